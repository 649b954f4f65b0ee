"""Side-by-side sampler benchmark: our recording sampler vs the same loop without
recording vs the family's diffusers pipeline (``output_type="latent"``), at the same model,
batch, steps and guidance; eager and ``torch.compile``d.

``backbone``: sd (``StableDiffusionPipeline``, DDIM eta 1), sdxl (``StableDiffusionXLPipeline``,
DDIM eta 1), sd3 (``StableDiffusion3Pipeline``) or flux (``FluxPipeline``); for the flow families
fastdense samples with the SDE (what training records) and diffusers with its own deterministic
Euler step: the same model calls per step, so the comparison is of everything around them.

CPU: the family's tiny test pipeline (fast to build, no download). GPU (``gpu_shapes=True``, SD
only): an SD1.5-shaped UNet (random weights) at 64×64 latents. Used by
``fastdense bench sampler`` and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdense.benchmarks.timing import sync

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


@dataclass
class SamplerRow:
    impl: str  # fastdense (recording), fastdense_norecord, diffusers
    compiled: bool
    batch: int
    steps: int
    guidance: float
    seconds_per_trajectory: float
    total_s: float
    peak_mem_mb: float
    mem_kind: str  # "cuda max_memory_allocated" or "cpu peak RSS growth"
    device: str
    model: str
    record_overhead: float | None = None  # recording / no-recording time - 1
    speedup_vs_diffusers_eager: float | None = None
    backbone: str = "sd"

    def as_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on CPU the RSS growth sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._proc = psutil.Process()
            self._base = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_mb = (self._peak - self._base) / 2**20
        return False


#: each family's tiny offline pipeline (module:function, building a diffusers directory)
TINY_BUILDERS = {
    "sd": "fastdense.testing:build_tiny_pipeline",
    "sdxl": "fastdense.models.tiny_sdxl:build_tiny_sdxl_pipeline",
    "sd3": "fastdense.models.tiny_sd3:build_tiny_sd3_pipeline",
    "flux": "fastdense.models.tiny_flux:build_tiny_flux_pipeline",
}
BACKBONES = tuple(TINY_BUILDERS)
#: image size of a family's tiny pipeline where its config has none (FLUX's default would be 1024 px)
TINY_RESOLUTION = {"flux": 16}


def build_tiny_family(backbone: str, root: Path) -> Path:
    """The tiny offline pipeline of a family, saved under ``root``."""
    import importlib

    from fastdense.errors import FastdenseError

    if backbone not in TINY_BUILDERS:
        raise FastdenseError(f"--backbone {backbone} is not allowed; allowed: {', '.join(BACKBONES)}")
    module, _, name = TINY_BUILDERS[backbone].partition(":")
    build = getattr(importlib.import_module(module), name)
    return build(root, sample_size=16) if backbone == "sd" else build(root)


def build_benchmark_parts(device: torch.device, gpu_shapes: bool, workdir: Path, dtype: torch.dtype,
                          backbone: str = "sd"):
    """PipelineParts for the benchmark: the family's tiny pipeline, or (GPU, SD) an SD1.5-shaped UNet in it."""
    from fastdense.errors import FastdenseError
    from fastdense.models import load_pipeline_parts

    if gpu_shapes and backbone != "sd":
        raise FastdenseError(f"--gpu-shapes is SD1.5's; for --backbone {backbone} use the tiny shapes (--tiny)")
    path = build_tiny_family(backbone, workdir / "tiny")
    parts = load_pipeline_parts(path, dtype=dtype, device=device, resolution=TINY_RESOLUTION.get(backbone))
    if gpu_shapes:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        parts.unet = UNet2DConditionModel(**SD15_UNET).to(device=device, dtype=dtype).eval()
        cfg = parts.text_encoder.config.to_dict()
        cfg.update(hidden_size=768, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=12,
                   projection_dim=768)
        parts.text_encoder = CLIPTextModel(CLIPTextConfig(**cfg)).to(device=device, dtype=dtype).eval()
        parts.latent_size = (64, 64)
    return parts


def bench_prompts(tokenizer, count: int) -> list[str]:
    """``count`` distinct prompts that fit the tokenizer's window, so neither our encoder nor
    diffusers truncates (and warns about) them: whole phrases while they fit, the number first."""
    limit = int(tokenizer.model_max_length)
    prompts = []
    for i in range(count):
        prompt = f"{i} red circles"
        for phrase in ("on a blue background", "in soft light"):
            longer = f"{prompt} {phrase}"
            if len(tokenizer(longer, verbose=False).input_ids) > limit:
                break
            prompt = longer
        prompts.append(prompt)
    return prompts


