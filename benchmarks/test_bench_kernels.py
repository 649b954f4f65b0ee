"""pytest-benchmark suite for the kernels: ``pytest benchmarks/ --benchmark-only``.

Same shapes as ``fastdense bench kernels`` (SD1.5 latents); groups put the
implementations of one (op, dtype, n) side by side. Triton only on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from fastdense.benchmarks.kernels import DTYPES, log_ratio_call, make_log_ratio_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["naive", "torch"] + (["triton"] if DEVICE.type == "cuda" else [])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", [8, 32, 128])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_log_ratio_fwd_bwd(benchmark, impl, dtype, n):
    inp = make_log_ratio_inputs(n, DTYPES[dtype], DEVICE)
    inp.eps_u.requires_grad_(True)
    inp.eps_c.requires_grad_(True)
    call = log_ratio_call(impl, inp)
    upstream = torch.randn(inp.num_traj, device=DEVICE)
    benchmark.group = f"log_ratio fwd+bwd {dtype} n={n}"

    def step():
        inp.eps_u.grad = inp.eps_c.grad = None
        call().backward(upstream)
        _sync()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(inp.eps_c.grad).all()


@pytest.mark.parametrize("n", [8, 32])
@pytest.mark.parametrize("impl", ["torch"] + (["triton"] if DEVICE.type == "cuda" else []))
def test_ddim_step(benchmark, impl, n):
    from fastdense.kernels.ddim_step import ddim_step

    shape = (n, 4, 64, 64)
    eps_u, eps_c, x, z = (torch.randn(shape, device=DEVICE) for _ in range(4))
    buffer = torch.empty(n, 3, 4, 64, 64, device=DEVICE)
    benchmark.group = f"ddim_step fp32 n={n}"

    def step():
        ddim_step(x, eps_c, eps_u, z, 0.99, -0.07, 0.1, 7.5, buffer[:, 1], impl=impl)
        _sync()

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(buffer[:, 1]).all()
