"""Choice of kernel implementation (the input checks of the ops live in ``_checks.py``).

Implementations, all computing the same function:
  ``reference``      eager, readable, float64-capable: the ground truth;
  ``torch``          fused torch path (few passes), eager;
  ``torch_compile``  the same fused torch path under ``torch.compile``;
  ``triton``         Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``).

``auto`` picks Triton for CUDA tensors (and on CPU when the Triton interpreter is
switched on, which is how the tests exercise the kernels), the eager torch path
otherwise. ``FASTDENSE_KERNEL_IMPL`` overrides ``auto`` for every op.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLS = ("reference", "torch", "torch_compile", "triton")
IMPL_ENV_VAR = "FASTDENSE_KERNEL_IMPL"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, device: torch.device | str) -> str:
    """Map ``impl`` ("auto", None or one of IMPLS) to a concrete implementation for ``device``."""
    device = torch.device(device)
    if impl is None or impl == "auto":
        impl = os.environ.get(IMPL_ENV_VAR, "auto") or "auto"
        if impl != "auto" and impl not in IMPLS:
            raise ValueError(f"{IMPL_ENV_VAR}={impl!r} is not an implementation; allowed: auto, {', '.join(IMPLS)}")
    if impl == "auto":
        if triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
            return "triton"
        return "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not an implementation; allowed: auto, {', '.join(IMPLS)}")
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package; install it or use impl='torch'")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported; "
                "use impl='torch' on CPU"
            )
    return impl


def describe_auto_choice(device: torch.device | str) -> str:
    """One line for ``fastdense env``: what ``auto`` resolves to on ``device``."""
    try:
        return resolve_impl("auto", device)
    except ValueError as err:
        return f"error: {err}"
