"""Each model family's denoiser at its real shapes (random weights) for a GPU run, or its tiny
test pipeline for a CPU dry run, timed through fastdense's own code paths: one sampling step
(the CFG model call through the family's backbone + the fused step) and one training
micro-batch (LoRA on the backbone's default targets, the batched policy pass, the fused
log-ratio op, backward).

Real shapes: the published ``config.json`` of each denoiser — SD 1.5's UNet, SDXL base 1.0's
UNet, SD3.5 Medium's MMDiT, FLUX.1-dev's transformer — built with random weights; the text
encoders are not built: the conditioning is random of the shapes the real encoders give (CLIP
77 tokens; SD3: 77 CLIP + 256 T5 tokens; FLUX: 512 T5 tokens; pooled vectors packed as
:func:`fastdense.models.backbone.pack_conditioning` does). ``parameter_count`` counts a
denoiser's parameters on the meta device (no memory), which the tests hold against the
published model sizes. Used by ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fastdense.benchmarks.timing import sync

__all__ = ["REAL_SHAPES", "FamilyRow", "RealShape", "build_real_backbone", "parameter_count", "time_family"]


@dataclass(frozen=True)
class RealShape:
    """One family's real denoiser: its diffusers class and config, image size, conditioning shapes."""

    model: str  # the hub id whose config this is
    denoiser_class: str
    config: dict[str, Any]
    resolution: int  # pixels (the family preset's); latents are resolution / 8
    latent_channels: int
    tokens: int  # conditioning tokens per prompt
    token_dim: int
    pooled_dim: int  # 0: no pooled vector


REAL_SHAPES: dict[str, RealShape] = {
    "sd": RealShape(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "UNet2DConditionModel",
        dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
             block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        512, 4, 77, 768, 0,
    ),  # the sd15-* presets' 512 px
    "sdxl": RealShape(
        "stabilityai/stable-diffusion-xl-base-1.0", "UNet2DConditionModel",
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
             block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
             transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        1024, 4, 77, 2048, 1280,
    ),  # the sdxl preset's 1024 px
    "sd3": RealShape(
        "stabilityai/stable-diffusion-3.5-medium", "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13))),
        512, 16, 77 + 256, 4096, 2048,
    ),  # the sd35-medium preset's 512 px (Flow-GRPO's)
    "flux": RealShape(
        "black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        512, 16, 512, 4096, 768,
    ),  # the flux-dev preset's 512 px
}
#: what the flow families' step tables come from (their schedulers' configs)
FLOW_SCHEDULERS = {
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096},
}
SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def _denoiser_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def parameter_count(family: str) -> int:
    """Parameters of the family's real denoiser, counted on the meta device (nothing allocated)."""
    shape = REAL_SHAPES[family]
    with torch.device("meta"):
        model = _denoiser_class(shape.denoiser_class)(**shape.config)
    return sum(p.numel() for p in model.parameters())


class RandomConditioning:
    """A stand-in prompt encoder: fixed random packed conditioning per prompt (seeded by the
    prompt's CRC32), of the shape the family's real text encoders give."""

    def __init__(self, shape: RealShape, *, device, dtype):
        from fastdense.models.prompts import EmbeddingCache

        class _Cache(EmbeddingCache):
            def _run(cache, prompts: list[str]) -> torch.Tensor:
                from fastdense.models.backbone import pack_conditioning

                rows = []
                for prompt in prompts:
                    g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
                    tokens = torch.randn((1, shape.tokens, shape.token_dim), generator=g)
                    if shape.pooled_dim:
                        rows.append(pack_conditioning(tokens, torch.randn((1, shape.pooled_dim), generator=g))[0])
                    else:
                        rows.append(tokens[0])
                return torch.stack(rows).to(device=cache.device, dtype=cache.dtype)

        self.cache = _Cache(device=device, dtype=dtype)


def build_real_backbone(family: str, device: torch.device, dtype: torch.dtype, *, resolution: int | None = None):
    """(backbone, latent shape (C, H, W), scheduler config) of the family's real denoiser with random
    weights on ``device`` in ``dtype``, conditioned by :class:`RandomConditioning`."""
    from fastdense.models.backbone import UNetBackbone
    from fastdense.models.flux import FluxBackbone
    from fastdense.models.sd3 import SD3Backbone
    from fastdense.models.sdxl import SDXLBackbone

    shape = REAL_SHAPES[family]
    torch.manual_seed(0)
    # built on the device in the model dtype: FLUX's 11.9 B parameters never pass through fp32 host memory
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            denoiser = _denoiser_class(shape.denoiser_class)(**shape.config).eval()
    finally:
        torch.set_default_dtype(previous)
    denoiser.requires_grad_(False)
    encoder = RandomConditioning(shape, device=device, dtype=dtype).cache
    side = (resolution or shape.resolution) // 8
    latent = (shape.latent_channels, side, side)
    if family == "sd":
        return UNetBackbone(denoiser, encoder), latent, SD_SCHEDULER
    if family == "sdxl":
        backbone = SDXLBackbone(denoiser, encoder, vae_scale_factor=8, zero_negative=True, max_length=77)
        return backbone, latent, {**SD_SCHEDULER, "timestep_spacing": "leading"}
    if family == "sd3":
        return SD3Backbone(denoiser, encoder, scheduler_config=FLOW_SCHEDULERS["sd3"]), latent, FLOW_SCHEDULERS["sd3"]
    return FluxBackbone(denoiser, encoder), latent, FLOW_SCHEDULERS["flux"]


