"""``fastdense eval``: the files it writes, defaults from a run's config and from the toy model, and
bad input as one-line errors with exit code 2 that write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fastdense.stats import win_rate
from fastdense.testing import random_lora


@pytest.fixture(scope="module")
def run_dir(pixel_dir, tmp_path_factory):
    """A finished run as the trainer leaves it (config.json, lora/): 2 steps, guidance 2, brightness."""
    from fastdense.config import Config, validate

    cfg = Config()
    cfg.model.path = str(pixel_dir)
    cfg.data.prompts, cfg.data.eval_prompts = ["a cat", "the dog", "a cow"], ["the dog", "a red cat", "a bird"]
    cfg.reward.name = "brightness"
    cfg.sampling.num_steps, cfg.sampling.guidance = 2, 2.0
    validate(cfg)
    run = tmp_path_factory.mktemp("runs") / "run-7"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    random_lora(pixel_dir, run / "lora")
    return run


def test_eval_from_a_run_directory(pixel_dir, run_dir, tmp_path, run_cli):
    """Model, prompts (seen: trained on; unseen: evaluated, not trained on), reward and sampling settings
    all come from the run's config.json; the numbers in eval.json agree with its per-image scores."""
    out = tmp_path / "eval"
    code, stdout, err = run_cli(["eval", "--lora", run_dir, "--seeds", 3, "--first-seed", 5, "--max-seen", 2,
                              "--max-unseen", 2,
                              "--device", "cpu", "--micro-batch", 4, "--grid-rows", 3, "--trajectories", 1,
                              "--out", out])
    assert code == 0, err
    record = json.loads((out / "eval.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(record["files"])
    assert record["files"] == ["grid_seen.png", "trajectory_seen_00.png", "grid_unseen.png",
                               "trajectory_unseen_00.png", "eval.md", "eval.json"]
    assert record["model"] == str(pixel_dir) and record["schema"] == "fastdense.eval/1"
    assert [m["label"] for m in record["models"]] == ["base", "run-7"]
    assert record["models"][1] == {"label": "run-7", "lora": str(run_dir / "lora"), "run": str(run_dir)}
    assert record["prompts"] == {"seen": ["a cat", "the dog"], "unseen": ["a red cat", "a bird"]}
    assert record["rewards"] == ["brightness"] and record["seeds"] == [5, 6, 7]
    assert record["settings"]["steps"] == 2 and record["settings"]["guidance"] == 2.0
    assert record["settings"]["device"] == "cpu" and record["settings"]["micro_batch"] == 4
    for group in ("seen", "unseen"):
        base = np.array(record["scores"]["base"]["brightness"][group])
        mine = np.array(record["scores"]["run-7"]["brightness"][group])
        assert base.shape == (2, 3) and not np.array_equal(base, mine)
        res = record["results"][group]["brightness"]["overall"]
        assert res["base"]["mean"]["value"] == pytest.approx(base.mean(), abs=1e-12)
        assert res["run-7"]["mean"]["n"] == 6
        reported = res["run-7"]["win_rate"]
        expected = win_rate(mine.reshape(-1), base.reshape(-1))
        assert (reported["value"], reported["low"], reported["high"]) == pytest.approx(
            (expected.value, expected.low, expected.high), abs=1e-12)
        assert res["run-7"]["difference"]["value"] == pytest.approx((mine - base).mean(), abs=1e-12)
    all_base = np.concatenate([np.array(record["scores"]["base"]["brightness"][g]) for g in ("seen", "unseen")])
    assert record["results"]["all"]["brightness"]["overall"]["base"]["mean"]["value"] == pytest.approx(
        all_base.mean(), abs=1e-12)
    md = (out / "eval.md").read_text()
    assert "## Overall" in md and "## Per prompt: seen" in md and "## Per prompt: unseen" in md
    assert "| a red cat |" in md and "run-7 win rate [CI]" in md
    grid = Image.open(out / "grid_unseen.png")
    assert grid.mode == "RGB" and grid.height > 3 * 128 and grid.width > 2 * 128  # 3 rows, 2 models, scaled up
    assert "unseen brightness run-7: mean" in stdout and "win rate" in stdout


def test_eval_with_prompt_files_labels_and_overwrite(pixel_dir, run_dir, tmp_path, run_cli):
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.txt"
    seen.write_text("a cat\n")
    unseen.write_text("a bird\na fish\n")
    out = tmp_path / "eval"
    base = ["eval", "--model", pixel_dir, "--lora", run_dir / "lora", "--lora", run_dir, "--label", "A",
            "--label", "B", "--seen-prompts-file", seen, "--prompts-file", unseen, "--reward", "brightness",
            "--reward", "aesthetic_proxy=2", "--seeds", 2, "--steps", 2, "--guidance", 1, "--device", "cpu",
            "--out", out]
    code, _, err = run_cli(base + ["--trajectory-steps", "0,1"])
    assert code == 0, err
    record = json.loads((out / "eval.json").read_text())
    assert [m["label"] for m in record["models"]] == ["base", "A", "B"]
    assert record["rewards"] == ["brightness", "aesthetic_proxy=2"]
    assert record["prompts"] == {"seen": ["a cat"], "unseen": ["a bird", "a fish"]}
    assert record["prompt_sources"] == {"seen": str(seen), "unseen": str(unseen)}
    assert record["pictures"]["trajectories"][0]["steps"] == [0, 1]
    assert record["settings"]["micro_batch"] == 8  # the run's (the config default)
    a = record["scores"]["A"]["aesthetic_proxy=2"]
    assert a == record["scores"]["B"]["aesthetic_proxy=2"]  # the same LoRA, loaded twice
    trajectory = Image.open(out / "trajectory_unseen_00.png")
    assert trajectory.width > 3 * 128 and trajectory.height > 3 * 128  # 2 steps + final, 3 models, scaled up

    # a second evaluation needs --overwrite, and then leaves none of the first one's pictures behind
    code, _, err = run_cli(base)
    assert code == 2 and "is not empty" in err and "--overwrite" in err
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(base + ["--trajectories", 0, "--overwrite"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "grid_seen.png", "grid_unseen.png",
                                                     "notes.txt"]


def test_default_model_is_the_toy_model(tmp_path, run_cli):
    """Without --model and runs: the shipped toy model, its training captions (seen) and held-out
    prompts (unseen), its colour reward and sampling defaults."""
    from fastdense.toy import DEFAULT_GUIDANCE, shipped_model_dir
    from fastdense.toy.world import HELDOUT_PROMPTS, train_prompts

    out = tmp_path / "o"
    code, _, err = run_cli(["eval", "--max-seen", 1, "--max-unseen", 1, "--seeds", 1, "--steps", 2, "--trajectories", 0,
                         "--out", out])
    assert code == 0, err
    record = json.loads((out / "eval.json").read_text())
    assert record["model"] == str(shipped_model_dir()) and record["rewards"] == ["color_fidelity"]
    assert record["prompts"] == {"seen": train_prompts()[:1], "unseen": list(HELDOUT_PROMPTS[:1])}
    assert record["settings"]["guidance"] == DEFAULT_GUIDANCE and record["settings"]["eta"] == 1.0
    assert record["settings"]["micro_batch"] == 128  # the toy preset's: small UNet calls are slow on a CPU
    assert [m["label"] for m in record["models"]] == ["base"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--lora", "{missing}"], "--lora {missing} does not exist"),
        (["--lora", "{empty}"], "holds no LoRA weights"),
        (["--reward", "no_such_reward"], "unknown reward 'no_such_reward'; allowed:"),
        (["--seeds", "0"], "--seeds 0 is not allowed"),
        (["--seeds", "many"], "--seeds"),  # typer's own usage error
        (["--first-seed", "-1"], "--first-seed -1 is not allowed"),
        (["--max-seen", "-2"], "--max-seen -2 is not allowed"),
        (["--max-unseen", "0"], "the limit of every group with prompts (unseen) is 0"),
        (["--prompts-file", "{empty}"], "--prompts-file"),
        (["--steps", "0"], "--steps 0 is not allowed"),
        (["--micro-batch", "0"], "--micro-batch 0 is not allowed"),
        (["--trajectory-steps", "0,9"], "out of range"),
        (["--label", "x"], "--label given 1 times for 0 --lora"),
        (["--prompts-file", "{missing}"], "--prompts-file"),
        (["--dtype", "fp8"], "--dtype"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(pixel_dir, tmp_path, run_cli, args, match):
    (tmp_path / "empty").mkdir()
    subs = {"{missing}": str(tmp_path / "missing"), "{empty}": str(tmp_path / "empty")}
    args = [subs.get(a, a) for a in args]
    match = match.replace("{missing}", subs["{missing}"])
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("a cat\n")
    base = ["eval", "--model", pixel_dir, "--steps", "2", "--device", "cpu", "--out", tmp_path / "o"]
    if "--prompts-file" not in args:
        base += ["--prompts-file", unseen]
    code, _, err = run_cli(base + args)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert not (tmp_path / "o").exists()
