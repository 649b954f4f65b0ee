"""Choice of kernel implementation and the input checks shared by every op.

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


# ---------------------------------------------------------------------------
# Input checks shared by the ops. Every message names the argument and what is allowed.


def check_item_tensor(t: torch.Tensor, name: str, like: torch.Tensor, *, float_only: bool = True) -> None:
    """``t`` must match ``like`` in shape and device; each item (dim 0 slice) must be contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}; all inputs must be on {like.device}")
    if float_only and t.dtype not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: float64, float32, bfloat16, float16")
    if not item_contiguous(t):
        raise ValueError(
            f"{name} has strides {tuple(t.stride())}; each item t[i] must be contiguous (call .contiguous())"
        )


def item_contiguous(t: torch.Tensor) -> bool:
    """True when every ``t[i]`` is one contiguous block (dim 0 may have any stride)."""
    if t.dim() <= 1:
        return t.dim() == 0 or t.stride(0) == 1 or t.shape[0] <= 1
    return t[0].is_contiguous() if t.shape[0] > 0 else True


def per_item(value: float | torch.Tensor, n: int, name: str, device: torch.device) -> torch.Tensor:
    """A python number or a [n] / scalar tensor as an fp32 [n] tensor on ``device``.

    fp64 inputs stay fp64 so that the reference can run fully in float64.
    """
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}; all inputs must be on {device}")
        if value.dim() == 0:
            value = value.expand(n)
        if value.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; allowed: a number, a scalar or shape ({n},)")
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        return value.to(dtype).contiguous()
    return torch.full((n,), float(value), dtype=torch.float32, device=device)
