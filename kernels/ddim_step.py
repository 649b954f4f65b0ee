"""Fused DDIM sampling step: CFG combine, x' = μ + σ·z written in place, ‖x'_stored − μ‖².

Per item i of a batch [B, *S] (D = prod(S)), DESIGN.md §1::

    ε̂   = ε_u + w·(ε_c − ε_u)          (ε̂ = ε_c when eps_uncond is None)
    μ    = A_i·x + B_i·ε̂
    x'   = μ + σ_i·z                     stored into ``out`` (cast to out.dtype)
    sq_i = ‖x'_stored − μ‖²              returned, [B]

The residual is computed from the value *as stored* (after the cast to
``out.dtype``), so the recorded transition's likelihood is self-consistent: with
σ > 0, log π(x'|x) = −sq/(2σ²) − (D/2)·log(2πσ²) for exactly the x' in ``out``.
While the sampling policy is the reference policy this is the cached ``ref_sq``.

Decisions:

- Math in float32; in float64 when any of x / eps_cond / eps_uncond / noise is
  float64 (the residual is then float64 too, otherwise float32). Coefficients are
  cast to that dtype.
- ``out`` is written through (no hidden copy): typically a view
  ``traj_latents[:, t + 1]`` of a [B, T+1, *S] buffer; only each item must be
  contiguous. ``out`` may *be* one of the inputs (same memory, strides and dtype:
  an in-place step, e.g. ``out=x``); any other overlap with an input, or between
  its own items, is refused.
- σ = 0 is allowed (η = 0 deterministic sampling); σ < 0 is refused. Python
  numbers are always checked; tensor coefficients are checked on CPU only (on
  CUDA a check would cost a host sync every step).
- Without CFG (``eps_uncond=None``) ``guidance`` is ignored.
- Not differentiable: a sampling op, run under ``torch.no_grad``.

The Triton kernel writes ``out`` and one partial sum per (item, chunk of
BLOCK_SIZE elements); a fixed-order torch sum over the chunks finishes the
residual, so results are bitwise reproducible (no atomics).
"""


import torch
from torch import Tensor

from ._checks import check_number, ddim_coef, validate_ddim_step
from .ddim_step_torch import compiled_ddim_step_torch, ddim_step_reference, ddim_step_torch
from .dispatch import resolve_impl

try:  # triton is a Linux-only dependency; the torch paths work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["ddim_step", "ddim_step_triton"]

DEFAULT_BLOCK_SIZE = 1024
_MAX_GRID_DIM1 = 65535
# FMA contraction (a·b + c as one fused multiply-add, rounded once): on, as Triton <= 3.9 compiles
# by default, so results stay what they were. μ = A·x + B·ε̂ is computed once and both the stored
# x' = μ + σ·z and the residual x'_stored − μ use that same μ, so sq stays consistent with the
# stored x' either way. Passed in the launch because Triton 3.10 turns its default off
# (TRITON_DEFAULT_FP_FUSION): the environment must not change the compiled code. kernels/aot.py
# compiles with this same value.
_FP_FUSION = True


# ---------------------------------------------------------------------------------------------------
# Triton kernel

if triton is not None:

    @triton.jit
    def _ddim_step_fwd_kernel(
        x_ptr,  # [B, D] state x, row stride x_row_stride, rows contiguous
        eps_c_ptr,  # [B, D] conditional model output, row stride eps_c_row_stride
        eps_u_ptr,  # [B, D] unconditional model output (read only when HAS_CFG)
        noise_ptr,  # [B, D] z, row stride noise_row_stride
        coef_ptr,  # [4, B] compute dtype, contiguous: rows A, B, σ, w
        out_ptr,  # [B, D] x' (written), row stride out_row_stride
        partial_ptr,  # [B, n_chunks] compute dtype (written): Σ_chunk (x'_stored − μ)²
        x_row_stride,
        eps_c_row_stride,
        eps_u_row_stride,
        noise_row_stride,
        out_row_stride,
        n_items,
        n_cols,
        n_chunks,
        BLOCK_SIZE: tl.constexpr,
        HAS_CFG: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        if ACC_FP64:
            acc_ty = tl.float64
        else:
            acc_ty = tl.float32

        cols = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols

        a = tl.load(coef_ptr + row).to(acc_ty)
        b = tl.load(coef_ptr + n_items + row).to(acc_ty)
        s = tl.load(coef_ptr + 2 * n_items + row).to(acc_ty)

        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(acc_ty)
        eps = tl.load(eps_c_ptr + row * eps_c_row_stride + cols, mask=mask, other=0.0).to(acc_ty)
        if HAS_CFG:
            w = tl.load(coef_ptr + 3 * n_items + row).to(acc_ty)
            eps_u = tl.load(eps_u_ptr + row * eps_u_row_stride + cols, mask=mask, other=0.0).to(acc_ty)
            eps = eps_u + w * (eps - eps_u)
        z = tl.load(noise_ptr + row * noise_row_stride + cols, mask=mask, other=0.0).to(acc_ty)

        mu = a * x + b * eps
        stored = (mu + s * z).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * out_row_stride + cols, stored, mask=mask)

        r = tl.where(mask, stored.to(acc_ty) - mu, 0.0)
        tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(r * r, axis=0))


