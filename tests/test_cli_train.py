"""``fastdense train``: dry run, a small run and its resumption, and bad input as one-line errors
(exit code 2, no traceback, nothing in an existing run directory touched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from fastdense import checkpoint as ckpt
from fastdense.cli.main import main
from fastdense.config import build_config

REPO = Path(__file__).resolve().parents[1]
FASTDENSE = Path(sys.executable).parent / "fastdense"

REWARD_MODULE = textwrap.dedent(
    """
    from fastdense.rewards import BaseReward


    class Brightness(BaseReward):
        name = "brightness"

        def score_batch(self, images, prompts):
            return images.mean(dim=(1, 2, 3))
    """
)


@pytest.fixture
def reward_on_path(tmp_path, monkeypatch):
    (tmp_path / "fd_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fd_test_rewards:Brightness"


def _run(argv, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def _small(model, reward) -> list[str]:
    sets = [
        f"model.path={model}", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]", f"reward.name={reward}",
        "sampling.num_steps=2", "sampling.rollouts_per_prompt=2", "sampling.micro_batch=4", "objective.group_size=2",
        "objective.k=1", "train.updates_per_round=2", "train.grad_accum=1", "train.groups_per_step=1",
        "run.checkpoint_every=1", "data.prompts=[a cat, the dog]", "data.eval_prompts=[a cat]",
        "data.eval_seeds=[1,2]",
    ]
    return [a for s in sets for a in ("--set", s)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_resolved_config(capsys):
    code, out, err = _run(["train", "--dry-run"], capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads(build_config(preset="toy").to_json())  # no arguments: the toy job
    code, out, err = _run(["train", "--preset", "sd15-single", "--set", "objective.gamma=0.8", "--rounds", "3",
                           "--reward", "pickscore", "--dry-run"], capsys)
    assert code == 0, err
    cfg = json.loads(out)
    assert cfg["objective"]["gamma"] == 0.8 and cfg["train"]["rounds"] == 3 and cfg["reward"]["name"] == "pickscore"
    assert cfg["model"]["path"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_toy_preset_is_valid_and_small():
    cfg = build_config(preset="toy")
    assert cfg.model.path == "fastdense.toy:shipped_model_dir" and cfg.reward.name == "color_fidelity"
    assert cfg.sampling.rollouts_per_prompt >= cfg.objective.group_size >= 2
    assert cfg.train.rounds * cfg.train.updates_per_round <= 128


def test_train_writes_a_run_and_resumes_it(grey_dir, reward_on_path, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(["train", *_small(grey_dir, reward_on_path), "--rounds", "1", "--out", str(out),
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "reward before → after on held-out seeds:" in stdout
    for name in ("lora/pytorch_lora_weights.safetensors", "metrics.jsonl", "reward_curve.png", "before_after.png",
                 "summary.json", "config.json"):
        assert (out / name).is_file(), name
    assert Image.open(out / "reward_curve.png").size == (640, 400)
    assert Image.open(out / "before_after.png").mode == "RGB"
    assert [s for s, _ in ckpt.find_checkpoints(out)] == [1, 2]

    # a second run into the same directory is refused, and changes nothing there
    before = _snapshot(out)
    code, _, err = _run(["train", *_small(grey_dir, reward_on_path), "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err and _snapshot(out) == before

    # resume it with one more round: it continues from step 2
    code, stdout, err = _run(["train", "--resume", "latest", "--out", str(out), "--rounds", "2", "--no-progress"],
                             capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["tag"] for r in records if r["event"] == "eval"] == ["before", "after"]  # as if never stopped
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


BAD_CASES = [
    (["--set", "objective.gamma=0"], "objective.gamma=0.0 is not allowed"),
    (["--set", "objective.gamma=1.5"], "objective.gamma"),
    (["--set", "objective.group_size=1"], "objective.group_size=1"),
    (["--set", "objective.estimator=greedy"], "objective.estimator"),
    (["--set", "objective.reference=none"], "objective.reference"),
    (["--set", "nosuch.key=1"], "unknown config key"),
    (["--set", "objective.nosuch=1"], "unknown config key 'objective.nosuch'"),
    (["--set", "objective.gamma"], "section.key=value"),
    (["--set", "train.rounds=many"], "train.rounds"),
    (["--rounds", "0"], "train.rounds=0"),
    (["--updates", "-1"], "train.updates_per_round"),
    (["--set", "optim.zero_stage=5"], "optim.zero_stage"),
    (["--set", "optim.precision=fp8"], "optim.precision"),
    (["--set", "optim.lr=-1"], "optim.lr"),
    (["--set", "sampling.eta=0"], "sampling.eta"),
    (["--set", "sampling.rollouts_per_prompt=1"], "sampling.rollouts_per_prompt"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--config", "{tmp}/missing.yaml"], "does not exist"),
    (["--config", "{tmp}/bad.yaml"], "does not parse"),
    (["--model", "{tmp}/no-model"], "model.path"),
    (["--set", "data.prompts_file={tmp}/none.txt"], "data.prompts_file"),
    (["--out", "{tmp}/afile"], "not a directory"),
    (["--out", "{tmp}/afile/run"], "cannot be created"),
    (["--out", "{tmp}/precious"], "not empty"),
    (["--resume", "latest", "--out", "{tmp}/emptyrun"], "no complete checkpoint"),
    (["--resume", "latest"], "needs the run directory"),
    (["--resume", "{tmp}/no-checkpoint"], "no such checkpoint"),
    (["--resume", "{tmp}/precious", "--preset", "toy"], "not allowed"),
    (["--resume", "latest", "--out", "{tmp}/precious"], "corrupt"),
    (["--steps", "3"], "No such option"),  # typer's own usage error
]


@pytest.mark.parametrize("args, match", BAD_CASES, ids=[" ".join(a) for a, _ in BAD_CASES])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, args, match):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.yaml").write_text("objective: [unclosed\n")
    (tmp_path / "emptyrun").mkdir()
    precious = tmp_path / "precious"  # an existing run whose only checkpoint is corrupt
    broken = precious / "checkpoints" / "step-00000002"
    broken.mkdir(parents=True)
    (broken / "COMPLETE").write_text("1\n")
    (broken / "state.json").write_text("{")
    (precious / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    before = _snapshot(tmp_path)
    argv = ["train", *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    if "--out" not in args and "--resume" not in args:
        argv += ["--out", str(tmp_path / "new-run")]
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], err
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "new-run").exists()


@pytest.mark.parametrize(
    "sets, match",
    [
        (["reward.name=no_such_reward"], "unknown reward 'no_such_reward'"),
        (["model.lora_targets=[no_such_layer]"], "model.lora_targets"),
        (["optim.precision=fp16", "run.device=cpu"], None),  # fp16 on CPU: refused or trained, never a traceback
    ],
)
def test_bad_input_found_after_loading_writes_nothing(grey_dir, reward_on_path, tmp_path, capsys, sets, match):
    out = tmp_path / "run"
    argv = ["train", *_small(grey_dir, reward_on_path), "--rounds", "1", "--updates", "1", "--out", str(out),
            "--no-progress"]
    argv += [a for s in sets for a in ("--set", s)]
    code, _, err = _run(argv, capsys)
    if match is None and code == 0:
        return
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error:")
    if match is not None:
        assert match in lines[-1]
    assert not out.exists()


def test_console_script_error_without_traceback(tmp_path):
    if not FASTDENSE.exists():
        pytest.skip("the fastdense console script is not installed next to this python")
    env = {k: v for k, v in os.environ.items() if k != "FASTDENSE_DEBUG"}
    proc = subprocess.run([str(FASTDENSE), "train", "--set", "objective.group_size=1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: objective.group_size=1 is not allowed; a comparison group needs >= 2 trajectories"
    ]
    assert not (tmp_path / "r").exists()


def test_the_deepspeed_launchers_local_rank_argument(capsys, monkeypatch):
    """``deepspeed $(which fastdense) train ...`` runs ``fastdense --local_rank=N train ...``."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    code, out, err = _run(["--local_rank=0", "train", "--dry-run"], capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads(build_config(preset="toy").to_json())
    monkeypatch.delenv("LOCAL_RANK")  # the launcher exports it too; then it is not overwritten
    code, out, err = _run(["--local_rank", "1", "train", "--dry-run"], capsys)
    assert code == 0 and os.environ["LOCAL_RANK"] == "1", err
    code, _, err = _run(["--local_rank=x", "train", "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--local_rank='x' is not allowed" in err
