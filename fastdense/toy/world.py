"""The toy world: coloured shapes on coloured backgrounds, rendered from a seed.

Every image holds one shape (``SHAPES``) of one palette colour, of one size
(``SIZES``) at a random position, on a plain background of another palette colour.
Colours come from :data:`fastdense.toy.colors.PALETTE` (the single source of
truth, shared with the ``color_fidelity`` reward).

Caption grammar (a subset of what :func:`fastdense.toy.colors.parse_toy_prompt`
parses; :func:`caption` writes it through ``format_toy_prompt``)::

    caption := "a" [SIZE] COLOR SHAPE "on a" COLOR "background"
    SIZE    := "small" | "large"
    SHAPE   := "circle" | "square" | "triangle" | "ring" | "cross"
    COLOR   := a palette colour name (the two colours differ)

The position is not captioned (it is random in every image).

Images are ``[3, H, W]`` float32 in [0, 1], hard-edged by default (every pixel is a
palette colour exactly, so a perfect rendering scores 1.0 under ``color_fidelity``);
``antialias=k`` averages k x k sub-samples per pixel instead.

Held-out split: :data:`HELDOUT_TRIPLES` lists (shape colour, shape, background)
combinations that training never shows under any caption; :data:`HELDOUT_PROMPTS`
are their captions (one size each) and evaluation uses them with its own noise seeds.

The toy preset trains on :func:`train_prompts` and evaluates on :data:`HELDOUT_PROMPTS`
(``data.prompts_file: fastdense.toy.world:train_prompts``, ``data.eval_prompts_file:
fastdense.toy.world:HELDOUT_PROMPTS``: prompt providers, :mod:`fastdense.data`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from fastdense.errors import FastdenseError
from fastdense.toy.colors import COLOR_NAMES, PALETTE, format_toy_prompt, parse_toy_prompt

__all__ = [
    "SHAPES",
    "SIZES",
    "ARTICLES",
    "CAPTION_WORDS",
    "HELDOUT_TRIPLES",
    "HELDOUT_PROMPTS",
    "TRAIN_PROMPT_COUNT",
    "Scene",
    "caption",
    "is_heldout",
    "random_scene",
    "render",
    "render_batch",
    "scene_from_prompt",
    "train_prompts",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
SIZES: tuple[str, ...] = ("small", "large")
ARTICLES: tuple[str, ...] = ("a", "an", "the")

#: Every word a toy caption can contain (the tokenizer gets one token for each).
CAPTION_WORDS: tuple[str, ...] = (*ARTICLES, "on", "background", *SIZES, *COLOR_NAMES, *SHAPES)

#: Half-extent of a shape as a fraction of the image side, per size: (low, high).
_SIZE_RANGE = {"small": (0.16, 0.22), "large": (0.30, 0.40)}


def _heldout_triples() -> tuple[tuple[str, str, str], ...]:
    # Two combinations per colour, cycling through shapes and backgrounds, so every
    # colour, shape and background still appears in training in other combinations.
    out = []
    n = len(COLOR_NAMES)
    for i, color in enumerate(COLOR_NAMES):
        for j in range(2):
            shape = SHAPES[(2 * i + j) % len(SHAPES)]
            background = COLOR_NAMES[(i + 3 + 2 * j) % n]
            out.append((color, shape, background))
    return tuple(out)


#: (shape colour, shape, background colour) never rendered or captioned in training.
HELDOUT_TRIPLES: tuple[tuple[str, str, str], ...] = _heldout_triples()
_HELDOUT_SET = frozenset(HELDOUT_TRIPLES)

#: The evaluation prompts: one caption per held-out triple, sizes alternating.
HELDOUT_PROMPTS: tuple[str, ...] = tuple(
    format_toy_prompt(c, s, b, size=SIZES[k % 2]) for k, (c, s, b) in enumerate(HELDOUT_TRIPLES)
)


#: Training prompts of the toy preset: 256 of the 528 training captions (many prompts, few rollouts each).
TRAIN_PROMPT_COUNT = 256


def train_prompts(count: int = TRAIN_PROMPT_COUNT, seed: int = 0) -> list[str]:
    """``count`` distinct training captions (held-out combinations excluded), in the order a
    ``seed``-ed stream of random scenes first captions them."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    for _ in range(50 * count):
        out.setdefault(caption(random_scene(rng)))
        if len(out) >= count:
            break
    return list(out)


def is_heldout(color: str, shape: str, background: str) -> bool:
    """True when (shape colour, shape, background) is a held-out combination."""
    return (color, shape, background) in _HELDOUT_SET


