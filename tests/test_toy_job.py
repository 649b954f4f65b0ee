"""A short version of the main job (``fastdense train`` on the toy preset: the shipped toy model,
the colour-fidelity reward, its learning rate and reward-gap filter) improves the reward on
fixed seeds.

It trains on four of the prompts the shipped model gets most wrong and evaluates on the same
prompts with 16 fixed seeds that no rollout uses (64 samples), so 20 updates show a gain well
above the noise: measured 0.650 -> 0.823 (2026-12-03, AMD EPYC, 2 threads, 167 s)."""

from __future__ import annotations

import json

import pytest
import torch

from fastdense.cli.main import main

WEAK_PROMPTS = "[a large white ring on a yellow background, a small magenta ring on a black background, " \
    "a large yellow triangle on a red background, a large cyan square on a blue background]"


@pytest.mark.slow
def test_short_toy_job_improves_the_reward_on_fixed_seeds(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [
        f"data.prompts={WEAK_PROMPTS}", f"data.eval_prompts={WEAK_PROMPTS}",
        f"data.eval_seeds={list(range(1000, 1016))}",
        "sampling.rollouts_per_prompt=16", "train.rounds=2", "train.prompts_per_round=4",
        "train.updates_per_round=10", "train.groups_per_step=16",
        # every attention projection and K = 4: learns a narrow prompt set faster than the preset's
        # cross-attention-only LoRA (measured: +0.17 here, +0.10 with the preset's targets and K = 3)
        "model.lora_targets=[to_q,to_k,to_v,to_out.0]", "objective.k=4", "run.checkpoint_every=1000",
    ]
    torch.set_num_threads(2)  # the job's own setting on 2 cores (conftest's fixture restores 1 afterwards)
    try:
        main(["train", "--preset", "toy", *[a for s in sets for a in ("--set", s)], "--out", str(out),
              "--no-progress"])
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 20 and all(r["applied"] for r in train)
    assert summary["reward_after"] >= summary["reward_before"] + 0.1, summary
    # the preset's evaluations: after round 1 of 2, and the paired comparison on 4 prompts x
    # (16 eval seeds + the preset's 44 more), whose interval excludes no change
    assert [r["round"] for r in records if r["event"] == "eval" and r["tag"] == "round"] == [0]
    assert (out / "eval" / "round_1.png").is_file()
    paired = summary["paired"]
    assert paired["samples"] == 4 * 60 and paired["seeds"] == list(range(1000, 1060))
    assert paired["difference"]["low"] > 0, paired
    assert "paired on 240 held-out samples" in capsys.readouterr().out

    # the saved LoRA scores through `fastdense toy eval --lora` (held-out prompts, any seeds)
    capsys.readouterr()
    try:
        main(["toy", "eval", "--lora", str(out / "lora"), "--seeds", "1", "--first-seed", "2000"])
    except SystemExit as exit_:
        assert exit_.code in (0, None), capsys.readouterr().err
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("held-out colour fidelity 0.") and "+ LoRA" in last
    assert last.endswith("seeds 2000-2000, 16 samples")


def test_toy_eval_refuses_a_missing_lora(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "eval", "--lora", str(tmp_path / "nope"), "--seeds", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "nope" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
