import math

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.objective import (
    discount_weights,
    listmle_loss,
    plan_items,
    ranking_from_rewards,
    sample_step_indices,
)


def test_discount_weights_hand_computed():
    p = discount_weights(3, 0.5)
    # γ^t = 1, 0.5, 0.25 → sum 1.75
    torch.testing.assert_close(p, torch.tensor([1 / 1.75, 0.5 / 1.75, 0.25 / 1.75], dtype=torch.float64))
    torch.testing.assert_close(discount_weights(4, 1.0), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.01, float("nan")])
def test_discount_weights_rejects_bad_gamma(gamma):
    with pytest.raises(FastdenseError, match="gamma"):
        discount_weights(5, gamma)


def test_bradley_terry_is_listmle_for_two():
    z = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    ranking = torch.tensor([[0, 1], [1, 0]])
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(1.5, dtype=torch.float64))
                 + torch.nn.functional.logsigmoid(torch.tensor(-1.5, dtype=torch.float64))) / 2
    torch.testing.assert_close(listmle_loss(z, ranking), expected)


def test_listmle_hand_computed_three():
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ranking = torch.tensor([[2, 0, 1]])
    # P = e^-1/(e^1+e^0+e^-1) · e^1/(e^1+e^0)
    want = -(-1 - math.log(math.e + 1 + math.exp(-1)) + 1 - math.log(math.e + 1))
    loss = listmle_loss(z, ranking)
    assert abs(loss.item() - want) < 1e-12
    # gradient agrees with autograd through the explicit formula
    z2 = z.detach().clone().requires_grad_(True)
    explicit = -(z2[0, 2] - torch.logsumexp(z2[0], 0) + z2[0, 0] - torch.logsumexp(z2[0, :2], 0))
    loss.backward()
    explicit.backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_ranking_sorts_by_reward_and_breaks_ties_at_random():
    rewards = torch.tensor([[0.1, 0.9, 0.5]])
    assert ranking_from_rewards(rewards).tolist() == [[1, 2, 0]]
    tied = torch.tensor([[1.0, 1.0, 0.0]])
    firsts = {ranking_from_rewards(tied, torch.Generator().manual_seed(s))[0, 0].item() for s in range(40)}
    assert firsts == {0, 1}
    for s in range(10):
        assert ranking_from_rewards(tied, torch.Generator().manual_seed(s))[0, 2].item() == 2


def test_plan_exact_weights_sum_to_beta_per_trajectory():
    plan = plan_items(2, 3, 5, gamma=0.9, beta=10.0, estimator="exact")
    assert plan.traj.shape == plan.step.shape == plan.weight.shape == (2 * 3 * 5,)
    per_traj = torch.zeros(6, dtype=torch.float64).index_add_(0, plan.traj, plan.weight)
    torch.testing.assert_close(per_traj, torch.full((6,), 10.0, dtype=torch.float64))


def test_plan_sampled_shares_steps_within_group():
    plan = plan_items(4, 3, 50, gamma=0.9, beta=12.5, estimator="sampled", k=2,
                      generator=torch.Generator().manual_seed(0))
    steps = plan.step.view(4, 3, 2)
    assert (steps == steps[:, :1]).all()
    torch.testing.assert_close(plan.weight, torch.full((24,), 12.5 / 2, dtype=torch.float64))


def test_sampled_steps_follow_discount():
    idx = sample_step_indices(20000, 5, 0.5, 1, torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(idx, minlength=5).double() / idx.numel()
    torch.testing.assert_close(freq, discount_weights(5, 0.5), atol=0.015, rtol=0)


def test_sampled_estimator_is_unbiased_for_exact():
    ratios = torch.randn(6, 8, dtype=torch.float64)  # [trajectories, steps]
    exact = plan_items(2, 3, 8, gamma=0.8, beta=2.0, estimator="exact")
    contrib = exact.weight * ratios[exact.traj, exact.step]
    z_exact = torch.zeros(6, dtype=torch.float64).index_add_(0, exact.traj, contrib)
    gen = torch.Generator().manual_seed(1)
    acc = torch.zeros(6, dtype=torch.float64)
    reps = 4000
    for _ in range(reps):
        plan = plan_items(2, 3, 8, gamma=0.8, beta=2.0, estimator="sampled", k=3, generator=gen)
        acc.index_add_(0, plan.traj, plan.weight * ratios[plan.traj, plan.step])
    torch.testing.assert_close(acc / reps, z_exact, atol=0.08, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="bogus"), "estimator"),
    (dict(beta=0.0), "beta"),
    (dict(k=0), "k="),
])
def test_plan_rejects_bad_values(kwargs, match):
    base = dict(gamma=0.9, beta=1.0, estimator="sampled", k=1)
    base.update(kwargs)
    with pytest.raises(FastdenseError, match=match):
        plan_items(2, 2, 5, **base)


def test_group_of_one_is_refused():
    with pytest.raises(FastdenseError, match="group_size"):
        plan_items(2, 1, 5, gamma=0.9, beta=1.0)
