"""plan_items(steps=...): training on a window of the chain (Flow-GRPO), the discount γ^t still indexed by
the true step t and normalised over the window."""

import numpy as np
import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.objective import discount_weights, plan_items, sample_step_indices, step_window, window_weights


def _per_traj(plan, num_traj: int) -> torch.Tensor:
    return torch.zeros(num_traj, dtype=torch.float64).index_add_(0, plan.traj, plan.weight)


def test_exact_window_weights_hand_computed():
    # window [5, 10) of a 20-step chain, γ = 0.9: step 5 weighs γ^5 / Σ_{s=5..9} γ^s
    plan = plan_items(2, 2, 20, gamma=0.9, beta=2.0, estimator="exact", steps=range(5, 10))
    denom = sum(0.9**s for s in range(5, 10))
    want = [2.0 * 0.9**t / denom for t in range(5, 10)]
    assert plan.step.tolist() == list(range(5, 10)) * 4
    assert plan.traj.tolist() == [j for j in range(4) for _ in range(5)]
    torch.testing.assert_close(plan.weight, torch.tensor(want * 4, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(_per_traj(plan, 4), torch.full((4,), 2.0, dtype=torch.float64))


def test_exact_window_with_gaps_hand_computed():
    # γ = 0.5 on steps 2, 7, 11: 1/4, 1/128, 1/2048 (exact in binary) over their sum
    plan = plan_items(1, 2, 12, gamma=0.5, beta=1.0, estimator="exact", steps=[2, 7, 11])
    total = 1 / 4 + 1 / 128 + 1 / 2048
    want = torch.tensor([0.25 / total, (1 / 128) / total, (1 / 2048) / total] * 2, dtype=torch.float64)
    assert plan.step.tolist() == [2, 7, 11, 2, 7, 11]
    torch.testing.assert_close(plan.weight, want, rtol=1e-15, atol=0)
    # the window's p_t is the chain's p_t renormalised: same ratios between steps
    full = discount_weights(12, 0.5)
    torch.testing.assert_close(window_weights(torch.tensor([2, 7, 11]), 0.5), full[[2, 7, 11]] / full[[2, 7, 11]].sum())


def test_late_window_does_not_underflow():
    # γ^400 underflows float64 for γ = 0.01; the normalised weights do not
    p = window_weights(step_window(range(400, 403), 1000), 0.01)
    want = torch.tensor([1.0, 0.01, 0.0001], dtype=torch.float64) / 1.0101
    torch.testing.assert_close(p, want, rtol=1e-14, atol=0)


def test_sampled_draws_stay_in_window_and_follow_discount():
    window = [3, 4, 5, 9]
    gen = torch.Generator().manual_seed(0)
    plan = plan_items(5000, 2, 12, gamma=0.7, beta=3.0, estimator="sampled", k=4, generator=gen, steps=window)
    assert set(plan.step.tolist()) == set(window)  # every window step drawn, nothing else
    steps = plan.step.view(5000, 2, 4)
    assert (steps == steps[:, :1]).all()  # the trajectories of a group share their steps
    torch.testing.assert_close(plan.weight, torch.full((5000 * 2 * 4,), 3.0 / 4, dtype=torch.float64))
    freq = torch.stack([(steps[:, 0] == t).double().mean() for t in window])
    torch.testing.assert_close(freq, window_weights(torch.tensor(window), 0.7), atol=0.01, rtol=0)


def test_sampled_window_is_unbiased_for_exact_window():
    ratios = torch.randn(4, 10, dtype=torch.float64)  # [trajectories, steps]
    window = range(2, 8)
    exact = plan_items(2, 2, 10, gamma=0.8, beta=2.0, estimator="exact", steps=window)
    z_exact = _per_traj(type(exact)(exact.traj, exact.step, exact.weight * ratios[exact.traj, exact.step]), 4)
    gen = torch.Generator().manual_seed(1)
    acc = torch.zeros(4, dtype=torch.float64)
    reps = 3000
    for _ in range(reps):
        plan = plan_items(2, 2, 10, gamma=0.8, beta=2.0, estimator="sampled", k=3, generator=gen, steps=window)
        acc.index_add_(0, plan.traj, plan.weight * ratios[plan.traj, plan.step])
    torch.testing.assert_close(acc / reps, z_exact, atol=0.1, rtol=0)


def test_default_is_todays_plan_and_full_window_is_the_same():
    """No window: the plan (and the generator's draws) are what they were before windows existed; an
    explicit full window is meant to be the very same plan, bit for bit."""
    for estimator in ("exact", "sampled"):
        g_default, g_window, g_before = (torch.Generator().manual_seed(11) for _ in range(3))
        default = plan_items(3, 2, 8, gamma=0.9, beta=10.0, estimator=estimator, k=2, generator=g_default)
        full = plan_items(3, 2, 8, gamma=0.9, beta=10.0, estimator=estimator, k=2, generator=g_window,
                          steps=list(range(8)))
        for name in ("traj", "step", "weight"):
            assert torch.equal(getattr(default, name), getattr(full, name)), (estimator, name)
            assert getattr(default, name).dtype == getattr(full, name).dtype
        if estimator == "exact":
            assert torch.equal(default.weight, (10.0 * discount_weights(8, 0.9)).repeat(6))
        else:  # today's plan: one sample_step_indices draw per call, rows shared by the groups
            before = sample_step_indices(3, 8, 0.9, 2, g_before)
            assert torch.equal(default.step, before.repeat_interleave(2, dim=0).reshape(-1))
        # the generators advanced alike
        assert torch.equal(g_default.get_state(), g_window.get_state())
        assert torch.equal(g_default.get_state(), g_before.get_state())


@pytest.mark.parametrize("steps", [range(2, 5), (2, 3, 4), torch.tensor([2, 3, 4]), np.array([2, 3, 4]),
                                   [np.int64(2), 3, 4]])
def test_window_accepts_sequences_tensors_arrays(steps):
    assert step_window(steps, 5).tolist() == [2, 3, 4]
    plan = plan_items(1, 2, 5, gamma=0.9, beta=1.0, estimator="exact", steps=steps)
    assert plan.step.tolist() == [2, 3, 4, 2, 3, 4]


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([], r"steps=\[\] is an empty window; allowed: a non-empty subset of 0 <= t < 10"),
        (range(0), r"empty window"),
        ([-1, 2], r"step window \[-1, 2\] leaves the chain at t=-1; allowed: 0 <= t < 10"),
        ([5, 10], r"leaves the chain at t=10; allowed: 0 <= t < 10"),
        (range(5, 20), r"\[5, 6, …, 19\] \(15 steps\) leaves the chain at t=10"),
        ([5, 4], r"must be sorted ascending without repeats"),
        ([3, 3], r"must be sorted ascending without repeats"),
        ([1.0, 2.0], r"steps must be ints, got 1.0"),
        ([True], r"steps must be ints, got True"),
        ("0123", r"steps must be a sequence of generation step indices"),
        (5, r"steps must be a sequence"),
        (torch.tensor([[1, 2]]), r"1-D integer tensor"),
        (torch.tensor([1.0, 2.0]), r"1-D integer tensor"),
    ],
)
@pytest.mark.parametrize("estimator", ["exact", "sampled"])
def test_bad_windows_are_one_line_errors(steps, match, estimator):
    with pytest.raises(FastdenseError, match=match) as info:
        plan_items(2, 2, 10, gamma=0.9, beta=1.0, estimator=estimator, steps=steps)
    assert "\n" not in str(info.value)


def test_window_keeps_the_other_checks():
    with pytest.raises(FastdenseError, match="k="):
        plan_items(2, 2, 10, gamma=0.9, beta=1.0, k=0, steps=[1, 2])
    with pytest.raises(FastdenseError, match="gamma"):
        plan_items(2, 2, 10, gamma=1.5, beta=1.0, steps=[1, 2])
    with pytest.raises(FastdenseError, match="beta"):
        plan_items(2, 2, 10, gamma=0.9, beta=0.0, steps=[1, 2])
    with pytest.raises(FastdenseError, match="num_steps=0"):
        plan_items(2, 2, 0, gamma=0.9, beta=1.0, steps=[0])
