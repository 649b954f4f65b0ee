"""Evaluation: a policy's samples on fixed prompts × fixed noise seeds, scored by a reward.

Used by the trainer (held-out reward before and after training, :mod:`fastdense.training.outputs`)
and by ``fastdense toy eval`` (:func:`fastdense.toy.fidelity_scores`). Sample ``(i, j)`` is
``prompts[i]`` with noise seed ``seeds[j]``; the batch is prompt-major. The same sampler, seeds,
micro-batching and decode batch size give the same images and scores, bit for bit.

:func:`generate` is the same loop for several rewards at once, keeping only the images asked
for and, optionally, decoded x̂0 pictures of some samples (``fastdense eval``,
:mod:`fastdense.comparison`); its scores equal :func:`evaluate`'s for each reward, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    from fastdense.models.loading import PipelineParts
    from fastdense.rewards.base import Reward
    from fastdense.sampler import Sampler

__all__ = ["Evaluation", "Generation", "evaluate", "generate"]


class Evaluation(NamedTuple):
    """The mean reward over the finite scores, the images [P·S, 3, H, W] (prompt-major, on the
    CPU) and each image's reward [P·S] (float64, NaN where the reward was not finite)."""

    reward: float
    images: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def evaluate(
    sampler: Sampler,
    parts: PipelineParts,
    reward: Reward,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    guidance: float,
    eta: float,
    sampler_kind: str | None = None,
    decode_batch_size: int = 8,
) -> Evaluation:
    """Sample every prompt with every seed (``num_steps`` of ``sampler_kind``, the scheduler's own by
    default; CFG ``guidance``, ``eta``), decode
    (the VAE in batches of ``decode_batch_size``) and score with ``reward``: :func:`generate` with
    one reward, keeping every image."""
    total = len(prompts) * len(seeds)
    out = generate(sampler, parts, {"reward": reward}, prompts, seeds, num_steps=num_steps, guidance=guidance,
                   eta=eta, sampler_kind=sampler_kind, decode_batch_size=decode_batch_size, keep=range(total))
    scores = out.scores["reward"]
    finite = scores[torch.isfinite(scores)]
    return Evaluation(float(finite.mean()) if finite.numel() else float("nan"), out.images, scores)


class Generation(NamedTuple):
    """Per reward, each sample's score [P·S] (float64, prompt-major, as the reward gave it); the
    images of the ``keep`` samples [K, 3, H, W] and the decoded x̂0 pictures of the ``x0_keep``
    samples at the ``x0_steps`` [X, len(x0_steps), 3, H, W] (None without x0 steps); all on the CPU."""

    scores: dict[str, torch.Tensor]
    images: torch.Tensor
    x0_images: torch.Tensor | None


def _check_indices(indices: Sequence[int], total: int, what: str) -> list[int]:
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise FastdenseError(f"{what} has sample index {bad[0]}; allowed: 0 <= index < {total}")
    return indices


@torch.no_grad()
def generate(
    sampler: Sampler,
    parts: PipelineParts,
    rewards: Mapping[str, Reward],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_steps: int,
    guidance: float,
    eta: float,
    sampler_kind: str | None = None,
    decode_batch_size: int = 8,
    keep: Sequence[int] = (),
    x0_steps: Sequence[int] = (),
    x0_keep: Sequence[int] = (),
    progress: Callable[[int], None] | None = None,
) -> Generation:
    """:func:`evaluate` with several ``rewards`` (name → reward) in one sampler call: every prompt
    with every seed, prompt-major (sample ``i·S + j``). Only the images of the samples ``keep``
    are returned, and the x̂0 predictions at ``x0_steps`` of the samples ``x0_keep`` (decoded),
    so a large evaluation holds no more pictures than it shows. ``progress(n)``: the sampler's."""
    from fastdense.sampler import decode

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        raise FastdenseError(f"an evaluation needs at least one prompt and one seed, got {len(prompts)} prompt(s) "
                             f"and {len(seeds)} seed(s)")
    if not rewards:
        raise FastdenseError("an evaluation needs at least one reward")
    total = len(prompts) * len(seeds)
    keep, x0_keep = _check_indices(keep, total, "keep"), _check_indices(x0_keep, total, "x0_keep")
    x0_steps = tuple(int(t) for t in x0_steps) if x0_keep else ()
    batch_prompts = [p for p in prompts for _ in seeds]
    # record=False: the final latents only (two slots); the same arithmetic as a recorded chain, bit for bit
    traj = sampler.sample(batch_prompts, num_steps=num_steps, guidance=guidance, eta=eta, sampler=sampler_kind,
                          seed=[s for _ in prompts for s in seeds], record_x0_steps=x0_steps,
                          progress=progress, record=False)
    images = decode(parts, traj.final_latents, batch_size=decode_batch_size)
    scores = {name: reward(images, batch_prompts).double().cpu() for name, reward in rewards.items()}
    x0_images = None
    if x0_steps:
        x0 = traj.x0[x0_keep]  # [X, K, C, h, w]
        flat = decode(parts, x0.flatten(0, 1), batch_size=decode_batch_size)
        x0_images = flat.reshape(len(x0_keep), len(x0_steps), *flat.shape[1:]).cpu()
    return Generation(scores, images[keep].cpu(), x0_images)
