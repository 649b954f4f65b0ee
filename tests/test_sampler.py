"""fastdense.sampler: equivalence with diffusers, recorded likelihoods, reproducibility, LoRA reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models.loading import load_pipeline_parts
from fastdense.models.prompts import PromptEncoder
from fastdense.sampler import Sampler, Trajectories, decode, make_generators, sample
from fastdense.testing import build_tiny_pipeline

PROMPTS = ["a red cat", "the dog", "a cat and a dog"]


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return load_pipeline_parts(tiny_dir)


@pytest.fixture(scope="module")
def sampler(parts):
    return Sampler(parts)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@torch.no_grad()
def recompute(parts, unet, traj: Trajectories, *, model_dtype=torch.float32):
    """Squared residuals [B, T] and x̂0 per step, recomputed from the stored latents.

    The UNet runs in ``model_dtype``; CFG, μ and the residual in float64 from the stored tensors.
    """
    unet = copy.deepcopy(unet).to(model_dtype)
    enc = PromptEncoder.from_parts(parts)
    cond = enc.encode(traj.prompts).to(model_dtype)
    uncond = enc.unconditional().to(model_dtype)
    B, T = traj.batch_size, traj.num_steps
    w = traj.guidance
    sq = torch.empty((B, T), dtype=torch.float64)
    x0 = []
    for t in range(T):
        x = traj.latents[:, t].double()
        x1 = traj.latents[:, t + 1].double()
        if w != 1.0:
            inp = torch.cat([x, x]).to(model_dtype)
            e = torch.cat([uncond.expand(B, -1, -1), cond])
            eu, ec = unet(inp, traj.timesteps[t], encoder_hidden_states=e, return_dict=False)[0].double().chunk(2)
            eps = eu + w * (ec - eu)
        else:
            eps = unet(x.to(model_dtype), traj.timesteps[t], encoder_hidden_states=cond, return_dict=False)[0].double()
        mu = traj.coef_a[t] * x + traj.coef_b[t] * eps
        sq[:, t] = ((x1 - mu) ** 2).sum(dim=(1, 2, 3))
        abar = traj.step_table.alpha_cumprod[t]
        x0.append((x - (1 - abar).sqrt() * eps) / abar.sqrt())
    return sq, torch.stack(x0, dim=1)


def _log_prob(sq: torch.Tensor, sigma: torch.Tensor, d: int) -> torch.Tensor:
    var = sigma[None, :] ** 2
    return -sq / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)


# ---------------------------------------------------------------------------------------------------
# equivalence with diffusers


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_final_latents_match_diffusers_pipeline(parts, tiny_dir, sampler, guidance):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)
    prompts, steps, seed = PROMPTS[:2], 5, 123
    # diffusers with a list of generators draws each sample's noise from its own generator:
    # first the initial latent (here drawn by us and passed as latents=), then one draw per step.
    gens = make_generators([seed, seed + 1])
    init = torch.stack([torch.randn(parts.latent_shape, generator=g) for g in gens])
    ref = pipe(
        prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, latents=init.clone(),
        generator=gens, output_type="latent", height=16, width=16,
    ).images

    traj = sampler.sample(prompts, num_steps=steps, guidance=guidance, eta=1.0, seed=seed)
    assert torch.equal(traj.latents[:, 0], init)
    assert traj.timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    assert _rel_err(traj.final_latents, ref) < 1e-5
    assert not torch.allclose(traj.final_latents, init)


# ---------------------------------------------------------------------------------------------------
# recorded likelihoods


def test_recorded_residuals_are_the_stored_transitions_likelihood(parts, sampler):
    steps, guidance = 4, 4.0
    traj = sampler.sample(PROMPTS, num_steps=steps, guidance=guidance, seed=5, record_x0_steps=(0, 2, 3))
    B, T, D = 3, steps, traj.latent_dim
    assert traj.latents.shape == (B, T + 1, *parts.latent_shape) and traj.latents.dtype == torch.float32
    assert traj.sq_residual.shape == (B, T) and traj.sq_residual.dtype == torch.float32
    assert traj.timesteps.dtype == torch.int64 and traj.timesteps.shape == (T,)
    assert traj.coef_a.dtype == torch.float64 and traj.prompts == PROMPTS and traj.prompt_ids.tolist() == [0, 1, 2]

    # UNet in fp32 (as sampled), residual in float64: the stored likelihood to fp32 rounding
    sq32, x0 = recompute(parts, parts.unet, traj)
    want = _log_prob(sq32, traj.sigma, D)
    torch.testing.assert_close(traj.log_prob("sum"), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(traj.log_prob("mean"), want / D, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traj.sq_residual.double(), sq32, rtol=1e-5, atol=1e-6)
    # UNet in float64 too: the whole transition density in float64
    sq64, _ = recompute(parts, parts.unet, traj, model_dtype=torch.float64)
    torch.testing.assert_close(traj.log_prob("sum"), _log_prob(sq64, traj.sigma, D), rtol=1e-4, atol=1e-3)
    # x̂0 predictions at the chosen steps
    assert traj.x0_steps == (0, 2, 3) and traj.x0.shape == (B, 3, *parts.latent_shape)
    torch.testing.assert_close(traj.x0.double(), x0[:, [0, 2, 3]], rtol=1e-5, atol=1e-5)
    # the policy is the reference: its residual is the reference residual, at no cost
    assert traj.ref_sq_residual is None
    again = sampler.sample(PROMPTS, num_steps=steps, guidance=guidance, seed=5, ref_residual=True)
    assert again.ref_sq_residual is again.sq_residual and again.ref_sq is again.old_sq


def test_low_precision_storage_is_self_consistent(parts, sampler):
    traj = sampler.sample(PROMPTS[:2], num_steps=3, guidance=3.0, seed=1, latent_dtype=torch.bfloat16)
    assert traj.latents.dtype == torch.bfloat16 and traj.sq_residual.dtype == torch.float32
    sq, _ = recompute(parts, parts.unet, traj)  # from the bf16 values as stored
    torch.testing.assert_close(traj.sq_residual.double(), sq, rtol=1e-5, atol=1e-6)


def test_ref_residual_with_lora_policy(parts):
    unet = copy.deepcopy(parts.unet)
    unet.add_adapter(_lora_config())
    s = Sampler(unet=unet, encoder=PromptEncoder.from_parts(parts), scheduler_config=parts.scheduler_config)
    traj = s.sample(PROMPTS[:2], num_steps=3, guidance=3.0, seed=2, ref_residual=True)
    assert traj.policy_has_adapters
    assert traj.ref_sq_residual is not None and traj.ref_sq_residual is not traj.sq_residual
    assert not torch.allclose(traj.ref_sq_residual, traj.sq_residual, rtol=1e-3)
    ref_sq, _ = recompute(parts, parts.unet, traj)  # base model = adapters off
    torch.testing.assert_close(traj.ref_sq_residual.double(), ref_sq, rtol=1e-5, atol=1e-6)
    pol_sq, _ = recompute(parts, unet, traj)
    torch.testing.assert_close(traj.sq_residual.double(), pol_sq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traj.log_prob(ref=True), _log_prob(ref_sq, traj.sigma, traj.latent_dim),
                               rtol=1e-5, atol=1e-4)
    # the adapters are on again after sampling
    from fastdense.models.loading import has_adapters

    assert has_adapters(unet)
    no_ref = s.sample(PROMPTS[:2], num_steps=3, guidance=3.0, seed=2)
    assert no_ref.ref_sq_residual is None and torch.equal(no_ref.latents, traj.latents)


# ---------------------------------------------------------------------------------------------------
# reproducibility


def test_seed_is_bitwise_reproducible_and_batch_independent(parts, sampler):
    kw = dict(num_steps=3, guidance=3.0)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    fixed = Sampler(parts, micro_batch=2)
    a = fixed.sample(prompts, seed=7, **kw)
    b = fixed.sample(prompts, seed=7, **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.sq_residual, b.sq_residual)
    assert a.seeds.tolist() == [7, 8, 9, 10, 11] and a.info["micro_batch"] == 2

    # the same micro-batch size, other batches: bitwise the same samples
    sub = fixed.sample(prompts[2:4], seed=[9, 10], **kw)
    assert torch.equal(sub.latents, a.latents[2:4]) and torch.equal(sub.sq_residual, a.sq_residual[2:4])
    one = fixed.sample(prompts[3:4], seed=10, **kw)
    assert torch.equal(one.latents[0], a.latents[3])

    # other micro-batch sizes: the same noise (bitwise) and the same samples to fp32 rounding
    for mb in (None, 1, 3):
        c = Sampler(parts, micro_batch=mb).sample(prompts, seed=7, **kw)
        assert torch.equal(c.latents[:, 0], a.latents[:, 0])
        torch.testing.assert_close(c.latents, a.latents, rtol=1e-5, atol=1e-5)

    gens = make_generators([7, 8, 9, 10, 11])
    d = fixed.sample(prompts, generators=gens, **kw)
    assert torch.equal(d.latents, a.latents) and d.seeds is None
    e = fixed.sample(prompts[:1], seed=8, **kw)  # seed 8 with prompt 0: sample 1's noise, another prompt
    assert torch.equal(e.latents[0, 0], a.latents[1, 0]) and not torch.equal(e.latents[0, -1], a.latents[1, -1])


def test_embeddings_are_cached_across_calls(parts):
    s = Sampler(parts)
    s.sample(PROMPTS + PROMPTS[:1], num_steps=1, guidance=2.0)
    assert s.encoder.calls == 2 and s.encoder.encoded == 4  # 3 unique prompts + ""
    s.sample(PROMPTS[::-1], num_steps=1, guidance=2.0)
    assert s.encoder.calls == 2
    s.sample(["a new prompt"], num_steps=1, guidance=1.0)
    assert s.encoder.calls == 3 and s.encoder.encoded == 5


def test_progress_eta_zero_and_functional_entry(parts):
    ticks = []
    parts.unet.train()
    try:
        traj = sample(parts, PROMPTS, num_steps=2, guidance=2.0, eta=0.0, micro_batch=2, progress=ticks.append)
        assert parts.unet.training  # sampled in eval mode, the caller's mode restored
    finally:
        parts.unet.eval()
    assert sum(ticks) == 3 * 2 and ticks == [2, 2, 1, 1]
    assert torch.equal(traj.sq_residual, torch.zeros_like(traj.sq_residual))  # σ = 0: x' = μ exactly
    with pytest.raises(FastdenseError, match="no density"):
        traj.log_prob()


def test_compiled_unet_reuses_its_graph(parts):
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        s = Sampler(parts, micro_batch=2, compile=True, compile_options={"backend": counting_backend})
        assert s.compile
        first = s.sample(PROMPTS, num_steps=3, guidance=3.0, seed=3)
        n = len(compiled)
        assert n >= 1
        s.sample(PROMPTS[:1] * 4, num_steps=4, guidance=3.0, seed=4)  # other timesteps, batch size, prompts
        assert len(compiled) == n, "the step loop recompiled"
        plain = Sampler(parts, micro_batch=2).sample(PROMPTS, num_steps=3, guidance=3.0, seed=3)
        torch.testing.assert_close(first.latents, plain.latents, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# decode, options, errors


def test_decode_vae_and_pixel_space(parts, sampler, tmp_path):
    traj = sampler.sample(PROMPTS, num_steps=2, guidance=3.0)
    images = decode(parts, traj.final_latents, batch_size=2)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    with torch.no_grad():
        want = parts.vae.decode(traj.final_latents / parts.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (want / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)

    pixel = load_pipeline_parts(build_tiny_pipeline(tmp_path / "pix", with_vae=False, in_channels=3, sample_size=4))
    ptraj = Sampler(pixel).sample(["a cat"], num_steps=2, guidance=2.0)
    img = decode(pixel, ptraj.final_latents)
    torch.testing.assert_close(img, (ptraj.final_latents / 2 + 0.5).clamp(0, 1))
    with pytest.raises(FastdenseError, match="channels"):
        decode(pixel, torch.zeros(1, 4, 4, 4))


def test_defaults_and_bad_arguments(parts, sampler):
    assert sampler.compile is False  # CPU default
    with pytest.raises(FastdenseError, match="xformers"):
        Sampler(parts, attention="xformers")
    with pytest.raises(FastdenseError, match="attention"):
        Sampler(parts, attention="flash")
    with pytest.raises(FastdenseError, match="micro_batch"):
        Sampler(parts, micro_batch=0)
    bad = [
        (dict(prompts=[], num_steps=2, guidance=1.0), "no prompts"),
        (dict(prompts="a cat", num_steps=2, guidance=1.0), "list of strings"),
        (dict(prompts=["a"], num_steps=0, guidance=1.0), "num_steps"),
        (dict(prompts=["a"], num_steps=2, guidance=float("nan")), "guidance"),
        (dict(prompts=["a"], num_steps=2, guidance=-1.0), "guidance"),
        (dict(prompts=["a"], num_steps=2, guidance=1.0, record_x0_steps=(2,)), "record_x0_steps"),
        (dict(prompts=["a", "b"], num_steps=2, guidance=1.0, seed=[1]), "seeds"),
        (dict(prompts=["a"], num_steps=2, guidance=1.0, generators=make_generators([1, 2])), "generators"),
        (dict(prompts=["a"], num_steps=2, guidance=1.0, latent_dtype=torch.int32), "latent_dtype"),
    ]
    for kwargs, match in bad:
        prompts = kwargs.pop("prompts")
        with pytest.raises(FastdenseError, match=match):
            sampler.sample(prompts, **kwargs)


def test_sampling_without_recording_gives_the_same_final_latents(tmp_path):
    from fastdense.models import load_pipeline_parts
    from fastdense.sampler import Sampler
    from fastdense.testing import build_tiny_pipeline

    parts = load_pipeline_parts(build_tiny_pipeline(tmp_path / "m"))
    sampler = Sampler(parts)
    for steps in (3, 4):  # odd and even chains end in different ping-pong slots
        full = sampler.sample(["a red circle", "a blue square"], num_steps=steps, guidance=3.0, seed=7)
        light = sampler.sample(["a red circle", "a blue square"], num_steps=steps, guidance=3.0, seed=7,
                               record=False)
        assert light.latents.shape[1] == 2 and not light.info["recorded"]
        assert torch.equal(light.final_latents, full.final_latents)
        assert torch.equal(light.sq_residual, full.sq_residual)
