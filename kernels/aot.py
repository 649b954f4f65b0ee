"""Ahead-of-time compile of every Triton specialisation the launchers can produce (no GPU needed).

The Triton interpreter (``TRITON_INTERPRET=1``, what the test suite runs) accepts kernels that
the real compiler rejects (e.g. a loop-carried variable whose type the loop changes). This
module compiles each kernel for real GPU targets, from the CPU, with ``triton.compile`` and the
ptxas shipped in the triton wheel, and reports per specialisation and arch:

* ``n_regs`` and ``n_spills``: read from the cubin (``cuobjdump --dump-resource-usage``: REG and
  LOCAL/4), the same numbers ``CompiledKernel.n_regs`` / ``.n_spills`` give once loaded on a GPU
  (Triton's driver reads CU_FUNC_ATTRIBUTE_NUM_REGS and LOCAL_SIZE_BYTES / 4; without a GPU
  those attributes are not set in triton 3.9);
* ``shared``: ``compiled.metadata.shared``, the dynamic shared memory Triton launches with;
* ``vector_loads``: the widest ``ld.global.v2``/``.v4`` in the PTX (1 = scalar loads only);
  ``v4_loads`` / ``v4_stores``: how many 16-byte ``ld.global.v4`` / ``st.global.v4`` it has
  (a BLOCK = 1024, 4-warp program reads 8 elements of each streamed tensor per thread: two v4
  loads for fp32, one for bf16/fp16, when the whole tensor is read with vector loads);
* ``fp_fusion``: every launch passes ``enable_fp_fusion`` (the ``_FP_FUSION`` constant of
  kernels/log_ratio.py and kernels/ddim_step.py); :func:`specialise` keeps it and
  :func:`compile_spec` compiles with it, so the compiled code is the one a launch gets whatever
  ``TRITON_DEFAULT_FP_FUSION`` says.

Specialisations. The launchers (``log_ratio._partials`` / ``_log_ratio_forward`` /
``_log_ratio_backward``, ``ddim_step.ddim_step_triton``) are mirrored by the ``_*_launch``
functions below: the same argument list, launch-config functions (``_launch_config``,
``_num_warps``, ``_BLOCK_N``, ddim's block rule), constexprs and launch options (``num_warps``,
``enable_fp_fusion``), and return :class:`Launch` objects: the specialisation and the grid the
launch uses at that shape. Their arguments go through the JIT's own binder (:func:`specialise`,
the one place signatures come from), so pointer dtypes
(``*bf16``), ``i32``/``i64`` ints, ints equal to 1 turned into constexprs and the 16-divisibility
attributes are exactly what a launch on a GPU would compile. Tensors are stand-ins (:class:`Ptr`:
a dtype and an aligned or unaligned address). Enumerated: every pair of model-output and state
dtypes from fp32/bf16/fp16, plus three with fp64 (which switches on ACC_FP64), each with and
without CFG at the default shape; both MEAN modes with either accumulation; a shape sweep that
hits every BLOCK / BLOCK_N / BLOCK_R the launch configs pick, N = 1 and NUM_CHUNKS = 1; and layout cases (strided
items, unaligned views, int64 strides, D >= 2**31). Identical specialisations are compiled once.
``squared_residual`` launches the log-ratio forward kernel, so it has no kernels of its own.

Static kernel report (``fastdense profile kernels --static``): :func:`static_report` adds to each
compile the launch grid at SD1.5 shapes (:func:`sd15_launches`) and the occupancy that follows
(kernels/occupancy.py); :func:`static_report_subprocess` runs it from any process.

Must run in a process WITHOUT ``TRITON_INTERPRET`` set (or set to 0) before triton is imported:
under the interpreter ``@triton.jit`` gives ``InterpretedFunction`` objects, which cannot be
compiled (:func:`enumerate_specs` raises). From the test suite (which sets it) run this in a
subprocess, as tests/test_aot_compile.py does. Set ``TRITON_CACHE_DIR`` to an empty folder to
force real compiles. Command line (from outside the checkout)::

    python -m fastdense.kernels.aot --arch sm_80 --arch sm_90 [--jobs 2] [--failures-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace

import torch

ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_I64 = 2**31 + 16  # the smallest "large" value with 16-divisibility: the JIT types it i64


class Ptr:
    """What the JIT sees of a tensor argument: its dtype and address (16-byte aligned or not)."""

    def __init__(self, dtype: torch.dtype, aligned: bool = True):
        self.dtype = dtype
        self.aligned = aligned

    def data_ptr(self) -> int:
        # an unaligned view is still aligned to its element size
        return 1 << 20 if self.aligned else (1 << 20) + torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Spec:
    """One compile: a JIT function with the signature, constexprs and attributes a launch gives."""

    name: str
    fn: object = field(repr=False, compare=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    num_warps: int = 4
    fp_fusion: bool | None = None  # the launch's enable_fp_fusion (None: Triton's default, from the environment)


@dataclass(frozen=True)
class Launch:
    """One launch at one shape: the specialisation it compiles, its grid and a label of the shape."""

    spec: Spec
    grid: tuple[int, ...] | None = None
    case: str = ""

    @property
    def kernel(self) -> str:
        return self.spec.name.split("[", 1)[0]


@dataclass
class Result:
    arch: str
    name: str
    ok: bool
    n_regs: int | None = None
    n_spills: int | None = None
    shared: int | None = None
    vector_loads: int | None = None  # widest ld.global vector width in the PTX (1: none)
    v4_loads: int | None = None  # ld.global.v4 instructions in the PTX
    v4_stores: int | None = None  # st.global.v4 instructions in the PTX
    seconds: float = 0.0
    error: str = ""


def _require_jit(fn) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError(
            f"{getattr(fn, '__name__', fn)} is a {type(fn).__name__}, not a JITFunction: AOT compiles need a "
            "process without TRITON_INTERPRET=1 (set before triton is imported)"
        )


def specialise(fn, label: str, args: tuple, kwargs: dict) -> Spec:
    """The specialisation a launch ``fn[grid](*args, **kwargs)`` compiles, via the JIT's own binder.

    ``args`` as the launcher passes them (tensors as :class:`Ptr`); ``kwargs`` the constexprs and
    the launch options ``num_warps`` and ``enable_fp_fusion``. The name is
    ``<kernel>[<label> <constexprs> w<warps> <int specialisations>]``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    _require_jit(fn)
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    fp_fusion = kwargs.pop("enable_fp_fusion", None)
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the specialisation rules are arch-independent
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, _ = binder(*args, **kwargs)
    names = [p.name for p in fn.params]
    values = list(bound.values())
    signature = {n: s[0] for n, s in zip(names, spec, strict=True)}
    constexprs = {n: v for n, s, v in zip(names, spec, values, strict=True) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1])
             for i, s in enumerate(spec) if s[0] != "constexpr" and isinstance(s[1], str)}

    parts = [label] if label else []
    for n, v in constexprs.items():
        if n in kwargs:  # the kernel's own constexprs (modes and block sizes)
            parts.append(n if v is True else f"{n}={v}" if v is not False else "")
    parts.append(f"w{num_warps}")
    ones = [n for n in constexprs if n not in kwargs]
    if ones:
        parts.append(",".join(ones) + "=1")
    wide = [n for n, t in signature.items() if t == "i64"]
    if wide:
        parts.append("i64:" + ",".join(wide))
    undivided = [names[i] for i, s in enumerate(spec) if s[0] != "constexpr" and s[1] == ""]
    if any(signature[n].startswith("*") for n in undivided):
        parts.append("unaligned")
    elif undivided:  # ints without the multiple-of-16 attribute
        parts.append("nodiv:" + ",".join(undivided))
    kernel = fn.__name__.strip("_").removesuffix("_kernel")
    name = f"{kernel}[{' '.join(p for p in parts if p)}]"
    return Spec(name, fn, signature, constexprs, attrs, num_warps, fp_fusion)


