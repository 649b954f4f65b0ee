"""SDXL backbone against diffusers' StableDiffusionXLPipeline on a tiny offline model: loading,
the conditioning (``encode_prompt``), the CFG model call with added conditioning, full DDIM
sampling, a LoRA the pipeline loads, and one-line errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models.families import backbone_for
from fastdense.models.loading import load_pipeline_parts
from fastdense.models.sdxl import SDXLBackbone, SDXLPromptEncoder
from fastdense.models.tiny_sdxl import (
    TINY_SDXL_HIDDEN,
    TINY_SDXL_HIDDEN_2,
    TINY_SDXL_POOLED,
    build_tiny_sdxl_pipeline,
)
from fastdense.schedule import make_step_table

PROMPTS = ["a red cat", "the dog on grass", "a photo of a blue dog and a green cat"]
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="module")
def encoded_negative_dir(sdxl_dir, tmp_path_factory):
    """The same model with force_zeros_for_empty_prompt false: the unconditional half is the
    empty prompt encoded."""
    root = tmp_path_factory.mktemp("sdxl_neg") / "model"
    shutil.copytree(sdxl_dir, root)
    index = json.loads((root / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = False
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def parts(sdxl_dir):
    return load_pipeline_parts(sdxl_dir)


@pytest.fixture
def backbone(parts):
    """A fresh backbone per test: its embedding cache is empty, so prompts are encoded in the
    same batches as the pipeline encodes them (CPU kernels may round differently per batch size)."""
    return backbone_for(parts)


def _pipeline(path, dtype=torch.float32):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return _pipeline(sdxl_dir)


def _noise(n: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def _pipeline_unet_call(pipe, x, t, prompt_embeds, negative_embeds, pooled, negative_pooled, image_hw):
    """The UNet call of the pipeline's denoising loop with CFG (``_get_add_time_ids`` for the ids)."""
    add_time_ids = pipe._get_add_time_ids(
        image_hw, (0, 0), image_hw, dtype=prompt_embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    n = x.shape[0]
    added = {
        "text_embeds": torch.cat([negative_pooled, pooled]),
        "time_ids": torch.cat([add_time_ids, add_time_ids]).repeat(n, 1),
    }
    with torch.no_grad():
        out = pipe.unet(torch.cat([x] * 2), t, encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
                        added_cond_kwargs=added, return_dict=False)[0]
    return out.chunk(2)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --- loading ------------------------------------------------------------------------------------


def test_loads_as_the_sdxl_family(parts, backbone):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    assert parts.family == "sdxl"
    assert parts.latent_shape == (4, 8, 8)
    assert parts.vae_scale_factor == 2 and parts.image_size == (16, 16)
    assert set(parts.extra) == {"tokenizer_2", "text_encoder_2"}
    assert isinstance(parts.extra["text_encoder_2"], CLIPTextModelWithProjection)
    assert isinstance(parts.extra["tokenizer_2"], CLIPTokenizer)
    assert parts.extra["tokenizer_2"].pad_token == "!"  # as SDXL's second tokenizer
    assert isinstance(backbone, SDXLBackbone)
    assert (backbone.family, backbone.flow, backbone.guidance_distilled, backbone.lora_prefix) == (
        "sdxl", False, False, "unet")
    assert backbone.token_dim == TINY_SDXL_HIDDEN + TINY_SDXL_HIDDEN_2
    assert backbone.pooled_dim == TINY_SDXL_POOLED
    assert backbone.zero_negative is True


def test_scheduler_config_gives_the_pipelines_ddim_timesteps(parts, pipe):
    """SDXL's Euler config (leading spacing, steps_offset 1, clip_sample false) read as DDIM."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    ddim.set_timesteps(4)
    table = make_step_table(parts.scheduler_config, 4, eta=0.0)
    assert table.timesteps.tolist() == ddim.timesteps.tolist() == [751, 501, 251, 1]


# --- conditioning -------------------------------------------------------------------------------


def test_conditioning_equals_encode_prompt(parts, backbone, pipe):
    cond = backbone.encode(PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                   do_classifier_free_guidance=True)
    width = TINY_SDXL_HIDDEN + TINY_SDXL_HIDDEN_2
    assert cond.shape == (3, 17, max(width, TINY_SDXL_POOLED)) and embeds.shape == (3, 16, width)
    assert torch.equal(cond[:, :-1, :width], embeds)
    assert torch.equal(cond[:, -1, :TINY_SDXL_POOLED], pooled)
    assert not cond[:, -1, TINY_SDXL_POOLED:].any()  # the pooled row's padding
    # force_zeros_for_empty_prompt: both unconditional parts are zeros
    uncond = backbone.unconditional()
    assert uncond.shape == cond.shape[1:] and not uncond.any()
    assert not negative.any() and not negative_pooled.any()
    assert backbone.unconditional() is uncond  # cached
    assert "" not in backbone.encoder  # and the empty prompt never encoded


def test_penultimate_layer_of_both_encoders(parts, backbone):
    """Not the last hidden state, and text_encoder's features first."""
    tokens = parts.tokenizer(["a red cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        out = parts.text_encoder(tokens, output_hidden_states=True)
    cond = backbone.encode(["a red cat"])[0]
    assert torch.equal(cond[:-1, :TINY_SDXL_HIDDEN], out.hidden_states[-2][0])
    assert not torch.equal(out.hidden_states[-2], out.hidden_states[-1])


def test_encoded_negative_equals_encode_prompt(encoded_negative_dir):
    parts = load_pipeline_parts(encoded_negative_dir)
    backbone = backbone_for(parts)
    assert backbone.zero_negative is False
    pipe = _pipeline(encoded_negative_dir)
    assert pipe.config.force_zeros_for_empty_prompt is False
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=True)
    uncond = backbone.unconditional()
    assert "" in backbone.encoder
    assert torch.equal(uncond[:-1, : negative.shape[-1]], negative[0])
    assert torch.equal(uncond[-1, : negative_pooled.shape[-1]], negative_pooled[0])
    assert negative.abs().max() > 0


# --- the model call -----------------------------------------------------------------------------


def test_cfg_output_equals_the_pipelines_unet_call(parts, backbone, pipe):
    x = _noise(3, parts.latent_shape)
    t = torch.tensor(751)
    eps_u, eps_c = backbone(x, t, backbone.encode(PROMPTS), cfg=True)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu",
                                                                   do_classifier_free_guidance=True)
    want_u, want_c = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    assert torch.equal(eps_u, want_u)
    assert torch.equal(eps_c, want_c)
    assert (eps_u - eps_c).abs().max() > 1e-4  # the halves differ


def test_bf16_conditioning_and_model_call_equal_the_pipelines(sdxl_dir):
    parts = load_pipeline_parts(sdxl_dir, dtype=torch.bfloat16)
    backbone = backbone_for(parts)
    pipe = _pipeline(sdxl_dir, dtype=torch.bfloat16)
    cond = backbone.encode(PROMPTS[:2])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu",
                                                                   do_classifier_free_guidance=True)
    assert cond.dtype == embeds.dtype == torch.bfloat16
    assert torch.equal(cond[:, :-1, : embeds.shape[-1]], embeds)
    assert torch.equal(cond[:, -1, : pooled.shape[-1]], pooled)
    x = _noise(2, parts.latent_shape).to(torch.bfloat16)
    t = torch.tensor(501)
    got = backbone(x, t, cond, cfg=True)
    want = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16 and torch.equal(g, w)


