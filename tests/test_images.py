"""fastdense.images: the one tensor→PIL conversion and the one grid."""

from __future__ import annotations

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.images import image_grid, to_pil, to_pil_list


def test_to_pil_rounds_to_8_bits_and_clamps():
    image = torch.tensor([[[-0.5, 0.0], [0.5, 1.5]]]).expand(3, 2, 2)
    assert list(to_pil(image).getdata()) == [(0, 0, 0), (0, 0, 0), (128, 128, 128), (255, 255, 255)]
    assert [im.size for im in to_pil_list(torch.rand(3, 3, 4, 5))] == [(5, 4)] * 3
    assert len(to_pil_list(image)) == 1
    with pytest.raises(FastdenseError, match="one \\[3, H, W\\] image"):
        to_pil(torch.rand(2, 3, 4, 4))


def test_grid_layout_padding_and_scale():
    images = torch.stack([torch.full((3, 4, 6), k / 5) for k in range(6)])  # 6 flat tiles, 4 x 6 px
    plain = image_grid(images, 2, 3)
    assert plain.size == (18, 8) and plain.getpixel((6, 4)) == to_pil(images[4]).getpixel((0, 0))
    padded = image_grid(images, 2, 3, pad=2)  # 2 white pixels around and between the tiles
    assert padded.size == (3 * 6 + 4 * 2, 2 * 4 + 3 * 2)
    assert padded.getpixel((0, 0)) == padded.getpixel((8, 3)) == padded.getpixel((25, 13)) == (255, 255, 255)
    assert padded.getpixel((2 + 6 + 2, 2 + 4 + 2)) == to_pil(images[4]).getpixel((0, 0))
    scaled = image_grid(list(images[:2]), 1, 2, scale=3)
    assert scaled.size == (36, 12)
    with pytest.raises(FastdenseError, match="needs 4 images, got 6"):
        image_grid(images, 2, 2)
