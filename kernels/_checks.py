"""Input checks of the kernel ops (``log_ratio`` / ``squared_residual`` and ``ddim_step``), in one place.

Every implementation of an op (reference, torch, torch.compile, Triton) runs the same checks
before any math, so they agree on what is accepted. Each message names the argument and what
is allowed (``ValueError``: the CLI prints it as one line).

* Shared: the float dtypes, :func:`check_item_tensor` (shape, device, dtype, item-contiguous),
  :func:`per_item` / :func:`per_item_tensor` (per-item coefficients as [N] tensors),
  :func:`check_number`, :func:`accumulation_dtype`.
* ``log_ratio``: :func:`prepare_residual`, :func:`prepare_log_ratio` → :class:`PreparedLogRatio`.
* ``ddim_step``: :func:`validate_ddim_step` (incl. ``out`` overlapping an input), :func:`ddim_coef`.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "PreparedLogRatio",
    "accumulation_dtype",
    "check_float_dtype",
    "check_item_tensor",
    "check_number",
    "ddim_coef",
    "item_contiguous",
    "per_item",
    "per_item_tensor",
    "prepare_log_ratio",
    "prepare_residual",
    "validate_ddim_step",
]

# ---------------------------------------------------------------------------
# Shared by the ops


FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_float_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; allowed: float64, float32, bfloat16, float16")


def check_item_tensor(t: torch.Tensor, name: str, like: torch.Tensor, *, float_only: bool = True) -> None:
    """``t`` must match ``like`` in shape and device; each item (dim 0 slice) must be contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must match {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}; all inputs must be on {like.device}")
    if float_only:
        check_float_dtype(t, name)
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


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32: the dtype the ops compute and sum in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def per_item_tensor(value: Tensor, n: int, name: str, device: torch.device, acc: torch.dtype) -> Tensor:
    """A [n] / scalar float tensor of per-item coefficients as a [n] tensor in ``acc``."""
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {value.dtype}; allowed: a python number or a float tensor")
    return per_item(value, n, name, device).to(acc)


