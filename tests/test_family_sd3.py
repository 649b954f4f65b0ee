"""SD3 / SD3.5 (fastdense.models.sd3) on tiny offline pipelines (fastdense.models.tiny_sd3) against
diffusers' StableDiffusion3Pipeline: loading, conditioning (encode_prompt, bit for bit), the CFG
transformer call (exact), sampling (final latents of the ODE equal the pipeline's; SDE / CPS
residuals equal their fp64 recomputation) and a LoRA that the pipeline's load_lora_weights reads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models.families import backbone_for
from fastdense.models.loading import load_pipeline_parts
from fastdense.models.sd3 import SD3Backbone, SD3PromptEncoder, model_max_sequence_length
from fastdense.models.tiny_sd3 import TINY_SD3_JOINT_DIM, TINY_SD3_POOLED, build_tiny_sd3_pipeline

T5_LENGTH = 12  # the tiny models' max_sequence_length (the pipeline's default is 256)
CLIP_LENGTH = 16  # the first tiny CLIP tokenizer's window
GUIDANCE = 5.0
PROMPTS = [
    "a red cat",
    "the dog on grass",
    "a photo of a blue cat and a green dog on the grass, a red cat on a blue dog",  # longer than both windows
]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """Latent space (VAE, 16 channels) with T5."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "model", max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module")
def sd3_pixel_dir(tmp_path_factory):
    """Pixel space (no VAE, RGB) without T5: FastdensePixelSD3Pipeline."""
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3px") / "model", with_t5=False, with_vae=False,
                                   max_sequence_length=T5_LENGTH, seed=1)


@pytest.fixture(scope="module")
def parts(sd3_dir):
    return load_pipeline_parts(sd3_dir)


@pytest.fixture(scope="module")
def pixel_parts(sd3_pixel_dir):
    return load_pipeline_parts(sd3_pixel_dir)


def _pipeline(parts):
    """A StableDiffusion3Pipeline on the loaded modules (also works without VAE / T5, as diffusers allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    config = {k: v for k, v in parts.scheduler_config.items() if not k.startswith("_")}
    pipe = StableDiffusion3Pipeline(
        transformer=parts.unet,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(config),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        text_encoder_2=parts.extra["text_encoder_2"],
        tokenizer_2=parts.extra["tokenizer_2"],
        text_encoder_3=parts.extra["text_encoder_3"],
        tokenizer_3=parts.extra["tokenizer_3"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    """The pipeline as diffusers loads the directory itself."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- 1. loading ---------------------------------------------------------------------------------------


