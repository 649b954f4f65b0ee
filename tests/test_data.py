"""fastdense.data: prompt sources (files and module:attr providers), model.path providers, and
the toy preset's inputs named by strings."""

from __future__ import annotations

import json
import sys

import pytest

from fastdense.config import build_config
from fastdense.data import (
    is_provider,
    load_prompts,
    read_prompt_file,
    read_prompt_source,
    resolve_model_path,
    resolve_provider,
)
from fastdense.errors import FastdenseError


@pytest.fixture
def provider_module(tmp_path, monkeypatch):
    (tmp_path / "my_prompts.py").write_text(
        "PROMPTS = ['a cat', 'a dog']\n"
        "def make():\n    return ['a fox', '  ', 'an owl']\n"
        "NOT_PROMPTS = 3\n"
        "def model_dir():\n    return " + repr(str(tmp_path)) + "\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_prompts"
    sys.modules.pop("my_prompts", None)


def test_is_provider():
    assert is_provider("fastdense.toy.world:train_prompts") and is_provider("a:b.c")
    for text in ("a red circle: big", "runwayml/stable-diffusion-v1-5", "./prompts.txt", "C:\\prompts.txt", "a:",
                 ":b", "prompts.txt"):
        assert not is_provider(text), text


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "list.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "draw.json").write_text(json.dumps({"x": {"category": "c"}, "z": {}}))
    assert read_prompt_file(tmp_path / "p.txt", "--prompts-file") == ["a cat", "a dog"]
    assert read_prompt_file(tmp_path / "list.json", "data.prompts_file") == ["x", "y"]
    assert read_prompt_file(tmp_path / "draw.json", "data.prompts_file") == ["x", "z"]
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "num.json").write_text("3")
    for name, message in (("blank.txt", "holds no prompts"), ("bad.json", "not valid JSON"),
                          ("num.json", "must hold a list"), ("missing.txt", "does not exist")):
        with pytest.raises(FastdenseError, match=message) as info:
            read_prompt_file(tmp_path / name, "data.prompts_file")
        assert str(info.value).startswith("data.prompts_file ") and "\n" not in str(info.value)


def test_prompt_providers(provider_module):
    assert read_prompt_source(f"{provider_module}:PROMPTS", "data.prompts_file") == ["a cat", "a dog"]
    assert read_prompt_source(f"{provider_module}:make", "data.prompts_file") == ["a fox", "an owl"]
    with pytest.raises(FastdenseError, match="gave a int, not a list of prompts"):
        read_prompt_source(f"{provider_module}:NOT_PROMPTS", "data.prompts_file")
    with pytest.raises(FastdenseError, match="has no attribute 'MISSING'"):
        read_prompt_source(f"{provider_module}:MISSING", "data.prompts_file")
    with pytest.raises(FastdenseError, match="cannot import module 'no_such_module_xyz'"):
        resolve_provider("no_such_module_xyz:X", "data.prompts_file")


def test_model_path(provider_module, tmp_path):
    with pytest.raises(FastdenseError, match="model.path is not set; give a diffusers directory") as info:
        resolve_model_path(None)
    assert "\n" not in str(info.value)
    assert resolve_model_path(f"{provider_module}:model_dir") == str(tmp_path)
    assert resolve_model_path("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    with pytest.raises(FastdenseError, match="gave a list, not a directory"):
        resolve_model_path(f"{provider_module}:PROMPTS")


def test_toy_preset_names_its_model_and_the_model_its_prompts():
    from fastdense.toy import shipped_model_dir
    from fastdense.toy.world import HELDOUT_PROMPTS, TRAIN_PROMPT_COUNT, train_prompts

    cfg = build_config(preset="toy")
    assert resolve_model_path(cfg.model.path) == shipped_model_dir()
    assert cfg.data.prompts_file is None and cfg.data.eval_prompts_file is None  # defaults: the model's
    prompts, eval_prompts = load_prompts(cfg, shipped_model_dir())
    assert prompts == train_prompts() and len(prompts) == TRAIN_PROMPT_COUNT == 256
    assert eval_prompts == list(HELDOUT_PROMPTS)


def test_load_prompts_defaults_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"p{k}" for k in range(10)) + "\np0\n")
    cfg = build_config(overrides=[f"data.prompts_file={tmp_path / 'p.txt'}", "data.prompts=[p3, extra]"])
    prompts, eval_prompts = load_prompts(cfg)
    assert prompts == ["p3", "extra"] + [f"p{k}" for k in range(10) if k != 3]  # duplicates dropped, first kept
    assert eval_prompts == ["p3", "extra", "p0", "p1", "p2", "p4", "p5"]  # the first 8 given, deduplicated
    with pytest.raises(FastdenseError, match="no training prompts"):
        load_prompts(build_config())
    with pytest.raises(FastdenseError, match="data.eval_prompts_file"):
        build_config(overrides=["data.eval_prompts_file=/no/such/file.txt"])


