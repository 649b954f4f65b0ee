import math

import pytest

from fastdense.config import build_config, parse_override, preset_names
from fastdense.errors import FastdenseError


def test_defaults_and_presets_validate():
    assert {"sd15-single", "sd15-multi"} <= set(preset_names())
    multi = build_config(preset="sd15-multi")
    assert (multi.objective.beta, multi.objective.clip, multi.objective.k) == (12.5, 5e-4, 1)
    assert (multi.model.lora_rank, multi.optim.lr, multi.sampling.rollouts_per_prompt) == (32, 2e-5, 12)
    single = build_config(preset="sd15-single")
    assert (single.objective.beta, single.objective.clip, single.objective.k) == (10.0, 1e-4, 3)


def test_file_then_overrides(tmp_path):
    (tmp_path / "c.toml").write_text('[objective]\ngamma = 0.5\n[train]\nrounds = 3\n')
    (tmp_path / "c.yaml").write_text("objective:\n  gamma: 0.7\n")
    cfg = build_config(config_file=tmp_path / "c.toml", overrides=["objective.gamma=0.8", "train.seed=5"])
    assert cfg.objective.gamma == 0.8 and cfg.train.rounds == 3 and cfg.train.seed == 5
    assert build_config(config_file=tmp_path / "c.yaml").objective.gamma == 0.7
    assert build_config(overrides=["objective.clip=.inf"]).objective.clip == math.inf


@pytest.mark.parametrize("override,match", [
    ("objective.gamma=0", "objective.gamma=0"),
    ("objective.gamma=1.5", "objective.gamma"),
    ("objective.beta=-1", "objective.beta"),
    ("objective.clip=0", "objective.clip"),
    ("objective.k=0", "objective.k"),
    ("objective.min_reward_gap=-0.1", "objective.min_reward_gap"),
    ("objective.group_size=1", "objective.group_size"),
    ("objective.estimator=mc", "objective.estimator"),
    ("objective.reference=ema", "objective.reference"),
    ("model.lora_rank=-1", "model.lora_rank"),
    ("model.path=/no/such/dir", "model.path"),
    ("optim.zero_stage=4", "optim.zero_stage"),
    ("optim.precision=fp8", "optim.precision"),
    ("sampling.eta=0", "sampling.eta"),
    ("sampling.num_steps=abc", "sampling.num_steps"),
    ("sampling.rollouts_per_prompt=1", "sampling.rollouts_per_prompt"),
    ("train.rounds=0", "train.rounds"),
    ("objective.nonsense=1", "unknown config key 'objective.nonsense'"),
    ("nonsense.key=1", "unknown config key 'nonsense'"),
    ("objective.gamma", "expected section.key=value"),
    ("data.prompts_file=/no/such/file.txt", "data.prompts_file"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(FastdenseError, match=match) as info:
        build_config(overrides=[override])
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(FastdenseError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.yaml")
    (tmp_path / "bad.toml").write_text("[objective\n")
    with pytest.raises(FastdenseError, match="does not parse"):
        build_config(config_file=tmp_path / "bad.toml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(FastdenseError, match="unknown format"):
        build_config(config_file=tmp_path / "c.ini")
    with pytest.raises(FastdenseError, match="unknown preset 'nope'"):
        build_config(preset="nope")


def test_override_parsing():
    assert parse_override("data.eval_seeds=[1, 2]") == {"data": {"eval_seeds": [1, 2]}}
    assert build_config(overrides=["data.eval_seeds=[1, 2]"]).data.eval_seeds == [1, 2]


def test_values_are_coerced_by_the_field_types():
    """Coercion reads the dataclass type hints (typing.get_origin / get_args), optional or not."""
    cfg = build_config(overrides=["optim.betas=0.8,0.9", "model.lora_alpha=4", "model.compile=yes",
                                  "run.tensorboard=false", "data.eval_seeds=3,4", "model.lora_targets=to_q",
                                  "train.rounds=2.0", "model.lora_alpha=null"])
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.lora_alpha is None and cfg.model.compile is True
    assert cfg.run.tensorboard is False and cfg.data.eval_seeds == [3, 4] and cfg.model.lora_targets == ["to_q"]
    assert cfg.train.rounds == 2 and isinstance(cfg.train.rounds, int)
    for override, message in [
        ("train.rounds=2.5", "train.rounds=2.5 is not allowed; expected <class 'int'>"),
        ("train.rounds=true", "train.rounds=True is not allowed; expected <class 'int'>"),
        ("model.compile=maybe", "model.compile='maybe' is not allowed; expected bool | None"),
        ("optim.betas=0.9", "optim.betas=0.9 is not allowed; expected tuple[float, float]"),
        ("optim.lr=null", "optim.lr: null is not allowed; expected <class 'float'>"),
    ]:
        with pytest.raises(FastdenseError) as info:
            build_config(overrides=[override])
        assert str(info.value) == message
