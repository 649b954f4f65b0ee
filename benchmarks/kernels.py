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

from fastdense.benchmarks.roofline import ddim_step_min_bytes, log_ratio_min_bytes
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
    return log_ratio_min_bytes(inp.x.shape[0], inp.x[0].numel(), inp.eps_u.element_size(), inp.x.element_size(),
                               num_traj=inp.num_traj)


@dataclass
class TimedCase:
    """One (op, impl, dtype, n) cell: timed phases (fn, untimed setup) and how to make its row."""

    phases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]]
    make_row: Callable[[dict[str, float]], KernelRow]


def log_ratio_case(impl: str, n: int, dtype_name: str, device: torch.device, shape=LATENT_SHAPE) -> TimedCase:
    inp = make_log_ratio_inputs(n, DTYPES[dtype_name], device, shape=shape)
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


def ddim_step_call(impl: str, n: int, dtype_name: str, device: torch.device, shape=LATENT_SHAPE):
    """A no-argument call of one DDIM step on ``n`` items (``naive``: the eager CFG + DDIM step
    written the obvious way; else ``impl`` of the fused op), and its model-output tensor."""
    from fastdense.kernels.ddim_step import ddim_step

    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cpu").manual_seed(1)
    full = (n, *shape)
    eps_u, eps_c = (torch.randn(*full, generator=g).to(device, dtype) for _ in range(2))
    x, z = (torch.randn(*full, generator=g).to(device) for _ in range(2))
    buffer = torch.empty(n, 3, *shape, device=device)
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
    return call, eps_u


def ddim_step_case(impl: str, n: int, dtype_name: str, device: torch.device, shape=LATENT_SHAPE) -> TimedCase:
    """The sampling-step op: reads ε_u, ε_c, x, z, writes x' (fp32 slot) and one scalar per sample."""
    call, eps_u = ddim_step_call(impl, n, dtype_name, device, shape)
    d = math.prod(shape)
    min_fwd = ddim_step_min_bytes(n, d, eps_u.element_size())

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
    shape: tuple[int, ...] = LATENT_SHAPE,
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
                cases = {impl: make_case(impl, n, dtype_name, device, shape) for impl in impls}
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


# ------------------------------------------------------------------------------------ traffic


@dataclass
class Traffic:
    """Memory traffic of a call as eager torch runs it: every aten op reads its inputs and writes
    its outputs once (views are free; an expanded input counts its storage, not its view)."""

    bytes_big: int = 0  # traffic of tensors of at least ``item_bytes`` (the per-item arrays)
    bytes_all: int = 0
    launches: int = 0  # ops that produce a tensor (one kernel each on a GPU), host syncs excluded
    syncs: int = 0  # aten._local_scalar_dense / is_nonzero: a device-to-host wait
    ops: list[str] | None = None


_SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")


def count_traffic(fn: Callable[[], object], item_elems: int) -> Traffic:
    """Run ``fn`` under a dispatch mode that adds up the bytes each aten op reads and writes.

    ``item_elems``: D, the size of one item; a tensor counts towards ``bytes_big`` when its own
    traffic is at least D elements (so the per-item scalars, < 0.1 % at SD1.5 shapes, do not).
    Runs on any device; backward ops are seen when ``fn`` calls ``backward`` (CPU autograd runs
    on the calling thread).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    traffic = Traffic(ops=[])

    def nbytes(t: torch.Tensor) -> int:
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = str(func)
            if name.startswith(_SYNC_OPS):
                traffic.syncs += 1
                return out
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if not outs or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
                return out  # a view, or no tensor produced: no kernel, no traffic
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t in ins + outs:
                b = nbytes(t)
                traffic.bytes_all += b
                if b >= item_elems * t.element_size():
                    traffic.bytes_big += b
            traffic.launches += 1
            traffic.ops.append(name)
            return out

    with _Counter():
        fn()
    return traffic


def naive_traffic(op: str, dtype_name: str, shape=(4, 8, 8), n: int = 4) -> dict[str, Traffic]:
    """Traffic of the naive baseline cell of the benchmark (on CPU, at small shapes: the counts
    per element of N·D do not depend on them): ``{"fwd", "bwd"}`` for log_ratio, ``{"fwd"}`` for
    ddim_step. The forward runs with ε requiring grad, as the benchmark times it."""
    device = torch.device("cpu")
    d = math.prod(shape)
    if op == "ddim_step":
        call, _ = ddim_step_call("naive", n, dtype_name, device, shape)
        return {"fwd": count_traffic(call, d)}
    case = log_ratio_case("naive", n, dtype_name, device, shape)
    out = {}
    for phase in ("fwd", "bwd"):
        fn, setup = case.phases[phase]
        if setup is not None:
            setup()
        out[phase] = count_traffic(fn, d)
    return out


def naive_traffic_table(shape=(4, 8, 8), n: int = 4) -> dict[tuple[str, str, str], tuple[float, int, int]]:
    """``{(op, dtype, dir): (bytes per element of N·D, launches, syncs)}``: the numbers behind
    ``roofline.NAIVE_TRAFFIC`` (which a test compares with this count)."""
    d = math.prod(shape)
    table = {}
    for op in ("log_ratio", "ddim_step"):
        for dtype_name in ("fp32", "bf16", "fp16"):
            for phase, t in naive_traffic(op, dtype_name, shape, n).items():
                table[(op, dtype_name, phase)] = (t.bytes_big / (n * d), t.launches, t.syncs)
    return table