def check_number(value: numbers.Real, name: str, *, nonneg: bool = False, allowed: str = "a real number") -> float:
    """A python real number (not a bool, not a tensor), finite, and >= 0 with ``nonneg``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={v} must be finite")
    if nonneg and v < 0:
        raise ValueError(f"{name}={v} must be >= 0 (0 for deterministic η = 0 steps)")
    return v


# ---------------------------------------------------------------------------
# log_ratio / squared_residual


class PreparedLogRatio(NamedTuple):
    """Validated inputs. Per-item scalars are [N] tensors in ``acc_dtype``; ``ref_sq`` is [N, R]."""

    eps_cond: Tensor
    eps_uncond: Tensor | None
    x: Tensor
    x_next: Tensor
    coef_a: Tensor
    coef_b: Tensor
    sigma: Tensor | None
    ref_sq: Tensor | None
    weight: Tensor | None
    traj_index: Tensor | None
    num_traj: int
    guidance: float
    clip: float
    mean: bool
    acc_dtype: torch.dtype
    ratio_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return self.eps_cond.shape[0]

    @property
    def d(self) -> int:
        return math.prod(self.eps_cond.shape[1:])




def _per_item_acc(value, n: int, name: str, device: torch.device, acc: torch.dtype) -> Tensor:
    """:func:`per_item` in the accumulation dtype (python numbers keep full precision in fp64)."""
    if isinstance(value, Tensor):
        return per_item_tensor(value, n, name, device, acc)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number or a tensor of shape ({n},), got {type(value).__name__}")
    return torch.full((n,), float(value), dtype=acc, device=device)


def _check_float(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def prepare_residual(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance=1.0) -> PreparedLogRatio:
    """Checks for the residual part (ε, states, A, B, guidance); see :func:`prepare_log_ratio`."""
    if not isinstance(eps_cond, Tensor):
        raise ValueError(f"eps_cond must be a torch.Tensor, got {type(eps_cond).__name__}")
    if eps_cond.dim() < 1 or eps_cond.shape[0] < 1 or eps_cond[0].numel() < 1:
        raise ValueError(
            f"eps_cond has shape {tuple(eps_cond.shape)}; "
            "allowed: [N, *S] with N >= 1 and at least one element per item"
        )
    check_item_tensor(eps_cond, "eps_cond", eps_cond)
    if eps_uncond is not None:
        check_item_tensor(eps_uncond, "eps_uncond", eps_cond)
        if eps_uncond.dtype != eps_cond.dtype:
            raise ValueError(
                f"eps_uncond has dtype {eps_uncond.dtype}; it must match eps_cond ({eps_cond.dtype})"
            )
    check_item_tensor(x, "x", eps_cond)
    check_item_tensor(x_next, "x_next", eps_cond)
    if x_next.dtype != x.dtype:
        raise ValueError(f"x_next has dtype {x_next.dtype}; it must match x ({x.dtype})")
    guidance = _check_float(guidance, "guidance")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance={guidance}; allowed: a finite number")
    n, device = eps_cond.shape[0], eps_cond.device
    acc = accumulation_dtype(eps_cond, x)
    a = _per_item_acc(coef_a, n, "coef_a", device, acc)
    b = _per_item_acc(coef_b, n, "coef_b", device, acc)
    return PreparedLogRatio(
        eps_cond, eps_uncond, x, x_next, a, b, None, None, None, None, 0, guidance, math.inf, False, acc, (n,)
    )


def prepare_log_ratio(
    eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index, num_traj,
    guidance=1.0, clip=math.inf, reduction="mean",
) -> PreparedLogRatio:
    """Validate every argument of ``log_ratio``; raise ``ValueError`` naming the argument.

    Value checks (σ > 0 and finite, traj_index in range) cost one host sync when σ or
    traj_index are tensors.
    """
    p = prepare_residual(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    n, device, acc = p.n, eps_cond.device, p.acc_dtype

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; allowed: 'mean', 'sum'")
    clip = _check_float(clip, "clip")
    if not clip > 0:  # also catches NaN
        raise ValueError(f"clip={clip}; allowed: a number > 0 (float('inf') for no clamp)")
    try:
        num_traj = operator.index(num_traj)
    except TypeError:
        raise ValueError(f"num_traj must be an int, got {type(num_traj).__name__}") from None
    if num_traj < 1:
        raise ValueError(f"num_traj={num_traj}; allowed: an int >= 1")

    if not isinstance(sigma, Tensor):
        sig_value = _check_float(sigma, "sigma")
        if not (sig_value > 0 and math.isfinite(sig_value)):
            raise ValueError(f"sigma={sig_value}; allowed: finite values > 0 (a step with sigma = 0 has no density)")
    sig = _per_item_acc(sigma, n, "sigma", device, acc)
    w = _per_item_acc(weight, n, "weight", device, acc)

    if not isinstance(ref_sq, Tensor):
        raise ValueError(f"ref_sq must be a torch.Tensor of shape ({n},) or ({n}, R), got {type(ref_sq).__name__}")
    if ref_sq.device != device:
        raise ValueError(f"ref_sq is on {ref_sq.device}; all inputs must be on {device}")
    check_float_dtype(ref_sq, "ref_sq")
    if not (ref_sq.dim() in (1, 2) and ref_sq.shape[0] == n and (ref_sq.dim() == 1 or ref_sq.shape[1] >= 1)):
        raise ValueError(f"ref_sq has shape {tuple(ref_sq.shape)}; allowed: ({n},) or ({n}, R) with R >= 1")
    ratio_shape = tuple(ref_sq.shape)
    ref2 = ref_sq.reshape(n, -1).to(acc).contiguous()

    if not isinstance(traj_index, Tensor):
        raise ValueError(f"traj_index must be an int64 tensor of shape ({n},), got {type(traj_index).__name__}")
    if traj_index.dtype != torch.int64:
        raise ValueError(f"traj_index has dtype {traj_index.dtype}; allowed: torch.int64")
    if traj_index.shape != (n,):
        raise ValueError(f"traj_index has shape {tuple(traj_index.shape)}; allowed: ({n},)")
    if traj_index.device != device:
        raise ValueError(f"traj_index is on {traj_index.device}; all inputs must be on {device}")
    traj = traj_index.contiguous()

    # One host sync for all value checks on tensors.
    checks = [((traj < 0) | (traj >= num_traj)).any()]
    if isinstance(sigma, Tensor):
        checks.append((~(sig > 0) | ~torch.isfinite(sig)).any())
    bad = torch.stack(checks).tolist()
    if bad[0]:
        lo, hi = traj.min().item(), traj.max().item()
        raise ValueError(f"traj_index has values in [{lo}, {hi}]; allowed: integers in [0, num_traj={num_traj})")
    if len(bad) > 1 and bad[1]:
        raise ValueError(
            f"sigma has values <= 0 or non-finite (min {sig.min().item()}); allowed: finite values > 0 "
            "(a step with sigma = 0 has no density: exclude it)"
        )
    return p._replace(
        sigma=sig, ref_sq=ref2, weight=w, traj_index=traj, num_traj=num_traj, clip=clip,
        mean=reduction == "mean", ratio_shape=ratio_shape,
    )


# ---------------------------------------------------------------------------
# ddim_step


def _item_intervals(t: Tensor) -> tuple[Tensor, int]:
    """Start byte address of every item of ``t`` ([B] int64) and the item length in bytes."""
    esz = t.element_size()
    starts = t.data_ptr() + torch.arange(t.shape[0], dtype=torch.int64) * (t.stride(0) * esz)
    return starts, t[0].numel() * esz


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """True when some item of ``a`` shares memory with some item of ``b`` (items contiguous)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    sa, la = _item_intervals(a)
    sb, lb = _item_intervals(b)
    if int(sa[-1]) + la <= int(sb[0]) or int(sb[-1]) + lb <= int(sa[0]):
        return False  # disjoint spans: the common case, no per-item work
    ea = sa + la  # starts and ends of a's items are non-decreasing (stride >= 0)
    k = torch.searchsorted(sa, sb + lb, side="left")  # items of a starting before each b item ends
    last_end = torch.where(k > 0, ea[(k - 1).clamp(min=0)], torch.zeros_like(k))
    return bool(((k > 0) & (last_end > sb)).any())


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def ddim_coef(value, n: int, name: str, device: torch.device, acc: torch.dtype, *, nonneg: bool = False) -> Tensor:
    """A coefficient (number or [B] / scalar tensor) as [B] in ``acc``; tensor values are checked on CPU only."""
    if isinstance(value, Tensor):
        t = per_item_tensor(value, n, name, device, acc)
        if t.device.type == "cpu" and t.numel():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} has non-finite entries")
            if nonneg and bool((t < 0).any()):
                raise ValueError(f"{name} has negative entries; σ must be >= 0 (0 for deterministic η = 0 steps)")
        return t
    v = check_number(value, name, nonneg=nonneg, allowed="a real number or a [B] / scalar tensor")
    return torch.full((n,), v, dtype=acc, device=device)


