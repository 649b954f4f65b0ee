"""The toy world's colour palette and prompt grammar: the single source of truth.

The toy world renders prompts such as ``"a red circle on a black background"`` and its
``color_fidelity`` reward (:mod:`fastdense.toy.reward`) scores images against them, so both
import the palette and the parser from here.

Palette: the eight corners of the RGB cube, so every pair of colours is at least
1.0 apart in RGB (Euclidean, values in [0, 1]) and nearest-colour assignment is
unambiguous for anything but heavy blending.

Prompt grammar (case-insensitive; punctuation other than letters is ignored)::

    prompt     := subject [ "on" background ]
    subject    := [article] {modifier} COLOR {modifier} [shape]
    background := [article] COLOR ["background"]
    article    := "a" | "an" | "the"
    COLOR      := one of COLOR_NAMES

``modifier`` is any word that is not a colour (e.g. "small", "big"); ``shape`` is the
last word of the subject when it follows the colour (e.g. "circle", "square"). The
shape vocabulary belongs to the toy world; the parser returns the word as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch

from fastdense.errors import FastdenseError

__all__ = [
    "PALETTE",
    "COLOR_NAMES",
    "ToyPrompt",
    "color_index",
    "format_toy_prompt",
    "palette_tensor",
    "parse_toy_prompt",
]

#: name -> (r, g, b) in [0, 1]. Read-only; the order is fixed (indices are stable).
PALETTE: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {
        "red": (1.0, 0.0, 0.0),
        "green": (0.0, 1.0, 0.0),
        "blue": (0.0, 0.0, 1.0),
        "yellow": (1.0, 1.0, 0.0),
        "magenta": (1.0, 0.0, 1.0),
        "cyan": (0.0, 1.0, 1.0),
        "white": (1.0, 1.0, 1.0),
        "black": (0.0, 0.0, 0.0),
    }
)

#: Palette colour names in palette order.
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

_INDEX = {name: i for i, name in enumerate(COLOR_NAMES)}
_ARTICLES = frozenset({"a", "an", "the"})


class ToyPrompt(NamedTuple):
    """A parsed toy prompt; unpacks as ``(shape_color, background_color, shape)``."""

    shape_color: str
    background_color: str | None
    shape: str | None


def color_index(name: str) -> int:
    """Index of a palette colour (its row in :func:`palette_tensor`)."""
    try:
        return _INDEX[name.lower()]
    except KeyError:
        raise FastdenseError(f"unknown colour {name!r}; allowed: {', '.join(COLOR_NAMES)}") from None


def palette_tensor(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The palette as a ``[K, 3]`` tensor, rows in :data:`COLOR_NAMES` order."""
    return torch.tensor([PALETTE[n] for n in COLOR_NAMES], device=device, dtype=dtype)


def _colors_in(words: list[str]) -> list[int]:
    return [i for i, w in enumerate(words) if w in _INDEX]


def parse_toy_prompt(prompt: str) -> ToyPrompt:
    """Parse a toy prompt into ``(shape_color, background_color | None, shape | None)``.

    >>> parse_toy_prompt("a small blue square on a white background")
    ToyPrompt(shape_color='blue', background_color='white', shape='square')
    >>> parse_toy_prompt("Red circle.")
    ToyPrompt(shape_color='red', background_color=None, shape='circle')

    Raises :class:`FastdenseError` when the subject does not name exactly one palette
    colour, or an ``on ...`` clause does not name exactly one.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    if "on" in words:
        cut = words.index("on")
        subject, background = words[:cut], words[cut + 1 :]
    else:
        subject, background = words, None

    subject = [w for w in subject if w not in _ARTICLES]
    found = _colors_in(subject)
    if len(found) != 1:
        what = "no palette colour" if not found else "more than one colour"
        raise FastdenseError(
            f"toy prompt {prompt!r} names {what} for the shape; "
            f"expected e.g. 'a red circle on a black background' with colours from: "
            f"{', '.join(COLOR_NAMES)}"
        )
    at = found[0]
    shape_color = subject[at]
    shape = subject[-1] if at < len(subject) - 1 else None

    background_color = None
    if background is not None:
        rest = [w for w in background if w not in _ARTICLES and w != "background"]
        if len(rest) != 1 or rest[0] not in _INDEX:
            raise FastdenseError(
                f"toy prompt {prompt!r}: expected 'on a <colour> background' with a colour from: "
                f"{', '.join(COLOR_NAMES)}"
            )
        background_color = rest[0]
    return ToyPrompt(shape_color, background_color, shape)


def format_toy_prompt(
    shape_color: str,
    shape: str = "circle",
    background_color: str | None = None,
    size: str | None = None,
) -> str:
    """The canonical toy prompt; :func:`parse_toy_prompt` inverts it.

    >>> format_toy_prompt("red", "circle", "black", size="small")
    'a small red circle on a black background'
    """
    color_index(shape_color)
    words = ["a"] + ([size] if size else []) + [shape_color.lower(), shape]
    if background_color is not None:
        color_index(background_color)
        words += ["on", "a", background_color.lower(), "background"]
    return " ".join(words)
