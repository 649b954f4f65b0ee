"""The dense-vs-trajectory experiment: the same training job with several discounts γ.

The paper's claim: discounting (γ < 1) weights the early steps of the reverse chain, which
shape the image, and aligns better and faster than the classical trajectory-level objective
(γ = 1, the same estimator and everything else equal). Each arm is one γ; each arm is trained
from the same preset and budget with the same training seeds, so arm A's run with seed s and
arm B's run with seed s draw the same prompts in the same order and start from the same LoRA.

Every run evaluates the held-out prompts × ``data.eval_seeds`` before training, after every
round (``eval.every_rounds = 1``) and after training, and the larger paired set (``data.eval_seeds``
+ ``eval.paired_seeds`` more) before and after; the before evaluations are the base model, the
same in every run. The report (:func:`report`) reads only the run directories:

* per arm and round: the held-out reward, mean ± std across training seeds (the curve);
* per arm: the final reward on the paired set and the win rate against the base model, pooled
  over training seeds × prompts × evaluation seeds, with 95 % bootstrap intervals;
* per pair of arms (every γ against the trajectory-level arm γ = 1 when there is one): the
  paired difference of their final rewards on the same samples and training seeds, and the
  difference of the per-seed means (one number per training seed, so its spread shows how much
  the result depends on the training seed, which the pooled interval does not).

Runs are separate ``python -m fastdense train`` processes (a fresh DeepSpeed process group and
RNG state each), ``jobs`` at a time, each writing ``train.log`` into its run directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastdense.errors import FastdenseError

__all__ = ["Arm", "ExperimentPlan", "plan_experiment", "report", "run_arms", "TRAJECTORY_GAMMA"]

TRAJECTORY_GAMMA = 1.0  # γ = 1: every step weighs the same, the trajectory-level objective
REPORT_JSON, REPORT_MD, CURVE_PNG = "experiment.json", "experiment.md", "heldout_curve.png"


@dataclass(frozen=True)
class Arm:
    gamma: float
    seed: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"gamma_{self.gamma:g}/seed_{self.seed}"


@dataclass(frozen=True)
class ExperimentPlan:
    out: Path
    preset: str
    gammas: tuple[float, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # applied to every run (the budget, the evaluation sizes, --set)
    arms: tuple[Arm, ...]

    def command(self, arm: Arm) -> list[str]:
        """The ``fastdense train`` command line of one run."""
        sets = [*self.overrides, f"objective.gamma={arm.gamma!r}", f"train.seed={arm.seed}"]
        return [sys.executable, "-m", "fastdense", "train", "--preset", self.preset, "--out", str(arm.run_dir),
                "--no-progress", *[a for s in sets for a in ("--set", s)]]


def plan_experiment(out: str | Path, *, preset: str, gammas: Sequence[float], seeds: Sequence[int],
                    overrides: Sequence[str] = ()) -> ExperimentPlan:
    """The runs of an experiment: every γ × every training seed, each in ``out/gamma_G/seed_S``.
    Raises FastdenseError for a bad γ, seed list or an ``out`` that holds something else."""
    gammas = tuple(float(g) for g in gammas)
    seeds = tuple(int(s) for s in seeds)
    for g in gammas:
        if not (math.isfinite(g) and 0 < g <= 1):
            raise FastdenseError(f"--gamma {g!r} is not allowed; each γ must be in (0, 1]")
    if len(gammas) < 2 or len(set(gammas)) != len(gammas):
        raise FastdenseError(f"--gamma {list(gammas)} is not allowed; give at least two different values")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise FastdenseError(f"training seeds {list(seeds)} are not allowed; give one or more different seeds >= 0")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastdenseError(f"--out {out} exists and is not an empty directory; choose a new one")
    arms = tuple(Arm(g, s, out / f"gamma_{g:g}" / f"seed_{s}") for g in gammas for s in seeds)
    return ExperimentPlan(out, preset, gammas, seeds, tuple(overrides), arms)


def run_arms(plan: ExperimentPlan, *, jobs: int = 1, on_done: Callable[[Arm, float], None] | None = None,
             env: dict[str, str] | None = None) -> None:
    """Run every arm, ``jobs`` processes at a time (each with cores // jobs torch threads when
    jobs > 1). Raises FastdenseError naming the first run that failed and its log."""
    if jobs < 1:
        raise FastdenseError(f"--jobs {jobs} is not allowed; it must be >= 1")
    base_env = dict(os.environ if env is None else env)
    if jobs > 1:
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    plan.out.mkdir(parents=True, exist_ok=True)
    pending, running = list(plan.arms), []
    failed: list[tuple[Arm, int]] = []
    while pending or running:
        while pending and len(running) < jobs and not failed:
            arm = pending.pop(0)
            arm.run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = (arm.run_dir.parent / f"{arm.run_dir.name}.log").open("w")
            proc = subprocess.Popen(plan.command(arm), stdout=log, stderr=subprocess.STDOUT, env=base_env)
            running.append((arm, proc, log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            arm, proc, log, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                failed.append((arm, proc.returncode))
            elif on_done is not None:
                on_done(arm, time.perf_counter() - start)
        if failed and not running:
            break
    if failed:
        arm, code = failed[0]
        raise FastdenseError(f"run {arm.name} failed with exit code {code}; see "
                             f"{arm.run_dir.parent / (arm.run_dir.name + '.log')}")


# ================================================================================ report


def _json_rewards(path: Path) -> np.ndarray:
    saved = json.loads(path.read_text())
    return np.array([[math.nan if v is None else v for v in row] for row in saved["paired_rewards"]], dtype=float)


def _tie(summary: dict[str, Any], cfg: dict[str, Any]) -> float:
    """The run's tie tolerance for win rates: from its summary, or (runs made before it was
    recorded there) from its reward."""
    paired = summary.get("paired") or {}
    if "tie" in paired:
        return float(paired["tie"])
    from fastdense.rewards import get_reward
    from fastdense.stats import tie_tolerance

    return tie_tolerance(get_reward(cfg["reward"]["name"]))


def _heldout_curve(run_dir: Path, rounds: int) -> list[float]:
    """Held-out reward before training (index 0) and after each round (1..rounds), from metrics.jsonl."""
    curve = [math.nan] * (rounds + 1)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") != "eval":
            continue
        index = {"before": 0, "after": rounds}.get(r["tag"], r.get("round", -2) + 1)
        if 0 <= index <= rounds:
            curve[index] = math.nan if r["reward"] is None else float(r["reward"])
    return curve


def report(out: str | Path, gammas: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """Read the runs of an experiment in ``out`` and write experiment.json, experiment.md and
    heldout_curve.png there; returns the experiment.json content."""
    from fastdense.stats import mean_ci, paired_difference, win_rate

    out = Path(out)
    arms: dict[float, dict[str, Any]] = {}
    rounds = None
    for g in gammas:
        curves, before, after, seconds, ties = [], [], [], [], []
        for s in seeds:
            run = out / f"gamma_{g:g}" / f"seed_{s}"
            cfg = json.loads((run / "config.json").read_text())
            rounds = cfg["train"]["rounds"] if rounds is None else rounds
            if cfg["train"]["rounds"] != rounds:
                raise FastdenseError(f"{run} trained {cfg['train']['rounds']} rounds, the others {rounds}: "
                                     "arms must have the same budget")
            curves.append(_heldout_curve(run, rounds))
            before.append(_json_rewards(run / "eval_before.json"))
            after.append(_json_rewards(run / "eval_after.json"))
            summary = json.loads((run / "summary.json").read_text())
            seconds.append(summary.get("seconds"))
            ties.append(_tie(summary, cfg))
        curves_a, before_a, after_a = np.array(curves), np.stack(before), np.stack(after)
        arms[g] = {
            "gamma": g, "curve": curves_a, "before": before_a, "after": after_a,
            "final": mean_ci(after_a), "base": mean_ci(before_a),
            "win_rate_vs_base": win_rate(after_a, before_a, tie=max(ties)),
            "tie": max(ties),
            "per_seed_final": [float(np.nanmean(a)) for a in after_a],
            "seconds": seconds,
        }
    reference = TRAJECTORY_GAMMA if TRAJECTORY_GAMMA in arms else list(arms)[-1]
    comparisons = []
    for g in arms:
        if g == reference:
            continue
        a, b = arms[g], arms[reference]
        per_seed = [x - y for x, y in zip(a["per_seed_final"], b["per_seed_final"], strict=True)]
        comparisons.append({
            "arm": g, "against": reference,
            "difference": paired_difference(a["after"], b["after"]).to_dict(),
            "win_rate": win_rate(a["after"], b["after"], tie=max(a["tie"], b["tie"])).to_dict(),
            "per_seed_difference": per_seed,
            "seeds_where_arm_wins": int(sum(d > 0 for d in per_seed)),
        })
    samples = int(next(iter(arms.values()))["after"][0].size)
    result = {
        "gammas": list(gammas), "seeds": list(seeds), "rounds": rounds,
        "samples_per_run": samples,
        "arms": [{
            "gamma": g,
            "heldout_per_round": {"mean": _nan_list(np.nanmean(v["curve"], axis=0)),
                                  "std": _nan_list(_std(v["curve"]))},
            "final": v["final"].to_dict(), "base": v["base"].to_dict(),
            "win_rate_vs_base": v["win_rate_vs_base"].to_dict(), "per_seed_final": v["per_seed_final"],
            "seconds": v["seconds"], "tie": v["tie"],
        } for g, v in arms.items()],
        "comparisons": comparisons,
    }
    from fastdense.training.tracking import json_value

    (out / REPORT_JSON).write_text(json.dumps(json_value(result), indent=2) + "\n")
    (out / REPORT_MD).write_text(_markdown(result))
    _curve_png(result, out / CURVE_PNG)
    return result


def _std(curves: np.ndarray) -> np.ndarray:
    return np.nanstd(curves, axis=0, ddof=1) if curves.shape[0] > 1 else np.zeros(curves.shape[1])


def _nan_list(values) -> list[float]:
    return [float(v) for v in values]


def _ci(e: dict[str, float], digits: int = 4) -> str:
    return f"{e['value']:.{digits}f} [{e['low']:.{digits}f}, {e['high']:.{digits}f}]"


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Dense vs trajectory-level reward",
        "",
        f"Training seeds {r['seeds']}, {r['rounds']} rounds per run, {r['samples_per_run']} held-out samples per "
        "run in the final comparison (prompts × evaluation seeds). Intervals: 95 % bootstrap over training "
        "seeds × prompts × evaluation seeds.",
        "",
        "| γ | base reward | final reward | win rate vs base | final per training seed |",
        "|---|---|---|---|---|",
    ]
    for a in r["arms"]:
        per_seed = ", ".join(f"{v:.4f}" for v in a["per_seed_final"])
        lines.append(f"| {a['gamma']:g} | {_ci(a['base'])} | {_ci(a['final'])} | {_ci(a['win_rate_vs_base'], 3)} "
                     f"| {per_seed} |")
    lines += ["", "Held-out reward per round (mean ± std across training seeds; round 0 = before training):", "",
              "| γ | " + " | ".join(str(k) for k in range(r["rounds"] + 1)) + " |",
              "|---|" + "---|" * (r["rounds"] + 1)]
    for a in r["arms"]:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(a["heldout_per_round"]["mean"], a["heldout_per_round"]["std"],
                                                      strict=True)]
        lines.append(f"| {a['gamma']:g} | " + " | ".join(cells) + " |")
    if r["comparisons"]:
        lines += ["", "Paired comparison of the arms (same training seeds, prompts and evaluation seeds):", "",
                  "| arm | against | difference of final reward | win rate | difference per training seed |",
                  "|---|---|---|---|---|"]
        for c in r["comparisons"]:
            per_seed = ", ".join(f"{d:+.4f}" for d in c["per_seed_difference"])
            d = c["difference"]
            lines.append(f"| γ = {c['arm']:g} | γ = {c['against']:g} | {d['value']:+.4f} [{d['low']:+.4f}, "
                         f"{d['high']:+.4f}] | {_ci(c['win_rate'], 3)} | {per_seed} |")
    return "\n".join(lines) + "\n"


def _curve_png(r: dict[str, Any], path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    from fastdense.pictures import new_figure, save_png

    fig = new_figure(720, 440)
    ax = fig.add_subplot()
    x = np.arange(r["rounds"] + 1)
    n = len(r["seeds"])
    for a in r["arms"]:
        mean = np.array(a["heldout_per_round"]["mean"])
        std = np.array(a["heldout_per_round"]["std"])
        label = f"γ = {a['gamma']:g}" + (" (trajectory-level)" if a["gamma"] == TRAJECTORY_GAMMA else "")
        (line,) = ax.plot(x, mean, marker="o", label=label)
        if n > 1:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("held-out reward")
    band = f"; bands: ± 1 std across {n} training seeds" if n > 1 else f"; {n} training seed"
    ax.set_title(f"held-out reward per round, mean{band}", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return save_png(fig, path)
