"""Side-by-side kernel benchmark: the naive formula vs the fused torch path (eager and
compiled) vs Triton (CUDA only), at SD1.5 latent shapes.

Used by ``fastdense bench kernels`` and ``benchmarks/gpu_check.py``. Every row carries
the minimum bytes the pass must move (each input read once, each output written
once; DESIGN.md §1) and the bandwidth that implies.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from fastdense.benchmarks.timing import count_cuda_kernels, time_once_ms
from fastdense.devices import DTYPES

LATENT_SHAPE = (4, 64, 64)  # SD1.5 latents at 512×512
DEFAULT_NS = (8, 32, 128)


@dataclass
class KernelRow:
    op: str
    impl: str
    dtype: str
    n: int
    d: int
    fwd_ms: float | None
    bwd_ms: float | None
    fwd_bwd_ms: float | None
    min_bytes_fwd: int
    min_bytes_bwd: int | None
    gbps: float | None  # forward+backward minimum bytes / forward+backward time
    fwd_gbps: float | None
    bwd_gbps: float | None
    launches_fwd: int | None
    launches_bwd: int | None
    speedup_vs_naive: float | None = None
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LogRatioInputs:
    eps_u: torch.Tensor
    eps_c: torch.Tensor
    eps_ref_u: torch.Tensor
    eps_ref_c: torch.Tensor
    x: torch.Tensor
    x_next: torch.Tensor
    coef_a: torch.Tensor
    coef_b: torch.Tensor
    sigma: torch.Tensor
    ref_sq: torch.Tensor
    weight: torch.Tensor
    traj_index: torch.Tensor
    num_traj: int
    guidance: float = 7.5
    clip: float = 5e-4  # paper multi-prompt c with reduction "mean"


def make_log_ratio_inputs(n: int, dtype: torch.dtype, device: torch.device, shape=LATENT_SHAPE, seed: int = 0):
    """Random but realistic inputs: states are fp32 (as stored), model outputs in ``dtype``."""
    from fastdense.kernels.log_ratio import squared_residual

    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt)

    eps_u, eps_c = rnd(n, *shape, dt=dtype), rnd(n, *shape, dt=dtype)
    eps_ref_u = (eps_u.float() + 0.05 * rnd(n, *shape)).to(dtype)
    eps_ref_c = (eps_c.float() + 0.05 * rnd(n, *shape)).to(dtype)
    x = rnd(n, *shape)
    coef_a = (0.99 + 0.01 * torch.rand(n, generator=g)).to(device)
    coef_b = (-0.05 - 0.05 * torch.rand(n, generator=g)).to(device)
    sigma = (0.05 + 0.1 * torch.rand(n, generator=g)).to(device)
    x_next = coef_a.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * rnd(n, *shape)
    num_traj = max(1, n // 4)
    traj_index = (torch.arange(n) % num_traj).to(device)
    weight = torch.full((n,), 10.0 / 4, device=device)
    ref_sq = squared_residual(eps_ref_c, eps_ref_u, x, x_next, coef_a, coef_b, guidance=7.5, impl="torch")
    return LogRatioInputs(eps_u, eps_c, eps_ref_u, eps_ref_c, x, x_next, coef_a, coef_b, sigma, ref_sq, weight,
                          traj_index, num_traj)


def log_ratio_call(impl: str, inp: LogRatioInputs) -> Callable[[], torch.Tensor]:
    """A no-argument call of the log-ratio op (``naive`` formula or ``impl`` of the fused op) on ``inp``:
    what the benchmark times and ``fastdense profile kernels`` traces."""
    from fastdense.kernels.log_ratio import log_ratio
    from fastdense.kernels.log_ratio_torch import log_ratio_naive

    if impl == "naive":
        return lambda: log_ratio_naive(
            inp.eps_c, inp.eps_u, inp.eps_ref_c, inp.eps_ref_u, inp.x, inp.x_next, inp.coef_a, inp.coef_b,
            inp.sigma, inp.weight, inp.traj_index, inp.num_traj, guidance=inp.guidance, clip=inp.clip,
            reduction="mean",
        )
    return lambda: log_ratio(
        inp.eps_c, inp.eps_u, inp.x, inp.x_next, inp.coef_a, inp.coef_b, inp.sigma, inp.ref_sq, inp.weight,
        inp.traj_index, inp.num_traj, guidance=inp.guidance, clip=inp.clip, reduction="mean", impl=impl,
    ).logits


def _min_bytes_log_ratio(inp: LogRatioInputs) -> tuple[int, int]:
    n, d = inp.x.shape[0], inp.x[0].numel()
    eps_b, state_b = inp.eps_u.element_size(), inp.x.element_size()
    small = n * (4 * 6 + 8) + inp.num_traj * 4  # per-item scalars + index in, logits out
    fwd = n * d * (2 * eps_b + 2 * state_b) + small
    bwd = n * d * (2 * eps_b + 2 * state_b) + n * d * 2 * eps_b + small
    return fwd, bwd


@dataclass
class TimedCase:
    """One (op, impl, dtype, n) cell: timed phases (fn, untimed setup) and how to make its row."""

    phases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]]
    make_row: Callable[[dict[str, float]], KernelRow]


def log_ratio_case(impl: str, n: int, dtype_name: str, device: torch.device) -> TimedCase:
    inp = make_log_ratio_inputs(n, DTYPES[dtype_name], device)
    for t in (inp.eps_u, inp.eps_c):
        t.requires_grad_(True)
    call = log_ratio_call(impl, inp)
    upstream = torch.randn(inp.num_traj, device=device)
    state: dict[str, torch.Tensor] = {}

    def reset_grads():
        inp.eps_u.grad = inp.eps_c.grad = None

    def setup_bwd():
        reset_grads()
        state["out"] = call()  # the forward whose backward is timed (graph built, as in training)

    def fwd_bwd():
        call().backward(upstream)

    def fwd_no_grad():
        with torch.no_grad():
            return call()

    min_fwd, min_bwd = _min_bytes_log_ratio(inp)

    def make_row(ms: dict[str, float]) -> KernelRow:
        launches_fwd = count_cuda_kernels(fwd_no_grad)
        launches_bwd = None
        if launches_fwd is not None:
            setup_bwd()
            launches_bwd = count_cuda_kernels(lambda: state["out"].backward(upstream))
        return KernelRow(
            op="log_ratio", impl=impl, dtype=dtype_name, n=n, d=inp.x[0].numel(),
            fwd_ms=ms["fwd"], bwd_ms=ms["bwd"], fwd_bwd_ms=ms["fwd_bwd"], min_bytes_fwd=min_fwd,
            min_bytes_bwd=min_bwd, gbps=(min_fwd + min_bwd) / (ms["fwd_bwd"] * 1e-3) / 1e9,
            fwd_gbps=min_fwd / (ms["fwd"] * 1e-3) / 1e9, bwd_gbps=min_bwd / (ms["bwd"] * 1e-3) / 1e9,
            launches_fwd=launches_fwd, launches_bwd=launches_bwd, device=device.type,
        )

    return TimedCase(
        phases={
            "fwd": (call, reset_grads),  # forward with grad-requiring inputs, as in training
            "bwd": (lambda: state["out"].backward(upstream), setup_bwd),
            "fwd_bwd": (fwd_bwd, reset_grads),
        },
        make_row=make_row,
    )


def ddim_step_case(impl: str, n: int, dtype_name: str, device: torch.device) -> TimedCase:
    """The sampling-step op: reads ε_u, ε_c, x, z, writes x' (fp32 slot) and one scalar per sample."""
    from fastdense.kernels.ddim_step import ddim_step

    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (n, *LATENT_SHAPE)
    eps_u, eps_c = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(2))
    x, z = (torch.randn(*shape, generator=g).to(device) for _ in range(2))
    buffer = torch.empty(n, 3, *LATENT_SHAPE, device=device)
    out = buffer[:, 1]
    if impl == "naive":
        def call():
            eps = eps_u.float() + 7.5 * (eps_c.float() - eps_u.float())
            mu = 0.99 * x + (-0.07) * eps
            out.copy_(mu + 0.1 * z)
            return (out - mu).square().flatten(1).sum(1)
    else:
        def call():
            return ddim_step(x, eps_c, eps_u, z, 0.99, -0.07, 0.1, 7.5, out, impl=impl)
    d = math.prod(LATENT_SHAPE)
    min_fwd = n * d * (2 * eps_u.element_size() + 3 * 4) + n * 4

    def make_row(ms: dict[str, float]) -> KernelRow:
        return KernelRow(
            op="ddim_step", impl=impl, dtype=dtype_name, n=n, d=d, fwd_ms=ms["fwd"], bwd_ms=None,
            fwd_bwd_ms=None, min_bytes_fwd=min_fwd, min_bytes_bwd=None, gbps=None,
            fwd_gbps=min_fwd / (ms["fwd"] * 1e-3) / 1e9, bwd_gbps=None, launches_fwd=count_cuda_kernels(call),
            launches_bwd=None, device=device.type,
        )

    return TimedCase(phases={"fwd": (call, None)}, make_row=make_row)