def test_load_parts_with_t5_and_vae(parts, sd3_dir):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert parts.family == "sd3"
    assert isinstance(parts.unet, SD3Transformer2DModel)
    assert isinstance(parts.vae, AutoencoderKL)
    assert parts.latent_shape == (16, 8, 8)
    assert parts.vae_scale_factor == 2 and parts.image_size == (16, 16)
    assert isinstance(parts.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(parts.extra["text_encoder_2"], CLIPTextModelWithProjection)
    assert isinstance(parts.extra["text_encoder_3"], T5EncoderModel)
    assert type(parts.extra["tokenizer_3"]).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert parts.extra["tokenizer_2"].pad_token == "!"
    assert parts.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert parts.scheduler_config["shift"] == 3.0

    backbone = backbone_for(parts)
    assert isinstance(backbone, SD3Backbone) and isinstance(backbone.encoder, SD3PromptEncoder)
    assert backbone.flow and not backbone.guidance_distilled and backbone.uses_cfg(GUIDANCE)
    assert backbone.lora_prefix == "transformer" and backbone.latent_multiple == parts.unet.config.patch_size
    assert backbone.encoder.has_t5 and backbone.encoder.max_sequence_length == T5_LENGTH  # from fastdense.json
    assert json.loads((sd3_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"


def test_load_parts_without_t5_pixel_space(pixel_parts, sd3_pixel_dir):
    index = json.loads((sd3_pixel_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FastdensePixelSD3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["vae"] == [None, None]
    assert pixel_parts.family == "sd3"
    assert pixel_parts.vae is None and pixel_parts.vae_scale_factor == 1
    assert pixel_parts.latent_shape == (3, 8, 8)
    assert pixel_parts.extra["text_encoder_3"] is None and pixel_parts.extra["tokenizer_3"] is None
    backbone = backbone_for(pixel_parts)
    assert not backbone.encoder.has_t5
    # the T5 part is zeros of [max_sequence_length, joint_attention_dim]
    cond = backbone.encode(["a red cat"])
    assert cond.shape == (1, CLIP_LENGTH + T5_LENGTH + 1, TINY_SD3_JOINT_DIM)
    assert bool((cond[0, CLIP_LENGTH:-1] == 0).all())
    assert bool((cond[0, :CLIP_LENGTH] != 0).any())


def test_resolution_must_divide_into_patches(sd3_dir):
    assert load_pipeline_parts(sd3_dir, resolution=24).latent_shape == (16, 12, 12)
    with pytest.raises(FastdenseError, match=r"resolution=18 .* multiple of 4 pixels"):
        load_pipeline_parts(sd3_dir, resolution=18)  # 9 latent pixels: not whole 2x2 patches


def test_max_sequence_length_option(tmp_path, parts):
    assert model_max_sequence_length(tmp_path) == 256  # no fastdense.json: the pipeline's default
    (tmp_path / "fastdense.json").write_text(json.dumps({"train_prompts": "x.txt"}))
    assert model_max_sequence_length(tmp_path) == 256  # other keys are not this option
    (tmp_path / "fastdense.json").write_text(json.dumps({"max_sequence_length": 600}))
    with pytest.raises(FastdenseError, match=r"max_sequence_length=600 is not allowed"):
        model_max_sequence_length(tmp_path)
    encoder = SD3PromptEncoder.from_parts(parts, max_sequence_length=5)  # an explicit value wins
    assert encoder.encode(["a red cat"]).shape == (1, CLIP_LENGTH + 5 + 1, TINY_SD3_JOINT_DIM)
    with pytest.raises(FastdenseError, match="max_sequence_length=0 is not allowed with a T5 encoder"):
        SD3PromptEncoder.from_parts(parts, max_sequence_length=0)
    with pytest.raises(FastdenseError, match="tokenizer_3 and text_encoder_3, or neither"):
        SD3PromptEncoder(parts.tokenizer, parts.text_encoder, parts.extra["tokenizer_2"],
                         parts.extra["text_encoder_2"], parts.extra["tokenizer_3"], None, joint_attention_dim=48)


# -- 2. conditioning ------------------------------------------------------------------------------


@pytest.mark.parametrize(("which", "t5_length"), [("parts", T5_LENGTH), ("pixel_parts", T5_LENGTH), ("pixel_parts", 0)],
                         ids=["t5", "no_t5", "no_t5_rows"])
def test_conditioning_equals_encode_prompt(which, t5_length, request):
    parts = request.getfixturevalue(which)
    pipe = _pipeline(parts)
    backbone = SD3Backbone.from_parts(parts, encoder=SD3PromptEncoder.from_parts(parts, max_sequence_length=t5_length))
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
            max_sequence_length=t5_length,
        )
    cond = backbone.encode(PROMPTS)
    uncond = backbone.unconditional()
    length = CLIP_LENGTH + t5_length
    assert embeds.shape == (3, length, TINY_SD3_JOINT_DIM) and pooled.shape == (3, TINY_SD3_POOLED)
    assert cond.shape == (3, length + 1, TINY_SD3_JOINT_DIM) and cond.dtype == embeds.dtype
    assert torch.equal(cond[:, :length], embeds)
    assert torch.equal(cond[:, length, :TINY_SD3_POOLED], pooled)
    assert bool((cond[:, length, TINY_SD3_POOLED:] == 0).all())
    # the negative conditioning: the empty prompt through all encoders (not zeros); the cache encodes
    # it alone, the pipeline once per prompt (a batch of 3: the pooled projection may round differently)
    with torch.no_grad():
        _, neg_embeds_1, _, neg_pooled_1 = pipe.encode_prompt(
            PROMPTS[:1], None, None, device=torch.device("cpu"), do_classifier_free_guidance=True,
            max_sequence_length=t5_length,
        )
    assert torch.equal(uncond[:length], neg_embeds_1[0])
    assert torch.equal(uncond[length, :TINY_SD3_POOLED], neg_pooled_1[0])
    torch.testing.assert_close(uncond[:length].expand(3, -1, -1), neg_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(uncond[length, :TINY_SD3_POOLED].expand(3, -1), neg_pooled, rtol=1e-6, atol=1e-6)
    assert bool((uncond[:CLIP_LENGTH] != 0).any())
    assert not torch.equal(cond[0], cond[1])


def test_long_prompt_is_reported_once(parts, caplog):
    encoder = SD3PromptEncoder.from_parts(parts)
    with caplog.at_level("WARNING", logger="fastdense.models.prompts"):
        encoder.encode(PROMPTS)
        encoder.encode(PROMPTS)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "T5's max_sequence_length" in lines[0] and "a photo of a blue cat" in lines[0]


# -- 3. the model call ------------------------------------------------------------------------------


def test_cfg_output_equals_the_pipeline_transformer_call(parts):
    backbone = backbone_for(parts)
    # the conditioning as encode_prompt gives it (test above), unpacked
    cond = backbone.encode(PROMPTS)
    length = CLIP_LENGTH + T5_LENGTH
    embeds, pooled = cond[:, :length].clone(), cond[:, length, :TINY_SD3_POOLED].clone()
    neg_embeds = backbone.unconditional()[:length].expand(3, -1, -1).clone()
    neg_pooled = backbone.unconditional()[length, :TINY_SD3_POOLED].expand(3, -1).clone()
    x = torch.randn((3, *parts.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(857.6923, dtype=torch.float32)  # a float32 σ·1000, as the scheduler gives
    with torch.no_grad():
        # the pipeline's call in its denoising loop (CFG: [negative | positive] rows, t.expand(rows))
        ref = parts.unet(
            hidden_states=torch.cat([x, x]),
            timestep=t.expand(6),
            encoder_hidden_states=torch.cat([neg_embeds, embeds]),
            pooled_projections=torch.cat([neg_pooled, pooled]),
            return_dict=False,
        )[0]
        out_u, out_c = backbone(x, t, cond, cfg=True)
        # a padded fixed-size batch and the no-CFG half give the same rows
        pad_u, pad_c = backbone(x, t, cond, cfg=True, rows=5)
        none_u, only_c = backbone(x, t, cond, cfg=False)
        # one timestep per row (the trainer)
        ts = torch.tensor([900.0, 500.0, 20.0])
        row_u, row_c = backbone(x, ts, cond, cfg=True)
        ref_rows = parts.unet(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([ts, ts]),
            encoder_hidden_states=torch.cat([neg_embeds, embeds]),
            pooled_projections=torch.cat([neg_pooled, pooled]),
            return_dict=False,
        )[0]
    assert torch.equal(out_u, ref[:3]) and torch.equal(out_c, ref[3:])
    assert not torch.equal(out_u, out_c) and not torch.equal(out_c[0], out_c[1])
    torch.testing.assert_close(pad_u, ref[:3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pad_c, ref[3:], rtol=1e-6, atol=1e-6)
    assert none_u is None
    torch.testing.assert_close(only_c, ref[3:], rtol=1e-6, atol=1e-6)
    assert torch.equal(row_u, ref_rows[:3]) and torch.equal(row_c, ref_rows[3:])


def test_table_options_follow_dynamic_shifting(parts):
    backbone = backbone_for(parts)
    assert backbone.table_options((16, 8, 8)) == {"style": "sd3"}  # SD3's config: a fixed shift
    shifting = SD3Backbone(parts.unet, backbone.encoder,
                           scheduler_config={**parts.scheduler_config, "use_dynamic_shifting": True})
    # the pipeline's image_seq_len: (H / patch) · (W / patch)
    assert shifting.table_options((16, 64, 32)) == {"image_seq_len": 32 * 16, "style": "sd3"}


def test_default_lora_targets_cover_both_streams(parts):
    names = [name for name, _ in parts.unet.named_modules()]
    for target in SD3Backbone.default_lora_targets:
        assert any(name.endswith("." + target) for name in names), target
    # the text stream's projections are covered, not only the image stream's
    assert any(t.endswith("add_q_proj") for t in SD3Backbone.default_lora_targets)


# -- 4. sampling ------------------------------------------------------------------------------------


def _sampler(parts):
    from fastdense.sampler import Sampler

    return Sampler(parts)


@pytest.mark.parametrize("which", ["parts", "pixel_parts"], ids=["t5_vae", "no_t5_pixel"])
def test_ode_final_latents_equal_the_pipeline(which, request):
    parts = request.getfixturevalue(which)
    if which == "parts":  # the pipeline as diffusers loads the directory
        pipe = request.getfixturevalue("pipe")
        height, width = parts.image_size
    else:  # diffusers has no pixel-space SD3: the pipeline object without a VAE takes latent size · 8
        pipe = _pipeline(parts)
        height, width = (side * pipe.vae_scale_factor for side in parts.latent_size)
    sampler = _sampler(parts)
    traj = sampler.sample(PROMPTS[:2], num_steps=4, guidance=GUIDANCE, sampler="ode", seed=10)
    generators = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    with torch.no_grad():
        ref = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=GUIDANCE, output_type="latent",
                   generator=generators, height=height, width=width, max_sequence_length=T5_LENGTH).images
    # the same initial noise, then the same chain
    noise = torch.stack([torch.randn(parts.latent_shape, generator=torch.Generator().manual_seed(10 + i))
                         for i in range(2)])
    assert torch.equal(traj.latents[:, 0], noise)
    final = traj.final_latents
    assert final.shape == ref.shape
    rel = float((final - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, rel
    assert float((final - noise).abs().max()) > 0.1  # the chain moved


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_recorded_residuals_equal_fp64_recomputation(kind, parts):
    sampler = _sampler(parts)
    noise_level = 0.7
    traj = sampler.sample(PROMPTS[:2], num_steps=4, guidance=GUIDANCE, sampler=kind, eta=noise_level, seed=3)
    T = traj.num_steps
    d = traj.latent_dim
    backbone = sampler.backbone
    cond = backbone.encode(PROMPTS[:2])
    expected = torch.empty((2, T), dtype=torch.float64)
    with torch.no_grad():
        for t in range(T):
            x = traj.latents[:, t]
            out_u, out_c = backbone(x, traj.timesteps[t], cond, cfg=True)
            v = out_u.double() + GUIDANCE * (out_c.double() - out_u.double())
            mu = traj.coef_a[t] * x.double() + traj.coef_b[t] * v
            expected[:, t] = ((traj.latents[:, t + 1].double() - mu) ** 2).sum(dim=(1, 2, 3))
    sigma = traj.sigma
    density = sigma > 0
    if kind == "sde":
        assert bool(density.all())
    else:  # CPS: the last step goes to s' = 0 with σ = 0 (no density)
        assert density.tolist() == [True] * (T - 1) + [False]
        assert float(traj.sq_residual[:, -1].abs().max()) <= 1e-8 * d
    torch.testing.assert_close(traj.sq_residual[:, density].double(), expected[:, density], rtol=1e-4, atol=0)
    # the recorded transitions carry noise of the table's σ: ‖x' − μ‖² ≈ σ²·D
    ratio = expected[:, density] / (sigma[density] ** 2 * d)
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    # the fp64 Gaussian log-density of each stored transition
    var = sigma[density] ** 2
    log_density = -expected[:, density] / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
    if kind == "sde":
        torch.testing.assert_close(traj.log_prob(), log_density, rtol=1e-6, atol=1e-3)
    else:
        with pytest.raises(FastdenseError, match="no density"):
            traj.log_prob()


# -- 5. LoRA ------------------------------------------------------------------------------------------


def test_lora_loads_with_the_pipeline(parts, sd3_dir, tmp_path):
    import copy

    from diffusers import StableDiffusion3Pipeline

    from fastdense.lora import add_lora, load_lora, save_lora

    backbone = backbone_for(parts)
    transformer = copy.deepcopy(parts.unet)
    add_lora(transformer, 4, 4.0, list(backbone.default_lora_targets), seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)  # peft starts B at zero: make the adapter change the model
    lora_dir = tmp_path / "lora"
    save_lora(transformer, lora_dir, prefix=backbone.lora_prefix, family=backbone.family)

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), local_files_only=True)
    pipe.load_lora_weights(str(lora_dir))
    reloaded = copy.deepcopy(parts.unet)
    load_lora(reloaded, lora_dir, family="sd3")

    cond = backbone.encode(PROMPTS[:2])
    x = torch.randn((2, *parts.latent_shape), generator=torch.Generator().manual_seed(5))
    t = torch.tensor(602.15, dtype=torch.float32)
    with torch.no_grad():
        _, base = backbone(x, t, cond, cfg=False)
        _, ours = SD3Backbone(transformer, backbone.encoder)(x, t, cond, cfg=False)
        _, theirs = SD3Backbone(pipe.transformer.eval(), backbone.encoder)(x, t, cond, cfg=False)
        _, again = SD3Backbone(reloaded.eval(), backbone.encoder)(x, t, cond, cfg=False)
    assert float((ours - base).abs().max()) > 1e-3  # the adapter is not a no-op
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, ours, rtol=1e-6, atol=1e-6)


def test_bf16_conditioning_and_model_call_equal_the_pipeline(sd3_dir):
    parts = load_pipeline_parts(sd3_dir, dtype=torch.bfloat16)
    pipe = _pipeline(parts)
    backbone = backbone_for(parts)
    assert backbone.dtype == torch.bfloat16
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS[:2], None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
            max_sequence_length=T5_LENGTH,
        )
        cond = backbone.encode(PROMPTS[:2])
        length = CLIP_LENGTH + T5_LENGTH
        assert cond.dtype == embeds.dtype == torch.bfloat16
        assert torch.equal(cond[:, :length], embeds) and torch.equal(cond[:, length, :TINY_SD3_POOLED], pooled)
        x = torch.randn((2, *parts.latent_shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        t = torch.tensor(602.15, dtype=torch.float32)  # the scheduler's float32 timestep, as the pipeline passes it
        ref = pipe.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        none_u, out = backbone(x, t, cond, cfg=False)
    assert none_u is None and out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


def test_conditioning_unpacked_once_per_batch_and_again_after_a_change(parts):
    backbone = backbone_for(parts)
    cond = backbone.encode(PROMPTS[:2])
    x = torch.randn((2, *parts.latent_shape), generator=torch.Generator().manual_seed(2))
    t = torch.tensor(500.0)
    batch = backbone.batch(cond, cfg=True)
    batch.load(x)
    with torch.no_grad():
        first = backbone.output(batch, t)
        tokens = backbone._unpacked[2]
        again = backbone.output(batch, t)
        assert backbone._unpacked[2] is tokens  # the same unpacked rows for the next step
        batch.context[batch.rows :].copy_(backbone.encode(PROMPTS[1:3]))  # rewritten in place: new prompts
        changed = backbone.output(batch, t)
        fresh = backbone(x, t, backbone.encode(PROMPTS[1:3]), cfg=True)
    assert torch.equal(first[1], again[1])
    assert torch.equal(changed[1], fresh[1]) and not torch.equal(changed[1], first[1])
