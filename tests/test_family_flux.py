"""FLUX.1 backbone against diffusers' FluxPipeline on a tiny offline model: loading, the
conditioning (``encode_prompt``), the packed transformer call with its ids, guidance and t/1000,
full ODE sampling (dev and schnell), SDE residuals, a LoRA the pipeline loads, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models.backbone import unpack_conditioning
from fastdense.models.families import backbone_for
from fastdense.models.flux import (
    DEFAULT_LATENT_SIZE,
    FluxBackbone,
    FluxPromptEncoder,
    image_ids,
    pack_latents,
    unpack_latents,
)
from fastdense.models.loading import load_pipeline_parts
from fastdense.models.tiny_flux import TINY_CLIP_DIM, TINY_T5_DIM, build_tiny_flux_pipeline, write_t5_tokenizer

PROMPTS = ["a red cat", "photo of a blue dog on the zebra"]
SEEDS = [11, 12]
GUIDANCE = 3.5
RESOLUTION = 16  # pixels: latents 8×8 at the tiny VAE's scale factor 2, 16 image tokens
LATENT_HW = 8


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("schnell") / "model", seed=5, guidance_embeds=False)


def _parts(path):
    return load_pipeline_parts(path, resolution=RESOLUTION)


@pytest.fixture(scope="module")
def parts(flux_dir):
    return _parts(flux_dir)


@pytest.fixture
def backbone(parts):
    """A fresh backbone per test: an empty embedding cache, so prompts are encoded in the same
    batch as the pipeline encodes them (CPU kernels may round differently per batch size)."""
    return backbone_for(parts)


def _pipeline(path, **kwargs):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(flux_dir):
    return _pipeline(flux_dir)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _run_recording(pipe, prompts, seeds, *, num_steps, guidance=GUIDANCE):
    """Run the pipeline to latents, recording every transformer call (inputs and output) and the
    packed latents after every step."""
    calls, steps = [], []

    def on_call(module, args, kwargs, out):
        calls.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, out[0].clone()))

    def on_step(pipeline, i, t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    handle = pipe.transformer.register_forward_hook(on_call, with_kwargs=True)
    try:
        final = pipe(
            prompts, height=RESOLUTION, width=RESOLUTION, num_inference_steps=num_steps, guidance_scale=guidance,
            output_type="latent", generator=_generators(seeds), callback_on_step_end=on_step,
        ).images
    finally:
        handle.remove()
    return calls, steps, final


# -- loading ----------------------------------------------------------------------------------------


def test_loads_as_flux_with_its_components_and_latent_geometry(flux_dir, parts):
    from transformers import CLIPTextModel, T5EncoderModel

    assert parts.family == "flux"
    assert type(parts.unet).__name__ == "FluxTransformer2DModel"
    assert isinstance(parts.text_encoder, CLIPTextModel)
    assert isinstance(parts.extra["text_encoder_2"], T5EncoderModel)
    assert type(parts.extra["tokenizer_2"]).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert parts.vae_scale_factor == 2
    # channels = in_channels // 4 (2×2 packing); resolution 16 px → 2·(16 // 4) = 8 latents, as prepare_latents
    assert parts.latent_shape == (4, LATENT_HW, LATENT_HW)
    # no sample_size in a FLUX config: FluxPipeline's default_sample_size, 128 latents
    assert load_pipeline_parts(flux_dir).latent_shape == (4, DEFAULT_LATENT_SIZE, DEFAULT_LATENT_SIZE)
    with pytest.raises(FastdenseError, match="multiple of 4"):  # 18 px is not whole 2×2 patches of the VAE's latents
        load_pipeline_parts(flux_dir, resolution=18)

    backbone = backbone_for(parts)
    assert isinstance(backbone, FluxBackbone) and isinstance(backbone.encoder, FluxPromptEncoder)
    assert backbone.flow and backbone.guidance_distilled and backbone.lora_prefix == "transformer"
    assert backbone.latent_multiple == 2
    # guidance is an input, never an unconditional branch
    assert not backbone.uses_cfg(GUIDANCE) and not backbone.uses_cfg(1.0) and not backbone.uses_cfg(0.0)
    with pytest.raises(FastdenseError, match="guidance-distilled"):
        backbone.batch(backbone.encode(["a cat"]), cfg=True)
    # the shift depends on the number of image tokens of the packed latents
    assert backbone.table_options(parts.latent_shape) == {"image_seq_len": 16, "style": "flux"}
    assert backbone.table_options((16, 128, 96)) == {"image_seq_len": 64 * 48, "style": "flux"}


def test_default_lora_targets_are_the_attention_projections_of_both_block_kinds(parts):
    names = [name for name, _ in parts.unet.named_modules()]
    for target in FluxBackbone.default_lora_targets:
        assert any(name.startswith("transformer_blocks.") and name.endswith("attn." + target) for name in names)
    for target in ("to_q", "to_k", "to_v"):  # single blocks: q/k/v only (their output goes through proj_out)
        assert any(name.startswith("single_transformer_blocks.") and name.endswith("attn." + target) for name in names)
    assert not any(name.startswith("single_transformer_blocks.") and name.endswith("to_out.0") for name in names)


def test_t5_tokenizer_is_offline_t5_shaped(tmp_path):
    tokenizer = write_t5_tokenizer(tmp_path / "t5")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 4  # three known words, then </s>
    assert tokenizer.tokenize("a zebra")[1:] == ["▁", "z", "e", "b", "r", "a"]  # unknown words are spelt out
    assert tokenizer.model_max_length == 512


# -- conditioning -------------------------------------------------------------------------------------


def test_conditioning_equals_the_pipelines_encode_prompt(pipe, backbone):
    with torch.no_grad():  # as inside FluxPipeline.__call__ (grad mode changes CPU kernels' rounding)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS)
    cond = backbone.encode(PROMPTS)
    assert cond.shape == (2, 512 + 1, max(TINY_T5_DIM, TINY_CLIP_DIM))
    tokens, pooled_row = unpack_conditioning(cond, backbone.token_dim, backbone.pooled_dim)
    assert torch.equal(tokens, prompt_embeds)  # T5's last hidden state, 512 tokens
    assert torch.equal(pooled_row, pooled)  # CLIP's pooler_output
    assert torch.equal(cond[:, -1, TINY_CLIP_DIM:], torch.zeros_like(cond[:, -1, TINY_CLIP_DIM:]))  # zero padded
    assert torch.equal(text_ids, torch.zeros(512, 3))
    assert backbone.encoder.encoded == 2
    backbone.encode(PROMPTS[:1])
    assert backbone.encoder.encoded == 2  # cached


def test_a_prompt_longer_than_t5s_window_is_reported(parts, caplog):
    encoder = FluxPromptEncoder.from_parts(parts, max_sequence_length=8)
    with caplog.at_level("WARNING", logger="fastdense.models.prompts"):
        cond = encoder.encode(["a red cat and a blue dog on the car"])
    assert cond.shape[1] == 8 + 1
    assert any("max_sequence_length" in r.getMessage() for r in caplog.records)
    with pytest.raises(FastdenseError, match="max_sequence_length=513"):
        FluxPromptEncoder.from_parts(parts, max_sequence_length=513)


# -- the model call -------------------------------------------------------------------------------------


def test_packing_and_ids_are_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    x = torch.randn(3, 4, 6, 10)
    packed = FluxPipeline._pack_latents(x, 3, 4, 6, 10)
    assert torch.equal(pack_latents(x), packed)
    # FluxPipeline._unpack_latents takes pixel sizes: latents 6×10 at scale factor 8 are 48×80 px
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))
    # the flow-matching step is elementwise: on unpacked latents it is the pipeline's step on packed ones
    v = torch.randn_like(x)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0, 0.6], mu=0.7)
    t = sched.timesteps[0]
    on_packed = sched.step(pack_latents(v), t, packed, return_dict=False)[0]
    sched._step_index = None
    on_unpacked = sched.step(v, t, x, return_dict=False)[0]
    assert torch.equal(unpack_latents(on_packed, 6, 10), on_unpacked)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_model_output_equals_the_pipelines_transformer_call(variant, flux_dir, schnell_dir, pipe, parts):
    """Every transformer call of a pipeline run, unpacked, is the backbone's output on the unpacked
    latents at the scheduler's timestep, bit for bit; with guidance as an input (dev) or none (schnell)."""
    if variant == "schnell":
        pipe, parts = _pipeline(schnell_dir), _parts(schnell_dir)
    backbone = backbone_for(parts)
    calls, _, _ = _run_recording(pipe, PROMPTS, SEEDS, num_steps=3)
    assert len(calls) == 3
    cond = backbone.encode(PROMPTS)
    for (inputs, out), t in zip(calls, pipe.scheduler.timesteps, strict=True):
        assert torch.equal(inputs["img_ids"], image_ids(LATENT_HW, LATENT_HW))
        assert torch.equal(inputs["timestep"], (t.expand(2) / 1000))
        if variant == "dev":
            assert torch.equal(inputs["guidance"], torch.full([2], GUIDANCE))
        else:
            assert inputs["guidance"] is None
        x = unpack_latents(inputs["hidden_states"], LATENT_HW, LATENT_HW)
        expected = unpack_latents(out, LATENT_HW, LATENT_HW)
        uncond, velocity = backbone(x, t, cond, cfg=False, guidance=GUIDANCE)
        assert uncond is None
        assert torch.equal(velocity, expected)
        # one timestep per row (the trainer's form) is the same call
        _, per_row = backbone(x, t.expand(2).clone(), cond, cfg=False, guidance=GUIDANCE)
        assert torch.equal(per_row, expected)