# ---------------------------------------------------------------------------
# Mirrors of the launchers


def _log_ratio_launches(lr, ec: str, x: str, cfg: bool, mean: bool, n: int, d: int, r: int,
                        stride: int | None = None, aligned: bool = True, num_traj: int | None = None) -> list[Launch]:
    """The three launches of log_ratio (forward partials, logits, backward) for one case, with their
    grids (``num_traj`` trajectories; default N / 4, as ``fastdense bench kernels`` has them)."""
    import triton

    acc = torch.float64 if "fp64" in (ec, x) else torch.float32
    acc64 = acc == torch.float64
    e, s = DTYPES[ec], DTYPES[x]
    stride = d if stride is None else stride
    label = f"ec={ec} x={x} acc={'fp64' if acc64 else 'fp32'}"
    block, chunk_len, num_chunks = lr._launch_config(n, d)
    warps = lr._num_warps(block)
    ins = (Ptr(e, aligned), Ptr(e, aligned), Ptr(s, aligned), Ptr(s, aligned))
    a, b = Ptr(acc), Ptr(acc)
    fwd = specialise(
        lr._log_ratio_fwd_kernel, label,
        (*ins, a, b, Ptr(acc), stride, stride, stride, stride, d, chunk_len, num_chunks, 7.5),
        dict(HAS_UNCOND=cfg, ACC_FP64=acc64, BLOCK=block, num_warps=warps, enable_fp_fusion=lr._FP_FUSION),
    )
    logits = specialise(
        lr._log_ratio_logits_kernel, f"acc={'fp64' if acc64 else 'fp32'}",
        (Ptr(acc), Ptr(acc), Ptr(acc), Ptr(acc), Ptr(torch.int64), Ptr(acc), Ptr(acc), n, num_chunks, r, d, 0.5),
        dict(MEAN=mean, ACC_FP64=acc64, BLOCK_N=min(lr._BLOCK_N, triton.next_power_of_2(n)),
             BLOCK_R=triton.next_power_of_2(r), enable_fp_fusion=lr._FP_FUSION),
    )
    bwd = specialise(
        lr._log_ratio_bwd_kernel, label,
        (*ins, a, b, Ptr(acc), Ptr(acc), Ptr(torch.int64), Ptr(acc), Ptr(acc), Ptr(e), Ptr(e),
         stride, stride, stride, stride, d, chunk_len, r, 7.5, 0.5),
        dict(HAS_UNCOND=cfg, MEAN=mean, ACC_FP64=acc64, BLOCK=block, BLOCK_R=triton.next_power_of_2(r),
             num_warps=warps, enable_fp_fusion=lr._FP_FUSION),
    )
    num_traj = max(1, n // 4) if num_traj is None else num_traj
    return [Launch(fwd, (n, num_chunks)), Launch(logits, (num_traj,)), Launch(bwd, (n, num_chunks))]


def _ddim_config(dd, d: int) -> tuple[int, int, int]:
    """(BLOCK_SIZE, n_chunks, num_warps) as ``ddim_step_triton`` picks them for items of ``d`` elements."""
    return dd._launch_config(d)


def _ddim_launch(dd, x: str, eps: str, cfg: bool, n: int, d: int, out: str | None = None,
                 stride: int | None = None, aligned: bool = True) -> Launch:
    """``ddim_step_triton``'s launch: states x / noise / out in ``x`` (``out`` may differ), ε in ``eps``."""
    out = out or x
    acc = torch.float64 if "fp64" in (x, eps) else torch.float32
    stride = d if stride is None else stride
    block, n_chunks, warps = _ddim_config(dd, d)
    label = f"x={x} eps={eps}" + (f" out={out}" if out != x else "")
    label += f" acc={'fp64' if acc == torch.float64 else 'fp32'}"
    e = DTYPES[eps]
    spec = specialise(
        dd._ddim_step_fwd_kernel, label,
        (Ptr(DTYPES[x], aligned), Ptr(e, aligned), Ptr(e, aligned), Ptr(DTYPES[x], aligned), Ptr(acc),
         Ptr(DTYPES[out], aligned), Ptr(acc), stride, stride, stride, stride, stride, n, d, n_chunks),
        dict(BLOCK_SIZE=block, HAS_CFG=cfg, ACC_FP64=acc == torch.float64, num_warps=warps,
             enable_fp_fusion=dd._FP_FUSION),
    )
    return Launch(spec, (n, n_chunks))


# (n, d) pairs of the shape sweep: every BLOCK 1..1024 and BLOCK_N 1..128, N = 1, NUM_CHUNKS = 1
_SWEEP = [(1, 1), (2, 2), (3, 3), (5, 5), (9, 9), (17, 17), (33, 33), (65, 65), (129, 129), (200, 257),
          (3, 513), (1024, 16384), (64, 16384)]
_BASE = (64, 16384)  # a Stable-Diffusion latent (4×64×64), 64 items: BLOCK 1024, 16 chunks
# (model outputs, states): all of fp32/bf16/fp16 with fp32 accumulation, and fp64 accumulation
_DTYPE_PAIRS = [(e, x) for e in ("fp32", "bf16", "fp16") for x in ("fp32", "bf16", "fp16")] + [
    ("fp64", "fp64"), ("bf16", "fp64"), ("fp64", "fp32")]


def enumerate_specs() -> list[Spec]:
    """Every distinct specialisation (module docstring), in a fixed order, deduplicated."""
    from fastdense.kernels import ddim_step as dd
    from fastdense.kernels import log_ratio as lr

    n0, d0 = _BASE
    launches: list[Launch] = []
    for ec, x in _DTYPE_PAIRS:  # dtypes × CFG at the default shape (ddim: ε and states)
        for cfg in (False, True):
            launches += _log_ratio_launches(lr, ec, x, cfg, True, n0, d0, 1)
            launches.append(_ddim_launch(dd, x, ec, cfg, 8, d0))
    for mean in (True, False):  # MEAN × accumulation dtype (only the logits and backward kernels see it)
        for ec, x in (("bf16", "fp32"), ("fp64", "fp64")):
            launches += _log_ratio_launches(lr, ec, x, True, mean, n0, d0, 2)
    for n, d in _SWEEP:  # every block size the launch configs pick, int-1 specialisations
        launches += _log_ratio_launches(lr, "bf16", "fp32", True, True, n, d, 2)
        launches.append(_ddim_launch(dd, "fp32", "bf16", True, n, d))
        if n in (1, 1024):
            launches += _log_ratio_launches(lr, "fp32", "fp32", False, False, n, d, 1)
    for d in (1024 * 65535 + 1, 4 * 1024 * 65535 + 1):  # ddim grows BLOCK_SIZE past 1024 for huge items
        launches.append(_ddim_launch(dd, "fp32", "bf16", True, 2, d))
    for out in ("bf16", "fp16"):  # fp32 states stored into a lower-precision buffer
        launches.append(_ddim_launch(dd, "fp32", "bf16", True, 8, d0, out=out))
    for ec, x in (("bf16", "fp32"), ("fp64", "fp64")):
        # layouts: items of a [B, T+1, *S] buffer, unaligned views, int64 strides, int64 D
        launches += _log_ratio_launches(lr, ec, x, True, True, n0, d0, 2, stride=51 * d0)
        launches += _log_ratio_launches(lr, ec, x, True, True, n0, 4099, 2, stride=51 * 4099, aligned=False)
        launches += _log_ratio_launches(lr, ec, x, True, True, n0, d0, 2, stride=_I64)
        launches += _log_ratio_launches(lr, ec, x, True, True, 2, _I64, 2, stride=_I64)
        launches.append(_ddim_launch(dd, x, ec, True, 8, d0, stride=51 * d0))
        launches.append(_ddim_launch(dd, x, ec, True, 8, 4099, stride=51 * 4099, aligned=False))
        launches.append(_ddim_launch(dd, x, ec, True, 8, d0, stride=_I64))
        launches.append(_ddim_launch(dd, x, ec, True, 2, _I64, stride=_I64))
    return list({launch.spec.name: launch.spec for launch in _share_specs(launches)}.values())


def _spec_key(s: Spec) -> tuple:
    return (s.fn.__name__, tuple(s.signature.items()), tuple(s.constexprs.items()),
            tuple((k, str(v)) for k, v in s.attrs.items()), s.num_warps, s.fp_fusion)


def _share_specs(launches: list[Launch]) -> list[Launch]:
    """The launches with one Spec per distinct specialisation, and a distinct name for each (``#2``,
    ``#3``: two shapes may differ only in attributes), in the order they first appear."""
    canon: dict[tuple, Spec] = {}
    seen: dict[str, int] = {}
    out = []
    for launch in launches:
        key = _spec_key(launch.spec)
        if key not in canon:
            spec = launch.spec
            seen[spec.name] = seen.get(spec.name, 0) + 1
            if seen[spec.name] > 1:
                spec = replace(spec, name=f"{spec.name}#{seen[spec.name]}")
            canon[key] = spec
        out.append(replace(launch, spec=canon[key]))
    return out


# ---------------------------------------------------------------------------
# Compiling


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spills in 4-byte words) of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text!r}")
    return int(m.group(1)), int(m.group(2)) // 4


