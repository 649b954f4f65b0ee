"""The dense-reward objective (DESIGN.md §1): discount weights, step estimators and
the Plackett–Luce / ListMLE loss over a comparison group.

Per trajectory j the logit is z_j = Σ_items weight_i · clip(ℓ_i); this module
chooses the items and their weights (``exact``: every step with β·p_t;
``sampled``: K steps drawn ∝ p_t, shared by the trajectories of a group, each
with β/K), and turns a group's logits and rewards into a loss. The per-item
ratios themselves come from ``fastdense.kernels.log_ratio``.

A step window (Flow-GRPO trains on a subset of the chain) restricts the items to
the window's steps, with p_t ∝ γ^t normalised over the window and t still the
true generation step.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdense.errors import FastdenseError

ESTIMATORS = ("exact", "sampled")


def discount_weights(num_steps: int, gamma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """p_t = γ^t / Σ_s γ^s for t = 0..T-1 (t = 0 is the first step, from noise). γ = 1 is uniform."""
    if num_steps < 1:
        raise FastdenseError(f"num_steps={num_steps} is not allowed; it must be >= 1")
    if not 0.0 < gamma <= 1.0:
        raise FastdenseError(f"gamma={gamma} is not allowed; it must be in (0, 1]")
    powers = torch.full((num_steps,), float(gamma), dtype=torch.float64).pow(torch.arange(num_steps))
    return (powers / powers.sum()).to(dtype)


def _describe(steps: list) -> str:
    return repr(steps) if len(steps) <= 8 else f"[{steps[0]!r}, {steps[1]!r}, …, {steps[-1]!r}] ({len(steps)} steps)"


def step_window(steps: Sequence[int] | torch.Tensor, num_steps: int) -> torch.Tensor:
    """The window as a [n] int64 tensor, checked: non-empty, strictly ascending, inside [0, num_steps)."""
    if isinstance(steps, torch.Tensor):
        if steps.dim() != 1 or steps.dtype.is_floating_point or steps.dtype == torch.bool or steps.is_complex():
            raise FastdenseError(
                f"steps must be a 1-D integer tensor of generation step indices, got {steps.dtype} "
                f"of shape {tuple(steps.shape)}"
            )
        values = steps.tolist()
    elif isinstance(steps, Sequence) and not isinstance(steps, (str, bytes)):
        values = list(steps)
    elif callable(getattr(steps, "tolist", None)) and getattr(steps, "ndim", None) == 1:  # a numpy array
        values = steps.tolist()
    else:
        raise FastdenseError(f"steps must be a sequence of generation step indices, got {steps!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise FastdenseError(f"steps must be ints, got {bad[0]!r} in {_describe(values)}")
    values = [int(v) for v in values]
    if not values:
        raise FastdenseError(f"steps=[] is an empty window; allowed: a non-empty subset of 0 <= t < {num_steps}")
    outside = [v for v in values if not 0 <= v < num_steps]
    if outside:
        raise FastdenseError(
            f"step window {_describe(values)} leaves the chain at t={outside[0]}; allowed: 0 <= t < {num_steps}"
        )
    if any(b <= a for a, b in zip(values[:-1], values[1:], strict=True)):
        raise FastdenseError(f"steps {_describe(values)} must be sorted ascending without repeats")
    return torch.tensor(values, dtype=torch.int64)


def window_weights(window: torch.Tensor, gamma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """p_t = γ^t / Σ_{s∈window} γ^s for the (checked, ascending) ``window``, indexed by the true step t.

    Exponents are taken relative to the window's first step (the same normalised weights, without
    underflow for late windows); for the full window 0..T-1 this is :func:`discount_weights` bit for bit.
    """
    if not 0.0 < gamma <= 1.0:
        raise FastdenseError(f"gamma={gamma} is not allowed; it must be in (0, 1]")
    powers = torch.full((window.shape[0],), float(gamma), dtype=torch.float64).pow(window - window[0])
    return (powers / powers.sum()).to(dtype)


def sample_step_indices(
    num_groups: int, num_steps: int, gamma: float, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[num_groups, k] step indices drawn i.i.d. ∝ p_t; one row is shared by a whole group."""
    if k < 1:
        raise FastdenseError(f"k={k} is not allowed; it must be >= 1")
    p = discount_weights(num_steps, gamma)
    return torch.multinomial(p.expand(num_groups, -1), k, replacement=True, generator=generator)