def _diffusers_pipeline(parts, compiled: bool):
    """The family's diffusers pipeline on the same modules (the UNet / transformer maybe compiled)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    denoiser = torch.compile(parts.unet, dynamic=False) if compiled else parts.unet
    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    extra = {k: v for k, v in parts.extra.items()}
    if parts.family == "sd":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**common, unet=denoiser, scheduler=DDIMScheduler.from_config(
            parts.scheduler_config), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif parts.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**common, **extra, unet=denoiser,
                                         scheduler=DDIMScheduler.from_config(parts.scheduler_config))
    elif parts.family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(**common, **extra, transformer=denoiser,
                                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config))
    else:
        from diffusers import FluxPipeline

        pipe = FluxPipeline(**common, **extra, transformer=denoiser,
                            scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sampler_benchmarks(
    device: torch.device,
    *,
    gpu_shapes: bool = False,
    batch: int = 8,
    steps: int | None = None,
    guidance: float = 7.5,
    repeats: int = 3,
    compile_modes: Iterable[bool] = (False, True),
    impls: Iterable[str] = ("fastdense", "fastdense_norecord", "diffusers"),
    progress: Callable[[str], None] | None = None,
    backbone: str = "sd",
) -> list[SamplerRow]:
    from fastdense.sampler import Sampler

    steps = steps or (50 if gpu_shapes else 20)
    dtype = torch.float16 if (gpu_shapes and device.type == "cuda") else torch.float32
    rows: list[SamplerRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_benchmark_parts(device, gpu_shapes, Path(tmp), dtype, backbone)
        prompts = bench_prompts(parts.tokenizer, batch)
        h, w = parts.latent_size
        model_name = ("sd15-shaped unet, 64x64 latents" if gpu_shapes
                      else f"tiny {backbone} test pipeline, {h}x{w} latents")
        # the diffusers pipelines' own step: DDIM eta 1 for the UNet families; their Euler ODE for flow models
        theirs_kw = {"eta": 1.0} if parts.family in ("sd", "sdxl") else {}
        for compiled in compile_modes:
            sampler = Sampler(parts, micro_batch=batch, compile=compiled)
            pipe = _diffusers_pipeline(parts, compiled) if "diffusers" in impls else None

            def ours(record: bool, sampler=sampler):
                return sampler.sample(prompts, num_steps=steps, guidance=guidance, seed=0, record=record)

            def theirs(pipe=pipe):
                gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
                return pipe(prompts, height=h * parts.vae_scale_factor, width=w * parts.vae_scale_factor,
                            num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                            output_type="latent", **theirs_kw)

            calls = {
                "fastdense": lambda: ours(True),
                "fastdense_norecord": lambda: ours(False),
                "diffusers": theirs,
            }
            impls = list(impls)
            for impl in impls:  # warm-up (and compilation)
                if progress is not None:
                    progress(f"warm-up {impl} compiled={compiled}")
                calls[impl]()
            sync(device)
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            peaks: dict[str, float] = dict.fromkeys(impls, 0.0)
            for rep in range(repeats):  # round-robin, so machine drift hits every impl alike
                for impl in impls:
                    if progress is not None:
                        progress(f"{impl} compiled={compiled} repeat {rep + 1}/{repeats}")
                    with PeakMemory(device) as mem:
                        start = time.perf_counter()
                        calls[impl]()
                        sync(device)
                        times[impl].append(time.perf_counter() - start)
                    peaks[impl] = max(peaks[impl], mem.peak_mb)
            for impl in impls:
                total = statistics.median(times[impl])
                rows.append(SamplerRow(
                    impl=impl, compiled=compiled, batch=batch, steps=steps, guidance=guidance,
                    seconds_per_trajectory=total / batch, total_s=total, peak_mem_mb=peaks[impl],
                    mem_kind="cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS growth",
                    device=device.type, model=model_name, backbone=backbone,
                ))
    by_key = {(r.impl, r.compiled): r for r in rows}
    diffusers_eager = by_key.get(("diffusers", False))
    for r in rows:
        norec = by_key.get(("fastdense_norecord", r.compiled))
        if r.impl == "fastdense" and norec is not None:
            r.record_overhead = r.total_s / norec.total_s - 1
        if diffusers_eager is not None:
            r.speedup_vs_diffusers_eager = diffusers_eager.total_s / r.total_s
    return rows
