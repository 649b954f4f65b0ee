"""The flow-matching (SD3-style) toy model: ``fastdense toy pretrain --backbone sd3`` and the shipped
weights (fastdense/toy/weights_flow/)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.toy import (
    DEFAULT_FLOW_ETA,
    DEFAULT_FLOW_GUIDANCE,
    DEFAULT_FLOW_SAMPLER,
    DEFAULT_FLOW_STEPS,
    DEFAULT_STEPS,
    sampling_defaults,
    shipped_flow_model_dir,
)
from fastdense.toy.colors import COLOR_NAMES
from fastdense.toy.flow_model import FLOW_PIPELINE_CLASS, FlowModelConfig, sd3_conditioning
from fastdense.toy.flow_pretrain import FlowPretrainConfig, pretrain_flow, sample_noise_levels
from fastdense.toy.world import HELDOUT_PROMPTS

# A few prompts to encode: toy captions, the empty prompt (CFG's other half), one past the window.
PROMPTS = ["a small red circle on a blue background", "", "the cyan cross", "a " + "green " * 20 + "ring"]
CHANCE_FIDELITY = 1.0 / len(COLOR_NAMES)
TINY_MODEL = FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=40,
                             text_hidden=16, text_2_hidden=24, text_layers=1)


def _state(directory):
    from safetensors.torch import load_file

    names = {"transformer": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
             "text_encoder_2": "model.safetensors"}
    return {f"{part}.{k}": v for part, file in names.items()
            for k, v in load_file(directory / part / file).items()}


def _pipeline(directory):
    """diffusers' StableDiffusion3Pipeline on the toy flow model's parts (no VAE, no T5): the reference."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(directory / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(directory / "scheduler"),
        vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(directory / "tokenizer_2"),
        text_encoder_3=None,
        tokenizer_3=None,
    )


@pytest.fixture(scope="module")
def tiny_flow_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyflow") / "model"
    config = FlowPretrainConfig(steps=2, batch_size=4, warmup_steps=1, model=TINY_MODEL)
    pretrain_flow(out, config, threads=1)
    return out


# -- pretraining -----------------------------------------------------------------------------------


