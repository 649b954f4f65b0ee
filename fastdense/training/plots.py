"""The pictures of a run, drawn with matplotlib's Agg canvas (no display, no pyplot state):

* ``reward_curve.png``: the rollouts' reward per round (mean and max) and the held-out
  reward before and after training as labelled horizontal lines;
* ``eval_before.png`` / ``eval_after.png``: the plain evaluation grids (rows = prompts,
  columns = seeds; ``diffusers.utils.make_image_grid``);
* ``before_after.png``: the same evaluation images side by side, each row named by its
  prompt and each image titled with its seed and reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastdense.images import image_grid, to_pil  # noqa: F401  (to_pil: importable from here, as before)
from fastdense.pictures import new_figure, save_png, wrap

__all__ = ["before_after", "eval_grid", "grid_tiles", "new_figure", "reward_curve", "save_png", "to_pil"]

MAX_ROWS = 4  # prompts shown in the evaluation grids
MAX_COLS = 4  # seeds shown per prompt
MIN_TILE = 64  # small images (the toy model's 16 px) are scaled up to at least this many pixels


def eval_grid(images: torch.Tensor, n_prompts: int, n_seeds: int):
    """The evaluation images [P·S, 3, H, W] (prompt-major) → a PIL grid of the first
    ``MAX_ROWS`` prompts × ``MAX_COLS`` seeds, small images scaled up (nearest) to ``MIN_TILE`` px."""
    rows, cols = min(MAX_ROWS, n_prompts), min(MAX_COLS, n_seeds)
    h, w = images.shape[-2:]
    shown = [images[r * n_seeds + c] for r in range(rows) for c in range(cols)]
    return image_grid(shown, rows, cols, scale=max(1, MIN_TILE // max(h, w)))


def grid_tiles(grid, rows: int, cols: int) -> list:
    """The tiles of a grid made by :func:`eval_grid` (row-major), read back exactly."""
    w, h = grid.width // cols, grid.height // rows
    return [grid.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)) for r in range(rows) for c in range(cols)]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def reward_curve(history: Sequence[dict[str, Any]], before: float, after: float, path: str | Path,
                 size: tuple[int, int] = (640, 400)) -> Path:
    """Reward per round (rollout mean and max; rounds counted from 1) and the held-out reward:
    as a curve from round 0 (before training) through every round evaluated on the way
    (``heldout`` in a history entry) to the end when there are such rounds, else as horizontal
    lines before and after training. Written to ``path`` (PNG, ``size`` pixels)."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(*size)
    ax = fig.add_subplot()
    for key, label, colour, marker in (("reward_mean", "rollouts: mean", "tab:blue", "o"),
                                       ("reward_max", "rollouts: max", "tab:orange", "^")):
        points = [(h["round"] + 1, h[key]) for h in history if _finite(h.get(key))]
        if points:
            ax.plot([x for x, _ in points], [y for _, y in points], color=colour, marker=marker, label=label)
    last = max((h["round"] for h in history), default=0) + 1
    per_round = [(h["round"] + 1, h["heldout"]) for h in history if _finite(h.get("heldout"))]
    if per_round:
        points = [(0, before), *per_round] + ([(last, after)] if per_round[-1][0] != last else [])
        points = [(x, y) for x, y in points if _finite(y)]
        ax.plot([x for x, _ in points], [y for _, y in points], color="tab:green", marker="s",
                label=f"held-out: {before:.4f} → {after:.4f}")
    else:
        for value, label, colour, style, width in ((before, "held-out before", "tab:gray", ":", 2.5),
                                                   (after, "held-out after", "tab:green", "--", 1.5)):
            if _finite(value):  # dotted under dashed: both stay visible when they coincide
                ax.axhline(value, color=colour, linestyle=style, linewidth=width, label=f"{label}: {value:.4f}")
    ax.set_xlabel("round (0 = before training)" if per_round else "round")
    ax.set_ylabel("reward")
    ax.set_title("reward per round (rollouts) and on held-out prompts")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if history:
        ax.set_xlim(-0.5 if per_round else 0.5, last + 0.5)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return save_png(fig, path)


def before_after(prompts: Sequence[str], seeds: Sequence[int], before: Sequence | None,
                 before_scores: Sequence[float] | None, after: Sequence, after_scores: Sequence[float],
                 path: str | Path, before_mean: float | None = None, after_mean: float | None = None,
                 caption: str | None = None, after_title: str = "after training") -> Path:
    """One row per prompt: its images before training (left block) and after (right block), each
    titled with its seed and reward. ``before`` / ``after``: PIL tiles, row-major rows × seeds;
    ``before`` may be None (not available): that block is left out. ``caption``: a line under the
    figure (what the means are taken over). ``after_title``: the right block's header."""
    rows, cols = len(prompts), len(seeds)
    blocks = [("before training", before, before_scores, before_mean),
              (after_title, after, after_scores, after_mean)]
    blocks = [b for b in blocks if b[1] is not None]
    tile_in = max(1.35, 2.2 / cols)  # a block is at least wide enough for its header
    label_in, header_in, gap = 2.3, 0.75, 0.25  # inches; gap: between the blocks, in tiles
    width_ratios = []
    for b in range(len(blocks)):
        width_ratios += ([gap] if b else []) + [1.0] * cols
    width_in = label_in + tile_in * sum(width_ratios) + 0.15
    foot_in = 0.35 if caption else 0.1
    height_in = header_in + rows * (tile_in + 0.3) + foot_in
    fig = new_figure(round(100 * width_in), round(100 * height_in))
    grid = fig.add_gridspec(rows, len(width_ratios), width_ratios=width_ratios, left=label_in / width_in,
                            right=1 - 0.15 / width_in, top=1 - header_in / height_in, bottom=foot_in / height_in,
                            wspace=0.06, hspace=0.3 / tile_in)
    for b, (name, tiles, scores, mean) in enumerate(blocks):
        first_col = b * (cols + 1)
        axes = [[fig.add_subplot(grid[r, first_col + c]) for c in range(cols)] for r in range(rows)]
        x = (axes[0][0].get_position().x0 + axes[0][-1].get_position().x1) / 2
        header = name + (f"\nmean reward {mean:.3f}" if _finite(mean) else "")
        fig.text(x, 1 - 0.1 / height_in, header, ha="center", va="top", fontsize=10, fontweight="bold")
        for r in range(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.imshow(tiles[r * cols + c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                score = scores[r * cols + c] if scores is not None else None
                text = f"{float(score):.3f}" if _finite(score) else ("n/a" if score is None else "not finite")
                ax.set_title(f"seed {seeds[c]}: {text}", fontsize=8, pad=3)
                if b == 0 and c == 0:
                    ax.set_ylabel(wrap(prompts[r]), rotation=0, ha="right", va="center", fontsize=9,
                                  labelpad=8)
    if caption:
        fig.text(0.01, 0.08 / height_in, caption, ha="left", va="bottom", fontsize=8, color="dimgray")
    return save_png(fig, path)
