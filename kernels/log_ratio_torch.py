"""Pure-torch implementations of the training log-ratio op (DESIGN.md §1).

Three functions of the same math, for three purposes:

* :func:`log_ratio_reference`: eager, readable, plain autograd, fully float64-capable.
  The ground truth every other implementation is tested against.
* :func:`log_ratio_torch` / :func:`log_ratio_torch_compiled`: the fused torch path, a
  ``torch.autograd.Function`` with a hand-written backward that recomputes the residual
  (nothing of size N×D is saved beyond the inputs); the compiled variant wraps it in
  ``torch.compile`` (cached).
* :func:`log_ratio_naive`: the straightforward formula a user would write (two
  ``Normal.log_prob`` in the input dtype, subtracted). It is the **benchmark baseline**
  and shows what the cancellation costs in low precision; never use it for training.

The input checks shared by every implementation (:func:`prepare_log_ratio`) live here too,
so that ``log_ratio.py`` (the Triton kernels and the dispatching entry point) and this
module agree on what is accepted.

Math, per item i (one stored transition) with D = prod(S):
    ε̂ = ε_u + w·(ε_c − ε_u)   (ε̂ = ε_c without CFG)
    sq_i = ‖x'_i − (A_i·x_i + B_i·ε̂_i)‖²             accumulated in fp32 (fp64 for fp64 inputs)
    s_i = 1 / (2σ_i²)   (÷ D for reduction "mean")
    ℓ_{i,r} = s_i · (ref_sq_{i,r} − sq_i)
    logits_j = Σ_{i: traj_i = j} weight_i · Σ_r clip(ℓ_{i,r}, −c, c)
Gradient only to ε_c and ε_u: ∂L/∂ε̂ = 2·s·B·r·Σ_r h_r, h_r = g[traj_i]·weight_i·1[−c < ℓ_r < c],
∂L/∂ε_c = w·∂L/∂ε̂, ∂L/∂ε_u = (1 − w)·∂L/∂ε̂.

Non-finite values: a NaN/inf in an item's ε or states makes its sq (and so its ℓ)
non-finite. A non-finite ℓ is **not** clamped: it passes unchanged to the logit of that
item's trajectory (which becomes NaN or ±inf) and its gradient passes as if unclipped, so
the item's gradient is non-finite wherever its residual is. Other items and trajectories
are unaffected (no multiply-by-zero masking anywhere).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import NamedTuple

import torch
from torch import Tensor

from fastdense.kernels.dispatch import check_item_tensor, per_item

__all__ = [
    "LogRatioOutput",
    "PreparedLogRatio",
    "log_ratio_naive",
    "log_ratio_reference",
    "log_ratio_torch",
    "log_ratio_torch_compiled",
    "prepare_log_ratio",
    "prepare_residual",
    "squared_residual_reference",
    "squared_residual_torch",
]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class LogRatioOutput(NamedTuple):
    """``logits``: [num_traj], fp32 (fp64 when an input is fp64), differentiable w.r.t. ε.

    ``ratio``: same shape as ``ref_sq`` ([N] or [N, R]), per-item unclipped ℓ, detached, in the
    same accumulation dtype (fp32, or fp64 when an input is fp64), for logging.
    """

    logits: Tensor
    ratio: Tensor


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


# ---------------------------------------------------------------------------
# Input checks (shared by every implementation)


def _accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_item_acc(value, n: int, name: str, device: torch.device, acc: torch.dtype) -> Tensor:
    """``dispatch.per_item`` in the accumulation dtype (python numbers keep full precision in fp64)."""
    if isinstance(value, Tensor):
        if value.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {value.dtype}; allowed: a number or a float tensor")
        return per_item(value, n, name, device).to(acc)
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
    acc = _accumulation_dtype(eps_cond, x)
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
    if ref_sq.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"ref_sq has dtype {ref_sq.dtype}; allowed: float64, float32, bfloat16, float16")
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
# Reference (ground truth): plain autograd, readable, float64-capable


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[N] -> [N, 1, ..., 1] broadcastable against ``like``."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def _reference_sq(p: PreparedLogRatio) -> Tensor:
    acc = p.acc_dtype
    eps_c = p.eps_cond.to(acc)
    eps_hat = eps_c if p.eps_uncond is None else p.eps_uncond.to(acc) + p.guidance * (eps_c - p.eps_uncond.to(acc))
    mu = _bcast(p.coef_a, eps_c) * p.x.to(acc) + _bcast(p.coef_b, eps_c) * eps_hat
    r = p.x_next.to(acc) - mu
    return (r * r).reshape(p.n, -1).sum(1)


def log_ratio_reference(
    eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index, num_traj,
    guidance=1.0, clip=math.inf, reduction="mean",
) -> LogRatioOutput:
    """Eager reference of :func:`fastdense.kernels.log_ratio.log_ratio` (the ground truth).

    Everything runs in the accumulation dtype: fp32, or float64 when eps or the states are
    float64 (then python-number scalars are taken at full double precision). Gradients come
    from plain autograd; the hard clamp is written so that autograd's mask is the strict
    1[−c < ℓ < c] of the formula (``torch.clamp`` would pass the gradient at ℓ = ±c).
    """
    p = prepare_log_ratio(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index,
                          num_traj, guidance, clip, reduction)
    sq = _reference_sq(p)
    s = 1.0 / (2.0 * p.sigma * p.sigma)
    if p.mean:
        s = s / p.d
    ratio = s[:, None] * (p.ref_sq - sq[:, None])  # [N, R]
    c = p.clip
    inside = (ratio > -c) & (ratio < c)
    # Clipped values are constants; non-finite values are not clamped (they propagate).
    clipped = torch.where(inside | ~torch.isfinite(ratio), ratio, ratio.detach().clamp(-c, c))
    contrib = p.weight * clipped.sum(1)
    logits = torch.zeros(p.num_traj, dtype=p.acc_dtype, device=contrib.device).index_add(0, p.traj_index, contrib)
    return LogRatioOutput(logits, ratio.detach().reshape(p.ratio_shape))


def squared_residual_reference(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance=1.0) -> Tensor:
    """‖x' − μ‖² per item, eager, in the accumulation dtype (fp32 or fp64), no grad."""
    p = prepare_residual(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    with torch.no_grad():
        return _reference_sq(p)


# ---------------------------------------------------------------------------
# Fused torch path: few passes, in place, residual recomputed in backward


def _fused_residual(eps_cond, eps_uncond, x, x_next, a, b, guidance: float) -> Tensor:
    """r = x' − A·x − B·ε̂ as a fresh contiguous tensor in the dtype of ``a`` (3 passes).

    Written as r = x' − A·x − (B·(1−w))·ε_u − (B·w)·ε_c so that each pass is one fused
    multiply-add reading the inputs in their own dtype (upcast on the fly, no copies).
    """
    ba = _bcast(a, x)
    bb = _bcast(b, x)
    r = torch.addcmul(x_next, x, ba, value=-1.0)  # promoted to the dtype of ``a``
    if eps_uncond is None:
        r.addcmul_(eps_cond, bb, value=-1.0)
    else:
        r.addcmul_(eps_uncond, bb * (1.0 - guidance), value=-1.0)
        r.addcmul_(eps_cond, bb * guidance, value=-1.0)
    return r


def _row_sq(r: Tensor) -> Tensor:
    r2 = r.view(r.shape[0], -1)
    return torch.linalg.vecdot(r2, r2)


def _segment_sum(values: Tensor, traj: Tensor, num_traj: int) -> Tensor:
    """Deterministic per-trajectory sum (no atomics, NaN of one trajectory stays there)."""
    hit = traj[None, :] == torch.arange(num_traj, device=traj.device)[:, None]  # [num_traj, N]
    return torch.where(hit, values[None, :], values.new_zeros(())).sum(1)


def _scale(sigma: Tensor, d: int, mean: bool) -> Tensor:
    s = 0.5 / (sigma * sigma)
    return s / d if mean else s


class _LogRatioTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eps_cond, eps_uncond, x, x_next, a, b, sigma, ref_sq, weight, traj, num_traj, guidance, clip,
                mean):
        d = eps_cond[0].numel()
        r = _fused_residual(eps_cond, eps_uncond, x, x_next, a, b, guidance)
        sq = _row_sq(r)
        del r
        s = _scale(sigma, d, mean)
        ratio = s[:, None] * (ref_sq - sq[:, None])  # [N, R]
        clipped = torch.where(torch.isfinite(ratio), ratio.clamp(-clip, clip), ratio)
        logits = _segment_sum(weight * clipped.sum(1), traj, num_traj)
        ctx.save_for_backward(eps_cond, eps_uncond, x, x_next, a, b, sigma, weight, traj, ratio)
        ctx.guidance, ctx.clip, ctx.mean = guidance, clip, mean
        ctx.mark_non_differentiable(ratio)
        return logits, ratio

    @staticmethod
    def backward(ctx, grad_logits, _grad_ratio):
        eps_cond, eps_uncond, x, x_next, a, b, sigma, weight, traj, ratio = ctx.saved_tensors
        w, c = ctx.guidance, ctx.clip
        need_c, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logits is None or not (need_c or need_u):
            return (None,) * 14
        gw = grad_logits.to(ratio.dtype)[traj] * weight  # [N]
        passes = ((ratio > -c) & (ratio < c)) | ~torch.isfinite(ratio)  # [N, R]
        h = torch.where(passes, gw[:, None], gw.new_zeros(())).sum(1)
        coef = 2.0 * _scale(sigma, eps_cond[0].numel(), ctx.mean) * b * h  # [N]
        r = _fused_residual(eps_cond, eps_uncond, x, x_next, a, b, w)
        if eps_uncond is None:
            return (r.mul_(_bcast(coef, r)).to(eps_cond.dtype),) + (None,) * 13
        grad_c = torch.mul(r, _bcast(coef * w, r)).to(eps_cond.dtype) if need_c else None
        grad_u = r.mul_(_bcast(coef * (1.0 - w), r)).to(eps_uncond.dtype) if need_u else None
        return (grad_c, grad_u) + (None,) * 12