def test_moved_toy_names_stay_importable():
    import fastdense.rewards as rewards
    import fastdense.rewards.builtin as builtin
    import fastdense.rewards.colors as old_colors
    import fastdense.train as train_mod
    from fastdense.toy import colors, reward, world

    assert rewards.ColorFidelity is builtin.ColorFidelity is reward.ColorFidelity
    assert rewards.PALETTE is old_colors.PALETTE is colors.PALETTE
    assert rewards.parse_toy_prompt is colors.parse_toy_prompt and old_colors.palette_tensor is colors.palette_tensor
    assert train_mod.toy_train_prompts is world.train_prompts and train_mod.TOY_TRAIN_PROMPTS == 256
    assert train_mod.is_toy_model(None)
    with pytest.raises(AttributeError):
        _ = rewards.NoSuchName


def test_a_config_saved_with_a_null_model_path_reads_as_the_shipped_toy_model(tmp_path):
    """Runs saved before the toy preset named its model wrote ``model.path: null`` (the toy model then):
    they resume with the same model and the same prompts as the toy preset gives."""
    from fastdense.config import build_config
    from fastdense.data import load_prompts, resolve_model_path

    old = tmp_path / "config.json"
    old.write_text(json.dumps({"model": {"path": None}, "data": {"prompts_file": None, "eval_prompts": []}}))
    cfg = build_config(config_file=old)
    assert cfg.model.path == "fastdense.toy:shipped_model_dir"
    preset = build_config(preset="toy")
    assert resolve_model_path(cfg.model.path) == resolve_model_path(preset.model.path)
    model = resolve_model_path(cfg.model.path)
    assert load_prompts(cfg, model) == load_prompts(preset, model)


def test_a_model_directory_names_its_default_prompts(tmp_path):
    from fastdense.config import build_config
    from fastdense.data import load_prompts

    (tmp_path / "fastdense.json").write_text(json.dumps({"train_prompts": "fastdense.toy.world:HELDOUT_PROMPTS"}))
    cfg = build_config(overrides=["data.eval_prompts=[a dog]"])
    train, evaluation = load_prompts(cfg, tmp_path)
    from fastdense.toy.world import HELDOUT_PROMPTS

    assert train == list(HELDOUT_PROMPTS) and evaluation == ["a dog"]
    cfg = build_config(overrides=["data.prompts=[a cat]"])
    assert load_prompts(cfg, tmp_path)[0] == ["a cat"]  # the config wins
    with pytest.raises(FastdenseError, match="no training prompts"):
        load_prompts(build_config(), tmp_path / "nowhere")
    (tmp_path / "fastdense.json").write_text(json.dumps({"prompts": 3}))
    with pytest.raises(FastdenseError, match="fastdense.json must be a JSON object") as err:
        load_prompts(cfg, tmp_path)
    assert "\n" not in str(err.value)


def test_prompts_given_on_the_toy_preset_replace_the_models_defaults():
    """The toy model's own prompts are defaults: prompts in the config replace them, not add to them."""
    from fastdense.toy.world import HELDOUT_PROMPTS

    preset = build_config(preset="toy")
    model = resolve_model_path(preset.model.path)
    train, evaluation = load_prompts(preset, model)
    assert len(train) == 256 and evaluation == list(HELDOUT_PROMPTS)
    cfg = build_config(preset="toy", overrides=["data.prompts=[a red circle on a blue background]",
                                                 "data.eval_prompts=[a blue ring on a red background]"])
    assert load_prompts(cfg, model) == (["a red circle on a blue background"], ["a blue ring on a red background"])
