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
    model: Annotated[
        str | None,
        typer.Option("--model", help="a100, h100 or h200: the bandwidth model of that GPU (minimum bytes, time at "
                     "copy bandwidth, launch floor) beside the measured times; without CUDA the model alone."),
    ] = None,
) -> None:
    """Log-ratio and sampling-step kernels side by side (SD1.5 latents 4×64×64)."""
    from fastdense.benchmarks.kernels import DEFAULT_NS, default_impls, run_kernel_benchmarks

    spec = None
    if model is not None:
        from fastdense.benchmarks.roofline import gpu_spec

        spec = gpu_spec(model)
    dev = resolve_device(device)
    ns = n or (list(MODEL_NS) if spec is not None else list(DEFAULT_NS))
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

    if spec is not None and dev.type != "cuda":  # a CPU time beside a GPU model means nothing
        model_rows = print_bandwidth_model(spec, ns, dtypes, ops, kernel_rows=None,
                                           note=f"no CUDA device ({dev.type}): the model alone; run on the GPU "
                                                "(--device cuda) for the measured columns")
        write_json(model_rows, json_path)
        return

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
    if spec is not None:
        import torch

        from fastdense.benchmarks.timing import copy_bandwidth_gbps

        copy = copy_bandwidth_gbps(dev)  # of_copy against the copy this GPU reaches, not the assumed one
        dict_rows += print_bandwidth_model(spec, ns, dtypes, ops, kernel_rows=rows,
                                           device_name=torch.cuda.get_device_name(dev), copy_gbps=copy,
                                           note=f"measured device-to-device copy: {copy:.0f} GB/s (of_copy uses it)")
    write_json(dict_rows, json_path)


MODEL_NS = (8, 32, 128, 1024)  # --model without --n: the target cells (N = 128, N = 1024) included
MODEL_COLUMNS = ["op", "dir", "dtype", "n", "impl", "min_MB", "bytes_us", "launches", "syncs", "latency_us",
                 "model_us", "model_GB/s", "measured_us", "of_model", "of_copy"]


def print_bandwidth_model(spec, ns, dtypes, ops, *, kernel_rows=None, device_name: str | None = None,
                          note: str | None = None, copy_gbps: float | None = None) -> list[dict]:
    """Print the bandwidth model of ``spec`` (with the measured times of ``kernel_rows`` beside
    it when given), its assumptions and the targets it implies; returns the rows as dicts."""
    from rich.console import Console

    from fastdense.benchmarks.roofline import (
        Assumptions,
        attach_measured,
        crossover_n,
        gpu_key_of,
        model_rows,
        model_targets,
    )

    a = Assumptions()
    rows = model_rows(spec, ns, dtypes, ops, assumptions=a)
    if kernel_rows is not None:
        measured = {}
        for r in kernel_rows:
            for direction, ms in (("fwd", r.fwd_ms), ("bwd", r.bwd_ms), ("fwd+bwd", r.fwd_bwd_ms)):
                if ms is not None:
                    measured[(r.op, direction, r.dtype, r.n, r.impl)] = ms
        attach_measured(rows, measured, copy_gbps)
    display = []
    for r in rows:
        d = r.as_dict()
        d.update({"min_MB": r.min_bytes / 1e6, "model_GB/s": r.model_gbps})
        display.append(d)
    copy = rows[0].copy_gbps if rows else spec.hbm_tb_s * 1e3 * a.copy_efficiency
    print_table(f"bandwidth model: {spec.name}, peak HBM {spec.hbm_tb_s:g} TB/s x {a.copy_efficiency:.0%} = "
                f"{copy:.0f} GB/s copy; SD1.5 latents (D = 16384), states fp32, times in µs", display, MODEL_COLUMNS)
    console = Console() if Console().is_terminal else Console(width=220)
    lines = []
    if note:
        lines.append(note)
    if device_name is not None and gpu_key_of(device_name) != spec.key:
        lines.append(f"warning: measured on {device_name}, modelled for {spec.name}: the fractions compare two devices")
    lines.append("min_MB: each input read once, each output written once (DESIGN.md §1); launches: the Triton "
                 "launchers' kernels, or the naive path's eager ops (counted, NAIVE_TRAFFIC); of_model = model_us / "
                 "measured_us; of_copy = measured GB/s / copy GB/s")
    lines += [f"assumption: {text}" for text in a.describe()]
    if "log_ratio" in ops:
        for dtype in dtypes:
            fwd, bwd = (crossover_n(spec, "log_ratio", direction, dtype, assumptions=a) for direction in ("fwd", "bwd"))
            lines.append(f"log_ratio {dtype}: bandwidth-bound (streaming >= launch floor) from N = {fwd} forward, "
                         f"N = {bwd} backward")
    targets = model_targets(rows)
    for t in targets:
        measured = "" if t["measured"] is None else f"; measured {t['measured']:.2f} ({'met' if t['ok'] else 'MISSED'})"
        lines.append(f"target {t['target']}: the model gives {t['model']:.2f}{measured}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return [r.as_dict() for r in rows] + targets


BACKBONES = ("sd", "sdxl", "sd3", "flux")


def backbone_option():
    return typer.Option("--backbone", help=f"Model family of the tiny model: {', '.join(BACKBONES)}.")


def check_backbone(backbone: str) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"--backbone {backbone} is not allowed; allowed: {', '.join(BACKBONES)}")


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
    backbone: Annotated[str, backbone_option()] = "sd",
) -> None:
    """Our recording sampler vs the same loop without recording vs the family's diffusers pipeline."""
    import math

    check_backbone(backbone)
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
        gpu_shapes = dev.type == "cuda" and backbone == "sd"

    from rich.console import Console

    from fastdense.benchmarks.sampler import run_sampler_benchmarks

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        rows = run_sampler_benchmarks(
            dev, gpu_shapes=gpu_shapes, batch=batch, steps=steps, guidance=guidance, repeats=repeats,
            compile_modes=(False, True) if compile else (False,),
            progress=lambda msg: status.update(f"benchmarking {msg}"), backbone=backbone,
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
    backbone: Annotated[str, backbone_option()] = "sd",
) -> None:
    """Our training step vs the naive per-item step (tiny model), and buffer bytes at SD1.5 shapes."""
    check_backbone(backbone)
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
                                    progress=lambda msg: status.update(f"benchmarking {msg}"), backbone=backbone)
    import torch

    buffer_rows = buffer_bytes_rows(dtype=torch.float32) + buffer_bytes_rows(dtype=torch.bfloat16)
    step_dicts = [r.as_dict() for r in rows]
    print_table(f"fastdense bench train ({dev.type}, tiny {backbone} model)", step_dicts,
                ["mode", "step_seconds", "peak_mem_mb", "unet_calls", "items", "speedup_vs_naive"])
    buffer_dicts = [r.as_dict() for r in buffer_rows]
    print_table("replay buffer bytes per trajectory (SD1.5: 4x64x64 latents, T=50, 77x768 embeddings, G=5)",
                buffer_dicts, ["layout", "dtype", "bytes_per_trajectory", "ratio_vs_naive"])
    write_json(step_dicts + buffer_dicts, json_path)