def build_tiny_backbone(family: str, device: torch.device, dtype: torch.dtype, workdir):
    """(backbone, latent shape, scheduler config) of the family's tiny test pipeline (a CPU dry run)."""
    from pathlib import Path

    from fastdense.benchmarks.sampler import TINY_RESOLUTION, build_tiny_family
    from fastdense.models import load_pipeline_parts
    from fastdense.models.families import backbone_for

    parts = load_pipeline_parts(build_tiny_family(family, Path(workdir) / family), dtype=dtype, device=device,
                                resolution=TINY_RESOLUTION.get(family))
    return backbone_for(parts), parts.latent_shape, parts.scheduler_config


@dataclass
class FamilyRow:
    family: str
    model: str  # what was timed
    latent: str
    batch: int  # samples per sampling step; items per training micro-batch
    sample_step_ms: float  # one CFG model call through the backbone + the fused step
    train_microbatch_ms: float  # LoRA policy pass + fused log-ratio forward and backward
    peak_mem_mb: float | None
    device: str

    def as_dict(self) -> dict:
        return asdict(self)


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_family(family: str, backbone, latent: tuple[int, ...], scheduler_config: dict, device: torch.device, *,
                model: str, batch: int = 4, guidance: float = 4.5, repeats: int = 3, num_steps: int = 10) -> FamilyRow:
    """One sampling step and one training micro-batch of ``batch`` samples / items through ``backbone``."""
    from fastdense.kernels.ddim_step import ddim_step
    from fastdense.kernels.log_ratio import log_ratio
    from fastdense.lora import add_lora, trainable_parameters
    from fastdense.schedule import make_step_table

    table = make_step_table(scheduler_config, num_steps, eta=0.7 if backbone.flow else 1.0,
                            **backbone.table_options(latent))
    prompts = [f"prompt {i}" for i in range(batch)]
    cond = backbone.encode(prompts)
    cfg = backbone.uses_cfg(guidance)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((batch, *latent), generator=g).to(device)
    x_next = torch.randn((batch, *latent), generator=g).to(device)
    noise = torch.randn((batch, *latent), generator=g).to(device)
    t = table.timesteps[0].to(device)
    a, b, sigma = table.coefs(0)

    def sample_step():
        with torch.no_grad():
            rows = backbone.batch(cond, cfg=cfg, guidance=guidance)
            rows.load(x)
            out_u, out_c = backbone.output(rows, t)
            ddim_step(x, out_c, out_u, noise, a, b, sigma, guidance, out=torch.empty_like(x))

    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sample_ms = _median_ms(sample_step, repeats, device)

    add_lora(backbone.denoiser, 32, 32, list(backbone.default_lora_targets))
    params = trainable_parameters(backbone.denoiser)
    steps = torch.arange(batch) % table.num_steps
    ts = table.timesteps[steps].to(device)
    ca, cb, cs = (v.to(device) for v in table.coefs_at(steps, dtype=torch.float32))
    ref_sq = torch.zeros(batch, device=device)
    traj = torch.arange(batch, device=device) // 2

    def train_microbatch():
        out_u, out_c = backbone(x, ts, cond, cfg=cfg, guidance=guidance)
        logits = log_ratio(out_c, out_u, x, x_next, ca, cb, cs, ref_sq, 1.0, traj, (batch + 1) // 2,
                           guidance=guidance if cfg else 1.0).logits
        logits.sum().backward()
        for p in params:
            p.grad = None

    train_ms = _median_ms(train_microbatch, repeats, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return FamilyRow(family=family, model=model, latent="x".join(map(str, latent)), batch=batch,
                     sample_step_ms=sample_ms, train_microbatch_ms=train_ms, peak_mem_mb=peak, device=device.type)


def run_family_benchmarks(device: torch.device, *, dry_run: bool, families=tuple(REAL_SHAPES), batch: int = 4,
                          repeats: int = 3, workdir=None, progress=None) -> list[FamilyRow]:
    """Every family: real shapes with random weights (bf16 on CUDA), or the tiny pipelines (dry run, fp32)."""
    rows = []
    for family in families:
        if progress is not None:
            progress(f"family {family}")
        if dry_run:
            backbone, latent, sched = build_tiny_backbone(family, device, torch.float32, workdir)
            model = f"tiny {family} test pipeline"
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            backbone, latent, sched = build_real_backbone(family, device, dtype)
            model = f"{REAL_SHAPES[family].model} shapes, random weights"
        rows.append(time_family(family, backbone, latent, sched, device, model=model, batch=batch,
                                repeats=repeats))
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