def test_tiny_pretrain_writes_an_sd3_directory(tiny_flow_dir):
    from fastdense.models.loading import load_pipeline_parts

    index = json.loads((tiny_flow_dir / "model_index.json").read_text())
    assert index["_class_name"] == FLOW_PIPELINE_CLASS
    assert index["vae"] == index["text_encoder_3"] == index["tokenizer_3"] == [None, None]
    assert json.loads((tiny_flow_dir / "fastdense.json").read_text())["max_sequence_length"] == 0
    scheduler = json.loads((tiny_flow_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == TINY_MODEL.shift and scheduler["num_train_timesteps"] == 1000
    info = json.loads((tiny_flow_dir / "toy_info.json").read_text())
    assert info["backbone"] == "sd3" and info["pretrain"]["steps"] == 2 and info["model"]["num_layers"] == 1

    parts = load_pipeline_parts(tiny_flow_dir)
    assert parts.family == "sd3" and parts.vae is None
    assert parts.latent_shape == (3, 16, 16) and parts.image_size == (16, 16)
    assert parts.extra["text_encoder_3"] is None and parts.extra["tokenizer_3"] is None
    assert parts.extra["text_encoder_2"].config.hidden_size == TINY_MODEL.text_2_hidden
    assert sampling_defaults(tiny_flow_dir).sampler == DEFAULT_FLOW_SAMPLER
    assert sampling_defaults(None).steps == DEFAULT_STEPS  # the SD toy's


def test_conditioning_equals_the_sd3_pipeline_encode_prompt(tiny_flow_dir):
    pipe = _pipeline(tiny_flow_dir)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=0)
        ours, ours_pooled = sd3_conditioning(PROMPTS, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2,
                                             pipe.text_encoder_2, joint_attention_dim=TINY_MODEL.joint_attention_dim)
    assert ours.shape == (len(PROMPTS), TINY_MODEL.max_length, TINY_MODEL.joint_attention_dim)
    assert ours_pooled.shape == (len(PROMPTS), TINY_MODEL.pooled_dim)
    assert torch.equal(ours, embeds) and torch.equal(ours_pooled, pooled)
    # the zero padding up to the T5 width, and T5 rows when asked for
    assert not bool(ours[..., TINY_MODEL.text_hidden + TINY_MODEL.text_2_hidden :].any())
    with_t5, _ = sd3_conditioning(PROMPTS, pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2,
                                  joint_attention_dim=TINY_MODEL.joint_attention_dim, max_sequence_length=3)
    assert torch.equal(with_t5[:, : TINY_MODEL.max_length], ours.detach()) and not bool(with_t5[:, -3:].any())


def test_conditioning_is_differentiable_into_both_encoders(tiny_flow_dir):
    pipe = _pipeline(tiny_flow_dir)
    embeds, pooled = sd3_conditioning(PROMPTS[:2], pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2,
                                      pipe.text_encoder_2, joint_attention_dim=TINY_MODEL.joint_attention_dim)
    (embeds.square().sum() + pooled.square().sum()).backward()
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        grads = [p.grad for p in encoder.parameters() if p.requires_grad]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_backbone_encode_equals_the_pretraining_conditioning(tiny_flow_dir):
    """What the sd3 backbone conditions on at sampling time is what pretraining conditioned on."""
    from fastdense.models.backbone import unpack_conditioning
    from fastdense.models.families import backbone_for
    from fastdense.models.loading import load_pipeline_parts

    parts = load_pipeline_parts(tiny_flow_dir)
    backbone = backbone_for(parts)
    packed = backbone.encode(PROMPTS)
    tokens, pooled = unpack_conditioning(packed, TINY_MODEL.joint_attention_dim, TINY_MODEL.pooled_dim)
    with torch.no_grad():
        ours, ours_pooled = sd3_conditioning(PROMPTS, parts.tokenizer, parts.text_encoder, parts.extra["tokenizer_2"],
                                             parts.extra["text_encoder_2"],
                                             joint_attention_dim=TINY_MODEL.joint_attention_dim)
    assert tokens.shape == ours.shape and torch.equal(tokens, ours) and torch.equal(pooled, ours_pooled)
    assert torch.equal(backbone.unconditional(), packed[1])


def test_noise_levels_and_config_checks():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_noise_levels(20000, FlowPretrainConfig(), gen)
    logit = sample_noise_levels(20000, FlowPretrainConfig(time_sampling="logit_normal"), gen)
    assert 0 < float(uniform.min()) and float(uniform.max()) < 1 and 0 < float(logit.min()) and float(logit.max()) < 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float((uniform > 0.7).float().mean()) - 0.3) < 0.01
    assert abs(float(logit.median()) - 0.5) < 0.02 and abs(float((logit > 0.7).float().mean()) - 0.199) < 0.01
    with pytest.raises(FastdenseError, match="time_sampling='beta' is not allowed"):
        FlowPretrainConfig(time_sampling="beta")
    with pytest.raises(FastdenseError, match="wrong_color_fraction"):
        FlowPretrainConfig(wrong_color_fraction=2.0)
    with pytest.raises(FastdenseError, match="joint_attention_dim=32 is not allowed"):
        FlowModelConfig(joint_attention_dim=32)