@dataclass(frozen=True)
class ItemPlan:
    """Which (trajectory, step) items enter the loss, and their weights.

    traj: [N] int64 trajectory index (into the batch's trajectories), step: [N] int64,
    weight: [N] float64 (β·p_t for ``exact``, β/K for ``sampled``).
    """

    traj: torch.Tensor
    step: torch.Tensor
    weight: torch.Tensor


def plan_items(
    num_groups: int,
    group_size: int,
    num_steps: int,
    *,
    gamma: float,
    beta: float,
    estimator: str = "sampled",
    k: int = 1,
    generator: torch.Generator | None = None,
    steps: Sequence[int] | torch.Tensor | None = None,
) -> ItemPlan:
    """Items for ``num_groups`` groups of ``group_size`` trajectories (trajectory j of group g is g·G + j).

    ``steps``: an optional window of generation steps (ascending indices in [0, num_steps)) that the
    items are drawn from: ``exact`` sums over the window, ``sampled`` draws ∝ γ^t normalised over the
    window (t the true step). None is the whole chain; an explicit full window gives the same plan, draws
    included.
    """
    if estimator not in ESTIMATORS:
        raise FastdenseError(f"estimator={estimator!r} is not allowed; allowed: {', '.join(ESTIMATORS)}")
    if beta <= 0:
        raise FastdenseError(f"beta={beta} is not allowed; it must be > 0")
    if group_size < 2:
        raise FastdenseError(f"group_size={group_size} is not allowed; a comparison needs >= 2 trajectories")
    num_traj = num_groups * group_size
    if steps is not None:
        if num_steps < 1:
            raise FastdenseError(f"num_steps={num_steps} is not allowed; it must be >= 1")
        window = step_window(steps, num_steps)
        p = window_weights(window, gamma)
        if estimator == "exact":
            traj = torch.arange(num_traj).repeat_interleave(window.shape[0])
            step = window.repeat(num_traj)
            weight = (beta * p).repeat(num_traj)
            return ItemPlan(traj, step, weight)
        if k < 1:
            raise FastdenseError(f"k={k} is not allowed; it must be >= 1")
        drawn = window[torch.multinomial(p.expand(num_groups, -1), k, replacement=True, generator=generator)]
        step = drawn.repeat_interleave(group_size, dim=0).reshape(-1)  # trajectories of a group share steps
        traj = torch.arange(num_traj).repeat_interleave(k)
        weight = torch.full((num_traj * k,), beta / k, dtype=torch.float64)
        return ItemPlan(traj, step, weight)
    if estimator == "exact":
        p = discount_weights(num_steps, gamma)
        traj = torch.arange(num_traj).repeat_interleave(num_steps)
        step = torch.arange(num_steps).repeat(num_traj)
        weight = (beta * p).repeat(num_traj)
        return ItemPlan(traj, step, weight)
    steps = sample_step_indices(num_groups, num_steps, gamma, k, generator)  # [groups, k]
    step = steps.repeat_interleave(group_size, dim=0).reshape(-1)  # trajectories of a group share steps
    traj = torch.arange(num_traj).repeat_interleave(k)
    weight = torch.full((num_traj * k,), beta / k, dtype=torch.float64)
    return ItemPlan(traj, step, weight)


def ranking_from_rewards(rewards: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[groups, G] indices ordering each group best-first; ties broken uniformly at random."""
    noise = torch.rand(rewards.shape, generator=generator, dtype=torch.float64).to(rewards.device)
    # Sort by reward, then by random key: a stable sort on the key first, then on the reward.
    by_key = torch.argsort(noise, dim=1)
    by_reward = torch.argsort(torch.gather(rewards, 1, by_key), dim=1, descending=True, stable=True)
    return torch.gather(by_key, 1, by_reward)


def listmle_loss(logits: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
    """Plackett–Luce negative log-likelihood of ``ranking`` (best first) under ``logits``, mean over groups.

    logits, ranking: [groups, G]. For G = 2 this is Bradley–Terry, -log σ(z_w − z_l).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise FastdenseError(f"logits have shape {tuple(logits.shape)}; expected [groups, G] with G >= 2")
    ordered = torch.gather(logits, 1, ranking)
    # log Σ_{j>=k} exp(z_(j)) for every k, by a reversed cumulative logsumexp
    tail_lse = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
    return (tail_lse - ordered)[:, :-1].sum(1).mean()
