"""``fastdense bench ...``: side-by-side benchmarks printed as rich tables, rows as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import device_option, dtype_option, json_option, parse_dtype, resolve_device

app = typer.Typer(no_args_is_help=True)


def write_json(rows: list[dict], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    console = Console() if Console().is_terminal else Console(width=220)  # piped output: never truncate
    for col in columns:
        table.add_column(col, justify="right" if col not in ("op", "impl", "dtype", "mode") else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(col)) for col in columns))
    console.print(table)


@app.command("kernels")
def kernels(
    device: Annotated[str, device_option()] = "auto",
    json_path: Annotated[Path | None, json_option()] = None,
    n: Annotated[list[int] | None, typer.Option("--n", help="Items per call (repeatable).")] = None,
    dtype: Annotated[list[str] | None, dtype_option("fp32, bf16, fp16 (repeatable).")] = None,
    impl: Annotated[
        list[str] | None,
        typer.Option("--impl", help="naive, torch, torch_compile, triton (repeatable; default: all for the device)."),
    ] = None,
    op: Annotated[list[str] | None, typer.Option("--op", help="log_ratio, ddim_step (repeatable).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per cell; the median is reported.")] = 10,
) -> None:
    """Log-ratio and sampling-step kernels side by side (SD1.5 latents 4×64×64)."""
    from fastdense.benchmarks.kernels import DEFAULT_NS, default_impls, run_kernel_benchmarks

    dev = resolve_device(device)
    ns = n or list(DEFAULT_NS)
    if any(v < 1 for v in ns):
        raise ValueError(f"--n {ns} is not allowed; each must be >= 1")
    dtypes = dtype or ["fp32", "bf16"]
    for d in dtypes:
        parse_dtype(d)
    impls = impl or default_impls(dev)
    allowed_impls = ("naive", "torch", "torch_compile", "triton")
    for i in impls:
        if i not in allowed_impls:
            raise ValueError(f"--impl {i!r} is not allowed; allowed: {', '.join(allowed_impls)}")
    if "triton" in impls and dev.type != "cuda":
        raise ValueError("--impl triton needs --device cuda (on CPU Triton only runs interpreted, for tests)")
    ops = op or ["log_ratio", "ddim_step"]
    for o in ops:
        if o not in ("log_ratio", "ddim_step"):
            raise ValueError(f"--op {o!r} is not allowed; allowed: log_ratio, ddim_step")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats} is not allowed; it must be >= 1")

    from rich.console import Console

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        rows = run_kernel_benchmarks(
            dev, ns=ns, dtypes=dtypes, impls=impls, ops=ops, repeats=repeats,
            progress=lambda msg: status.update(f"benchmarking {msg}"),
        )
    dict_rows = [r.as_dict() for r in rows]
    cols = ["op", "impl", "dtype", "n", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "gbps", "speedup_vs_naive",
            "launches_fwd", "launches_bwd"]
    print_table(f"fastdense bench kernels ({dev.type})", dict_rows, cols)
    write_json(dict_rows, json_path)


@app.command("sampler")
def sampler(
    device: Annotated[str, device_option()] = "auto",
    json_path: Annotated[Path | None, json_option()] = None,
    batch: Annotated[int, typer.Option(help="Trajectories per call (one UNet micro-batch).")] = 8,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default 20 on CPU, 50 with --gpu-shapes).")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    repeats: Annotated[int, typer.Option(help="Timed repeats; the median is reported.")] = 3,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="Also time torch.compile'd runs.")] = True,
    gpu_shapes: Annotated[
        bool, typer.Option("--gpu-shapes/--tiny", help="SD1.5-shaped UNet at 64x64 latents (default on CUDA).")
    ] = None,
) -> None:
    """Our recording sampler vs the same loop without recording vs diffusers' pipeline."""
    import math

    dev = resolve_device(device)
    if batch < 1:
        raise ValueError(f"--batch {batch} is not allowed; it must be >= 1")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} is not allowed; it must be >= 1")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"--guidance {guidance} is not allowed; it must be a finite number >= 0")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats} is not allowed; it must be >= 1")
    if gpu_shapes is None:
        gpu_shapes = dev.type == "cuda"

    from rich.console import Console

    from fastdense.benchmarks.sampler import run_sampler_benchmarks

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        rows = run_sampler_benchmarks(
            dev, gpu_shapes=gpu_shapes, batch=batch, steps=steps, guidance=guidance, repeats=repeats,
            compile_modes=(False, True) if compile else (False,),
            progress=lambda msg: status.update(f"benchmarking {msg}"),
        )
    dict_rows = [r.as_dict() for r in rows]
    cols = ["impl", "compiled", "batch", "steps", "seconds_per_trajectory", "total_s", "peak_mem_mb",
            "record_overhead", "speedup_vs_diffusers_eager"]
    print_table(f"fastdense bench sampler ({dev.type}, {rows[0].model})", dict_rows, cols)
    write_json(dict_rows, json_path)


@app.command("train")
def train(
    device: Annotated[str, device_option()] = "auto",
    json_path: Annotated[Path | None, json_option()] = None,
    repeats: Annotated[int, typer.Option(help="Timed steps per mode; the median is reported.")] = 3,
    steps: Annotated[int, typer.Option(help="DDIM steps of the stored trajectories.")] = 10,
    group_size: Annotated[int, typer.Option(help="Trajectories per comparison group (G).")] = 4,
    k: Annotated[int, typer.Option(help="Sampled steps per trajectory (K).")] = 4,
) -> None:
    """Our training step vs the naive per-item step (tiny model), and buffer bytes at SD1.5 shapes."""
    dev = resolve_device(device)
    for name, value, low in (("--repeats", repeats, 1), ("--steps", steps, 1), ("--group-size", group_size, 2),
                             ("--k", k, 1)):
        if value < low:
            raise ValueError(f"{name} {value} is not allowed; it must be >= {low}")

    from rich.console import Console

    from fastdense.benchmarks.train import buffer_bytes_rows, run_train_benchmarks

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        rows = run_train_benchmarks(dev, repeats=repeats, num_steps=steps, group_size=group_size, k=k,
                                    progress=lambda msg: status.update(f"benchmarking {msg}"))
    import torch

    buffer_rows = buffer_bytes_rows(dtype=torch.float32) + buffer_bytes_rows(dtype=torch.bfloat16)
    step_dicts = [r.as_dict() for r in rows]
    print_table(f"fastdense bench train ({dev.type}, tiny model)", step_dicts,
                ["mode", "step_seconds", "peak_mem_mb", "unet_calls", "items", "speedup_vs_naive"])
    buffer_dicts = [r.as_dict() for r in buffer_rows]
    print_table("replay buffer bytes per trajectory (SD1.5: 4x64x64 latents, T=50, 77x768 embeddings, G=5)",
                buffer_dicts, ["layout", "dtype", "bytes_per_trajectory", "ratio_vs_naive"])
    write_json(step_dicts + buffer_dicts, json_path)