def test_bf16_conditioning_and_model_call_equal_the_pipelines(flux_dir):
    """In bf16 too: conditioning, timestep (t/1000 in the latents' dtype), fp32 guidance and ids."""
    parts = load_pipeline_parts(flux_dir, resolution=RESOLUTION, dtype=torch.bfloat16)
    backbone = backbone_for(parts)
    pipe = _pipeline(flux_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPTS)
    cond = backbone.encode(PROMPTS)
    assert cond.dtype == torch.bfloat16
    tokens, pooled_row = unpack_conditioning(cond, backbone.token_dim, backbone.pooled_dim)
    assert torch.equal(tokens, prompt_embeds) and torch.equal(pooled_row, pooled)
    calls, _, _ = _run_recording(pipe, PROMPTS, SEEDS, num_steps=2)
    for (inputs, out), t in zip(calls, pipe.scheduler.timesteps, strict=True):
        x = unpack_latents(inputs["hidden_states"], LATENT_HW, LATENT_HW)
        assert x.dtype == torch.bfloat16
        _, velocity = backbone(x, t, cond, cfg=False, guidance=GUIDANCE)
        assert torch.equal(velocity, unpack_latents(out, LATENT_HW, LATENT_HW))


def test_guidance_is_an_input_of_dev(backbone):
    x = torch.randn(1, 4, LATENT_HW, LATENT_HW)
    t = torch.tensor(700.0)
    cond = backbone.encode(PROMPTS[:1])
    _, low = backbone(x, t, cond, cfg=False, guidance=1.0)
    _, high = backbone(x, t, cond, cfg=False, guidance=GUIDANCE)
    assert not torch.allclose(low, high)
    with pytest.raises(FastdenseError, match="guidance="):
        backbone(x, t, cond, cfg=False)