def test_pretrain_cli_sd3_is_reproducible(tmp_path):
    from fastdense.cli.main import main

    runs = {"a": 0, "b": 0, "c": 1}
    for name, seed in runs.items():
        main(["toy", "pretrain", "--backbone", "sd3", "--out", str(tmp_path / name), "--steps", "2",
              "--seed", str(seed), "--batch-size", "4", "--threads", "1"])
    a, b, c = (_state(tmp_path / n) for n in runs)
    assert a.keys() == b.keys() == c.keys() and any(k.startswith("text_encoder_2.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    info = json.loads((tmp_path / "a/toy_info.json").read_text())
    assert info["pretrain"]["steps"] == 2 and info["pretrain"]["seed"] == 0 and info["backbone"] == "sd3"


def test_pretrain_cli_backbone_errors(tmp_path, capsys):
    from fastdense.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["toy", "pretrain", "--backbone", "sdx", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'sdx'" in err and "sd, sd3" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "pretrain", "--backbone", "sd3", "--out", str(tmp_path / "y"), "--offset-noise", "-1"])
    assert exit_.value.code == 2
    assert "offset_noise" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# -- the shipped model -----------------------------------------------------------------------------


def test_shipped_flow_model_layout_and_size():
    from fastdense.models.loading import load_pipeline_parts

    root = shipped_flow_model_dir()
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                 "tokenizer_2/merges.txt", "transformer/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "text_encoder_2/model.safetensors", "fastdense.json",
                 "toy_info.json"):
        assert (root / name).is_file(), name
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 20 * 2**20
    info = json.loads((root / "toy_info.json").read_text())
    assert info["backbone"] == "sd3" and info["model"] == asdict(FlowModelConfig())
    parts = load_pipeline_parts(root)
    assert parts.family == "sd3" and parts.vae is None and parts.latent_shape == (3, 16, 16)
    assert parts.unet.config.joint_attention_dim == FlowModelConfig().joint_attention_dim
    assert sampling_defaults(root).steps == DEFAULT_FLOW_STEPS


# The shipped model's recorded fidelity (toy_info.json, measured with exactly these settings: the 16
# held-out prompts x seeds 1000..1003, DEFAULT_FLOW_STEPS (10), DEFAULT_FLOW_GUIDANCE (1.5)). Sampling
# is deterministic, so it reproduces exactly on one machine; the margin absorbs float differences across
# machines (one flipped image moves a 64-image mean by 1/64; its standard error is ~0.05).
FIDELITY_MARGIN = 0.1


def _check_fidelity(mean: float, recorded: float) -> None:
    assert abs(mean - recorded) <= FIDELITY_MARGIN, (mean, recorded)
    assert CHANCE_FIDELITY + 0.2 < mean < 0.9  # follows prompts, imperfectly: room for alignment


@pytest.mark.slow
def test_shipped_flow_model_follows_prompts_imperfectly():
    """The defaults (Flow-GRPO's SDE, a = 0.7) through fastdense's sampler and the sd3 backbone."""
    from fastdense.models.loading import load_pipeline_parts
    from fastdense.toy import fidelity_scores

    info = json.loads((shipped_flow_model_dir() / "toy_info.json").read_text())["heldout_fidelity"]
    assert (info["sampler"], info["eta"], info["steps"], info["guidance"]) == (
        DEFAULT_FLOW_SAMPLER, DEFAULT_FLOW_ETA, DEFAULT_FLOW_STEPS, DEFAULT_FLOW_GUIDANCE)
    parts = load_pipeline_parts(shipped_flow_model_dir())
    defaults = sampling_defaults(shipped_flow_model_dir())
    scores = fidelity_scores(None, HELDOUT_PROMPTS, range(1000, 1004), defaults.steps, defaults.guidance,
                             defaults.eta, parts=parts, sampler=defaults.sampler)
    assert scores.shape == (len(HELDOUT_PROMPTS), 4)
    _check_fidelity(float(scores.mean()), info["seeds_1000_1003"])


@pytest.mark.slow
def test_shipped_flow_model_in_the_sd3_pipeline():
    """Deterministic ODE samples of diffusers' StableDiffusion3Pipeline itself (the reference) on 4 seeds."""
    from fastdense.toy.reward import ColorFidelity

    info = json.loads((shipped_flow_model_dir() / "toy_info.json").read_text())["heldout_fidelity"]
    pipe = _pipeline(shipped_flow_model_dir())
    prompts = [p for p in HELDOUT_PROMPTS for _ in range(4)]
    generators = [torch.Generator().manual_seed(s) for _ in HELDOUT_PROMPTS for s in range(1000, 1004)]
    with torch.no_grad():  # without a VAE the pipeline's latent grid is height / 8: 128 px = 16 x 16 pixels
        latents = pipe(prompts, height=128, width=128, num_inference_steps=DEFAULT_FLOW_STEPS,
                       guidance_scale=DEFAULT_FLOW_GUIDANCE, generator=generators, max_sequence_length=0,
                       output_type="latent").images
    assert latents.shape == (len(prompts), 3, 16, 16)
    scores = ColorFidelity().score_batch((latents / 2 + 0.5).clamp(0, 1), prompts)
    _check_fidelity(float(scores.mean()), info["ode_seeds_1000_1003"])


@pytest.mark.slow
def test_toy_flow_preset_trains_the_shipped_flow_model(tmp_path, run_cli):
    """`fastdense train --preset toy-flow`, shortened: the shipped flow model trained on its SDE chain
    through the CLI; the run records the sampler it used and writes an SD3-family LoRA. (The full
    job's fresh-seed result is measured in the README, "The flow-matching toy model".)"""
    sets = ["train.rounds=1", "train.prompts_per_round=8", "train.updates_per_round=2", "train.groups_per_step=4",
            "eval.every_rounds=0", "eval.paired_seeds=0", "data.eval_seeds=[1000]", "run.checkpoint_every=1000",
            "objective.min_reward_gap=0"]
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--preset", "toy-flow", *[a for s in sets for a in ("--set", s)],
                            "--out", out, "--no-progress"])
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["sampling"]["sampler"] == "sde" and config["model"]["path"].endswith("shipped_flow_model_dir")
    assert json.loads((out / "lora" / "fastdense_lora.json").read_text()) == {"family": "sd3",
                                                                             "prefix": "transformer"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_updates"] == 0
