"""fastdense.models.backbone: the CFG model call against direct UNet calls, padding, the no-CFG
path, the exact tensors fed to the model, and one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.models import Backbone, CFGBatch, UNetBackbone, cfg_enabled
from fastdense.models.loading import load_pipeline_parts
from fastdense.models.prompts import PromptEncoder
from fastdense.sampler import Sampler

PROMPTS = ["a red cat", "the dog", "a cat and a dog"]


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return load_pipeline_parts(tiny_dir)


@pytest.fixture(scope="module")
def backbone64(parts):
    """The tiny UNet in float64, so batched and separate calls agree to rounding."""
    unet = copy.deepcopy(parts.unet).to(torch.float64).eval()
    return UNetBackbone(unet, PromptEncoder.from_parts(parts))


@pytest.fixture(scope="module")
def backbone(parts):
    return UNetBackbone(parts.unet.eval(), PromptEncoder.from_parts(parts))


def _latents(n: int, shape, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Recorder(torch.nn.Module):
    """Stands in for the UNet: records what it is called with, returns a row-wise function of x."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, *, encoder_hidden_states, return_dict):
        self.calls.append((x.clone(), t.clone(), encoder_hidden_states.clone(), encoder_hidden_states.is_contiguous()))
        return (x * 2 + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None],)


def test_cfg_output_equals_two_separate_calls(parts, backbone64):
    unet = backbone64.unet
    cond = backbone64.encode(PROMPTS)
    uncond = backbone64.unconditional()
    assert cond.dtype == uncond.dtype == torch.float64
    x = _latents(3, parts.latent_shape, torch.float64)
    t = torch.tensor([900, 500, 20])
    with torch.no_grad():
        eps_u, eps_c = backbone64(x, t, cond, cfg=True)
        want_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1), return_dict=False)[0]
        want_c = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    torch.testing.assert_close(eps_u, want_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps_c, want_c, rtol=1e-12, atol=1e-12)
    assert (eps_u - eps_c).abs().max() > 1e-6  # the two halves really differ