def _vector_width(ptx: str) -> int:
    widths = [int(w) for w in re.findall(r"ld\.global(?:\.[a-z]\w*)*?\.v(\d)", ptx)]
    return max(widths, default=1)


def _v4_count(ptx: str, op: str) -> int:
    return len(re.findall(rf"\b{op}\.global(?:\.[a-z]\w*)*?\.v4\.", ptx))


def compile_triton(spec: Spec, arch: str):
    """``triton.compile`` of one specialisation for ``arch`` ("sm_90") with the launch's options:
    the CompiledKernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``); raises on a rejection."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_jit(spec.fn)
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    options = {"num_warps": spec.num_warps}
    if spec.fp_fusion is not None:  # as the launch passes it (None: Triton's default, from the environment)
        options["enable_fp_fusion"] = spec.fp_fusion
    return triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)


def compile_spec(spec: Spec, arch: str) -> Result:
    """Compile one specialisation for ``arch`` ("sm_90"); a rejection is a Result with ok=False."""
    t0 = time.perf_counter()
    try:
        compiled = compile_triton(spec, arch)
        regs, spills = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        return Result(arch, spec.name, True, regs, spills, compiled.metadata.shared, _vector_width(ptx),
                      _v4_count(ptx, "ld"), _v4_count(ptx, "st"), time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001 - every compiler rejection is a reported failure
        msg = f"{type(err).__name__}: {err}".strip()
        return Result(arch, spec.name, False, seconds=time.perf_counter() - t0, error=msg[-2000:])


def arch_supported(arch: str) -> tuple[bool, str]:
    """Whether the shipped compiler can target ``arch`` at all (compiles one small kernel)."""
    if arch not in ARCHS:
        return False, f"unknown arch {arch}; known: {', '.join(ARCHS)}"
    from fastdense.kernels import ddim_step as dd

    r = compile_spec(_ddim_launch(dd, "fp32", "fp32", False, 1, 16).spec, arch)
    return r.ok, r.error.splitlines()[0] if r.error else ""


_POOL_SPECS: list[Spec] = []


def _pool_job(job: tuple[int, str]) -> Result:
    return compile_spec(_POOL_SPECS[job[0]], job[1])


def compile_all(specs: list[Spec], archs: list[str], jobs: int = 1) -> list[Result]:
    """Compile every spec for every arch, ``jobs`` processes at a time (forked: specs are inherited)."""
    work = [(i, a) for a in archs for i in range(len(specs))]
    if jobs <= 1:
        return [compile_spec(specs[i], a) for i, a in work]
    global _POOL_SPECS
    _POOL_SPECS = specs
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_pool_job, work, chunksize=4))


# ---------------------------------------------------------------------------
# Static kernel report (``fastdense profile kernels --static``)

KERNELS = ("log_ratio_fwd", "log_ratio_logits", "log_ratio_bwd", "ddim_step_fwd")
_KERNEL_GROUPS = {"log_ratio": KERNELS[:3], "ddim_step": KERNELS[3:]}
REPORT_DTYPES = ("fp32", "bf16", "fp16")
SD15_D = 4 * 64 * 64  # Stable Diffusion 1.5 latents at 512×512
SD15_NS = (128, 1024)  # log-ratio items per call
SD15_BATCH = 8  # ddim_step: trajectories per sampler call


def select_kernels(names: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The kernels that ``--kernel`` names select: a kernel, or ``log_ratio`` / ``ddim_step`` for all of
    an op's kernels; none named: all."""
    if not names:
        return KERNELS
    chosen: set[str] = set()
    for name in names:
        if name in KERNELS:
            chosen.add(name)
        elif name in _KERNEL_GROUPS:
            chosen.update(_KERNEL_GROUPS[name])
        else:
            raise ValueError(f"--kernel {name!r} is not allowed; allowed: {', '.join((*_KERNEL_GROUPS, *KERNELS))}")
    return tuple(k for k in KERNELS if k in chosen)


