"""Moved: the toy world's palette and prompt grammar live in :mod:`fastdense.toy.colors`; its
names stay importable from here, resolved by name on first use (the rewards package never
imports the toy world)."""

_NAMES = ("COLOR_NAMES", "PALETTE", "ToyPrompt", "color_index", "format_toy_prompt", "palette_tensor",
          "parse_toy_prompt")


def __getattr__(name: str):
    if name in _NAMES:
        from fastdense.data import resolve_provider

        return resolve_provider(f"fastdense.toy.colors:{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
