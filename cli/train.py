"""``fastdense train``: dense-reward preference alignment on a DeepSpeed engine.

Config: the ``toy`` preset when neither ``--config`` nor ``--preset`` is given (the
shipped toy model and the colour-fidelity reward); ``--set section.key=value`` and
the direct flags override it. ``--dry-run`` prints the resolved config as JSON.
``--resume latest|PATH`` continues a run from its checkpoint (with the checkpoint's
config, plus any ``--set`` / flags). Writes into a fresh run directory (``--out``,
default ``run.out`` or ``runs/<time>``): LoRA weights, metrics.jsonl, reward_curve.png,
before_after.png, summary.json and checkpoints; prints "reward before → after on
held-out seeds". SIGINT (Ctrl-C) or SIGTERM: the update in progress finishes, a checkpoint is
written, and it exits 130 / 143 with the ``--resume`` command line to continue; a second signal
exits at once.

Single process: just run it. Several ranks: ``deepspeed --num_gpus N $(which fastdense) train ...``
or ``torchrun --nproc-per-node N $(which fastdense) train ...``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import device_option, out_option, progress_option, seed_option
from fastdense.errors import FastdenseError

DEFAULT_PRESET = "toy"


def resolve_config(
    *,
    config: Path | None,
    preset: str | None,
    overrides: list[str],
    resume: str | None,
    out: Path | None,
):
    """(Config, checkpoint directory or None) from the command line; raises FastdenseError."""
    from fastdense.config import build_config
    from fastdense.training.run_dir import resume_checkpoint

    if resume is not None:
        if config is not None or preset is not None:
            raise FastdenseError(
                "--resume continues a run with its checkpoint's config; --config/--preset are not allowed with it "
                "(use --set section.key=value to change a value)"
            )
        ckpt = resume_checkpoint(resume, out)
        cfg = build_config(config_file=ckpt / "config.json", overrides=overrides)
        return cfg, ckpt
    if config is not None and not config.is_file():
        raise FastdenseError(f"--config {config} does not exist or is not a file")
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    return build_config(preset=preset, config_file=config, overrides=overrides), None


def train(
    config: Annotated[
        Path | None, typer.Option("--config", help="A YAML/TOML/JSON config file (over the preset, if any).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="A shipped preset: toy (default), sd15-single, sd15-multi.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one value: section.key=value (repeatable), e.g. objective.gamma=0.8."),
    ] = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue a run: 'latest' (in --out) or a checkpoint directory.")
    ] = None,
    out: Annotated[Path | None, out_option("Run directory (new or empty; default runs/TIME).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config (JSON) and exit.")] = False,
    rounds: Annotated[int | None, typer.Option("--rounds", help="Rounds of collect + update (train.rounds).")] = None,
    updates: Annotated[
        int | None, typer.Option("--updates", help="Optimizer updates per round (train.updates_per_round).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Diffusers pipeline directory (model.path).")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="Reward name or spec (reward.name).")] = None,
    seed: Annotated[int | None, seed_option("Training seed (train.seed).")] = None,
    device: Annotated[str | None, device_option("auto, cpu, cuda or cuda:N (run.device).")] = None,
    progress: Annotated[bool, progress_option()] = True,
) -> None:
    """Train a text-to-image model with the dense-reward (temporally discounted DPO) objective."""
    sets = list(overrides or [])
    for key, value in (("train.rounds", rounds), ("train.updates_per_round", updates), ("model.path", model),
                       ("reward.name", reward), ("train.seed", seed), ("run.device", device)):
        if value is not None:
            sets.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    cfg, ckpt = resolve_config(config=config, preset=preset, overrides=sets, resume=resume, out=out)
    if dry_run:
        print(cfg.to_json())
        return

    from rich.console import Console

    from fastdense.training.run_dir import resolve_run_dir
    from fastdense.training.trainer import Trainer

    console = Console(stderr=True)
    run_dir = resolve_run_dir(cfg, out, ckpt)
    trainer = Trainer(cfg, run_dir, resume=ckpt, progress=progress and sys.stderr.isatty(), console=console)
    if trainer.dist.is_main:
        what = f"resuming {ckpt} at step {trainer.step}" if ckpt is not None else "training"
        console.print(f"{what}: {trainer.total_steps} updates in {cfg.train.rounds} rounds → {run_dir}")
    from fastdense.training.interrupt import TrainingInterrupted, stop_on_signals

    with stop_on_signals(trainer.stop, announce=trainer.dist.is_main):
        try:
            result = trainer.run()
        except TrainingInterrupted as stopped:
            if trainer.dist.is_main:
                print(f"interrupted at step {stopped.step}; continue with: "
                      f"fastdense train --resume latest --out {shlex.quote(str(run_dir))}", file=sys.stderr, flush=True)
            raise SystemExit(stopped.exit_code) from None  # 130 (SIGINT) or 143 (SIGTERM), past typer
    if trainer.dist.is_main:
        delta = result.reward_after - result.reward_before
        print(f"wrote {result.output} and metrics to {result.run_dir}")
        print(
            f"reward before → after on held-out seeds: {result.reward_before:.4f} → {result.reward_after:.4f} "
            f"({delta:+.4f})"
        )
        if result.paired is not None:
            print(paired_line(result.paired))


def paired_line(paired: dict) -> str:
    """The summary's paired comparison in one line: means, difference and win rate with 95 % CIs."""
    b, a, d, w = paired["before"], paired["after"], paired["difference"], paired["win_rate"]
    return (f"paired on {paired['samples']} held-out samples ({paired['prompts']} prompts × "
            f"{len(paired['seeds'])} seeds): {b['value']:.4f} → {a['value']:.4f}, difference "
            f"{d['value']:+.4f} [95% CI {d['low']:+.4f}, {d['high']:+.4f}], win rate {w['value']:.3f} "
            f"[{w['low']:.3f}, {w['high']:.3f}]")
