"""fastdense.models: the tiny pipeline, loading (and its errors), prompt cache, LoRA."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models.loading import (
    adapters_disabled,
    check_pipeline_dir,
    has_adapters,
    load_lora,
    load_pipeline_parts,
)
from fastdense.models.prompts import PromptEncoder
from fastdense.testing import TINY_MAX_LENGTH, build_tiny_pipeline


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return load_pipeline_parts(tiny_dir)


def _unet_out(unet, parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *parts.latent_shape), generator=g)
    enc = torch.randn((2, TINY_MAX_LENGTH, 32), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=enc, return_dict=False)[0]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


# ---------------------------------------------------------------------------------------------------
# tiny pipeline + loading


def test_tiny_pipeline_layout_and_parts(tiny_dir, parts):
    for name in ("model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json",
                 "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tiny_dir / name).is_file(), name
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert parts.latent_shape == (4, 8, 8)
    assert parts.vae is not None and parts.vae_scale_factor == 2 and parts.image_size == (16, 16)
    assert parts.prediction_type == "epsilon"
    sched = parts.make_scheduler()
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config.clip_sample is False and sched.config.steps_offset == 1
    assert all(not p.requires_grad for p in parts.unet.parameters())
    assert parts.tokenizer.model_max_length == TINY_MAX_LENGTH
    tokens = parts.tokenizer(["the cat"]).input_ids[0]
    assert parts.tokenizer.convert_ids_to_tokens(tokens) == ["<|startoftext|>", "the</w>", "cat</w>", "<|endoftext|>"]


def test_tiny_pipeline_is_deterministic_and_pixel_space(tmp_path, parts):
    other = load_pipeline_parts(build_tiny_pipeline(tmp_path / "again"))
    for (k, a), (_, b) in zip(parts.unet.state_dict().items(), other.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    pixel = load_pipeline_parts(build_tiny_pipeline(tmp_path / "pix", with_vae=False, in_channels=3, sample_size=4))
    assert pixel.vae is None and pixel.vae_scale_factor == 1
    assert pixel.latent_shape == (3, 4, 4) and pixel.image_size == (4, 4)


def test_stable_diffusion_pipeline_loads_tiny(tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae_scale_factor == 2


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: shutil.rmtree(d / "unet"), "unet/ directory is missing"),
        (lambda d: (d / "model_index.json").unlink(), "model_index.json is missing"),
        (lambda d: (d / "unet" / "config.json").unlink(), "unet/config.json is missing"),
        (lambda d: (d / "scheduler" / "scheduler_config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model_index.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "cannot load unet/"),
    ],
)
def test_malformed_directory_is_one_line_error(tiny_dir, tmp_path, damage, match):
    d = _copy(tiny_dir, tmp_path)
    damage(d)
    with pytest.raises(FastdenseError, match=match) as info:
        load_pipeline_parts(d)
    assert "\n" not in str(info.value)


def test_missing_paths_and_remote_code(tiny_dir, tmp_path):
    with pytest.raises(FastdenseError, match="does not exist"):
        load_pipeline_parts(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FastdenseError, match="not a directory"):
        load_pipeline_parts(f)
    with pytest.raises(FastdenseError, match="could not be fetched from the hub"):
        load_pipeline_parts("no-such-owner-xyz/no-such-model")  # HF_HUB_OFFLINE=1 in tests
    d = _copy(tiny_dir, tmp_path)
    index = json.loads((d / "model_index.json").read_text())
    index["unet"] = ["my_custom_lib", "FancyUNet"]
    (d / "model_index.json").write_text(json.dumps(index))
    assert check_pipeline_dir(d)["unet"][0] == "my_custom_lib"
    with pytest.raises(FastdenseError, match="trust_remote_code"):
        load_pipeline_parts(d)


# ---------------------------------------------------------------------------------------------------
# prompt embeddings


def test_prompt_encoder_caches_per_unique_prompt(parts):
    enc = PromptEncoder.from_parts(parts)
    e1 = enc.encode(["a cat", "a dog", "a cat"])
    assert e1.shape == (3, TINY_MAX_LENGTH, 32)
    assert enc.calls == 1 and enc.encoded == 2
    torch.testing.assert_close(e1[0], e1[2], rtol=0, atol=0)
    e2 = enc.encode(["a dog", "a cat"])
    assert enc.calls == 1 and enc.encoded == 2
    torch.testing.assert_close(e2, e1[[1, 0]], rtol=0, atol=0)
    u1 = enc.unconditional()
    u2 = enc.unconditional()
    assert enc.calls == 2 and enc.encoded == 3 and torch.equal(u1, u2)
    # the same as the text encoder run directly the way StableDiffusionPipeline runs it
    ids = parts.tokenizer(["a dog"], padding="max_length", max_length=TINY_MAX_LENGTH, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        direct = parts.text_encoder(ids)[0]
    torch.testing.assert_close(e2[0], direct[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(FastdenseError):
        enc.encode("a cat")


# ---------------------------------------------------------------------------------------------------
# LoRA


def test_adapters_disabled_context(parts):
    unet = copy.deepcopy(parts.unet)
    base = _unet_out(unet, parts)
    assert not has_adapters(unet)
    unet.add_adapter(_lora_config())
    assert has_adapters(unet)
    adapted = _unet_out(unet, parts)
    assert not torch.allclose(adapted, base)
    with adapters_disabled(unet):
        assert not has_adapters(unet)
        torch.testing.assert_close(_unet_out(unet, parts), base, rtol=0, atol=0)
    assert has_adapters(unet)
    torch.testing.assert_close(_unet_out(unet, parts), adapted, rtol=0, atol=0)


def test_load_lora_diffusers_and_peft_formats(parts, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    trained = copy.deepcopy(parts.unet)
    trained.add_adapter(_lora_config())
    want = _unet_out(trained, parts)

    # diffusers pipeline format (keys "unet.…"), what pipe.load_lora_weights reads
    d1 = tmp_path / "lora_pipe"
    StableDiffusionPipeline.save_lora_weights(d1, unet_lora_layers=get_peft_model_state_dict(trained))
    fresh = copy.deepcopy(parts.unet)
    assert load_lora(fresh, d1) == "default"
    torch.testing.assert_close(_unet_out(fresh, parts), want, rtol=1e-6, atol=1e-6)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(d1)  # the same directory loads in diffusers too
    torch.testing.assert_close(_unet_out(pipe.unet, parts), want, rtol=1e-6, atol=1e-6)

    # diffusers model format (no prefix)
    d2 = tmp_path / "lora_model"
    trained.save_lora_adapter(d2)
    fresh = copy.deepcopy(parts.unet)
    load_lora(fresh, d2)
    torch.testing.assert_close(_unet_out(fresh, parts), want, rtol=1e-6, atol=1e-6)

    # peft format: adapter_config.json + adapter_model.safetensors
    d3 = tmp_path / "lora_peft"
    d3.mkdir()
    from safetensors.torch import save_file

    save_file({f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained).items()},
              str(d3 / "adapter_model.safetensors"))
    (d3 / "adapter_config.json").write_text(json.dumps(trained.peft_config["default"].to_dict(), default=list))
    fresh = copy.deepcopy(parts.unet)
    load_lora(fresh, d3)
    torch.testing.assert_close(_unet_out(fresh, parts), want, rtol=1e-6, atol=1e-6)

    # through load_pipeline_parts
    with_lora = load_pipeline_parts(tiny_dir, lora=d1)
    assert has_adapters(with_lora.unet) and with_lora.lora_paths == [d1]

    with pytest.raises(FastdenseError, match="does not exist"):
        load_lora(copy.deepcopy(parts.unet), tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FastdenseError, match="holds no LoRA weights"):
        load_lora(copy.deepcopy(parts.unet), empty)


def test_lora_code_has_one_home():
    """load_lora / has_adapters / adapters_disabled live in fastdense.lora; the old import paths still work."""
    import fastdense.lora
    import fastdense.models
    import fastdense.models.loading

    for name in ("load_lora", "has_adapters", "adapters_disabled"):
        assert getattr(fastdense.models, name) is getattr(fastdense.lora, name)
        assert getattr(fastdense.models.loading, name) is getattr(fastdense.lora, name)
    assert "save_trainable" not in fastdense.lora.__all__  # was exported and never called
