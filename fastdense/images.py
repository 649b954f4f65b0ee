"""Images: the one conversion from tensors to PIL images, and the one grid.

Tensors are ``[3, H, W]`` (or ``[B, 3, H, W]``) floats in [0, 1] (clamped), on any device.
PIL images are 8-bit RGB: each value is rounded to the nearest of 256 levels, as image files
store them. Grids are ``diffusers.utils.make_image_grid`` (row-major tiles), optionally with
white padding around and between the tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["image_grid", "to_pil", "to_pil_list"]


def _to_uint8(images: Tensor) -> Tensor:
    return (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()


def to_pil(image: Tensor) -> Image.Image:
    """One ``[3, H, W]`` image → a PIL image."""
    from PIL import Image

    if image.ndim != 3:
        raise FastdenseError(f"to_pil takes one [3, H, W] image, got shape {tuple(image.shape)}; use to_pil_list")
    return Image.fromarray(_to_uint8(image).permute(1, 2, 0).contiguous().numpy())


def to_pil_list(images: Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` (or one ``[3, H, W]``) → a list of PIL images."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None]
    array = _to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(a) for a in array]


def image_grid(images: Tensor | Sequence[Tensor | Image.Image], rows: int, cols: int, *, pad: int = 0,
               scale: int = 1) -> Image.Image:
    """``rows × cols`` tiles (row-major: a ``[rows·cols, 3, H, W]`` tensor, or ``[3, H, W]`` tensors or PIL
    images of one size) in one PIL image. ``scale``: each tile enlarged that many times (nearest neighbour, so
    small images stay sharp). ``pad``: white pixels around the grid and between its tiles."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageOps

    tiles = [to_pil(image) if isinstance(image, Tensor) else image for image in images]
    if len(tiles) != rows * cols:
        raise FastdenseError(f"a {rows} x {cols} grid needs {rows * cols} images, got {len(tiles)}")
    if scale > 1:
        tiles = [tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST) for tile in tiles]
    if pad:  # each tile padded right and below, the grid left and above: pad pixels everywhere
        tiles = [ImageOps.expand(tile, border=(0, 0, pad, pad), fill="white") for tile in tiles]
    grid = make_image_grid(tiles, rows, cols)
    return ImageOps.expand(grid, border=(pad, pad, 0, 0), fill="white") if pad else grid
