"""Rewards that need no weights: JPEG (in)compressibility, a hand-made aesthetic proxy, and mean
brightness (a smoke-test reward). All are deterministic. The toy world's ``color_fidelity`` lives
with the toy world (:mod:`fastdense.toy.reward`); ``ColorFidelity`` stays importable from here."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdense.errors import FastdenseError
from fastdense.rewards.base import BaseReward

__all__ = ["AestheticProxy", "Brightness", "JpegCompressibility", "JpegIncompressibility", "luma"]


def luma(images: Tensor) -> Tensor:
    """Rec. 601 luma ``[B, H, W]`` of ``[B, 3, H, W]`` RGB in [0, 1]."""
    r, g, b = images.unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


class Brightness(BaseReward):
    """Mean pixel value in [0, 1] over all channels and pixels; prompts are ignored.

    The simplest reward a policy can move: for smoke tests of a training set-up on any model."""

    name = "brightness"

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class JpegCompressibility(BaseReward):
    """DDPO's compressibility reward: ``-size_kB`` of the image saved as JPEG
    (PIL, ``quality=95``, 1 kB = 1000 bytes). Prompts are ignored; runs on the CPU."""

    name = "jpeg_compressibility"
    needs_pil = True
    sign = -1.0

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64, quality: int = 95):
        super().__init__(device, batch_size)
        if not 1 <= int(quality) <= 100:
            raise FastdenseError(f"{self.name}: quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def jpeg_kb(self, image) -> float:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.quality)
        return buf.tell() / 1000.0

    def score_batch(self, images: list, prompts: list[str]) -> Tensor:
        return torch.tensor([self.sign * self.jpeg_kb(im) for im in images], dtype=torch.float32)


class JpegIncompressibility(JpegCompressibility):
    """DDPO's incompressibility reward: ``+size_kB`` of the JPEG (quality 95)."""

    name = "jpeg_incompressibility"
    sign = 1.0


class AestheticProxy(BaseReward):
    """A weight-free stand-in for an aesthetic model, in [0, 1). Prompts are ignored.

    On the luma ``L`` (Rec. 601) and RGB of the image, area-downsampled so its short
    side is at most ``analysis_size``:

    - colourfulness ``C`` (Hasler & Suesstrunk 2003, on [0, 1] values):
      ``std(rg, yb) + 0.3 * mean(rg, yb)`` with ``rg = R - G``, ``yb = (R + G) / 2 - B``;
    - contrast ``K = std(L)`` (RMS contrast);
    - sharpness ``S = mean |grad L|`` (forward differences);
    - noise ``N``: Immerkaer's estimate, ``median |L * lap| / (6 * 0.6745)`` with the
      3x3 kernel ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (the median ignores edges).

    Each of ``C, K, S`` is squashed by ``x / (x + k)`` with ``k`` = (0.18, 0.2, 0.05)
    (a "moderately" colourful / contrasted / sharp image scores 1/2), the three are
    averaged with ``weights`` and multiplied by ``exp(-N / noise_scale)`` so that noise
    does not pass for detail. A flat image scores 0.
    """

    name = "aesthetic_proxy"
    scales = (0.18, 0.2, 0.05)

    def __init__(
        self,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        noise_scale: float = 0.05,
        analysis_size: int = 256,
    ):
        super().__init__(device, batch_size)
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0 or noise_scale <= 0:
            raise FastdenseError(
                "aesthetic_proxy needs 3 non-negative weights (colourfulness, contrast, sharpness) "
                "with a positive sum and noise_scale > 0"
            )
        self.weights = weights
        self.noise_scale = float(noise_scale)
        self.analysis_size = int(analysis_size)

    def features(self, images: Tensor) -> dict[str, Tensor]:
        """The raw ``colorfulness, contrast, sharpness, noise`` terms, each ``[B]``."""
        h, w = images.shape[-2:]
        if min(h, w) > self.analysis_size:
            s = self.analysis_size / min(h, w)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            images = F.interpolate(images, size=size, mode="area")
        r, g, b = images.unbind(1)
        rg = (r - g).flatten(1)
        yb = (0.5 * (r + g) - b).flatten(1)
        std = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
        mean = (rg.mean(1).square() + yb.mean(1).square()).sqrt()
        colorfulness = std + 0.3 * mean

        lum = luma(images)
        contrast = lum.flatten(1).std(1, unbiased=False)
        gx = lum[:, :-1, 1:] - lum[:, :-1, :-1]
        gy = lum[:, 1:, :-1] - lum[:, :-1, :-1]
        sharpness = (gx.square() + gy.square()).sqrt().flatten(1).mean(1) if gx.numel() else contrast * 0
        kernel = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=images.device)
        if min(h, w) >= 3:
            lap = F.conv2d(lum[:, None], kernel[None, None]).abs().flatten(1)
            noise = lap.median(1).values / (6.0 * 0.6745)
        else:
            noise = contrast * 0
        return {"colorfulness": colorfulness, "contrast": contrast, "sharpness": sharpness, "noise": noise}

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        f = self.features(images)
        terms = [f["colorfulness"], f["contrast"], f["sharpness"]]
        total = sum(w * x / (x + k) for w, x, k in zip(self.weights, terms, self.scales, strict=True))
        return total / sum(self.weights) * torch.exp(-f["noise"] / self.noise_scale)


def __getattr__(name: str):
    # ColorFidelity moved to the toy world; resolved by name, so the rewards never import it.
    if name == "ColorFidelity":
        from fastdense.data import resolve_provider

        return resolve_provider("fastdense.toy.reward:ColorFidelity")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