def test_padding_rows_do_not_change_the_real_rows(backbone):
    x = torch.randn(2, 4, LATENT_HW, LATENT_HW)
    t = torch.tensor(500.0)
    cond = backbone.encode(PROMPTS)
    _, plain = backbone(x, t, cond, cfg=False, guidance=GUIDANCE)
    _, padded = backbone(x, t, cond, cfg=False, rows=3, guidance=GUIDANCE)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)  # another batch size: rounding only


# -- sampling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_ode_sampling_equals_the_pipeline(variant, flux_dir, schnell_dir, pipe, parts):
    """Same initial noise (one generator per sample, drawn unpacked then packed by the pipeline):
    every latent of fastdense's ODE chain equals the pipeline's, unpacked, to 1e-5 relative."""
    from fastdense.sampler import Sampler

    if variant == "schnell":
        pipe, parts = _pipeline(schnell_dir), _parts(schnell_dir)
    trajectories = Sampler(parts).sample(PROMPTS, num_steps=4, guidance=GUIDANCE, sampler="ode", seed=SEEDS)
    _, steps, final = _run_recording(pipe, PROMPTS, SEEDS, num_steps=4)
    assert torch.equal(trajectories.timesteps, pipe.scheduler.timesteps)

    noise = torch.stack([torch.randn((1, 4, LATENT_HW, LATENT_HW), generator=g)[0] for g in _generators(SEEDS)])
    assert torch.equal(trajectories.latents[:, 0], noise)
    for t, packed in enumerate(steps):
        ours, theirs = trajectories.latents[:, t + 1], unpack_latents(packed, LATENT_HW, LATENT_HW)
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5, f"step {t}"
    final = unpack_latents(final, LATENT_HW, LATENT_HW)
    assert ((trajectories.final_latents - final).norm() / final.norm()).item() < 1e-5

    # decoded as the pipeline decodes (latents / scaling_factor + shift_factor): the pipeline's images
    from fastdense.sampler import decode

    images = pipe(
        PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=4, guidance_scale=GUIDANCE,
        output_type="pt", generator=_generators(SEEDS),
    ).images
    assert parts.vae.config.shift_factor != 0
    torch.testing.assert_close(decode(parts, trajectories.final_latents), images, rtol=0, atol=1e-5)