@dataclass(frozen=True)
class Scene:
    """One toy image: ``cx, cy`` (centre) and ``radius`` (half-extent) are fractions of the side."""

    shape: str
    color: str
    background: str
    size: str
    cx: float
    cy: float
    radius: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise FastdenseError(f"unknown shape {self.shape!r}; allowed: {', '.join(SHAPES)}")
        if self.size not in SIZES:
            raise FastdenseError(f"unknown size {self.size!r}; allowed: {', '.join(SIZES)}")
        for name in (self.color, self.background):
            if name not in PALETTE:
                raise FastdenseError(f"unknown colour {name!r}; allowed: {', '.join(COLOR_NAMES)}")
        if self.color == self.background:
            raise FastdenseError(f"shape and background are both {self.color!r}; they must differ")


def caption(scene: Scene, *, with_size: bool = True, color: str | None = None) -> str:
    """The caption of ``scene``; ``color`` overrides the named shape colour (wrong captions)."""
    size = scene.size if with_size else None
    return format_toy_prompt(color or scene.color, scene.shape, scene.background, size=size)


def _place(rng: np.random.Generator, size: str) -> tuple[float, float, float]:
    low, high = _SIZE_RANGE[size]
    radius = float(rng.uniform(low, high))
    margin = radius + 0.02
    cx = float(rng.uniform(margin, 1.0 - margin))
    cy = float(rng.uniform(margin, 1.0 - margin))
    return cx, cy, radius


def random_scene(rng: np.random.Generator, *, allow_heldout: bool = False) -> Scene:
    """A uniformly random scene (held-out combinations excluded unless ``allow_heldout``)."""
    n = len(COLOR_NAMES)
    while True:
        color = COLOR_NAMES[int(rng.integers(n))]
        background = COLOR_NAMES[int(rng.integers(n))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if background == color or (not allow_heldout and is_heldout(color, shape, background)):
            continue
        break
    size = SIZES[int(rng.integers(len(SIZES)))]
    cx, cy, radius = _place(rng, size)
    return Scene(shape, color, background, size, cx, cy, radius)


def scene_from_prompt(prompt: str, rng: np.random.Generator) -> Scene:
    """A scene matching ``prompt`` (random position; random size/background where unnamed)."""
    color, background, shape = parse_toy_prompt(prompt)
    if shape not in SHAPES:
        raise FastdenseError(f"toy prompt {prompt!r} names no shape; allowed: {', '.join(SHAPES)}")
    words = re.findall(r"[a-z]+", prompt.lower())
    named = [s for s in SIZES if s in words]
    size = named[0] if named else SIZES[int(rng.integers(len(SIZES)))]
    if background is None:
        others = [c for c in COLOR_NAMES if c != color]
        background = others[int(rng.integers(len(others)))]
    cx, cy, radius = _place(rng, size)
    return Scene(shape, color, background, size, cx, cy, radius)


def _mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-test on offsets from the centre (same units as ``r``); y grows downwards."""
    if shape == "circle":
        return dx.square() + dy.square() <= r.square()
    if shape == "square":
        h = 0.85 * r
        return (dx.abs() <= h) & (dy.abs() <= h)
    if shape == "ring":
        d2 = dx.square() + dy.square()
        return (d2 <= r.square()) & (d2 >= (0.5 * r).square())
    if shape == "cross":
        arm = 0.32 * r
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    if shape == "triangle":
        # Upright isosceles triangle: apex (0, -r), base from (-r, 0.8r) to (r, 0.8r).
        base = dy <= 0.8 * r
        t = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return base & (t >= 0) & (dx.abs() <= t * r)
    raise FastdenseError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def render(scene: Scene, resolution: int = 16, *, antialias: int = 1) -> torch.Tensor:
    """``[3, resolution, resolution]`` float32 in [0, 1]; a pure function of ``scene``."""
    if resolution < 4:
        raise FastdenseError(f"resolution={resolution} is not allowed; allowed: >= 4")
    if antialias < 1:
        raise FastdenseError(f"antialias={antialias} is not allowed; allowed: >= 1")
    k = int(antialias)
    n = resolution * k
    # Sample points at sub-pixel centres, in units of the image side.
    coords = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    r = torch.tensor(scene.radius, dtype=torch.float64)
    inside = _mask(scene.shape, xx - scene.cx, yy - scene.cy, r).to(torch.float64)
    if k > 1:
        inside = inside.reshape(resolution, k, resolution, k).mean((1, 3))
    fg = torch.tensor(PALETTE[scene.color], dtype=torch.float64)[:, None, None]
    bg = torch.tensor(PALETTE[scene.background], dtype=torch.float64)[:, None, None]
    image = bg + (fg - bg) * inside[None]
    return image.to(torch.float32)


def render_batch(scenes: list[Scene], resolution: int = 16, *, antialias: int = 1) -> torch.Tensor:
    """``[B, 3, resolution, resolution]`` float32 in [0, 1]."""
    if not scenes:
        raise FastdenseError("render_batch needs at least one scene")
    return torch.stack([render(s, resolution, antialias=antialias) for s in scenes])
