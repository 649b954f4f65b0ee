"""Labelled image grids drawn on matplotlib's Agg canvas (no display, no pyplot state).

:func:`grid_figure` lays out ``rows × cols`` tiles with column headers on top, a label left of
each row and an optional title above each tile; sizes are computed in pixels, so every label
fits whatever the number of rows. Two pictures use it:

* the side-by-side comparison of ``fastdense eval`` (a row per (prompt, seed), a column per model,
  each tile titled with its reward; :mod:`fastdense.comparison`);
* :func:`trajectory_figure`: the decoded x̂0 prediction at chosen steps, then the final image,
  columns headed ``step t`` and ``final`` (``fastdense eval``: a row per model;
  ``fastdense sample --trajectory``: one row).

Small images (the toy model's 16×16) are scaled up to ``MIN_TILE_PX`` with nearest-neighbour
interpolation, so their pixels stay sharp; large ones are shown at ``MAX_TILE_PX``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

from torch import Tensor

from fastdense.errors import FastdenseError
from fastdense.images import to_pil

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ["grid_figure", "new_figure", "save_png", "tile_pixels", "trajectory_figure", "trajectory_labels", "wrap"]

Tile = Union[Tensor, "Image.Image"]  # a [3, H, W] tensor in [0, 1] or a PIL image

DPI = 100
MIN_TILE_PX = 128  # small images are enlarged (nearest neighbour) to at least this many pixels
MAX_TILE_PX = 256  # large images are shown this big (a grid of 512 px images would be huge)
_CHAR_PX = 6.5  # width of one character at the label font size (9 pt at 100 dpi), roughly
_SMALL_CHAR_PX = 5.8  # at the tile titles' 8 pt
_BOLD_CHAR_PX = 8.0  # at the headers' 10 pt bold
_LINE_PX = 14  # height of one line of 8-10 pt text, with its spacing
_GAP_PX = 8


def wrap(text: str, width: int = 28, lines: int = 4) -> str:
    """``text`` wrapped to ``width`` characters, at most ``lines`` lines (the last one cut with …)."""
    wrapped = textwrap.wrap(text, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def tile_pixels(height: int, width: int) -> int:
    """The side of a shown tile: a small image enlarged by a whole factor to at least ``MIN_TILE_PX``
    (every source pixel the same size), a large one shown at ``MAX_TILE_PX``."""
    side = max(int(height), int(width), 1)
    if side >= MIN_TILE_PX:
        return min(side, MAX_TILE_PX)
    return side * math.ceil(MIN_TILE_PX / side)


def trajectory_labels(steps: Sequence[int]) -> list[str]:
    """Column headers of a trajectory picture: ``step t`` per recorded step, then ``final``."""
    return [f"step {int(t)}" for t in steps] + ["final"]


def _lines(text: str | None) -> int:
    return 0 if not text else text.count("\n") + 1


def _width(texts: Sequence[str | None]) -> int:
    return max((len(line) for t in texts if t for line in t.splitlines()), default=0)


def new_figure(width_px: int, height_px: int, dpi: int = DPI) -> Figure:
    """A matplotlib figure of that many pixels on its own Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def grid_figure(
    tiles: Sequence[Sequence[Tile]],
    *,
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    titles: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
) -> Figure:
    """``tiles[r][c]`` in a grid; ``col_labels`` (bold) head the columns, ``row_labels`` stand left of
    the rows, ``titles[r][c]`` above each tile, ``title`` above everything. Returns the figure
    (:func:`save_png` writes it); its texts can be read back with ``fig.texts`` / ``ax.get_title()``."""
    import numpy as np

    rows, cols = len(tiles), len(tiles[0]) if tiles else 0
    if rows == 0 or cols == 0 or any(len(row) != cols for row in tiles):
        raise FastdenseError(f"a picture grid needs rows of equal, nonzero length, got {[len(r) for r in tiles]}")
    for name, labels, count in (("col_labels", col_labels, cols), ("row_labels", row_labels, rows)):
        if labels is not None and len(labels) != count:
            raise FastdenseError(f"{name}: {len(labels)} labels for {count} {name[:3]}s")
    images = [[to_pil(t) if isinstance(t, Tensor) else t for t in row] for row in tiles]
    h, w = images[0][0].height, images[0][0].width
    tile = tile_pixels(h, w)
    # a column is as wide as its tile, its tiles' titles (8 pt) and its header (10 pt bold)
    col_px = max(tile, round(_width([t for row in titles or () for t in row]) * _SMALL_CHAR_PX),
                 round(_width(col_labels or ()) * _BOLD_CHAR_PX))
    title_px = max((_lines(t) for row in titles for t in row), default=0) * _LINE_PX if titles else 0
    header_px = _lines(title) * (_LINE_PX + 2) + max((_lines(c) for c in col_labels or ()), default=0) * _LINE_PX
    left_px = _GAP_PX + (round(_width(row_labels or ()) * _CHAR_PX) + _GAP_PX if row_labels else 0)
    row_px = tile + title_px + _GAP_PX
    width_px = max(left_px + cols * (col_px + _GAP_PX), round(_width([title]) * _CHAR_PX) + 2 * _GAP_PX)
    height_px = _GAP_PX + header_px + rows * row_px
    fig = new_figure(width_px, height_px)
    if title:
        fig.text(0.5, 1 - 4 / height_px, title, ha="center", va="top", fontsize=10)
    for c in range(cols):
        x = left_px + c * (col_px + _GAP_PX) + (col_px - tile) / 2  # the tile, centred in its column
        if col_labels is not None:
            fig.text((x + tile / 2) / width_px, 1 - (_GAP_PX + header_px - 2) / height_px, col_labels[c],
                     ha="center", va="bottom", fontsize=10, fontweight="bold")
        for r in range(rows):
            y = _GAP_PX + header_px + r * row_px + title_px  # top edge of the image, from the top
            ax = fig.add_axes((x / width_px, 1 - (y + tile) / height_px, tile / width_px, tile / height_px))
            small = max(h, w) < tile  # enlarge with nearest neighbour; shrink smoothly
            ax.imshow(np.asarray(images[r][c]), interpolation="nearest" if small else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if titles is not None:
                ax.set_title(titles[r][c], fontsize=8, pad=2)
            if row_labels is not None and c == 0:
                pad_px = (col_px - tile) / 2 + _GAP_PX / 2  # labelpad is in points
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9,
                              labelpad=pad_px * 72 / DPI)
    return fig


def trajectory_figure(
    rows: Sequence[Sequence[Tile]],
    steps: Sequence[int],
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """x̂0 trajectories: each row holds the decoded x̂0 prediction at each of ``steps``, then the
    final image; the columns are headed ``step t`` and ``final`` (:func:`trajectory_labels`)."""
    labels = trajectory_labels(steps)
    for row in rows:
        if len(row) != len(labels):
            raise FastdenseError(f"a trajectory row needs {len(labels)} pictures ({len(steps)} steps and the "
                                 f"final image), got {len(row)}")
    return grid_figure(rows, col_labels=labels, row_labels=row_labels, title=title)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render on the Agg canvas and write an RGB PNG (matplotlib's own PNGs are RGBA)."""
    import numpy as np
    from PIL import Image

    fig.canvas.draw()
    Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).save(path, format="PNG")
    return Path(path)