def _launch_config(d: int, block_size: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_SIZE, chunks per item, num_warps) for items of ``d`` elements (also what the AOT compile
    and the static report use)."""
    block = block_size or min(DEFAULT_BLOCK_SIZE, triton.next_power_of_2(d))
    if block & (block - 1):
        raise ValueError(f"block_size={block_size} must be a power of two")
    n_chunks = triton.cdiv(d, block)
    if block_size is None:
        while n_chunks > _MAX_GRID_DIM1:  # CUDA limits grid dim 1 to 65535
            block *= 2
            n_chunks = triton.cdiv(d, block)
    return block, n_chunks, 4 if block <= 1024 else 8


def ddim_step_triton(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    noise: Tensor,
    coef_a: Tensor,
    coef_b: Tensor,
    sigma: Tensor,
    guidance: float,
    out: Tensor,
    *,
    block_size: int | None = None,
) -> Tensor:
    """Launcher; normalised arguments as for the torch paths. ``block_size``: elements per chunk."""
    if triton is None:  # pragma: no cover
        raise ValueError("impl='triton' needs the triton package; use impl='torch'")
    acc = coef_a.dtype
    n, d = x.shape[0], x[0].numel()
    x2, ec2, nz2, out2 = (t.reshape(n, d) for t in (x, eps_cond, noise, out))
    eu2 = eps_uncond.reshape(n, d) if eps_uncond is not None else ec2
    if out2.data_ptr() != out.data_ptr() or (n > 1 and out2.stride(0) != out.stride(0)):  # pragma: no cover
        raise AssertionError("out could not be viewed as [B, D]; it must be written in place")
    block, n_chunks, num_warps = _launch_config(d, block_size)
    w = torch.full_like(coef_a, guidance)
    coefs = torch.stack((coef_a, coef_b, sigma, w)).contiguous()  # [4, B]
    partials = torch.empty((n, n_chunks), dtype=acc, device=x.device)
    _ddim_step_fwd_kernel[(n, n_chunks)](
        x2,
        ec2,
        eu2,
        nz2,
        coefs,
        out2,
        partials,
        x2.stride(0),
        ec2.stride(0),
        eu2.stride(0),
        nz2.stride(0),
        out2.stride(0),
        n,
        d,
        n_chunks,
        BLOCK_SIZE=block,
        HAS_CFG=eps_uncond is not None,
        ACC_FP64=acc == torch.float64,
        num_warps=num_warps,
        enable_fp_fusion=_FP_FUSION,
    )
    return partials.sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# Functional entry point


def ddim_step(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    noise: Tensor,
    coef_a: float | Tensor,
    coef_b: float | Tensor,
    sigma: float | Tensor,
    guidance: float,
    out: Tensor,
    impl: str | None = "auto",
) -> Tensor:
    """One DDIM step for a batch, written into ``out``; returns ‖x'_stored − μ‖² per item.

    Args:
        x: [B, *S] current latents (any float dtype).
        eps_cond: [B, *S] (conditional) model output, ε or v per the table's prediction type.
        eps_uncond: [B, *S] unconditional output for CFG, or None (then ε̂ = eps_cond).
        noise: [B, *S] z ~ N(0, I).
        coef_a, coef_b, sigma: python numbers or [B] / scalar tensors (``StepTable.coefs(t)``).
        guidance: CFG scale w (ignored without eps_uncond).
        out: [B, *S] destination (any float dtype, e.g. ``traj_latents[:, t + 1]``); each
            item contiguous. May be one of the inputs itself (in-place step).
        impl: "auto", "reference", "torch", "torch_compile" or "triton" (see ``dispatch``).

    Returns:
        [B] float32 (float64 when a state/model-output input is float64).
    """
    acc = validate_ddim_step(x, eps_cond, eps_uncond, noise, out)
    n, dev = x.shape[0], x.device
    a = ddim_coef(coef_a, n, "coef_a", dev, acc)
    b = ddim_coef(coef_b, n, "coef_b", dev, acc)
    s = ddim_coef(sigma, n, "sigma", dev, acc, nonneg=True)
    w = check_number(guidance, "guidance", allowed="a python number (the CFG scale)")
    impl = resolve_impl(impl, dev)
    if n == 0 or out.numel() == 0:
        return torch.zeros((n,), dtype=acc, device=dev)
    with torch.no_grad():
        if impl == "triton":
            return ddim_step_triton(x, eps_cond, eps_uncond, noise, a, b, s, w, out)
        fn = {
            "reference": ddim_step_reference,
            "torch": ddim_step_torch,
            "torch_compile": compiled_ddim_step_torch(),
        }[impl]
        return fn(x, eps_cond, eps_uncond, noise, a, b, s, w, out)
