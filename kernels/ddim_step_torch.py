"""Torch implementations of the fused DDIM sampling step (see ``ddim_step.py``).

Both functions take *normalised* arguments, as produced by ``ddim_step.ddim_step``
after validation: ``coef_a`` / ``coef_b`` / ``sigma`` are [B] tensors in the compute
dtype (float32, or float64 when a state/model-output input is float64), ``guidance``
is a python float, ``eps_uncond`` may be None (no CFG).

Per item i (D = prod(S))::

    ε̂   = ε_u + w·(ε_c − ε_u)          (ε̂ = ε_c without CFG)
    μ    = A·x + B·ε̂
    x'   = μ + σ·z                       written to ``out`` (cast to out.dtype)
    sq_i = ‖x'_stored − μ‖²              returned, compute dtype, [B]

``ddim_step_reference`` is the readable ground truth (float64 when fed float64);
``ddim_step_torch`` is the fused path (few passes, no per-element python), the one
``torch.compile`` wraps for the ``torch_compile`` implementation.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["COMPILE_OPTIONS", "compiled_ddim_step_torch", "ddim_step_reference", "ddim_step_torch"]


def _per_item_view(c: Tensor, like: Tensor) -> Tensor:
    return c.view((like.shape[0],) + (1,) * (like.dim() - 1))


def ddim_step_reference(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    noise: Tensor,
    coef_a: Tensor,
    coef_b: Tensor,
    sigma: Tensor,
    guidance: float,
    out: Tensor,
) -> Tensor:
    """Eager, readable reference; computes in ``coef_a.dtype``. Writes ``out``, returns [B]."""
    acc = coef_a.dtype
    a, b, s = (_per_item_view(c, x) for c in (coef_a, coef_b, sigma))
    eps_c = eps_cond.to(acc)
    if eps_uncond is None:
        eps_hat = eps_c
    else:
        eps_u = eps_uncond.to(acc)
        eps_hat = eps_u + guidance * (eps_c - eps_u)
    mu = a * x.to(acc) + b * eps_hat
    x_new = mu + s * noise.to(acc)
    stored = x_new.to(out.dtype)
    out.copy_(stored)
    residual = stored.to(acc) - mu
    return (residual * residual).reshape(x.shape[0], -1).sum(dim=1)


def ddim_step_torch(
    x: Tensor,
    eps_cond: Tensor,
    eps_uncond: Tensor | None,
    noise: Tensor,
    coef_a: Tensor,
    coef_b: Tensor,
    sigma: Tensor,
    guidance: float,
    out: Tensor,
) -> Tensor:
    """Fused torch path (same function as the reference); torch.compile-able."""
    acc = coef_a.dtype
    a, b, s = (_per_item_view(c, x) for c in (coef_a, coef_b, sigma))
    eps_hat = eps_cond.to(acc)
    if eps_uncond is not None:
        eps_u = eps_uncond.to(acc)
        eps_hat = torch.add(eps_u, eps_hat - eps_u, alpha=guidance)
    mu = torch.addcmul(a * x.to(acc), b, eps_hat)
    x_new = torch.addcmul(mu, s, noise.to(acc))
    if out.dtype == acc:
        out.copy_(x_new)  # stored value == x_new exactly
        residual = x_new - mu
    else:
        stored = x_new.to(out.dtype)
        out.copy_(stored)
        residual = stored.to(acc) - mu
    return residual.square().reshape(x.shape[0], -1).sum(dim=1)


# Inductor normally fuses ``x_new.to(bf16).to(fp32)`` into a no-op, which would make the residual
# that of the unrounded x' rather than of the stored value. ``emulate_precision_casts`` keeps the
# rounding. Anyone compiling a larger region that contains ``ddim_step_torch`` (a whole sampler
# loop, say) must set it too: ``torch._inductor.config.patch(emulate_precision_casts=True)``.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


@functools.cache
def compiled_ddim_step_torch():
    """``torch.compile`` of :func:`ddim_step_torch`, built once per process on first use."""
    return torch.compile(ddim_step_torch, dynamic=None, options=COMPILE_OPTIONS)
