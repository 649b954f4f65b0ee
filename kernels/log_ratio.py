"""The training log-ratio op: Triton kernels, launchers, autograd Function, entry point.

Per stored transition i (an "item") with D = prod(S), DESIGN.md §1:

    ε̂_i = ε_u + w·(ε_c − ε_u)          (ε̂ = ε_c when ``eps_uncond`` is None)
    sq_i = ‖x'_i − (A_i·x_i + B_i·ε̂_i)‖²    accumulated in fp32 (fp64 when an input is fp64)
    s_i = 1 / (2σ_i²)   (÷ D for reduction "mean", the paper's; "sum" is the true density)
    ℓ_{i,r} = s_i·(ref_sq_{i,r} − sq_i)    one column per reference (π_init and/or π_old)
    logits_j = Σ_{i: traj_i = j} weight_i · Σ_r clip(ℓ_{i,r}, −c, c)

Gradients flow only to ``eps_cond`` and ``eps_uncond``:
∂L/∂ε̂ = 2·s·B·r·Σ_r h_r with h_r = g[traj_i]·weight_i·1[−c < ℓ_r < c] (strict), ∂L/∂ε_c = w·∂L/∂ε̂,
∂L/∂ε_u = (1 − w)·∂L/∂ε̂, each in the dtype of its input.

Triton launches (all deterministic: partial sums + fixed-order reductions, no atomics):

* forward, 2 launches: ``_log_ratio_fwd_kernel`` (grid N × num_chunks) writes partial squared
  residuals [N, num_chunks]; ``_log_ratio_logits_kernel`` (grid num_traj) sums the partials of
  its trajectory's items in a fixed order, writes their ℓ and its logit.
* backward, 1 launch: ``_log_ratio_bwd_kernel`` (grid N × num_chunks) loads the per-item scalars,
  computes the item's coefficient in-kernel, re-reads ε_c, ε_u, x, x' once and writes both
  gradients. Fully clipped items skip the reads and write zeros.
* ``squared_residual``: ``_log_ratio_fwd_kernel`` + one torch row sum of the [N, num_chunks]
  partials.

Small torch ops around them: the per-item scalars as [N] tensors (one ``full``/``to`` per
python number or foreign dtype) and the input value checks (σ > 0, traj_index in range: one
host sync). Nothing of size N×D is saved for backward beyond the inputs; items may have any
dim-0 stride as long as each item is contiguous (no hidden ``.contiguous()`` copies).

The guidance w and the clip c reach the kernels as fp32 scalars (Triton passes python floats
as fp32) and are cast to the accumulation dtype in-kernel: with fp64 inputs they are taken at
fp32 precision (exact for values like 7.5, 1.0, inf).

Non-finite inputs: a NaN/inf in an item's ε or states makes its sq and ℓ non-finite. Non-finite
ℓ are not clamped: they pass unchanged into the logit of that item's trajectory (NaN or ±inf)
and the item's gradient is computed as if unclipped (non-finite where its residual is). Other
items and trajectories are unaffected (segment sums select with ``where``, never multiply by 0).
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor

from fastdense.kernels._checks import PreparedLogRatio, prepare_log_ratio, prepare_residual
from fastdense.kernels.dispatch import resolve_impl
from fastdense.kernels.log_ratio_torch import (
    LogRatioOutput,
    log_ratio_reference,
    log_ratio_torch,
    log_ratio_torch_compiled,
    squared_residual_reference,
    squared_residual_torch,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton: the kernels are never launched
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["LogRatioOutput", "log_ratio", "squared_residual"]

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |ℓ| above this (or NaN) counts as non-finite


# ---------------------------------------------------------------------------
# Kernels


@triton.jit
def _residual_block(
    ec_row,  # pointer to eps_cond[i, 0], [D] any float dtype
    eu_row,  # pointer to eps_uncond[i, 0], [D] same dtype (unused without CFG)
    x_row,  # pointer to x[i, 0], [D] any float dtype
    xn_row,  # pointer to x_next[i, 0], [D] same dtype as x
    offs, mask, a, b, w, acc_ty: tl.constexpr, HAS_UNCOND: tl.constexpr,
):
    """r = x' − (A·x + B·ε̂) on one block, in the accumulation dtype (masked lanes give 0)."""
    ec = tl.load(ec_row + offs, mask=mask, other=0.0).to(acc_ty)
    if HAS_UNCOND:
        eu = tl.load(eu_row + offs, mask=mask, other=0.0).to(acc_ty)
        eps = eu + w * (ec - eu)
    else:
        eps = ec
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(acc_ty)
    xn = tl.load(xn_row + offs, mask=mask, other=0.0).to(acc_ty)
    return xn - (a * x + b * eps)


