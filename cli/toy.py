"""``fastdense toy ...``: the built-in toy world and its tiny text-to-image model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)

DEFAULT_OUT = Path("toy-model")
DEFAULT_FLOW_OUT = Path("toy-flow-model")
BACKBONES = ("sd", "sd3")


@app.command("pretrain")
def pretrain(
    out: Annotated[
        Path | None,
        typer.Option(help="Output directory (diffusers layout; default ./toy-model, or the package's with --ship)."),
    ] = None,
    ship: Annotated[
        bool,
        typer.Option("--ship", help="Write into the package's shipped weights dir (fastdense/toy/weights/, "
                     "with --backbone sd3 fastdense/toy/weights_flow/)."),
    ] = False,
    backbone: Annotated[
        str,
        typer.Option(help="sd: the UNet + DDIM toy model (SD 1.x layout); sd3: the flow-matching toy model "
                     "(SD3 layout: MMDiT transformer, two CLIP encoders, rectified flow)."),
    ] = "sd",
    seed: Annotated[int, typer.Option(help="Seed of weights, scenes, timesteps and noise.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the shipped model's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = None,
    wrong_color_fraction: Annotated[
        float | None, typer.Option(help="Fraction of training captions that name a wrong shape colour.")
    ] = None,
    cfg_dropout: Annotated[float | None, typer.Option(help="Fraction of captions replaced by \"\" (CFG).")] = None,
    offset_noise: Annotated[float | None, typer.Option(help="Per-channel offset-noise scale.")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).")] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Measure held-out colour fidelity afterwards (default settings).")
    ] = False,
) -> None:
    """Train the toy text-to-image model from scratch on freshly rendered toy images."""
    import json
    import os

    from rich.progress import TextColumn

    from fastdense.cli._options import progress_bar
    from fastdense.toy import sampling_defaults, shipped_flow_weights_path, shipped_weights_path

    if backbone not in BACKBONES:
        raise ValueError(f"--backbone {backbone!r} is not allowed; allowed: {', '.join(BACKBONES)}")
    flow = backbone == "sd3"
    if flow:
        from fastdense.toy.flow_pretrain import FlowPretrainConfig as PretrainConfig
        from fastdense.toy.flow_pretrain import pretrain_flow as run_pretrain
    else:
        from fastdense.toy.pretrain import PretrainConfig
        from fastdense.toy.pretrain import pretrain as run_pretrain

    if ship and out is not None:
        raise ValueError("give --out or --ship, not both")
    if ship:
        target = shipped_flow_weights_path() if flow else shipped_weights_path()
    else:
        target = out or (DEFAULT_FLOW_OUT if flow else DEFAULT_OUT)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"--out {target} exists and is not a directory")

    overrides = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "wrong_color_fraction": wrong_color_fraction,
        "cfg_dropout": cfg_dropout,
        "offset_noise": offset_noise,
    }
    config = PretrainConfig(seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with progress_bar("[bold]pretrain", TextColumn("loss {task.fields[loss]:.4f}"), transient=False) as bar:
        task = bar.add_task("pretrain", total=config.steps, loss=float("nan"))

        def progress(step: int, loss: float) -> None:
            bar.update(task, completed=step + 1, loss=loss)

        result = run_pretrain(target, config, threads=threads, progress=progress)
    print(f"saved {result.out} in {result.seconds:.1f} s (mean loss of the last 100 steps {result.final_loss:.4f})")

    if evaluate:
        from fastdense.toy import DEFAULT_EVAL_SEEDS, evaluate_fidelity

        defaults = sampling_defaults(result.out)
        fidelity = evaluate_fidelity(result.out, steps=defaults.steps, guidance=defaults.guidance, eta=defaults.eta,
                                     sampler=defaults.sampler)
        info_path = result.out / "toy_info.json"
        info = json.loads(info_path.read_text())
        info["heldout_fidelity"] = {
            "value": round(fidelity, 4),
            "prompts": "fastdense.toy.world.HELDOUT_PROMPTS",
            "seeds": [DEFAULT_EVAL_SEEDS[0], DEFAULT_EVAL_SEEDS[-1]],
            "steps": defaults.steps,
            "guidance": defaults.guidance,
            "eta": defaults.eta,
            **({"sampler": defaults.sampler} if defaults.sampler is not None else {}),
        }
        info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        print(f"held-out colour fidelity {fidelity:.3f}")


@app.command("eval")
def eval_(
    model: Annotated[Path | None, typer.Option(help="Model directory (default: the shipped toy model).")] = None,
    lora: Annotated[
        Path | None, typer.Option(help="LoRA weights to load into the model (e.g. a training run's lora/).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Noise seeds per held-out prompt (first-seed, first-seed + 1, ...).")] = 16,
    first_seed: Annotated[int, typer.Option(help="The first noise seed.")] = 1000,
    steps: Annotated[int | None, typer.Option(help="Sampling steps (default: the toy model's defaults).")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale.")] = None,
    eta: Annotated[float | None, typer.Option(help="DDIM eta, or a flow sampler's noise level.")] = None,
    sampler: Annotated[
        str | None, typer.Option(help="ddim (SD toy); sde, cps or ode (flow toy). Default: the model's.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
) -> None:
    """Mean colour fidelity on the held-out toy prompts (per prompt, and overall)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from fastdense.models.loading import load_pipeline_parts
    from fastdense.toy import fidelity_scores, sampling_defaults, shipped_model_dir
    from fastdense.toy.world import HELDOUT_PROMPTS

    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is not allowed; allowed: >= 1")
    if first_seed < 0:
        raise ValueError(f"--first-seed {first_seed} is not allowed; allowed: >= 0")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads} is not allowed; allowed: >= 1")
        torch.set_num_threads(threads)
    model_dir = model if model is not None else shipped_model_dir()
    defaults = sampling_defaults(model_dir)
    steps = defaults.steps if steps is None else steps
    guidance = defaults.guidance if guidance is None else guidance
    eta = defaults.eta if eta is None else eta
    sampler = defaults.sampler if sampler is None else sampler
    parts = load_pipeline_parts(model_dir, lora=lora)
    seed_range = range(first_seed, first_seed + seeds)
    scores = fidelity_scores(model_dir, HELDOUT_PROMPTS, seed_range, steps, guidance, eta, parts=parts,
                             sampler=sampler)

    what = f"{model_dir}" + (f" + LoRA {lora}" if lora is not None else "")
    kind = (sampler or "ddim").upper()
    noise = "eta" if kind == "DDIM" else "noise level"
    table = Table(title=f"colour fidelity ({kind} {steps}, guidance {guidance:g}, {noise} {eta:g})")
    table.add_column("prompt")
    table.add_column("fidelity", justify="right")
    for prompt, row in zip(HELDOUT_PROMPTS, scores, strict=True):
        table.add_row(prompt, f"{float(row.mean()):.3f}")
    table.add_row("[bold]mean", f"[bold]{float(scores.mean()):.3f}")
    Console().print(table)
    print(f"held-out colour fidelity {float(scores.mean()):.4f}: {what}, seeds {seed_range.start}-"
          f"{seed_range.stop - 1}, {scores.numel()} samples")