def dtype_pairs(dtypes: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(model outputs, states) of the report: each model-output dtype with fp32 states and with
    states in its own dtype."""
    pairs = []
    for eps in dtypes:
        if eps not in REPORT_DTYPES:
            raise ValueError(f"--dtype {eps!r} is not allowed; allowed: {', '.join(REPORT_DTYPES)}")
        pairs += [(eps, x) for x in dict.fromkeys(("fp32", eps))]
    return list(dict.fromkeys(pairs))


def sd15_launches(ns=SD15_NS, batch: int = SD15_BATCH, dtypes=("fp32", "bf16")) -> list[Launch]:
    """Every launch at SD1.5 shapes (D = 4·64·64), with the grid the launchers' own launch configs
    give: log_ratio with CFG, reduction "mean", one reference column and N / 4 trajectories for each
    N in ``ns`` (the cells of ``fastdense bench kernels``); ddim_step with CFG for ``batch`` items.
    Model outputs in each of ``dtypes``, states in fp32 and in that dtype. Ordered by kernel; a
    specialisation at a shape appears once."""
    from fastdense.kernels import ddim_step as dd
    from fastdense.kernels import log_ratio as lr

    launches: list[Launch] = []
    for eps, x in dtype_pairs(dtypes):
        for n in ns:
            launches += [replace(launch, case=f"N={n}")
                         for launch in _log_ratio_launches(lr, eps, x, True, True, n, SD15_D, 1)]
        launches.append(replace(_ddim_launch(dd, x, eps, True, batch, SD15_D), case=f"B={batch}"))
    launches.sort(key=lambda launch: KERNELS.index(launch.kernel))  # stable: dtype and shape order kept
    # the logits kernel sees no input dtype: one row per distinct (specialisation, shape)
    unique = {(launch.spec.name, launch.case, launch.grid): launch for launch in _share_specs(launches)}
    return list(unique.values())


def report_row(arch: str, launch: Launch, result: Result) -> dict:
    """One row of the static report: the compile's resources, the launch's grid and the occupancy
    that follows on ``arch`` (kernels/occupancy.py)."""
    from fastdense.kernels.occupancy import LIMITS, occupancy, waves

    lim, spec = LIMITS[arch], launch.spec
    programs = math.prod(launch.grid) if launch.grid else None
    row = dict(arch=arch, gpus=lim.gpus, kernel=launch.kernel, specialisation=spec.name, case=launch.case or None,
               grid=list(launch.grid) if launch.grid else None, programs=programs, num_warps=spec.num_warps,
               fp_fusion=spec.fp_fusion, ok=result.ok, error=result.error or None, regs=result.n_regs,
               spills=result.n_spills, shared=result.shared, vector_loads=result.vector_loads,
               v4_loads=result.v4_loads, v4_stores=result.v4_stores, blocks_per_sm=None, warps_per_sm=None,
               max_warps_per_sm=lim.max_warps, occupancy=None, limiter=None, sms=lim.sm_count, waves=None)
    if result.ok:
        occ = occupancy(result.n_regs, result.shared, spec.num_warps, lim)
        row.update(blocks_per_sm=occ.blocks_per_sm, warps_per_sm=occ.warps_per_sm, occupancy=occ.fraction,
                   limiter=occ.limiter, waves=waves(programs, occ, lim) if programs else None)
    return row


def static_report(archs: list[str], kernels: list[str] | None = None, ns=SD15_NS, batch: int = SD15_BATCH,
                  dtypes=("fp32", "bf16"), everything: bool = False, jobs: int = 1) -> list[dict]:
    """Rows (:func:`report_row`) for every arch × launch: the SD1.5 launches (:func:`sd15_launches`),
    or with ``everything`` every specialisation of :func:`enumerate_specs` (no grid); only the
    ``kernels`` selected (:func:`select_kernels`). Compiles here: needs a process without
    TRITON_INTERPRET (see :func:`static_report_subprocess`)."""
    chosen = select_kernels(kernels)
    launches = [Launch(spec) for spec in enumerate_specs()] if everything else sd15_launches(ns, batch, dtypes)
    launches = [launch for launch in launches if launch.kernel in chosen]
    specs = list({launch.spec.name: launch.spec for launch in launches}.values())
    results = {(r.arch, r.name): r for r in compile_all(specs, archs, jobs=jobs)}
    return [report_row(arch, launch, results[arch, launch.spec.name]) for arch in archs for launch in launches]


_CHILD = "import sys; from fastdense.kernels import aot; sys.exit(aot._static_report_child(sys.argv[1], sys.argv[2]))"
_UNSUPPORTED = 3  # the child's exit code for an arch the installed ptxas cannot target


def _static_report_child(request_path: str, answer_path: str) -> int:
    with open(request_path) as f:
        request = json.load(f)
    for arch in request["archs"]:
        ok, why = arch_supported(arch)
        if not ok:
            with open(answer_path, "w") as f:
                json.dump({"error": f"--arch {arch}: the installed triton/ptxas cannot compile for it ({why})"}, f)
            return _UNSUPPORTED
    rows = static_report(**request)
    with open(answer_path, "w") as f:
        json.dump({"rows": rows}, f)
    return 0


def static_report_subprocess(archs: list[str], **request) -> list[dict]:
    """:func:`static_report` run in a fresh Python process: without TRITON_INTERPRET (the real
    compiler, whatever this process runs under), with a throw-away TRITON_CACHE_DIR and working
    directory, so nothing is left on disk to go stale. An arch the installed ptxas cannot target
    is a FastdenseError."""
    from fastdense.errors import FastdenseError

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="fastdense-static-") as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        request_path, answer_path = os.path.join(tmp, "request.json"), os.path.join(tmp, "answer.json")
        with open(request_path, "w") as f:
            json.dump({"archs": list(archs), **request}, f)
        proc = subprocess.run([sys.executable, "-c", _CHILD, request_path, answer_path], cwd=tmp, env=env,
                              capture_output=True, text=True)
        answer = {}
        if os.path.exists(answer_path):
            with open(answer_path) as f:
                answer = json.load(f)
    if proc.returncode == _UNSUPPORTED and "error" in answer:
        raise FastdenseError(answer["error"])
    if proc.returncode != 0 or "rows" not in answer:
        tail = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"the compile subprocess failed (exit code {proc.returncode}): "
                           f"{tail[-1] if tail else 'no output'}")
    return answer["rows"]


def format_table(results: list[Result]) -> str:
    width = max((len(r.name) for r in results), default=4)
    lines = [f"{'arch':<7} {'specialisation':<{width}} {'regs':>4} {'spills':>6} {'shared':>6} {'ld.v':>4}  status"]
    for r in results:
        if r.ok:
            lines.append(f"{r.arch:<7} {r.name:<{width}} {r.n_regs:>4} {r.n_spills:>6} {r.shared:>6} "
                         f"{r.vector_loads:>4}  ok")
        else:
            lines.append(f"{r.arch:<7} {r.name:<{width}} {'-':>4} {'-':>6} {'-':>6} {'-':>4}  FAILED: "
                         f"{r.error.splitlines()[0] if r.error else ''}")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    lines = []
    for arch in dict.fromkeys(r.arch for r in results):
        rs = [r for r in results if r.arch == arch]
        ok = [r for r in rs if r.ok]
        line = f"{arch}: {len(ok)}/{len(rs)} compiled"
        if ok:
            line += (f", regs {min(r.n_regs for r in ok)}-{max(r.n_regs for r in ok)}, "
                     f"{sum(r.n_spills > 0 for r in ok)} with spills, "
                     f"{sum(r.vector_loads > 1 for r in ok)} with vectorised global loads, "
                     f"{sum(r.seconds for r in rs):.1f} s of compiling")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdense.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="sm_80, sm_90 or sm_100 (repeatable; default sm_80 and sm_90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--failures-only", action="store_true", help="list only the specialisations that failed")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; AOT compiles need the real compiler (unset it)", file=sys.stderr)
        return 2
    archs = []
    for arch in args.arch or ["sm_80", "sm_90"]:
        ok, why = arch_supported(arch)
        if ok:
            archs.append(arch)
        else:
            print(f"{arch}: not supported by this triton/ptxas ({why}); skipped", file=sys.stderr)
    specs = enumerate_specs()
    t0 = time.perf_counter()
    results = compile_all(specs, archs, jobs=args.jobs)
    shown = [r for r in results if not r.ok] if args.failures_only else results
    if shown:
        print(format_table(shown))
    print(summary(results))
    print(f"{len(specs)} specialisations per arch, {time.perf_counter() - t0:.1f} s wall with {args.jobs} jobs")
    return 0 if archs and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
