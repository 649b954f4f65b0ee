"""The reward contract, the batching base class and weighted sums.

A reward maps a batch of images and their prompts to one float per image::

    reward(images, prompts) -> Tensor[B] float32, on the CPU

``images`` is ``[B, 3, H, W]``, float, values in [0, 1] (clamped), on any device;
``prompts`` is a sequence of ``B`` strings. Higher is better. Rewards never build an
autograd graph.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fastdense.errors import FastdenseError
from fastdense.images import to_pil_list as to_pil  # rewards' public name: [B, 3, H, W] -> a list of PIL images

__all__ = ["Reward", "BaseReward", "WeightedSum", "check_inputs", "to_pil"]


@runtime_checkable
class Reward(Protocol):
    """What the trainer and evaluator call. :class:`BaseReward` implements it."""

    #: where the reward computes (inputs are moved there batch by batch)
    device: torch.device
    #: how many images one forward pass scores
    batch_size: int
    #: True when :meth:`BaseReward.score_batch` takes PIL images instead of a tensor
    needs_pil: bool

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def check_inputs(images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, list[str]]:
    """Validate ``(images, prompts)``; return the images clamped to [0, 1] and detached."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise FastdenseError(f"rewards take images as a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise FastdenseError(f"rewards take float images in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise FastdenseError("rewards take a list of prompts (one per image), got a single string")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise FastdenseError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    return images.detach().clamp(0.0, 1.0), prompts


class BaseReward:
    """Batching, ``no_grad`` and output checks around :meth:`score_batch`.

    Subclasses set :attr:`name` and :attr:`needs_pil` and implement
    :meth:`score_batch`. ``__call__`` splits the input into chunks of
    :attr:`batch_size`, moves each chunk to :attr:`device` as float32 (or converts it
    to PIL images when :attr:`needs_pil`), and concatenates the scores as float32 on
    the CPU, so scores never depend on ``batch_size`` beyond float rounding.
    """

    name: str = "reward"
    # scores this close are the same outcome: win rates count such pairs as ties (fastdense.stats)
    tie_tolerance: float = 0.0
    needs_pil: bool = False

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 32):
        if int(batch_size) < 1:
            raise FastdenseError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)

    def score_batch(self, images: Any, prompts: list[str]) -> Tensor:
        """Score one chunk: ``images`` is ``[b, 3, H, W]`` float32 on :attr:`device`
        (or a list of ``b`` PIL images when :attr:`needs_pil`); return ``[b]`` scores."""
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        images, prompts = check_inputs(images, prompts)
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = to_pil(chunk) if self.needs_pil else chunk.to(self.device, torch.float32)
                scores = torch.as_tensor(self.score_batch(batch, prompts[start : start + self.batch_size]))
                if scores.numel() != chunk.shape[0]:
                    raise RuntimeError(
                        f"{type(self).__name__}.score_batch returned {scores.numel()} scores "
                        f"for {chunk.shape[0]} images"
                    )
                out.append(scores.detach().reshape(-1).to("cpu", torch.float32))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, batch_size={self.batch_size})"


def _reward_name(reward: Any) -> str:
    return str(getattr(reward, "name", type(reward).__name__))


class WeightedSum:
    """``sum_i weight_i * reward_i(images, prompts)``.

    Each term keeps its own device and batch size. :attr:`name` is the registry spec
    that rebuilds it (e.g. ``"color_fidelity=1,aesthetic_proxy=0.1"``).
    """

    needs_pil = False

    def __init__(self, terms: Iterable[tuple[Reward, float]]):
        checked: list[tuple[Reward, float]] = []
        for item in terms:
            try:
                reward, weight = item
            except (TypeError, ValueError):
                raise FastdenseError(f"WeightedSum takes (reward, weight) pairs, got {item!r}") from None
            if not callable(reward):
                raise FastdenseError(f"WeightedSum: {reward!r} is not a reward (not callable)")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise FastdenseError(f"WeightedSum: weight {weight!r} is not a number") from None
            if not math.isfinite(weight):
                raise FastdenseError(f"WeightedSum: weight {weight!r} is not finite")
            checked.append((reward, weight))
        if not checked:
            raise FastdenseError("WeightedSum needs at least one (reward, weight) pair")
        self.terms: tuple[tuple[Reward, float], ...] = tuple(checked)
        self.name = ",".join(f"{_reward_name(r)}={w:g}" for r, w in self.terms)
        first = self.terms[0][0]
        self.device = torch.device(getattr(first, "device", "cpu"))
        self.batch_size = min(int(getattr(r, "batch_size", 1 << 30)) for r, _ in self.terms)

    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Unweighted scores of every term, keyed by term name (for logging)."""
        images, prompts = check_inputs(images, prompts)
        out: dict[str, Tensor] = {}
        for reward, _ in self.terms:
            key = name = _reward_name(reward)
            k = 2
            while key in out:
                key, k = f"{name}#{k}", k + 1
            scores = torch.as_tensor(reward(images, prompts)).detach().to("cpu", torch.float32)
            if scores.shape != (images.shape[0],):
                raise RuntimeError(f"reward {name!r} returned shape {tuple(scores.shape)} for {images.shape[0]} images")
            out[key] = scores
        return out

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        parts = self.components(images, prompts)
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for (_, weight), scores in zip(self.terms, parts.values(), strict=True):
            total += weight * scores
        return total

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r})"
