"""The trainer's small parts on their own: JSON numbers and metrics (tracking), run directories and
resume resolution (run_dir), the plots (matplotlib, Agg), and the fastdense.train re-exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastdense.config import build_config
from fastdense.errors import FastdenseError
from fastdense.rewards import BaseReward
from fastdense.training import plots, run_dir, tracking


def test_json_numbers_round_trip_non_finite_as_null(tmp_path):
    assert tracking.json_value({"a": math.nan, "b": [1.5, math.inf], "c": (2, None)}) == {
        "a": None, "b": [1.5, None], "c": [2, None]}
    assert math.isnan(tracking.from_json_float(None)) and tracking.from_json_float(2.0) == 2.0
    writer = tracking.MetricsWriter(tmp_path)
    writer.write({"event": "train", "step": 1, "loss": math.nan, "lr": 0.1})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"event": "train", "step": 1, "loss": None,
                                                                     "lr": 0.1}


def test_resolve_run_dir_fresh_and_resumed(tmp_path):
    cfg = build_config(preset="toy")
    assert run_dir.resolve_run_dir(cfg, tmp_path / "new", None) == tmp_path / "new"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FastdenseError, match="is not empty"):
        run_dir.resolve_run_dir(cfg, tmp_path / "full", None)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    assert run_dir.resolve_run_dir(cfg, None, ckpt) == (tmp_path / "run").resolve()  # resuming: the run holding it
    with pytest.raises(FastdenseError, match="needs the run directory"):
        run_dir.resume_checkpoint("latest", None)


def test_prepare_run_dir_cuts_metrics_back_when_resuming(tmp_path):
    cfg = build_config(preset="toy")
    run_dir.prepare_run_dir(tmp_path / "r", cfg, resumed=False, metrics_lines=0)
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == json.loads(cfg.to_json())
    (tmp_path / "r" / "metrics.jsonl").write_text("1\n2\n3\n")
    run_dir.prepare_run_dir(tmp_path / "r", cfg, resumed=True, metrics_lines=2)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == "1\n2\n"


def test_plots_write_readable_pngs(tmp_path):
    history = [{"round": r, "reward_mean": 0.5 + 0.1 * r, "reward_max": 1.0} for r in range(3)]
    history.append({"round": 3, "reward_mean": math.nan, "reward_max": math.nan})  # skipped, not drawn
    plots.reward_curve(history, 0.6, 0.8, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (640, 400) and Image.open(tmp_path / "curve.png").mode == "RGB"

    images = torch.rand(6 * 2, 3, 16, 16)
    grid = plots.eval_grid(images, n_prompts=6, n_seeds=2)  # 4 prompts × 2 seeds shown, 16 px → 64 px
    assert grid.size == (2 * 64, 4 * 64)
    tiles = plots.grid_tiles(grid, 4, 2)
    assert tiles[3].size == (64, 64)
    assert tiles[3].resize((16, 16), Image.NEAREST).tobytes() == plots.to_pil(images[3]).tobytes()  # row 1, seed 1
    prompts, seeds = [f"prompt {k}" for k in range(4)], [1000, 1001]
    plots.before_after(prompts, seeds, tiles, [0.1] * 8, tiles, [math.nan] + [0.9] * 7, tmp_path / "ba.png",
                       before_mean=0.1, after_mean=0.9)
    plots.before_after(prompts, seeds, None, None, tiles, [0.9] * 8, tmp_path / "after_only.png")
    for name in ("ba.png", "after_only.png"):
        assert Image.open(tmp_path / name).mode == "RGB"
    assert Image.open(tmp_path / "ba.png").width > Image.open(tmp_path / "after_only.png").width


def test_fastdense_train_re_exports_the_same_objects():
    import fastdense.train as train_mod
    from fastdense.training import trainer

    assert train_mod.Trainer is trainer.Trainer and train_mod.train is trainer.train
    for name in train_mod.__all__:
        assert getattr(train_mod, name) is not None, name


class _Const(BaseReward):
    name = "const"

    def __init__(self, device="cpu", batch_size: int = 4):
        super().__init__(device, batch_size)

    def score_batch(self, images, prompts):
        return torch.ones(images.shape[0])


def _const_without_batch_size():
    return _Const()


def test_trainer_build_reward_passes_batch_size_only_where_accepted(monkeypatch):
    """Trainer._build_reward decides from the factory's signature (no error-message matching)."""
    from types import SimpleNamespace

    from fastdense.rewards import registry
    from fastdense.training.trainer import Trainer

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_reward("const", _Const)
    registry.register_reward("const_nobs", _const_without_batch_size)
    for name in ("const", "const_nobs", "const_nobs=1.0"):
        fake = SimpleNamespace(cfg=SimpleNamespace(reward=SimpleNamespace(name=name, batch_size=7)), device="cpu")
        assert Trainer._build_reward(fake).batch_size == 7, name


def test_several_ranks_without_a_run_directory_are_refused(tmp_path, monkeypatch):
    """Each rank would pick its own runs/<time>: a launched multi-rank run must name one directory."""
    cfg = build_config(preset="toy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FastdenseError, match="2 ranks need one run directory: give --out"):
        run_dir.resolve_run_dir(cfg, None, None)
    assert run_dir.resolve_run_dir(cfg, tmp_path / "shared", None) == tmp_path / "shared"
    cfg.run.out = str(tmp_path / "from-config")
    assert run_dir.resolve_run_dir(cfg, None, None) == tmp_path / "from-config"
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg.run.out = None
    assert run_dir.resolve_run_dir(cfg, None, None).parent == Path("runs")
    assert not (tmp_path / "runs").exists()  # resolving writes nothing


DEVICE_REWARD = '''
from fastdense.rewards import BaseReward


class OnDevice(BaseReward):
    name = "on_device"
    made_on = []

    def __init__(self, device="cpu", batch_size=8):
        super().__init__(device, batch_size)
        OnDevice.made_on.append(str(device))

    def score_batch(self, images, prompts):
        return images.mean(dim=(1, 2, 3))
'''


def test_learned_rewards_are_built_on_the_training_device(grey_dir, tmp_path, monkeypatch):
    """A reward whose factory takes ``device`` (ImageReward, HPSv2, ...) gets the run's device."""
    import sys

    from fastdense.training.trainer import Trainer

    (tmp_path / "fd_device_reward.py").write_text(DEVICE_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fd_device_reward", None)
    cfg = build_config(overrides=[
        f"model.path={grey_dir}", "reward.name=fd_device_reward:OnDevice", "sampling.num_steps=2",
        "sampling.rollouts_per_prompt=2", "objective.group_size=2", "data.prompts=[a cat]", "run.device=cpu",
        "optim.zero_stage=0",
    ])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert sys.modules["fd_device_reward"].OnDevice.made_on == [str(trainer.device)] == ["cpu"]