def validate_ddim_step(x, eps_cond, eps_uncond, noise, out) -> torch.dtype:
    """Check the tensors of ``ddim_step``; returns the math dtype (float64 when an input is float64)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; it must be [B, *S] with at least one sample dim")
    check_item_tensor(x, "x", x)
    check_item_tensor(eps_cond, "eps_cond", x)
    if eps_uncond is not None:
        check_item_tensor(eps_uncond, "eps_uncond", x)
    check_item_tensor(noise, "noise", x)
    check_item_tensor(out, "out", x)
    n, d = x.shape[0], x[0].numel() if x.shape[0] else math.prod(x.shape[1:])
    if n > 1 and d > 0 and out.stride(0) < d:
        raise ValueError(
            f"out has strides {tuple(out.stride())}; its items overlap each other (dim-0 stride must be >= {d})"
        )
    inputs = {"x": x, "eps_cond": eps_cond, "eps_uncond": eps_uncond, "noise": noise}
    for name, t in inputs.items():
        if t is not None and _overlaps(out, t) and not _same_view(out, t):
            raise ValueError(
                f"out partially overlaps {name}; out must either be {name} itself (same memory, strides and "
                "dtype: an in-place step) or share no memory with it"
            )
    return accumulation_dtype(x, eps_cond, eps_uncond, noise)