def test_shared_timestep_equals_per_item_timesteps(parts, backbone64):
    cond = backbone64.encode(PROMPTS)
    x = _latents(3, parts.latent_shape, torch.float64)
    with torch.no_grad():
        shared = backbone64(x, torch.tensor(500), cond, cfg=True)
        per_item = backbone64(x, torch.tensor([500, 500, 500]), cond, cfg=True)
    for a, b in zip(shared, per_item, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_padding_rows_do_not_change_the_real_rows(parts, backbone):
    """Real rows of a padded batch equal, bit for bit, the same rows of a full batch of that size
    whose other rows are different items (and a workspace holding garbage changes nothing)."""
    cond = backbone.encode(PROMPTS)
    x = _latents(3, parts.latent_shape)
    for t in (torch.tensor(700), torch.tensor([700, 300, 50])):
        with torch.no_grad():
            full = backbone(x, t, cond, cfg=True)  # 3 real rows per half
            padded = backbone(x[:2], t if t.dim() == 0 else t[:2], cond[:2], cfg=True, rows=3)
            garbage = torch.full((6, *parts.latent_shape), 1e4)
            batch = backbone.batch(cond[:2], cfg=True, rows=3, x_rows=garbage)
            batch.load(x[:2])
            reused = backbone.output(batch, t if t.dim() == 0 else t[:2])
        for want, got, got_reused in zip(full, padded, reused, strict=True):
            assert got.shape[0] == 2
            assert torch.equal(got, want[:2]) and torch.equal(got_reused, want[:2])


def test_no_cfg_returns_none_and_the_conditional_output(parts, backbone):
    cond = backbone.encode(PROMPTS)
    x = _latents(3, parts.latent_shape)
    t = torch.tensor([900, 500, 20])
    with torch.no_grad():
        eps_u, eps_c = backbone(x, t, cond, cfg=False)
        want = backbone.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    assert eps_u is None
    assert torch.equal(eps_c, want)
    assert not cfg_enabled(1.0) and cfg_enabled(7.5) and cfg_enabled(0.5) and cfg_enabled(0.0)


def test_the_model_sees_the_same_tensors_as_a_hand_built_cfg_batch(backbone):
    """The exact inputs (values, dtype, order, padding, contiguity): uncond rows then cond rows, the
    last item repeated as padding, per-item timesteps padded the same way and repeated per half."""
    rec = Recorder()
    cond = backbone.encode(PROMPTS[:2])
    uncond = backbone.unconditional()
    x = _latents(2, (4, 8, 8), torch.float64)  # stored latents in another dtype: cast to the model's
    t = torch.tensor([900, 20])

    eps_u, eps_c = backbone(x, t, cond, cfg=True, module=rec)  # the trainer's way: no padding
    (xin, tin, enc, contiguous), = rec.calls
    xm = x.to(backbone.dtype)
    assert torch.equal(xin, torch.cat([xm, xm])) and xin.dtype == backbone.dtype
    assert torch.equal(tin, torch.cat([t, t]))
    assert torch.equal(enc, torch.cat([uncond.unsqueeze(0).expand(2, -1, -1), cond])) and contiguous
    assert torch.equal(eps_u, 2 * xm + uncond.mean()) and torch.equal(eps_c[1], 2 * xm[1] + cond[1].mean())

    rec.calls.clear()
    workspace = torch.zeros((8, 4, 8, 8), dtype=backbone.dtype)
    batch = backbone.batch(cond, cfg=True, rows=4, x_rows=workspace)  # the sampler's way: padded
    batch.load(x)
    backbone.output(batch, torch.tensor(500), module=rec)
    (xin, tin, enc, contiguous), = rec.calls
    pad = cond[-1:].expand(2, -1, -1)
    assert batch.x is workspace and torch.equal(xin[[0, 1, 4, 5]], torch.cat([xm, xm]))
    assert tin.dim() == 0 and int(tin) == 500
    assert torch.equal(enc, torch.cat([uncond.unsqueeze(0).expand(4, -1, -1), cond, pad])) and contiguous
    assert torch.equal(batch.timesteps(t), torch.tensor([900, 20, 20, 20, 900, 20, 20, 20]))

    rec.calls.clear()
    batch = backbone.batch(cond, cfg=False, rows=3)
    batch.load(x)
    eps_u, eps_c = backbone.output(batch, t, module=rec)
    (xin, tin, enc, _), = rec.calls
    assert eps_u is None and eps_c.shape[0] == 2
    assert torch.equal(enc, torch.cat([cond, cond[-1:]])) and torch.equal(tin, torch.tensor([900, 20, 20]))
    assert torch.equal(xin[2], torch.zeros_like(xin[2]))  # padding rows allocated here start at zero


def test_the_sampler_and_trainer_share_one_backbone(parts):
    sampler = Sampler(parts, compile=False)
    assert isinstance(sampler.backbone, UNetBackbone)
    assert sampler.backbone.module is sampler._model and sampler.backbone.encoder is sampler.encoder
    b: Backbone = sampler.backbone  # satisfies the protocol (checked by type checkers)
    assert b.dtype == sampler.model_dtype and b.device == sampler.device


def test_unconditional_is_cached_and_refreshed_after_clear(parts):
    enc = PromptEncoder.from_parts(parts)
    bb = UNetBackbone(parts.unet, enc)
    u = bb.unconditional()
    assert bb.unconditional() is u and enc.calls == 1
    enc.clear()
    u2 = bb.unconditional()
    assert enc.calls == 2 and torch.equal(u, u2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda bb, x, c, t: bb(x[:2], t, c, cfg=True), "latents have shape (2, 4, 8, 8); expected 3 rows"),
        (lambda bb, x, c, t: bb(x, t, c[0], cfg=True), "conditioning has shape (16, 32)"),
        (lambda bb, x, c, t: bb(x, t, c, cfg=True, rows=2), "rows=2 is not allowed for 3 items"),
        (lambda bb, x, c, t: bb(x, t[:2], c, cfg=False), "timesteps have shape (2,); expected () or (3,)"),
        (lambda bb, x, c, t: bb.batch(c, cfg=True, x_rows=x), "x_rows has shape (3, 4, 8, 8)"),
        (lambda bb, x, c, t: bb.output(bb.batch(c, cfg=True), t), "the batch holds no latents"),
    ],
)
def test_bad_inputs_give_one_line_errors(parts, backbone, call, message):
    cond = backbone.encode(PROMPTS)
    x = _latents(3, parts.latent_shape)
    t = torch.tensor([900, 500, 20])
    with pytest.raises(FastdenseError) as info, torch.no_grad():
        call(backbone, x, cond, t)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_load_refuses_latents_of_another_shape(backbone):
    batch: CFGBatch = backbone.batch(backbone.encode(PROMPTS[:1]), cfg=True)
    batch.load(torch.zeros((1, 4, 8, 8)))
    with pytest.raises(FastdenseError, match=r"latents have shape \(1, 4, 4, 4\); this batch's input rows"):
        batch.load(torch.zeros((1, 4, 4, 4)))
