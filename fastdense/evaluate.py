"""Evaluation: a policy's samples on fixed prompts × fixed noise seeds, scored by a reward.

Used by the trainer (held-out reward before and after training, :mod:`fastdense.training.outputs`)
and by ``fastdense toy eval`` (:func:`fastdense.toy.fidelity_scores`). Sample ``(i, j)`` is
``prompts[i]`` with noise seed ``seeds[j]``; the batch is prompt-major. The same sampler, seeds,
micro-batching and decode batch size give the same images and scores, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    from fastdense.models.loading import PipelineParts
    from fastdense.rewards.base import Reward
    from fastdense.sampler import Sampler

__all__ = ["Evaluation", "evaluate"]


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
    decode_batch_size: int = 8,
) -> Evaluation:
    """Sample every prompt with every seed (DDIM ``num_steps``, CFG ``guidance``, ``eta``), decode
    (the VAE in batches of ``decode_batch_size``) and score with ``reward``."""
    from fastdense.sampler import decode

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        raise FastdenseError(f"an evaluation needs at least one prompt and one seed, got {len(prompts)} prompt(s) "
                             f"and {len(seeds)} seed(s)")
    batch_prompts = [p for p in prompts for _ in seeds]
    traj = sampler.sample(batch_prompts, num_steps=num_steps, guidance=guidance, eta=eta,
                          seed=[s for _ in prompts for s in seeds])
    images = decode(parts, traj.final_latents, batch_size=decode_batch_size)
    scores = reward(images, batch_prompts).double()
    finite = scores[torch.isfinite(scores)]
    return Evaluation(float(finite.mean()) if finite.numel() else float("nan"), images.cpu(), scores.cpu())