def _fused_apply(eps_cond, eps_uncond, x, x_next, a, b, sigma, ref_sq, weight, traj, num_traj, guidance, clip, mean):
    return _LogRatioTorchFunction.apply(
        eps_cond, eps_uncond, x, x_next, a, b, sigma, ref_sq, weight, traj, num_traj, guidance, clip, mean
    )


@functools.cache
def _compiled_apply():
    """The compiled fused path, built once per process (forward and backward in one graph each)."""
    return torch.compile(_fused_apply, fullgraph=True)


def _run_fused(p: PreparedLogRatio, fn) -> LogRatioOutput:
    logits, ratio = fn(p.eps_cond, p.eps_uncond, p.x, p.x_next, p.coef_a, p.coef_b, p.sigma, p.ref_sq, p.weight,
                       p.traj_index, p.num_traj, p.guidance, p.clip, p.mean)
    return LogRatioOutput(logits, ratio.reshape(p.ratio_shape))


def log_ratio_torch(
    eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index, num_traj,
    guidance=1.0, clip=math.inf, reduction="mean",
) -> LogRatioOutput:
    """Fused eager torch path of ``log_ratio`` (forward: 3 fused multiply-add passes + one dot per item)."""
    p = prepare_log_ratio(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index,
                          num_traj, guidance, clip, reduction)
    return _run_fused(p, _fused_apply)


