"""``fastdense experiment ...``: experiments that compare training settings (fastdense.experiment).

``dense-vs-trajectory``: the preset's job with the dense-reward discount γ < 1 against the
trajectory-level objective γ = 1, same budget and training seeds; writes the runs, experiment.md,
experiment.json and heldout_curve.png into ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import out_option

app = typer.Typer(no_args_is_help=True)

# Sized for about 30 minutes on 2 CPU cores with the toy preset (README "The dense-vs-trajectory experiment").
DEFAULT_SEEDS = 2
DEFAULT_ROUNDS = 4
DEFAULT_PAIRED_SEEDS = 12  # + the preset's 4 eval seeds: 16 prompts × 16 seeds = 256 samples per run


@app.command("dense-vs-trajectory")
def dense_vs_trajectory(
    out: Annotated[Path | None, out_option("Experiment directory (new or empty; default runs/experiment-TIME).")] \
        = None,
    preset: Annotated[str, typer.Option("--preset", help="The training job every arm runs.")] = "toy",
    gammas: Annotated[
        list[float] | None,
        typer.Option("--gamma", help="A discount to compare (repeatable; default: the preset's γ and 1.0)."),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Training seeds per γ (0, 1, ...).")] = DEFAULT_SEEDS,
    rounds: Annotated[
        int | None, typer.Option("--rounds", help=f"Rounds per run, the budget (default {DEFAULT_ROUNDS}; 0: the "
                                 "preset's).")
    ] = DEFAULT_ROUNDS,
    paired_seeds: Annotated[
        int, typer.Option("--paired-seeds", help="eval.paired_seeds of every run: the final comparison's size.")
    ] = DEFAULT_PAIRED_SEEDS,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a value in every run: section.key=value (repeatable).")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Runs at a time (each gets cores / jobs threads).")] = 1,
    report_only: Annotated[
        bool, typer.Option("--report-only", help="Only (re)write the report from the runs already in --out.")
    ] = False,
) -> None:
    """Dense reward (γ < 1) against the trajectory-level objective (γ = 1) on the same budget and seeds."""
    from rich.console import Console

    from fastdense import experiment as exp
    from fastdense.config import build_config
    from fastdense.errors import FastdenseError

    console = Console(stderr=True)
    if seeds < 1:
        raise FastdenseError(f"--seeds {seeds} is not allowed; it must be >= 1")
    if rounds is not None and rounds < 0:
        raise FastdenseError(f"--rounds {rounds} is not allowed; it must be >= 1 (0: the preset's)")
    if jobs < 1:
        raise FastdenseError(f"--jobs {jobs} is not allowed; it must be >= 1")
    if paired_seeds < 0:
        raise FastdenseError(f"--paired-seeds {paired_seeds} is not allowed; it must be >= 0")
    sets = ["eval.every_rounds=1", f"eval.paired_seeds={paired_seeds}"]
    if rounds:
        sets.append(f"train.rounds={rounds}")
    sets += list(overrides or [])
    cfg = build_config(preset=preset, overrides=sets)  # bad preset or --set: one line, before anything runs
    if not gammas:
        gammas = [cfg.objective.gamma, 1.0] if cfg.objective.gamma != 1.0 else [0.9, 1.0]
    out = out or Path("runs") / time.strftime("experiment-%Y%m%d-%H%M%S")
    seed_list = list(range(seeds))
    if report_only:
        if not out.is_dir():
            raise FastdenseError(f"--out {out} is not a directory of experiment runs")
    else:
        plan = exp.plan_experiment(out, preset=preset, gammas=gammas, seeds=seed_list, overrides=sets)
        runs = len(plan.arms)
        console.print(f"dense vs trajectory: γ ∈ {{{', '.join(f'{g:g}' for g in plan.gammas)}}} × {seeds} training "
                      f"seed(s), {cfg.train.rounds} rounds each, {jobs} at a time → {out}")
        done = []

        def finished(arm, seconds: float) -> None:
            done.append(arm)
            console.print(f"[{len(done)}/{runs}] γ = {arm.gamma:g}, seed {arm.seed}: {seconds:.0f} s")

        exp.run_arms(plan, jobs=jobs, on_done=finished)
    exp.report(out, gammas, seed_list)
    print((out / exp.REPORT_MD).read_text(), end="")
    print(f"wrote {out / exp.REPORT_MD}, {out / exp.REPORT_JSON} and {out / exp.CURVE_PNG}")
