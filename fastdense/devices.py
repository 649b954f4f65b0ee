"""One rule for devices and one table for dtypes, used by the trainer, the CLI and the benchmarks.

Devices: ``auto`` (CUDA when torch sees a device, else the CPU), ``cpu``, ``cuda`` (the
process's local rank) or ``cuda:N``. Anything else, or a CUDA device torch does not see, is a
one-line :class:`~fastdense.errors.FastdenseError` naming the setting and what is allowed.

Dtypes: the short names configs and flags use (``fp32``, ``bf16``, ``fp16``).
"""

from __future__ import annotations

import torch

from fastdense.errors import FastdenseError

__all__ = ["ALLOWED_DEVICES", "DTYPES", "parse_dtype", "resolve_device"]

ALLOWED_DEVICES = "auto, cpu, cuda, cuda:N"

# Short dtype names (configs, --dtype flags) → torch dtypes.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _setting(what: str, value: str) -> str:
    """``run.device='tpu'`` for a config key, ``--device 'tpu'`` for a flag."""
    return f"{what} {value!r}" if what.startswith("-") else f"{what}={value!r}"


def resolve_device(device: str, local_rank: int = 0, *, what: str = "run.device") -> torch.device:
    """``device`` as a torch device; ``auto`` and ``cuda`` pick ``cuda:{local_rank}``.

    ``what`` names the setting in error messages (``run.device``, ``--device``).
    """
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    index_text = device[len("cuda:"):] if device.startswith("cuda:") else None
    if device != "cuda" and not (index_text is not None and index_text.isascii() and index_text.isdigit()):
        raise FastdenseError(f"{_setting(what, device)} is not allowed; allowed: {ALLOWED_DEVICES}")
    if not torch.cuda.is_available():
        raise FastdenseError(f"{_setting(what, device)} is not allowed: torch sees no CUDA device; use cpu or auto")
    index = local_rank if index_text is None else int(index_text)
    count = torch.cuda.device_count()
    if index >= count:
        raise FastdenseError(
            f"{_setting(what, device)} is not allowed: torch sees {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return torch.device(f"cuda:{index}")


def parse_dtype(name: str, *, what: str = "dtype") -> torch.dtype:
    """The torch dtype of a short name (``fp32``, ``bf16``, ``fp16``); ``what`` names the setting in errors."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise FastdenseError(f"{_setting(what, name)} is not allowed; allowed: {', '.join(DTYPES)}") from None