def default_impls(device: torch.device) -> list[str]:
    impls = ["naive", "torch", "torch_compile"]
    if device.type == "cuda":
        impls.append("triton")
    return impls


def run_kernel_benchmarks(
    device: torch.device,
    ns: Iterable[int] = DEFAULT_NS,
    dtypes: Iterable[str] = ("fp32", "bf16"),
    impls: Iterable[str] | None = None,
    ops: Iterable[str] = ("log_ratio", "ddim_step"),
    repeats: int = 10,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[KernelRow]:
    """Median times per cell; the implementations of one (op, dtype, n) are timed round-robin,
    repeat by repeat, so that drift of a shared machine hits them alike."""
    impls = list(impls) if impls is not None else default_impls(device)
    rows: list[KernelRow] = []
    for op in ops:
        make_case = log_ratio_case if op == "log_ratio" else ddim_step_case
        for dtype_name in dtypes:
            for n in ns:
                if progress is not None:
                    progress(f"{op} {dtype_name} n={n}: {', '.join(impls)}")
                cases = {impl: make_case(impl, n, dtype_name, device) for impl in impls}
                for case in cases.values():
                    for fn, setup in case.phases.values():
                        for _ in range(warmup):
                            time_once_ms(fn, device, setup)
                times = {impl: {ph: [] for ph in case.phases} for impl, case in cases.items()}
                for _ in range(repeats):
                    for impl, case in cases.items():
                        for ph, (fn, setup) in case.phases.items():
                            times[impl][ph].append(time_once_ms(fn, device, setup))
                cell = [case.make_row({ph: statistics.median(v) for ph, v in times[impl].items()})
                        for impl, case in cases.items()]
                naive = next((r for r in cell if r.impl == "naive"), None)
                for row in cell:
                    if naive is not None and row is not naive:
                        key = row.fwd_bwd_ms if row.fwd_bwd_ms is not None else row.fwd_ms
                        naive_key = naive.fwd_bwd_ms if naive.fwd_bwd_ms is not None else naive.fwd_ms
                        row.speedup_vs_naive = naive_key / key
                rows.extend(cell)
                del cases
    return rows
