"""``fastdense profile ...``: torch.profiler traces (Chrome trace JSON) of the hot paths, and
``profile kernels --static``: what the Triton compiler makes of each kernel, with no GPU."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import (
    check_out_dir,
    device_option,
    dtype_option,
    json_option,
    out_option,
    parse_dtype,
    resolve_device,
)

app = typer.Typer(no_args_is_help=True)


# options of each mode of ``profile kernels`` (parameter name -> flag); --n and --dtype serve both
_RUNTIME_ONLY = {"out": "--out", "device": "--device", "impl": "--impl", "steps": "--steps", "top": "--top"}
_STATIC_ONLY = {"arch": "--arch", "kernel": "--kernel", "batch": "--batch", "all_specs": "--all", "jobs": "--jobs",
                "json_path": "--json"}


def _given(ctx: typer.Context, names: dict[str, str]) -> list[str]:
    """The flags among ``names`` that the command line set (not left at their defaults)."""
    given = []
    for name, flag in names.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append(flag)
    return given


@app.command("kernels")
def kernels(
    ctx: typer.Context,
    out: Annotated[Path, out_option("Directory for the Chrome trace JSON.")] = Path("profile-kernels"),
    device: Annotated[str, device_option()] = "auto",
    impl: Annotated[str, typer.Option(help="naive, torch, torch_compile, triton or auto.")] = "auto",
    n: Annotated[int, typer.Option(help="Items per call (with --static: the log-ratio N of the grids; "
                                        "default there 128 and 1024).")] = 32,
    dtype: Annotated[str, dtype_option("fp32, bf16 or fp16 (with --static: of the model outputs, "
                                       "states in fp32 and in that dtype; default there fp32 and bf16).")] = "fp32",
    steps: Annotated[int, typer.Option(help="Profiled forward+backward calls.")] = 5,
    top: Annotated[int, typer.Option(help="Rows of the top-ops table.")] = 15,
    static: Annotated[bool, typer.Option(
        "--static", help="Run nothing: compile the Triton kernels for GPU targets (no GPU needed) and report "
                         "registers, spills, shared memory, vector loads, the launch grid at SD1.5 shapes and the "
                         "occupancy that follows.")] = False,
    arch: Annotated[list[str] | None, typer.Option(
        "--arch", help="With --static: sm_80, sm_90 or sm_100 (repeatable; default sm_90).")] = None,
    kernel: Annotated[list[str] | None, typer.Option(
        "--kernel", help="With --static: log_ratio, ddim_step, or one of log_ratio_fwd, log_ratio_logits, "
                         "log_ratio_bwd, ddim_step_fwd (repeatable; default all).")] = None,
    batch: Annotated[int, typer.Option(help="With --static: ddim_step items per sampler call (with CFG).")] = 8,
    all_specs: Annotated[bool, typer.Option(
        "--all", help="With --static: every specialisation the launchers can produce, without grids "
                      "(about 30 s per arch on 2 cores).")] = False,
    jobs: Annotated[int | None, typer.Option(help="With --static: compile processes (default up to 4).")] = None,
    json_path: Annotated[Path | None, json_option("With --static: write the rows as JSON to this file.")] = None,
) -> None:
    """Profile forward+backward of the log-ratio op and print the top ops; with --static, report what
    the Triton compiler makes of each kernel instead (no GPU needed)."""
    if static:
        runtime = _given(ctx, _RUNTIME_ONLY)
        if runtime:
            raise ValueError(f"{', '.join(runtime)} {'does' if len(runtime) == 1 else 'do'} not apply with --static "
                             "(it compiles the kernels and runs nothing)")
        _static_report(ctx, arch, kernel, n, dtype, batch, all_specs, jobs, json_path)
        return
    static_only = _given(ctx, _STATIC_ONLY)
    if static_only:
        raise ValueError(f"{', '.join(static_only)} {'needs' if len(static_only) == 1 else 'need'} --static")
    dev = resolve_device(device)
    if n < 1 or steps < 1 or top < 1:
        raise ValueError(f"--n {n}, --steps {steps}, --top {top}: each must be >= 1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastdense.benchmarks.kernels import log_ratio_call, make_log_ratio_inputs
    from fastdense.kernels.dispatch import resolve_impl

    torch_dtype = parse_dtype(dtype)
    if impl != "naive":
        impl = resolve_impl(impl, dev)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    inp = make_log_ratio_inputs(n, torch_dtype, dev)
    inp.eps_u.requires_grad_(True)
    inp.eps_c.requires_grad_(True)
    call = log_ratio_call(impl, inp)
    upstream = torch.randn(inp.num_traj, device=dev)
    for _ in range(2):  # warm-up (and compilation) outside the trace
        call().backward(upstream)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            inp.eps_u.grad = inp.eps_c.grad = None
            call().backward(upstream)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    trace = out / f"log_ratio_{impl}_{dtype}_n{n}_{dev.type}.json"
    prof.export_chrome_trace(str(trace))
    sort_key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=top))
    print(f"trace: {trace}")


def _static_report(ctx: typer.Context, arch: list[str] | None, kernel: list[str] | None, n: int, dtype: str,
                   batch: int, all_specs: bool, jobs: int | None, json_path: Path | None) -> None:
    """``profile kernels --static``: checks the options, compiles in a subprocess (kernels/aot.py),
    prints the table, writes the rows; exit 1 when a specialisation does not compile."""
    import os

    from fastdense.kernels import aot
    from fastdense.kernels.dispatch import triton_available

    archs = list(dict.fromkeys(arch or ["sm_90"]))
    for a in archs:
        if a not in aot.ARCHS:
            raise ValueError(f"--arch {a!r} is not allowed; allowed: {', '.join(aot.ARCHS)}")
    kernels = aot.select_kernels(kernel)
    shape_flags = _given(ctx, {"n": "--n", "dtype": "--dtype", "batch": "--batch"})
    if all_specs and shape_flags:
        raise ValueError(f"{', '.join(shape_flags)} {'does' if len(shape_flags) == 1 else 'do'} not apply with "
                         "--all (every specialisation, at the shapes kernels/aot.py enumerates)")
    ns = [n] if "--n" in shape_flags else list(aot.SD15_NS)
    dtypes = [dtype] if "--dtype" in shape_flags else ["fp32", "bf16"]
    aot.dtype_pairs(dtypes)  # checks them
    for flag, value in (("--n", n), ("--batch", batch), ("--jobs", jobs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} is not allowed; it must be >= 1")
    if not triton_available():
        raise ValueError("--static needs the triton package (Linux), which is not installed")
    jobs = jobs or min(4, os.cpu_count() or 1)

    from rich.console import Console

    with Console(stderr=True).status(f"compiling for {', '.join(archs)} (a subprocess, no GPU)"):
        rows = aot.static_report_subprocess(archs, kernels=list(kernels), ns=ns, batch=batch, dtypes=dtypes,
                                            everything=all_specs, jobs=jobs)
    _print_static_table(rows, archs)
    if json_path is not None:
        import json

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        for r in failed:
            first = (r["error"] or "").splitlines()[0] if r["error"] else ""
            print(f"error: {r['arch']} {r['specialisation']} does not compile: {first}", file=sys.stderr)
        raise typer.Exit(1)


def _print_static_table(rows: list[dict], archs: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from fastdense.kernels.occupancy import LIMITS

    console = Console() if Console().is_terminal else Console(width=220)  # piped output: never truncate
    table = Table(title=f"fastdense profile kernels --static ({', '.join(archs)})")
    for col in ("arch", "kernel", "specialisation", "case", "grid"):
        table.add_column(col)
    for col in ("regs", "spills", "shared", "ld.global", "warps", "blocks/SM", "occupancy", "limiter", "waves"):
        table.add_column(col, justify="right")
    for r in rows:
        spec = r["specialisation"].split("[", 1)[1].rstrip("]") if "[" in r["specialisation"] else ""
        grid = "×".join(str(g) for g in r["grid"]) if r["grid"] else "-"
        if not r["ok"]:
            table.add_row(r["arch"], r["kernel"], spec, r["case"] or "-", grid, *["-"] * 8, "FAILED")
            continue
        loads = (f"v4 ×{r['v4_loads']}" if r["v4_loads"] else f"v{r['vector_loads']}" if r["vector_loads"] > 1
                 else "scalar")
        occupancy = f"{r['warps_per_sm']}/{r['max_warps_per_sm']} ({100 * r['occupancy']:.0f}%)"
        waves = f"{r['waves']:.2f}" if r["waves"] is not None else "-"
        table.add_row(r["arch"], r["kernel"], spec, r["case"] or "-", grid, str(r["regs"]), str(r["spills"]),
                      str(r["shared"]), loads, str(r["num_warps"]), str(r["blocks_per_sm"]), occupancy,
                      r["limiter"], waves)
    console.print(table)
    for a in archs:
        lim = LIMITS[a]
        ok = [r for r in rows if r["arch"] == a and r["ok"]]
        line = (f"{a} ({lim.gpus}, {lim.sm_count} SMs; per SM {lim.max_warps} warps, {lim.max_blocks} blocks, "
                f"{lim.regs_per_sm} registers, {lim.shared_per_sm // 1024} KB shared memory)")
        if ok:
            occ = [100 * r["occupancy"] for r in ok]
            line += (f": regs {min(r['regs'] for r in ok)}-{max(r['regs'] for r in ok)}, "
                     f"{sum(r['spills'] > 0 for r in ok)} with spills, occupancy {min(occ):.0f}-{max(occ):.0f}%")
        console.print(line, highlight=False)
    console.print("occupancy: resident warps per SM that registers, shared memory and warps per block allow "
                  "(theoretical; kernels/occupancy.py). waves: programs / (blocks per SM × SMs); below 1 the grid "
                  "leaves block slots empty.", highlight=False)