def test_time_ids_follow_the_latent_size(parts, backbone, pipe):
    """Latents of another size are conditioned on that image size (H, W, 0, 0, H, W)."""
    x = _noise(1, (4, 6, 10))
    t = torch.tensor([501])
    cond = backbone.encode(PROMPTS[:1])
    _, eps_c = backbone(x, t, cond, cfg=False)
    assert backbone.time_ids((6, 10), 1).tolist() == [[12.0, 20.0, 0.0, 0.0, 12.0, 20.0]]
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((12, 20), (0, 0), (12, 20), dtype=embeds.dtype, text_encoder_projection_dim=40)
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)[0]
    assert torch.equal(eps_c, want)


# --- sampling -----------------------------------------------------------------------------------


def _pipeline_latents(pipe, prompts, *, num_steps, seed, guidance=GUIDANCE):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompt=prompts, num_inference_steps=num_steps, guidance_scale=guidance, eta=0.0,
               output_type="latent", generator=generators)
    return out.images


def test_ddim_through_the_backbone_matches_the_pipeline(parts, backbone, pipe):
    """A deterministic DDIM chain on fastdense's step table through the backbone gives the
    pipeline's latents (same initial noise, CFG 5)."""
    table = make_step_table(parts.scheduler_config, 4, eta=0.0)
    x = _noise(len(PROMPTS), parts.latent_shape, seed=7)
    cond = backbone.encode(PROMPTS)
    for step in range(table.num_steps):
        eps_u, eps_c = backbone(x, table.timesteps[step], cond, cfg=True)
        eps = eps_u + GUIDANCE * (eps_c - eps_u)
        a, b, _ = table.coefs(step)
        x = a * x + b * eps
    want = _pipeline_latents(pipe, PROMPTS, num_steps=4, seed=7)
    assert want.shape == x.shape
    assert _max_rel(x, want) < 1e-5


@pytest.mark.parametrize(("guidance", "micro_batch"), [(GUIDANCE, None), (1.0, 2)])
def test_sampler_matches_the_pipeline(parts, pipe, guidance, micro_batch):
    """Sampler(parts) on SDXL: with the same initial noise the final latents equal the pipeline's
    in its deterministic mode (DDIM, eta 0), with CFG and without it (guidance 1: the pipeline
    skips the unconditional half too), in one batch or padded micro-batches."""
    from fastdense.sampler import Sampler

    sampler = Sampler(parts, compile=False, micro_batch=micro_batch)
    traj = sampler.sample(PROMPTS, num_steps=4, guidance=guidance, eta=0.0, seed=11)
    want = _pipeline_latents(pipe, PROMPTS, num_steps=4, seed=11, guidance=guidance)
    assert torch.equal(traj.latents[:, 0], _noise(len(PROMPTS), parts.latent_shape, seed=11))
    assert _max_rel(traj.final_latents, want) < 1e-5