def log_ratio_torch_compiled(
    eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index, num_traj,
    guidance=1.0, clip=math.inf, reduction="mean",
) -> LogRatioOutput:
    """The fused torch path under ``torch.compile`` (compiled once per process and shape set)."""
    p = prepare_log_ratio(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index,
                          num_traj, guidance, clip, reduction)
    return _run_fused(p, _compiled_apply())


def squared_residual_torch(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance=1.0) -> Tensor:
    """‖x' − μ‖² per item with the fused passes, fp32 (fp64 for fp64 inputs), no grad."""
    p = prepare_residual(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    with torch.no_grad():
        return _row_sq(_fused_residual(p.eps_cond, p.eps_uncond, p.x, p.x_next, p.coef_a, p.coef_b, p.guidance))


# ---------------------------------------------------------------------------
# Naive baseline


def log_ratio_naive(
    eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, x, x_next, coef_a, coef_b, sigma, weight, traj_index,
    num_traj, guidance=1.0, clip=math.inf, reduction="mean", return_ratio=False,
) -> Tensor | LogRatioOutput:
    """BASELINE ONLY: the formula as a user would first write it. Do not train with it.

    CFG combine and DDIM mean for the policy and for the reference model outputs
    (``eps_ref_cond`` / ``eps_ref_uncond``, recomputed every call instead of a cached
    ``ref_sq``), ``torch.distributions.Normal(mu, sigma).log_prob(x_next)`` for each in the
    input dtype, subtracted, mean (or sum) over the non-batch dims, ``torch.clamp``, weighted
    ``index_add`` per trajectory. It is the speed baseline of the benchmarks, and in bf16 it
    shows the cancellation DESIGN.md warns about: two large log-probs in the model dtype,
    subtracted. Only light checks.

    Returns the logits [num_traj] (in the promoted input dtype), or with ``return_ratio=True``
    a ``LogRatioOutput`` whose ``ratio`` [N] is in that dtype too.
    """
    dtype = torch.promote_types(eps_cond.dtype, x.dtype)
    n, device = eps_cond.shape[0], eps_cond.device
    view = (n, *([1] * (eps_cond.dim() - 1)))

    def col(v):
        v = v if isinstance(v, Tensor) else torch.full((n,), float(v))
        return v.to(device=device, dtype=dtype).reshape(-1).expand(n).reshape(view)

    a, b, sig = col(coef_a), col(coef_b), col(sigma)
    x, x_next = x.to(dtype), x_next.to(dtype)

    def log_prob(e_c, e_u):
        e_c = e_c.to(dtype)
        eps = e_c if e_u is None else e_u.to(dtype) + guidance * (e_c - e_u.to(dtype))
        mu = a * x + b * eps
        return torch.distributions.Normal(mu, sig).log_prob(x_next)

    diff = log_prob(eps_cond, eps_uncond) - log_prob(eps_ref_cond, eps_ref_uncond)
    dims = tuple(range(1, diff.dim()))
    ratio = diff.mean(dims) if reduction == "mean" else diff.sum(dims)
    clipped = torch.clamp(ratio, -clip, clip)
    w = weight if isinstance(weight, Tensor) else torch.full((n,), float(weight), device=device)
    logits = torch.zeros(num_traj, dtype=dtype, device=device).index_add(0, traj_index, w.to(dtype) * clipped)
    return LogRatioOutput(logits, ratio.detach()) if return_ratio else logits
