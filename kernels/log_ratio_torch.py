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

The input checks shared by every implementation (:func:`prepare_log_ratio`, re-exported here)
live in ``_checks.py`` with those of ``ddim_step``, so that ``log_ratio.py`` (the Triton kernels
and the dispatching entry point) and this module agree on what is accepted.

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
from typing import NamedTuple

import torch
from torch import Tensor

from fastdense.kernels._checks import PreparedLogRatio, prepare_log_ratio, prepare_residual

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

class LogRatioOutput(NamedTuple):
    """``logits``: [num_traj], fp32 (fp64 when an input is fp64), differentiable w.r.t. ε.

    ``ratio``: same shape as ``ref_sq`` ([N] or [N, R]), per-item unclipped ℓ, detached, in the
    same accumulation dtype (fp32, or fp64 when an input is fp64), for logging.
    """

    logits: Tensor
    ratio: Tensor


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
