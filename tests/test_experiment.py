"""``fastdense experiment dense-vs-trajectory``: two tiny arms of one seed run through the real
command (a ``fastdense train`` process per run) and the report: table, JSON, curve; its numbers
are those of the runs' own files; bad input is one line before anything runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastdense.stats import paired_difference, win_rate


def _tiny(model) -> list[str]:
    sets = [
        f"model.path={model}", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]", "reward.name=brightness",
        "sampling.num_steps=3", "sampling.rollouts_per_prompt=2", "sampling.micro_batch=8", "objective.k=1",
        "objective.min_reward_gap=0", "objective.estimator=exact", "optim.lr=0.01", "train.prompts_per_round=2",
        "train.updates_per_round=1", "train.groups_per_step=2", "train.buffer_prompts=4", "run.checkpoint_every=100",
        "data.prompts=[a cat, the dog]", "data.eval_prompts=[a cat, a red dog]", "data.eval_seeds=[7]",
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.slow
def test_dense_vs_trajectory_runs_both_arms_and_reports(grey_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "exp"
    code, stdout, err = run_cli(["experiment", "dense-vs-trajectory", "--out", out, "--seeds", 1, "--rounds", 2,
                                 "--paired-seeds", 2, "--gamma", 0.5, "--gamma", 1.0, *_tiny(grey_dir)])
    assert code == 0, err
    assert "| γ = 0.5 | γ = 1 |" in stdout and "wrote" in stdout
    for name in ("experiment.md", "experiment.json", "heldout_curve.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "experiment.json").read_text())
    assert report["gammas"] == [0.5, 1.0] and report["seeds"] == [0] and report["rounds"] == 2
    assert report["samples_per_run"] == 2 * 3  # 2 eval prompts × (1 eval seed + 2 paired seeds)

    runs = {g: out / f"gamma_{g:g}" / "seed_0" for g in (0.5, 1.0)}
    for g, run in runs.items():
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["objective"]["gamma"] == g and cfg["train"]["rounds"] == 2 and cfg["eval"]["every_rounds"] == 1
    rewards = {g: np.array(json.loads((run / "eval_after.json").read_text())["paired_rewards"]).ravel()
               for g, run in runs.items()}
    base = np.array(json.loads((runs[1.0] / "eval_before.json").read_text())["paired_rewards"]).ravel()
    arms = {a["gamma"]: a for a in report["arms"]}
    for g in runs:
        assert arms[g]["final"]["value"] == pytest.approx(rewards[g].mean())
        assert arms[g]["base"]["value"] == pytest.approx(base.mean())  # the base model, the same in every run
        assert arms[g]["win_rate_vs_base"] == win_rate(rewards[g], base).to_dict()
        curve = arms[g]["heldout_per_round"]["mean"]
        assert len(curve) == 3 and all(math.isfinite(v) for v in curve)
        metrics = [json.loads(line) for line in (runs[g] / "metrics.jsonl").read_text().splitlines()]
        evals = {(r["tag"], r.get("round")): r["reward"] for r in metrics if r["event"] == "eval"}
        assert curve == pytest.approx([evals[("before", None)], evals[("round", 0)], evals[("after", None)]])
    (comparison,) = report["comparisons"]
    assert (comparison["arm"], comparison["against"]) == (0.5, 1.0)
    assert comparison["difference"] == paired_difference(rewards[0.5], rewards[1.0]).to_dict()
    assert comparison["per_seed_difference"] == pytest.approx([rewards[0.5].mean() - rewards[1.0].mean()])

    # the report alone, again from the runs: the same numbers
    (out / "experiment.json").unlink()
    code, _, err = run_cli(["experiment", "dense-vs-trajectory", "--out", str(out), "--seeds", "1", "--gamma", "0.5",
                         "--gamma", "1.0", "--report-only"])
    assert code == 0, err
    assert json.loads((out / "experiment.json").read_text()) == report


@pytest.mark.parametrize("args, message", [
    (["--gamma", "0.9"], "at least two different values"),
    (["--gamma", "0.9", "--gamma", "1.5"], "--gamma 1.5 is not allowed"),
    (["--seeds", "0"], "--seeds 0 is not allowed"),
    (["--jobs", "0"], "--jobs 0 is not allowed"),
    (["--set", "objective.beta=-1"], "objective.beta"),
    (["--preset", "nope"], "nope"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, run_cli, args, message):
    out = tmp_path / "exp"
    code, _, err = run_cli(["experiment", "dense-vs-trajectory", "--out", str(out), *args])
    assert code == 2
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_out_is_refused(tmp_path, run_cli):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "keep.txt").write_text("mine")
    code, _, err = run_cli(["experiment", "dense-vs-trajectory", "--out", str(tmp_path / "exp")])
    assert code == 2 and "not an empty directory" in err
    assert (tmp_path / "exp" / "keep.txt").read_text() == "mine"