# --- LoRA ---------------------------------------------------------------------------------------


def test_lora_loads_with_the_pipeline(sdxl_dir, tmp_path):
    """A LoRA on the backbone's default targets, saved with the family's prefix, loads with
    StableDiffusionXLPipeline.load_lora_weights and with load_pipeline_parts(lora=...), and
    both change the model call exactly as the adapted backbone does."""
    from fastdense.lora import add_lora, save_lora

    parts = load_pipeline_parts(sdxl_dir)
    add_lora(parts.unet, 4, 4, list(SDXLBackbone.default_lora_targets))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in parts.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    save_lora(parts.unet, tmp_path / "lora", prefix=SDXLBackbone.lora_prefix, family=SDXLBackbone.family)

    x = _noise(2, parts.latent_shape)
    t = torch.tensor(501)
    got = backbone_for(parts)(x, t, backbone_for(parts).encode(PROMPTS[:2]), cfg=True)
    reloaded = backbone_for(load_pipeline_parts(sdxl_dir, lora=tmp_path / "lora"))
    again = reloaded(x, t, reloaded.encode(PROMPTS[:2]), cfg=True)

    pipe = _pipeline(sdxl_dir)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu",
                                                                   do_classifier_free_guidance=True)
    base = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    want = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    for g, a, w, b in zip(got, again, want, base, strict=True):
        assert torch.equal(g, w)
        assert torch.equal(a, w)
        assert (w - b).abs().max() > 1e-3  # the LoRA changes the output


@pytest.mark.slow
def test_trained_lora_loads_with_the_pipeline(sdxl_dir, tmp_path):
    """One round of fastdense training on the tiny SDXL (default LoRA targets): the LoRA it
    writes loads with StableDiffusionXLPipeline.load_lora_weights and changes the model call as
    it does in fastdense."""
    from fastdense.config import build_config
    from fastdense.rewards import Brightness
    from fastdense.train import train

    cfg = build_config(overrides=[
        f"model.path={sdxl_dir}", "model.lora_rank=4", "sampling.num_steps=2", "sampling.guidance=2.0",
        "sampling.rollouts_per_prompt=2", "objective.group_size=2", "objective.k=2", "objective.clip=inf",
        "train.rounds=1", "train.updates_per_round=1", "train.prompts_per_round=1", "train.groups_per_step=1",
        "optim.lr=0.01", "data.prompts=[a red cat, the dog]", "data.eval_prompts=[a red cat]", "data.eval_seeds=[1]",
    ])
    result = train(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    assert result.steps == 1 and result.skipped_updates == 0
    info = json.loads((result.output / "fastdense_lora.json").read_text())
    assert info == {"family": "sdxl", "prefix": "unet"}

    parts = load_pipeline_parts(sdxl_dir, lora=result.output)
    backbone = backbone_for(parts)
    x = _noise(2, parts.latent_shape)
    t = torch.tensor(501)
    got = backbone(x, t, backbone.encode(PROMPTS[:2]), cfg=True)
    pipe = _pipeline(sdxl_dir)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS[:2], device="cpu",
                                                                   do_classifier_free_guidance=True)
    base = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    pipe.load_lora_weights(str(result.output))
    want = _pipeline_unet_call(pipe, x, t, embeds, negative, pooled, negative_pooled, parts.image_size)
    for g, w, b in zip(got, want, base, strict=True):
        assert torch.equal(g, w)
        assert (w - b).abs().max() > 0  # training moved the LoRA off zero


# --- bad input ----------------------------------------------------------------------------------


def test_mismatched_text_encoder_is_one_line_error(parts):
    wrong = replace(parts, text_encoder=parts.extra["text_encoder_2"])  # 48 + 48 features, UNet wants 80
    with pytest.raises(FastdenseError, match="cross_attention_dim=80") as err:
        backbone_for(wrong)
    assert "\n" not in str(err.value)


def test_bad_force_zeros_value_is_one_line_error(encoded_negative_dir, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(encoded_negative_dir, root)
    index = json.loads((root / "model_index.json").read_text())
    index["force_zeros_for_empty_prompt"] = "yes"
    (root / "model_index.json").write_text(json.dumps(index))
    parts = load_pipeline_parts(root)
    with pytest.raises(FastdenseError, match="force_zeros_for_empty_prompt='yes'"):
        backbone_for(parts)


def test_encoder_needs_equal_windows(parts):
    tokenizer_2 = parts.extra["tokenizer_2"]
    before = tokenizer_2.model_max_length
    tokenizer_2.model_max_length = before - 1
    try:
        with pytest.raises(FastdenseError, match=r"model_max_length \[16, 15\]"):
            SDXLPromptEncoder.from_parts(parts)
    finally:
        tokenizer_2.model_max_length = before