SCALING_COLUMNS = ["gpus", "nodes", "zero", "rollout_s", "step_s", "round_s", "comm_MB/step", "comm_s/step",
                   "comm/compute", "exposed_s/step", "rollout_gather_GB", "buffer_GB", "optimizer_GB", "weights_GB",
                   "buckets_GB", "total_GB", "bottleneck"]


def _int_list(text: str, what: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < low for v in values):
        raise ValueError(f"{what} {text!r} is not allowed; expected comma-separated integers >= {low}, e.g. 8,64,512")
    return values


@app.command("scaling")
def scaling(
    gpu: Annotated[str, typer.Option("--gpu", help="a100, h100 or h200 (published figures, BENCHMARKS.md).")] = "h100",
    gpus: Annotated[str, typer.Option("--gpus", help="GPU counts, comma-separated (8 per node).")] = "8,64,512",
    preset: Annotated[str | None, typer.Option("--preset", help="The training preset whose work is modelled.")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="A YAML/TOML/JSON config file (over the preset, if any).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one value: section.key=value (repeatable), e.g. train.grad_accum=8."),
    ] = None,
    zero: Annotated[str, typer.Option("--zero", help="ZeRO stages to model, comma-separated (0-3).")] = "2,3",
    mfu: Annotated[float, typer.Option("--mfu", help="Assumed model-FLOP utilisation of the denoiser.")] = 0.40,
    json_path: Annotated[Path | None, json_option()] = None,
) -> None:
    """Scaling model: rollout and step time, ZeRO-2/3 traffic, memory per rank at each GPU count (paper arithmetic)."""
    from fastdense.benchmarks.roofline import gpu_spec
    from fastdense.benchmarks.scaling import NCCL_SOURCE, ScalingAssumptions, comm_bound_from, scaling_rows
    from fastdense.config import build_config

    spec = gpu_spec(gpu, what="--gpu")
    counts = _int_list(gpus, "--gpus", 1)
    stages = _int_list(zero, "--zero", 0)
    if any(s > 3 for s in stages):
        raise ValueError(f"--zero {zero!r} is not allowed; stages are 0, 1, 2, 3")
    if not (0 < mfu <= 1):
        raise ValueError(f"--mfu {mfu} is not allowed; it must be in (0, 1]")
    if config is not None and not config.is_file():
        raise ValueError(f"--config {config} does not exist or is not a file")
    if preset is None and config is None:
        preset = "sd15-multi"
    cfg = build_config(preset=preset, config_file=config, overrides=list(overrides or []))
    a = ScalingAssumptions(mfu=mfu)
    plan, rows = scaling_rows(cfg, spec, counts, stages, a)

    display = []
    for r in rows:
        d = r.as_dict()
        d.update({"comm_MB/step": r.comm_mb_step, "comm_s/step": r.comm_s_step, "comm/compute": r.comm_per_compute,
                  "exposed_s/step": r.exposed_comm_s_step, "buckets_GB": r.buckets_gb,
                  "rollout_gather_GB": r.rollout_comm_gb_round, "buffer_GB": r.buffer_gb,
                  "optimizer_GB": r.optimizer_gb, "weights_GB": r.weights_gb + r.zero3_live_gb,
                  "total_GB": f"{r.total_gb:.2f}" + ("" if r.fits else " (!)")})
        display.append(d)
    name = preset or str(config)
    print_table(f"scaling model: {name} on {spec.name} ({spec.fabric}: NVLink within a node of "
                f"{spec.gpus_per_node}, InfiniBand across), per rank, steady-state round, times in s", display,
                SCALING_COLUMNS)

    from rich.console import Console

    console = Console() if Console().is_terminal else Console(width=220)
    bb = plan.backbone
    flops_s = spec.bf16_dense_tflops * a.mfu
    lines = [
        f"work per rank (from the config): {plan.prompts} prompt(s) x {plan.rollouts // max(plan.prompts, 1)} rollouts "
        f"= {plan.rollouts} trajectories of {plan.steps} steps per round ({plan.sampling_calls} denoiser calls, "
        f"CFG rows x{plan.cfg_rows}); {plan.updates} updates per round of {plan.micro_batches} micro-batches of "
        f"{plan.items} items; LoRA rank {plan.lora_rank} on {', '.join(plan.lora_targets)}: "
        f"{plan.trainable:,} trainable parameters; ZeRO stage of the config: {plan.zero_stage}",
        f"measured ({bb.measured}): denoiser forward {bb.fwd_flops / 1e9:.1f} GFLOP at batch 1 "
        f"(+{(plan.fwd_flops - bb.fwd_flops) / 1e9:.2f} LoRA), backward {plan.bwd_flops / 1e9:.1f} GFLOP "
        + ("(measured with these LoRA targets: activation gradients only, frozen base)" if plan.bwd_measured
           else "(assumed 2 x forward: no measurement for these LoRA targets)")
        + f", VAE decode {bb.vae_decode_flops / 1e9:.0f} GFLOP, text encoder {bb.text_encoder_flops / 1e9:.1f} GFLOP",
        f"published: {spec.name} {spec.bf16_dense_tflops:g} TFLOP/s dense bf16, {spec.memory_gb:g} GB, NVLink "
        f"{spec.nvlink_gb_s:g} GB/s per GPU (both directions), {spec.nics_per_node} x InfiniBand "
        f"{spec.nic_gb_s * 8:g} Gb/s per {spec.gpus_per_node}-GPU node; at the MFU below {flops_s:.0f} TFLOP/s",
        f"collective latency: {NCCL_SOURCE}",
    ]
    lines += [f"assumption: {text}" for text in a.describe()]
    for stage in stages:
        seq = [f"{r.gpus} GPUs: {r.bottleneck} (communication {r.comm_per_compute:.2f} x compute)"
               for r in rows if r.zero == stage]
        bound = comm_bound_from(cfg, spec, stage, a)
        where = (f"from {bound} GPUs the step's communication outlasts its compute" if bound is not None
                 else "the step's communication stays under its compute up to 65,536 GPUs")
        lines.append(f"bottleneck, ZeRO-{stage}: " + "; ".join(seq) + f"; {where}")
    if not all(r.fits for r in rows):
        lines.append(f"(!) total over the {spec.memory_gb:g} GB of one {spec.name}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    write_json([r.as_dict() for r in rows], json_path)


@app.command("gpu-check")
def gpu_check(
    json_path: Annotated[Path, typer.Option("--json", help="The JSON report.")] = Path("gpu_check.json"),
    md_path: Annotated[
        Path | None, typer.Option("--md", help="The markdown report (default: --json with .md).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer shapes and repeats.")] = False,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Skip the torch.compile kernel rows.")] = False,
    no_sampler: Annotated[bool, typer.Option("--no-sampler", help="Skip the sampler benchmark.")] = False,
    sampler_compile: Annotated[
        bool, typer.Option("--sampler-compile", help="Also time the torch.compile'd sampler.")
    ] = False,
    no_train: Annotated[bool, typer.Option("--no-train", help="Skip the training step.")] = False,
    model: Annotated[
        str | None, typer.Option("--model", help="a100, h100 or h200 for the bandwidth model (default: the GPU's).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Every case at small shapes here (CPU: Triton interpreted); for CI.")
    ] = False,
) -> None:
    """The one-shot GPU check (benchmarks/gpu_check.py): correctness, kernels + bandwidth model, sampler,
    training step; one JSON and one markdown report."""
    from fastdense.benchmarks import gpu_check as check

    if model is not None:
        from fastdense.benchmarks.roofline import gpu_spec

        gpu_spec(model)
    argv = ["--json", str(json_path)]
    if md_path is not None:
        argv += ["--md", str(md_path)]
    if model is not None:
        argv += ["--model", model]
    for flag, on in (("--quick", quick), ("--no-compile", no_compile), ("--no-sampler", no_sampler),
                     ("--sampler-compile", sampler_compile), ("--no-train", no_train), ("--dry-run", dry_run)):
        if on:
            argv.append(flag)
    code = check.main(argv)
    if code:
        raise typer.Exit(code)
