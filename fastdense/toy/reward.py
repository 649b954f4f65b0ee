"""The toy world's reward, ``color_fidelity``: how much of the shape has the colour the prompt
names. Registered under that name in :mod:`fastdense.rewards.registry` (``--reward
color_fidelity``), which imports this module only when the reward is asked for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdense.errors import FastdenseError
from fastdense.rewards.base import BaseReward
from fastdense.toy.colors import color_index, palette_tensor, parse_toy_prompt

__all__ = ["ColorFidelity"]


class ColorFidelity(BaseReward):
    """How much of the shape has the colour the toy prompt names, in [0, 1].

    For each image, with the prompt parsed by
    :func:`~fastdense.toy.colors.parse_toy_prompt`:

    0. If ``smooth > 1``, box-blur the image with a ``smooth x smooth`` window
       (against pixel noise; blurred edges stay valid by step 3; a shape a single
       pixel wide fades below ``fg_low`` and is not seen: use ``smooth=1`` for those).
    1. Background colour ``b``: the named one, or else the per-channel median of
       the border frame (``border`` x the short side, at least one pixel).
    2. Foreground weight of each pixel ``x``:
       ``w = clamp((|x - b| - fg_low) / (fg_high - fg_low), 0, 1)`` (RGB distance),
       a soft mask of the pixels that are clearly not background.
    3. Soft colour assignment over the palette. ``d_k(x)`` is the distance from ``x``
       to the RGB segment between ``b`` and ``palette_k``, relative to ``|x - b|``:
       ``r_k = d_k^2 / (|x - b|^2 + 0.01)``; then
       ``p(x) = softmax_k(-r_k / temperature)[named colour]``. Pixels that blend the
       shape colour with the background (anti-aliased or blurred edges) lie on the
       segment, so they count as the shape colour; colours between two palette
       entries get intermediate ``p`` (informative for RL).
    4. ``purity = sum(w * p) / sum(w)``, ``coverage = min(1, mean(w) / min_area)``,
       score ``= purity * coverage``.

    So a shape in the named colour scores ~1, a shape in another palette colour ~0,
    a shape smaller than ``min_area`` (a fraction of the image) is scaled down, and an
    image with no foreground (nothing differs from the background; also the case for
    a shape named in the background's colour) scores exactly 0. With a named
    background, a wrong background counts as off-colour foreground.
    """

    # a success scores 1 - O(1e-4) and its exact value moves with pixel noise: differences
    # below 0.01 are the same outcome (win rates count them as ties)
    tie_tolerance = 0.01

    name = "color_fidelity"

    def __init__(
        self,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        temperature: float = 0.03,
        fg_low: float = 0.25,
        fg_high: float = 0.5,
        min_area: float = 0.005,
        border: float = 0.05,
        smooth: int = 2,
    ):
        super().__init__(device, batch_size)
        if temperature <= 0 or not 0 <= fg_low < fg_high or min_area <= 0 or not 0 <= border < 0.5 or int(smooth) < 1:
            raise FastdenseError(
                "color_fidelity needs temperature > 0, 0 <= fg_low < fg_high, min_area > 0, "
                "0 <= border < 0.5, smooth >= 1"
            )
        self.temperature = float(temperature)
        self.fg_low, self.fg_high = float(fg_low), float(fg_high)
        self.min_area = float(min_area)
        self.border = float(border)
        self.smooth = int(smooth)
        self.eps = 0.01

    def estimate_background(self, images: Tensor) -> Tensor:
        """Per-channel median of the border frame: ``[B, 3]``."""
        b, _, h, w = images.shape
        k = max(1, round(self.border * min(h, w)))
        frame = torch.ones(h, w, dtype=torch.bool, device=images.device)
        frame[k : h - k, k : w - k] = False
        return images[:, :, frame].median(dim=2).values

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        parsed = [parse_toy_prompt(p) for p in prompts]
        palette = palette_tensor(images.device)  # [K, 3]
        target = torch.tensor([color_index(p.shape_color) for p in parsed], device=images.device)

        background = self.estimate_background(images)
        for i, p in enumerate(parsed):
            if p.background_color is not None:
                background[i] = palette[color_index(p.background_color)]

        if self.smooth > 1:  # box blur against pixel noise (blurred edges still lie on the segments)
            images = F.avg_pool2d(
                F.pad(images, [self.smooth // 2, (self.smooth - 1) // 2] * 2, mode="replicate"), self.smooth, stride=1
            )
        dist_bg = (images - background[:, :, None, None]).square().sum(1).sqrt()  # [B, H, W]
        weight = ((dist_bg - self.fg_low) / (self.fg_high - self.fg_low)).clamp(0.0, 1.0)

        # squared distance of each pixel to each segment [b, palette_k], relative to |x - b|^2:
        # |o - a s|^2 = |o|^2 - 2 a <s, o> + a^2 |s|^2 with o = x - b, s = palette_k - b, a in [0, 1]
        offset = images - background[:, :, None, None]  # [B, 3, H, W]
        span = palette[None] - background[:, None]  # [B, K, 3]
        span2 = span.square().sum(-1)[..., None, None]  # [B, K, 1, 1]
        dot = torch.einsum("bkc,bchw->bkhw", span, offset)  # [B, K, H, W]
        alpha = (dot / span2.clamp_min(1e-12)).clamp(0.0, 1.0)
        dist2 = dist_bg.square()[:, None]  # [B, 1, H, W]
        d2 = (dist2 - 2 * alpha * dot + alpha.square() * span2).clamp_min(0.0)
        d2 = d2 / (dist2 + self.eps)
        logp = torch.log_softmax(-d2 / self.temperature, dim=1)
        prob = logp.gather(1, target[:, None, None, None].expand(-1, 1, *d2.shape[2:])).squeeze(1).exp()

        mass = weight.sum((1, 2))
        purity = (weight * prob).sum((1, 2)) / mass.clamp_min(1e-12)
        coverage = (weight.mean((1, 2)) / self.min_area).clamp(max=1.0)
        return torch.where(mass > 0, purity * coverage, torch.zeros_like(mass))