def test_sde_residuals_are_those_of_the_stored_chain(parts):
    """Flow-GRPO SDE chain: each recorded ‖x' − μ‖² is the one recomputed in fp64 from the stored
    latents and the backbone's velocity, μ = A·x + B·v̂."""
    from fastdense.sampler import Sampler

    sampler = Sampler(parts)
    trajectories = sampler.sample(PROMPTS, num_steps=3, guidance=GUIDANCE, sampler="sde", eta=0.7, seed=SEEDS)
    table = trajectories.step_table
    assert bool((trajectories.sigma > 0).all())
    cond = sampler.backbone.encode(PROMPTS)
    latents = trajectories.latents.double()
    for t in range(3):
        x = trajectories.latents[:, t]
        _, v = sampler.backbone(x, trajectories.timesteps[t], cond, cfg=False, guidance=GUIDANCE)
        mu = float(table.coef_a[t]) * latents[:, t] + float(table.coef_b[t]) * v.double()
        expected = ((latents[:, t + 1] - mu) ** 2).flatten(1).sum(1)
        torch.testing.assert_close(trajectories.sq_residual[:, t].double(), expected, rtol=1e-5, atol=0)


# -- LoRA -----------------------------------------------------------------------------------------------


def test_lora_on_default_targets_loads_with_the_pipelines_load_lora_weights(flux_dir, tmp_path):
    from fastdense.lora import add_lora, load_lora, save_lora

    parts = _parts(flux_dir)
    backbone = backbone_for(parts)
    add_lora(parts.unet, 4, 4.0, list(backbone.default_lora_targets), seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in parts.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter change the model
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in parts.unet.named_parameters() if ".lora_A" in name}
    # every double-block projection (8) and the single block's q/k/v (3), one block of each in the tiny model
    assert len(adapted) == 8 + 3
    save_lora(parts.unet, tmp_path / "lora", prefix=backbone.lora_prefix, family=backbone.family)

    pipe = _pipeline(flux_dir)
    calls_base, _, _ = _run_recording(pipe, PROMPTS, SEEDS, num_steps=2)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    calls, _, _ = _run_recording(pipe, PROMPTS, SEEDS, num_steps=2)
    cond = backbone.encode(PROMPTS)
    for (inputs, out), (_, out_base), t in zip(calls, calls_base, pipe.scheduler.timesteps, strict=True):
        x = unpack_latents(inputs["hidden_states"], LATENT_HW, LATENT_HW)
        _, velocity = backbone(x, t, cond, cfg=False, guidance=GUIDANCE)
        assert torch.equal(velocity, unpack_latents(out, LATENT_HW, LATENT_HW))
        assert not torch.allclose(out, out_base)  # the LoRA does change the pipeline's model

    # and fastdense loads it back onto a fresh transformer: the same model
    fresh = _parts(flux_dir)
    load_lora(fresh.unet, tmp_path / "lora", family="flux")
    inputs, out = calls[-1]
    x = unpack_latents(inputs["hidden_states"], LATENT_HW, LATENT_HW)
    _, velocity = backbone_for(fresh)(x, pipe.scheduler.timesteps[-1], cond, cfg=False, guidance=GUIDANCE)
    assert torch.equal(velocity, unpack_latents(out, LATENT_HW, LATENT_HW))