@triton.jit
def _log_ratio_fwd_kernel(
    ec_ptr,  # [N, D] eps_cond, item stride stride_ec, any float dtype
    eu_ptr,  # [N, D] eps_uncond, item stride stride_eu, dtype of eps_cond (unused without CFG)
    x_ptr,  # [N, D] x, item stride stride_x, any float dtype
    xn_ptr,  # [N, D] x_next, item stride stride_xn, dtype of x
    a_ptr,  # [N] A, accumulation dtype
    b_ptr,  # [N] B, accumulation dtype
    part_ptr,  # [N, NUM_CHUNKS] out: partial sums of the squared residual, accumulation dtype
    stride_ec, stride_eu, stride_x, stride_xn,
    D, CHUNK_LEN, NUM_CHUNKS,
    guidance,
    HAS_UNCOND: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    w = tl.cast(guidance, acc_ty)
    a = tl.load(a_ptr + i).to(acc_ty)
    b = tl.load(b_ptr + i).to(acc_ty)
    ec_row = ec_ptr + i * stride_ec
    eu_row = eu_ptr + i * stride_eu
    x_row = x_ptr + i * stride_x
    xn_row = xn_ptr + i * stride_xn
    start = k * CHUNK_LEN
    acc = tl.zeros([BLOCK], dtype=acc_ty)
    for off in range(0, CHUNK_LEN, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < D
        r = _residual_block(ec_row, eu_row, x_row, xn_row, offs, mask, a, b, w, acc_ty, HAS_UNCOND)
        acc += r * r
    tl.store(part_ptr + i * NUM_CHUNKS + k, tl.sum(acc, axis=0))


@triton.jit
def _log_ratio_logits_kernel(
    part_ptr,  # [N, NUM_CHUNKS] partial squared residuals, accumulation dtype
    ref_ptr,  # [N, R] reference squared residuals, accumulation dtype, contiguous
    sigma_ptr,  # [N] sigma, accumulation dtype
    weight_ptr,  # [N] weight, accumulation dtype
    traj_ptr,  # [N] int64 trajectory of each item
    ratio_ptr,  # [N, R] out: unclipped ℓ, accumulation dtype
    logits_ptr,  # [num_traj] out: accumulation dtype
    N, NUM_CHUNKS, R, D,
    clip,
    MEAN: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    c = tl.cast(clip, acc_ty)
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros([BLOCK_N], dtype=acc_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        traj = tl.load(traj_ptr + offs_n, mask=offs_n < N, other=-1)
        mine = (offs_n < N) & (traj == j)
        sq = tl.zeros([BLOCK_N], dtype=acc_ty)
        for k in range(0, NUM_CHUNKS):  # fixed order: deterministic
            sq += tl.load(part_ptr + offs_n * NUM_CHUNKS + k, mask=mine, other=0.0)
        sig = tl.load(sigma_ptr + offs_n, mask=mine, other=1.0).to(acc_ty)
        s = 0.5 / (sig * sig)
        if MEAN:
            s = s / D
        wt = tl.load(weight_ptr + offs_n, mask=mine, other=0.0).to(acc_ty)
        idx2 = offs_n[:, None] * R + offs_r[None, :]
        mask2 = mine[:, None] & (offs_r[None, :] < R)
        ref = tl.load(ref_ptr + idx2, mask=mask2, other=0.0).to(acc_ty)
        ratio = s[:, None] * (ref - sq[:, None])  # [BLOCK_N, BLOCK_R]
        tl.store(ratio_ptr + idx2, ratio, mask=mask2)
        finite = tl.abs(ratio) <= _FLT_MAX
        clipped = tl.where(finite, tl.minimum(tl.maximum(ratio, -c), c), ratio)
        clipped = tl.where(mask2, clipped, 0.0)
        contrib = wt * tl.sum(clipped, axis=1)
        total += tl.where(mine, contrib, 0.0)
    tl.store(logits_ptr + j, tl.sum(total, axis=0))


@triton.jit
def _log_ratio_bwd_kernel(
    ec_ptr,  # [N, D] eps_cond, item stride stride_ec
    eu_ptr,  # [N, D] eps_uncond, item stride stride_eu (unused without CFG)
    x_ptr,  # [N, D] x, item stride stride_x
    xn_ptr,  # [N, D] x_next, item stride stride_xn
    a_ptr,  # [N] A, accumulation dtype
    b_ptr,  # [N] B, accumulation dtype
    sigma_ptr,  # [N] sigma, accumulation dtype
    weight_ptr,  # [N] weight, accumulation dtype
    traj_ptr,  # [N] int64 trajectory of each item
    ratio_ptr,  # [N, R] ℓ saved by the forward, accumulation dtype
    glogits_ptr,  # [num_traj] upstream gradient of the logits, accumulation dtype
    gc_ptr,  # [N, D] out: grad of eps_cond, dtype of eps_cond, contiguous
    gu_ptr,  # [N, D] out: grad of eps_uncond, dtype of eps_uncond, contiguous (unused without CFG)
    stride_ec, stride_eu, stride_x, stride_xn,
    D, CHUNK_LEN, R,
    guidance, clip,
    HAS_UNCOND: tl.constexpr, MEAN: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    acc_ty: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32
    w = tl.cast(guidance, acc_ty)
    c = tl.cast(clip, acc_ty)
    a = tl.load(a_ptr + i).to(acc_ty)
    b = tl.load(b_ptr + i).to(acc_ty)
    sig = tl.load(sigma_ptr + i).to(acc_ty)
    wt = tl.load(weight_ptr + i).to(acc_ty)
    traj = tl.load(traj_ptr + i)
    g = tl.load(glogits_ptr + traj).to(acc_ty)
    s = 0.5 / (sig * sig)
    if MEAN:
        s = s / D
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    ratio = tl.load(ratio_ptr + i * R + offs_r, mask=mask_r, other=0.0).to(acc_ty)
    finite = tl.abs(ratio) <= _FLT_MAX
    passes = ((ratio > -c) & (ratio < c)) | (~finite)
    h = tl.sum(tl.where(passes & mask_r, g * wt, 0.0), axis=0)
    n_nonfinite = tl.sum(tl.where(finite | (~mask_r), 0, 1), axis=0)
    coef = 2.0 * s * b * h
    if HAS_UNCOND:
        coef_c = coef * w
        coef_u = coef * (1.0 - w)
    else:
        coef_c = coef
        coef_u = coef
    gc_row = gc_ptr + i * D
    gu_row = gu_ptr + i * D
    start = k * CHUNK_LEN
    if (coef == 0.0) & (n_nonfinite == 0):
        # Fully clipped (or zero upstream/weight) item with a finite residual: the gradient is
        # exactly zero; skip reading the inputs.
        for off in range(0, CHUNK_LEN, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            mask = offs < D
            tl.store(gc_row + offs, tl.zeros([BLOCK], dtype=gc_ptr.dtype.element_ty), mask=mask)
            if HAS_UNCOND:
                tl.store(gu_row + offs, tl.zeros([BLOCK], dtype=gu_ptr.dtype.element_ty), mask=mask)
    else:
        ec_row = ec_ptr + i * stride_ec
        eu_row = eu_ptr + i * stride_eu
        x_row = x_ptr + i * stride_x
        xn_row = xn_ptr + i * stride_xn
        for off in range(0, CHUNK_LEN, BLOCK):
            offs = start + off + tl.arange(0, BLOCK)
            mask = offs < D
            r = _residual_block(ec_row, eu_row, x_row, xn_row, offs, mask, a, b, w, acc_ty, HAS_UNCOND)
            tl.store(gc_row + offs, (coef_c * r).to(gc_ptr.dtype.element_ty), mask=mask)
            if HAS_UNCOND:
                tl.store(gu_row + offs, (coef_u * r).to(gu_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers

# (N × chunk) programs per launch: ~8 per SM on an H100 (132 SMs), about half of its resident-block
# slots at 4 warps (`fastdense profile kernels --static`); each keeps 16-byte loads in flight. Raising it
# changes the reduction's partition (results move in the last bits): measure on a GPU first.
_TARGET_PROGRAMS = 1024
_BLOCK_N = 128
# FMA contraction (a·b + c as one fused multiply-add, rounded once) in all three kernels: on, as
# Triton <= 3.9 compiles by default, so results stay what they were (the residual A·x + B·ε̂ and
# the Σ r² accumulation; memory-bound, so this is about rounding, not speed). Passed in every launch
# because Triton 3.10 turns its default off (TRITON_DEFAULT_FP_FUSION): the environment must not
# change the compiled code. kernels/aot.py compiles with this same value.
_FP_FUSION = True


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output (tests swap it for a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_config(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK_LEN, num_chunks): each program sums CHUNK_LEN (a multiple of BLOCK) elements."""
    block = min(1024, triton.next_power_of_2(d))
    blocks = triton.cdiv(d, block)
    per_chunk = max(1, triton.cdiv(n * blocks, _TARGET_PROGRAMS))
    chunk_len = per_chunk * block
    return block, chunk_len, triton.cdiv(d, chunk_len)


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _row_strides(p: PreparedLogRatio) -> tuple[int, int, int, int]:
    eu = p.eps_uncond if p.eps_uncond is not None else p.eps_cond
    return p.eps_cond.stride(0), eu.stride(0), p.x.stride(0), p.x_next.stride(0)


def _partials(p: PreparedLogRatio) -> Tensor:
    """Launch ``_log_ratio_fwd_kernel``: [N, num_chunks] partial squared residuals."""
    n, d = p.n, p.d
    block, chunk_len, num_chunks = _launch_config(n, d)
    part = _empty((n, num_chunks), p.acc_dtype, p.eps_cond.device)
    eu = p.eps_uncond if p.eps_uncond is not None else p.eps_cond
    _log_ratio_fwd_kernel[(n, num_chunks)](
        p.eps_cond, eu, p.x, p.x_next, p.coef_a, p.coef_b, part,
        *_row_strides(p),
        d, chunk_len, num_chunks,
        float(p.guidance),
        HAS_UNCOND=p.eps_uncond is not None, ACC_FP64=p.acc_dtype == torch.float64, BLOCK=block,
        num_warps=_num_warps(block), enable_fp_fusion=_FP_FUSION,
    )
    return part


def _log_ratio_forward(p: PreparedLogRatio) -> tuple[Tensor, Tensor]:
    """Two launches: partial sums, then per-trajectory logits and per-item ℓ. Returns (logits, ratio[N, R])."""
    part = _partials(p)
    n, num_chunks = part.shape
    r = p.ref_sq.shape[1]
    device = p.eps_cond.device
    ratio = _empty((n, r), p.acc_dtype, device)
    logits = _empty((p.num_traj,), p.acc_dtype, device)
    block_n = min(_BLOCK_N, triton.next_power_of_2(n))
    _log_ratio_logits_kernel[(p.num_traj,)](
        part, p.ref_sq, p.sigma, p.weight, p.traj_index, ratio, logits,
        n, num_chunks, r, p.d,
        float(p.clip),
        MEAN=p.mean, ACC_FP64=p.acc_dtype == torch.float64, BLOCK_N=block_n,
        BLOCK_R=triton.next_power_of_2(r), enable_fp_fusion=_FP_FUSION,
    )
    return logits, ratio


def _log_ratio_backward(p: PreparedLogRatio, ratio: Tensor, grad_logits: Tensor) -> tuple[Tensor, Tensor | None]:
    """One launch: both gradients (grad of eps_uncond is None without CFG)."""
    n, d = p.n, p.d
    device = p.eps_cond.device
    block, chunk_len, num_chunks = _launch_config(n, d)
    grad_c = _empty(p.eps_cond.shape, p.eps_cond.dtype, device)
    grad_u = _empty(p.eps_uncond.shape, p.eps_uncond.dtype, device) if p.eps_uncond is not None else None
    eu = p.eps_uncond if p.eps_uncond is not None else p.eps_cond
    _log_ratio_bwd_kernel[(n, num_chunks)](
        p.eps_cond, eu, p.x, p.x_next, p.coef_a, p.coef_b, p.sigma, p.weight, p.traj_index, ratio,
        grad_logits, grad_c, grad_u if grad_u is not None else grad_c,
        *_row_strides(p),
        d, chunk_len, ratio.shape[1],
        float(p.guidance), float(p.clip),
        HAS_UNCOND=p.eps_uncond is not None, MEAN=p.mean, ACC_FP64=p.acc_dtype == torch.float64,
        BLOCK=block, BLOCK_R=triton.next_power_of_2(ratio.shape[1]),
        num_warps=_num_warps(block), enable_fp_fusion=_FP_FUSION,
    )
    return grad_c, grad_u


# ---------------------------------------------------------------------------
# Autograd


class LogRatioFunction(torch.autograd.Function):
    """Triton forward (2 launches) and backward (1 launch); saves only inputs + per-item scalars + ℓ."""

    @staticmethod
    def forward(ctx, eps_cond, eps_uncond, x, x_next, p: PreparedLogRatio):
        p = p._replace(eps_cond=eps_cond, eps_uncond=eps_uncond, x=x, x_next=x_next)
        logits, ratio = _log_ratio_forward(p)
        ctx.save_for_backward(eps_cond, eps_uncond, x, x_next, p.coef_a, p.coef_b, p.sigma, p.weight,
                              p.traj_index, ratio)
        ctx.prepared = p._replace(eps_cond=None, eps_uncond=None, x=None, x_next=None, ref_sq=None)
        ctx.mark_non_differentiable(ratio)
        return logits, ratio

    @staticmethod
    def backward(ctx, grad_logits, _grad_ratio):
        eps_cond, eps_uncond, x, x_next, a, b, sigma, weight, traj, ratio = ctx.saved_tensors
        if grad_logits is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        p = ctx.prepared._replace(eps_cond=eps_cond, eps_uncond=eps_uncond, x=x, x_next=x_next, coef_a=a,
                                  coef_b=b, sigma=sigma, weight=weight, traj_index=traj)
        grad_logits = grad_logits.to(ratio.dtype).contiguous()
        grad_c, grad_u = _log_ratio_backward(p, ratio, grad_logits)
        return (grad_c if ctx.needs_input_grad[0] else None,
                grad_u if ctx.needs_input_grad[1] else None, None, None, None)


# ---------------------------------------------------------------------------
# Entry points


def log_ratio(
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    x: Tensor,
    x_next: Tensor,
    coef_a: float | Tensor,
    coef_b: float | Tensor,
    sigma: float | Tensor,
    ref_sq: Tensor,
    weight: float | Tensor,
    traj_index: Tensor,
    num_traj: int,
    guidance: float = 1.0,
    clip: float = math.inf,
    reduction: str = "mean",
    impl: str = "auto",
) -> LogRatioOutput:
    """Per-trajectory weighted sum of clipped per-step log-ratios (module docstring for the math).

    Args:
        eps_cond, eps_uncond: [N, *S] model outputs (any float dtype, the same for both);
            ``eps_uncond=None`` means no CFG (ε̂ = eps_cond, ``guidance`` unused).
        x, x_next: [N, *S] states as stored (their own float dtype, e.g. fp32 states with bf16 outputs).
        coef_a, coef_b, sigma, weight: numbers or [N] tensors (σ must be finite and > 0).
        ref_sq: [N] or [N, R] cached ‖x' − μ_ref‖² (one column per reference; see :func:`squared_residual`).
        traj_index: int64 [N] in [0, num_traj): the trajectory whose logit each item adds to.
        guidance: CFG scale w (finite). clip: c > 0 (``inf`` = no clamp, e.g. for the warm-up).
        reduction: "mean" (÷ D, the paper's) or "sum" (the true density ratio).
        impl: "auto", "reference", "torch", "torch_compile" or "triton" (see ``dispatch.resolve_impl``).

    Items may have any dim-0 stride as long as each item ``t[i]`` is contiguous.

    Returns:
        ``LogRatioOutput(logits, ratio)``: ``logits`` [num_traj] fp32 (fp64 when an input is fp64),
        differentiable w.r.t. ``eps_cond`` / ``eps_uncond`` only (gradients in their dtypes);
        ``ratio`` shaped like ``ref_sq``, the unclipped ℓ (same dtype as ``logits``), detached.

    Deterministic: the same inputs give bitwise identical outputs and gradients.

    Non-finite inputs: NaN/inf in an item's ε or states make its ℓ non-finite; it is not
    clamped, so the logit of that item's trajectory becomes NaN/±inf, and the item's gradient
    is non-finite where its residual is. Other items and trajectories are unaffected.

    Raises:
        ValueError: naming the argument and what is allowed, for mismatched shapes/dtypes/devices,
        non-item-contiguous tensors, σ ≤ 0 or non-finite, c ≤ 0 or NaN, a reduction other than
        "mean"/"sum", num_traj < 1, traj_index of the wrong dtype/shape or out of range, ref_sq of
        the wrong shape, a non-finite guidance, or an unknown impl.
    """
    chosen = resolve_impl(impl, eps_cond.device if isinstance(eps_cond, Tensor) else "cpu")
    args = (eps_cond, eps_uncond, x, x_next, coef_a, coef_b, sigma, ref_sq, weight, traj_index, num_traj,
            guidance, clip, reduction)
    if chosen == "reference":
        return log_ratio_reference(*args)
    if chosen == "torch":
        return log_ratio_torch(*args)
    if chosen == "torch_compile":
        return log_ratio_torch_compiled(*args)
    p = prepare_log_ratio(*args)
    logits, ratio = LogRatioFunction.apply(p.eps_cond, p.eps_uncond, p.x, p.x_next, p)
    return LogRatioOutput(logits, ratio.reshape(p.ratio_shape))


def squared_residual(
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    x: Tensor,
    x_next: Tensor,
    coef_a: float | Tensor,
    coef_b: float | Tensor,
    guidance: float = 1.0,
    impl: str = "auto",
) -> Tensor:
    """‖x' − μ‖² per item, [N] fp32 (fp64 when an input is fp64), no grad: fills reference caches.

    μ = A·x + B·ε̂ with ε̂ = ε_u + w·(ε_c − ε_u) (ε̂ = ε_c when ``eps_uncond`` is None); compute it
    from the tensors as stored. Same argument rules as :func:`log_ratio`. ``impl="torch_compile"``
    runs the eager fused torch path (a one-off cache fill is not worth a compile).
    """
    chosen = resolve_impl(impl, eps_cond.device if isinstance(eps_cond, Tensor) else "cpu")
    if chosen == "reference":
        return squared_residual_reference(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    if chosen in ("torch", "torch_compile"):
        return squared_residual_torch(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    p = prepare_residual(eps_cond, eps_uncond, x, x_next, coef_a, coef_b, guidance)
    with torch.no_grad():
        return _partials(p).sum(1)
