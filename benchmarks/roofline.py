"""Bandwidth model of the loss and sampling-step kernels on A100 / H100 / H200: pure arithmetic, no torch.

``fastdense bench kernels --model h100`` prints it (and, on a GPU, the measured time beside it);
``benchmarks/gpu_check.py`` puts it in its report; :mod:`fastdense.benchmarks.scaling` reads the
GPU table for its cluster model. Every number below is either a published figure (with its
source in :data:`GPUS` and BENCHMARKS.md) or a named assumption (:class:`Assumptions`).

Minimum bytes per cell (DESIGN.md §1; each input read once, each output written once), for
N items of D elements, model outputs (ε_u, ε_c) of ``e`` bytes per element and states (x, x')
of ``s`` bytes (fp32 in the buffer):

* ``log_ratio`` forward reads ε_u, ε_c, x, x' (``N·D·(2e + 2s)``) and writes one logit per
  trajectory; backward re-reads the same four and writes ∂ε_c, ∂ε_u in the model dtype
  (``N·D·(2e + 2s) + N·D·2e``). Per item also 6 scalars of 4 bytes (A, B, σ, ref_sq, weight
  in; ℓ out) and an 8-byte trajectory index, and 4 bytes per trajectory (the logits).
  bf16 model outputs with fp32 states: 12·D bytes per item forward, 16·D backward.
* ``ddim_step`` reads ε_u, ε_c (model dtype), x and z (fp32), writes x' (fp32) and one fp32
  residual per item: ``N·D·(2e + 3·4) + 4·N``.

Modelled time of one call = launches × launch latency + bytes / (peak HBM bandwidth × copy
efficiency). A sum, not ``max``: the benchmark times one call at a time, synchronised
(``timing.time_once_ms``), so nothing overlaps the fixed cost of launching (and draining) the
call's kernels with its streaming; ``max`` would be the asymptotic roofline of back-to-back
calls and claims 100 % of copy bandwidth for any N. With the sum, the model itself says from
which N an op is bandwidth-bound (the latency term falls below the streaming term).

The naive formula (``log_ratio_naive``, the baseline of the ≥ 3× target; and the benchmark's
eager CFG + DDIM step) is modelled the same way from its own traffic: every eager torch op reads
its inputs and writes its output once and is one launch; the Normal distributions' argument
validation adds host syncs. Those counts are :data:`NAIVE_TRAFFIC`, counted by
:func:`fastdense.benchmarks.kernels.count_traffic` (a dispatch-mode counter of every aten op)
and pinned by ``tests/test_bench_model.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = [
    "DTYPE_BYTES",
    "GPUS",
    "NAIVE_TRAFFIC",
    "TRITON_LAUNCHES",
    "Assumptions",
    "GpuSpec",
    "ModelRow",
    "NaiveTraffic",
    "attach_measured",
    "crossover_n",
    "ddim_step_min_bytes",
    "gpu_key_of",
    "gpu_spec",
    "log_ratio_min_bytes",
    "model_rows",
    "model_targets",
]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STATE_BYTES = 4  # x, x' as stored in the replay buffer (sampling.latent_dtype fp32)
LATENT_D = 4 * 64 * 64  # SD1.5 latents at 512×512


@dataclass(frozen=True)
class GpuSpec:
    """Published figures of one data-centre GPU (SXM board) and of the 8-GPU node it ships in."""

    key: str
    name: str
    hbm_tb_s: float  # peak HBM bandwidth, TB/s (10^12 B/s)
    bf16_dense_tflops: float  # peak dense bf16 tensor-core FLOP/s (without 2:4 sparsity), 10^12
    memory_gb: float  # HBM capacity, GB as NVIDIA states it
    nvlink_gb_s: float  # NVLink bandwidth per GPU, both directions together, GB/s
    nic_gb_s: float  # one InfiniBand port, one direction, GB/s (NDR 400 Gb/s = 50 GB/s)
    nics_per_node: int  # compute-fabric ports per 8-GPU node (one per GPU: rail-optimised)
    gpus_per_node: int
    fabric: str  # the node's GPU interconnect and InfiniBand generation, in words
    sources: tuple[str, ...] = field(default=())

    @property
    def nvlink_one_way_gb_s(self) -> float:
        return self.nvlink_gb_s / 2


_A100_DATASHEET = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                   "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf")
_H100_DATASHEET = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200_PAGE = "https://www.nvidia.com/en-us/data-center/h200/"
_DGX_H_RA = ("https://docs.nvidia.com/dgx-basepod/reference-architecture-infrastructure-foundation-enterprise-ai/"
             "latest/core-components.html")
_DGX_A100_RA = "NVIDIA DGX SuperPOD reference architecture RA-09950-001 (DGX A100, Nov 2020)"

GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec(
        "a100", "A100-SXM4-80GB", hbm_tb_s=2.039, bf16_dense_tflops=312.0, memory_gb=80.0, nvlink_gb_s=600.0,
        nic_gb_s=25.0, nics_per_node=8, gpus_per_node=8, fabric="NVLink 3 + InfiniBand HDR 200 Gb/s",
        sources=(_A100_DATASHEET, _DGX_A100_RA),
    ),
    "h100": GpuSpec(
        "h100", "H100 SXM5 80GB", hbm_tb_s=3.35, bf16_dense_tflops=989.0, memory_gb=80.0, nvlink_gb_s=900.0,
        nic_gb_s=50.0, nics_per_node=8, gpus_per_node=8, fabric="NVLink 4 + InfiniBand NDR 400 Gb/s",
        sources=(_H100_DATASHEET, _DGX_H_RA),
    ),
    "h200": GpuSpec(
        "h200", "H200 SXM 141GB", hbm_tb_s=4.8, bf16_dense_tflops=989.0, memory_gb=141.0, nvlink_gb_s=900.0,
        nic_gb_s=50.0, nics_per_node=8, gpus_per_node=8, fabric="NVLink 4 + InfiniBand NDR 400 Gb/s",
        sources=(_H200_PAGE, _DGX_H_RA),
    ),
}


def gpu_spec(key: str, what: str = "--model") -> GpuSpec:
    """The spec of ``key`` (a100, h100, h200); a one-line ValueError otherwise."""
    spec = GPUS.get(str(key).lower())
    if spec is None:
        raise ValueError(f"{what} {key!r} is not allowed; allowed: {', '.join(GPUS)}")
    return spec


def gpu_key_of(device_name: str) -> str | None:
    """The :data:`GPUS` key of a CUDA device name (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    for key in ("h200", "h100", "a100"):
        if key in name:
            return key
    return None


@dataclass(frozen=True)
class Assumptions:
    """The bandwidth model's named assumptions (none of them is a published figure)."""

    # Fraction of the peak HBM bandwidth a device-to-device copy reaches (read + write bytes
    # over time): measured copies typically reach ~85-92 % of the spec; gpu_check measures it.
    copy_efficiency: float = 0.90
    # One kernel launch on the critical path of a synchronised call (host launch + GPU ramp-up
    # and drain of a kernel that moves almost nothing): a few µs on A100/H100; also the cost we
    # charge for each eager torch op of the naive path (its per-op host overhead is similar).
    launch_us: float = 5.0
    # One host sync (``.item()``-like D2H wait, e.g. Normal's argument validation): the queue
    # drains and the host round-trips before the next launch.
    sync_us: float = 10.0

    def describe(self) -> list[str]:
        return [
            f"copy efficiency {self.copy_efficiency:.0%} of peak HBM bandwidth (measured copies reach ~85-92 %)",
            f"launch latency {self.launch_us:g} µs per kernel on the critical path (also per eager op of the "
            "naive path)",
            f"host sync {self.sync_us:g} µs each (the naive path's Normal argument checks)",
            "modelled time = launches × latency (+ syncs) + min bytes / (peak HBM × copy efficiency): a sum, "
            "because one timed call is launched and synchronised alone",
        ]


# Launches of our Triton path per benchmarked call, counted from the launchers: log-ratio
# forward = partial-sums kernel + logits kernel; backward = one kernel; the benchmark's
# ddim_step (python-number coefficients) = 3 coefficient fills + guidance fill + stack of the
# [4, B] table + the kernel + the sum of the per-chunk partials.
TRITON_LAUNCHES = {("log_ratio", "fwd"): 2, ("log_ratio", "bwd"): 1, ("ddim_step", "fwd"): 7}


def log_ratio_min_bytes(n: int, d: int, eps_bytes: int, state_bytes: int = STATE_BYTES,
                        num_traj: int | None = None) -> tuple[int, int]:
    """(forward, backward) minimum bytes of one log-ratio call on N items of D elements."""
    num_traj = max(1, n // 4) if num_traj is None else num_traj
    small = n * (4 * 6 + 8) + num_traj * 4  # per-item scalars + index in, ℓ out; logits out
    reads = n * d * (2 * eps_bytes + 2 * state_bytes)
    return reads + small, reads + n * d * 2 * eps_bytes + small


def ddim_step_min_bytes(n: int, d: int, eps_bytes: int, state_bytes: int = STATE_BYTES) -> int:
    """Minimum bytes of one DDIM step on N items: ε_u, ε_c, x, z in; x' and the residual out."""
    return n * d * (2 * eps_bytes + 3 * state_bytes) + n * 4


@dataclass(frozen=True)
class NaiveTraffic:
    """Traffic of one naive call per element of N·D (tensors of at least one item's size; the
    per-item scalars are < 0.1 % and left out), its eager op launches and host syncs."""

    bytes_per_element: int
    launches: int
    syncs: int


# Counted by fastdense.benchmarks.kernels.count_traffic (torch 2.13, 2026-12-04):
#   python -c "from fastdense.benchmarks.kernels import naive_traffic_table; print(naive_traffic_table())"
# log_ratio: log_ratio_naive (policy and reference: dtype casts, CFG combine, DDIM mean,
# Normal(μ, σ).log_prob(x') with argument validation, subtract, mean, clamp, index_add) with ε
# requiring grad, as in training; "bwd" is autograd's backward of it. ddim_step: the benchmark's
# eager CFG + DDIM step (casts, combine, mean, noise, copy into the slot, residual).
NAIVE_TRAFFIC: dict[tuple[str, str, str], NaiveTraffic] = {
    ("log_ratio", "fp32", "fwd"): NaiveTraffic(332, 48, 6),
    ("log_ratio", "fp32", "bwd"): NaiveTraffic(96, 18, 0),
    ("log_ratio", "bf16", "fwd"): NaiveTraffic(368, 54, 6),
    ("log_ratio", "bf16", "bwd"): NaiveTraffic(108, 21, 0),
    ("log_ratio", "fp16", "fwd"): NaiveTraffic(368, 54, 6),
    ("log_ratio", "fp16", "bwd"): NaiveTraffic(108, 21, 0),
    ("ddim_step", "fp32", "fwd"): NaiveTraffic(116, 12, 0),
    ("ddim_step", "bf16", "fwd"): NaiveTraffic(134, 15, 0),
    ("ddim_step", "fp16", "fwd"): NaiveTraffic(134, 15, 0),
}


@dataclass
class ModelRow:
    """One cell of the bandwidth model: an op, direction, dtype, N, and the implementation it models."""

    op: str
    dir: str  # fwd, bwd, fwd+bwd
    dtype: str
    n: int
    impl: str  # "triton" (our kernels at their minimum bytes) or "naive" (the baseline formula)
    gpu: str
    min_bytes: int
    bytes_us: float  # bytes / (peak × copy efficiency)
    launches: int
    syncs: int
    latency_us: float  # launches × launch latency + syncs × sync cost: the floor
    model_us: float  # latency_us + bytes_us
    model_gbps: float  # min bytes / model time: what the model says the call reaches
    copy_gbps: float  # peak × copy efficiency
    measured_us: float | None = None
    of_model: float | None = None  # model_us / measured_us: the fraction of the model reached
    measured_gbps: float | None = None
    of_copy: float | None = None  # measured GB/s / copy GB/s (measured copy bandwidth when known)

    def as_dict(self) -> dict:
        return asdict(self)


def _cell(op, direction, dtype, n, impl, spec: GpuSpec, a: Assumptions, nbytes, launches, syncs) -> ModelRow:
    copy = spec.hbm_tb_s * 1e12 * a.copy_efficiency
    bytes_us = nbytes / copy * 1e6
    latency = launches * a.launch_us + syncs * a.sync_us
    model = latency + bytes_us
    return ModelRow(op=op, dir=direction, dtype=dtype, n=n, impl=impl, gpu=spec.key, min_bytes=int(nbytes),
                    bytes_us=bytes_us, launches=launches, syncs=syncs, latency_us=latency, model_us=model,
                    model_gbps=nbytes / (model * 1e-6) / 1e9, copy_gbps=copy / 1e9)


def model_rows(spec: GpuSpec, ns, dtypes, ops=("log_ratio", "ddim_step"), *, d: int = LATENT_D,
               assumptions: Assumptions | None = None, naive: bool = True) -> list[ModelRow]:
    """The model table: per (op, dtype, N) the Triton path at its minimum bytes (fwd, bwd, fwd+bwd
    for log_ratio; fwd for ddim_step), and the naive formula beside it when ``naive``."""
    a = assumptions or Assumptions()
    rows: list[ModelRow] = []
    for op in ops:
        for dtype in dtypes:
            e = DTYPE_BYTES[dtype]
            for n in ns:
                if op == "log_ratio":
                    fwd, bwd = log_ratio_min_bytes(n, d, e)
                    lf, lb = TRITON_LAUNCHES[(op, "fwd")], TRITON_LAUNCHES[(op, "bwd")]
                    cells = [("fwd", fwd, lf, 0), ("bwd", bwd, lb, 0), ("fwd+bwd", fwd + bwd, lf + lb, 0)]
                    rows += [_cell(op, dr, dtype, n, "triton", spec, a, b, la, 0) for dr, b, la, _ in cells]
                    if naive:
                        nf, nb = NAIVE_TRAFFIC[(op, dtype, "fwd")], NAIVE_TRAFFIC[(op, dtype, "bwd")]
                        for dr, parts in (("fwd", (nf,)), ("bwd", (nb,)), ("fwd+bwd", (nf, nb))):
                            rows.append(_cell(op, dr, dtype, n, "naive", spec, a,
                                              sum(p.bytes_per_element for p in parts) * n * d,
                                              sum(p.launches for p in parts), sum(p.syncs for p in parts)))
                else:
                    rows.append(_cell(op, "fwd", dtype, n, "triton", spec, a, ddim_step_min_bytes(n, d, e),
                                      TRITON_LAUNCHES[(op, "fwd")], 0))
                    if naive:
                        t = NAIVE_TRAFFIC[(op, dtype, "fwd")]
                        rows.append(_cell(op, "fwd", dtype, n, "naive", spec, a, t.bytes_per_element * n * d,
                                          t.launches, t.syncs))
    return rows


def attach_measured(rows: list[ModelRow], measured: dict[tuple[str, str, str, int, str], float],
                    copy_gbps: float | None = None) -> None:
    """Fill the measured columns from ``{(op, dir, dtype, n, impl): ms}``; ``copy_gbps``: the
    measured copy bandwidth (else the modelled one) for ``of_copy``."""
    for r in rows:
        ms = measured.get((r.op, r.dir, r.dtype, r.n, r.impl))
        if ms is None or ms <= 0:
            continue
        r.measured_us = ms * 1e3
        r.of_model = r.model_us / r.measured_us
        r.measured_gbps = r.min_bytes / (r.measured_us * 1e-6) / 1e9
        r.of_copy = r.measured_gbps / (copy_gbps or r.copy_gbps)


def model_targets(rows: list[ModelRow]) -> list[dict]:
    """What the model implies for the issue's two targets, per dtype: the fraction of copy
    bandwidth the Triton log-ratio reaches at N = 1024 (target ≥ 80 %), and the naive / Triton
    forward+backward time at N = 128 (target ≥ 3×). Measured values beside them when present."""
    out = []
    by = {(r.op, r.dir, r.dtype, r.n, r.impl): r for r in rows}
    for dtype in sorted({r.dtype for r in rows if r.op == "log_ratio"}):
        for direction in ("fwd", "bwd"):
            r = by.get(("log_ratio", direction, dtype, 1024, "triton"))
            if r is not None:
                out.append({
                    "target": f"log_ratio {direction} {dtype} N=1024 >= 80% of copy bandwidth",
                    "model": r.model_gbps / r.copy_gbps, "measured": r.of_copy, "need": 0.8,
                    "ok_model": r.model_gbps / r.copy_gbps >= 0.8,
                    "ok": None if r.of_copy is None else r.of_copy >= 0.8,
                })
        tri = by.get(("log_ratio", "fwd+bwd", dtype, 128, "triton"))
        nai = by.get(("log_ratio", "fwd+bwd", dtype, 128, "naive"))
        if tri is not None and nai is not None:
            measured = (nai.measured_us / tri.measured_us
                        if nai.measured_us is not None and tri.measured_us is not None else None)
            out.append({
                "target": f"log_ratio fwd+bwd {dtype} N=128 >= 3x the naive formula",
                "model": nai.model_us / tri.model_us, "measured": measured, "need": 3.0,
                "ok_model": nai.model_us / tri.model_us >= 3.0, "ok": None if measured is None else measured >= 3.0,
            })
    return out


def crossover_n(spec: GpuSpec, op: str, direction: str, dtype: str, *, d: int = LATENT_D,
                assumptions: Assumptions | None = None) -> int:
    """Smallest N at which the streaming term reaches the launch-latency term (bandwidth-bound from there)."""
    a = assumptions or Assumptions()
    copy = spec.hbm_tb_s * 1e12 * a.copy_efficiency
    e = DTYPE_BYTES[dtype]
    launches = (TRITON_LAUNCHES[(op, "fwd")] if direction == "fwd" else TRITON_LAUNCHES[(op, "bwd")])
    n = 1
    while n < 1 << 24:
        if op == "log_ratio":
            fwd, bwd = log_ratio_min_bytes(n, d, e)
            nbytes = fwd if direction == "fwd" else bwd
        else:
            nbytes = ddim_step_min_bytes(n, d, e)
        if nbytes / copy * 1e6 >= launches * a.launch_us:
            return n
        n += 1
    return n
