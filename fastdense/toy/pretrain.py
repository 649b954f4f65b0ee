"""Pretraining the toy model from scratch on freshly rendered toy images.

Text encoder and UNet are trained jointly with the standard ε-prediction MSE
objective. Each step renders ``batch_size`` new scenes (held-out combinations
excluded). A fraction ``wrong_color_fraction`` of the captions name a wrong shape
colour (another palette colour, never the background's), so the model follows
colour words imperfectly and alignment has something to fix; ``cfg_dropout`` of
the captions are replaced by the empty prompt (classifier-free guidance).

Offset noise (``offset_noise``, as in SD fine-tuning practice): the training noise
gets a per-image, per-channel constant ``offset_noise * N(0, 1)`` added. Without it
the tiny model reads the background colour off the mean of ``x_t`` (16x16 images
average the noise away) instead of off the prompt, and at sampling time the
background follows the seed's noise mean; with it, the colour has to come from the
prompt. Sampling is unchanged (iid Gaussian noise, the sampler's usual DDIM steps).

Reproducible: everything random comes from ``seed`` (numpy ``PCG64`` for the
scenes, a torch generator for timesteps and noise, ``manual_seed`` for the
initial weights), so the same seed, steps and thread count give bitwise-equal
weights on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastdense.errors import FastdenseError
from fastdense.toy.colors import COLOR_NAMES
from fastdense.toy.model import ToyModelConfig, build_toy_model, config_dict, save_toy_model, toy_scheduler_config
from fastdense.toy.world import Scene, caption, is_heldout, random_scene, render_batch

__all__ = ["PretrainConfig", "PretrainResult", "make_batch", "pretrain"]


@dataclass(frozen=True)
class PretrainConfig:
    """Training settings (the defaults trained the shipped model)."""

    seed: int = 0
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    wrong_color_fraction: float = 0.3
    cfg_dropout: float = 0.1
    size_word_fraction: float = 0.75
    offset_noise: float = 0.3
    model: ToyModelConfig = field(default_factory=ToyModelConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps={self.steps} is not allowed; allowed: >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} is not allowed; allowed: >= 1"),
            (self.lr > 0, f"lr={self.lr} is not allowed; allowed: > 0"),
            (0.0 <= self.wrong_color_fraction <= 1.0,
             f"wrong_color_fraction={self.wrong_color_fraction} is not allowed; allowed: 0..1"),
            (0.0 <= self.cfg_dropout < 1.0, f"cfg_dropout={self.cfg_dropout} is not allowed; allowed: 0 <= p < 1"),
            (0.0 <= self.size_word_fraction <= 1.0,
             f"size_word_fraction={self.size_word_fraction} is not allowed; allowed: 0..1"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay} is not allowed; allowed: 0 <= d < 1"),
            (self.offset_noise >= 0, f"offset_noise={self.offset_noise} is not allowed; allowed: >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise FastdenseError(message)


@dataclass
class PretrainResult:
    out: Path
    seconds: float
    final_loss: float
    losses: list[float]


def _training_caption(scene: Scene, rng: np.random.Generator, config: PretrainConfig) -> str:
    if rng.random() < config.cfg_dropout:
        return ""
    with_size = bool(rng.random() < config.size_word_fraction)
    named = scene.color
    if rng.random() < config.wrong_color_fraction:
        choices = [
            c for c in COLOR_NAMES
            if c not in (scene.color, scene.background) and not is_heldout(c, scene.shape, scene.background)
        ]
        named = choices[int(rng.integers(len(choices)))]
    return caption(scene, with_size=with_size, color=named)


def make_batch(rng: np.random.Generator, config: PretrainConfig) -> tuple[list[Scene], list[str]]:
    """One training batch: fresh scenes (held-out combinations excluded) and their captions."""
    scenes = [random_scene(rng) for _ in range(config.batch_size)]
    captions = [_training_caption(s, rng, config) for s in scenes]
    return scenes, captions


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_fraction + (1.0 - config.min_lr_fraction) * cosine


def optimizer_step(loss, optimizer, params, ema, step: int, config: PretrainConfig) -> float:
    """One update of a toy model's pretraining (the SD toy's and the flow toy's): the warm-up + cosine
    learning rate, backward, gradient clipping, AdamW, the EMA of the weights; returns the loss."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = config.lr * _lr_factor(step, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    with torch.no_grad():
        decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
    return float(loss.detach())


def pretrain(
    out: str | Path,
    config: PretrainConfig = PretrainConfig(),
    *,
    threads: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    extra_info: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train the toy model from scratch and save it (EMA weights) under ``out``.

    ``progress(step, loss)`` is called after every step. ``threads`` sets
    ``torch.set_num_threads`` for the run (restored afterwards).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler

    if threads is not None and threads < 1:
        raise FastdenseError(f"threads={threads} is not allowed; allowed: >= 1")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        start = time.perf_counter()
        tokenizer, text_encoder, unet = build_toy_model(config.model, seed=config.seed)
        text_encoder.train()
        unet.train()
        params = [*unet.parameters(), *text_encoder.parameters()]
        ema = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

        # The schedule exactly as the saved DDIMScheduler computes it.
        sched = toy_scheduler_config()
        alphas_cumprod = DDIMScheduler(**sched).alphas_cumprod.double()
        sqrt_ab = alphas_cumprod.sqrt().float()
        sqrt_1mab = (1.0 - alphas_cumprod).sqrt().float()

        rng = np.random.default_rng([config.seed, 1])
        gen = torch.Generator().manual_seed(config.seed + 2)
        res = config.model.resolution
        losses: list[float] = []
        for step in range(config.steps):
            scenes, captions = make_batch(rng, config)
            x0 = render_batch(scenes, res) * 2.0 - 1.0
            t = torch.randint(0, sched["num_train_timesteps"], (config.batch_size,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            if config.offset_noise > 0:
                offset = torch.randn((config.batch_size, x0.shape[1], 1, 1), generator=gen)
                noise = noise + config.offset_noise * offset
            xt = sqrt_ab[t, None, None, None] * x0 + sqrt_1mab[t, None, None, None] * noise
            ids = tokenizer(
                captions, padding="max_length", max_length=config.model.max_length, truncation=True,
                return_tensors="pt",
            ).input_ids
            emb = text_encoder(ids)[0]
            pred = unet(xt, t, encoder_hidden_states=emb, return_dict=False)[0]
            loss = F.mse_loss(pred, noise)

            losses.append(optimizer_step(loss, optimizer, params, ema, step, config))
            if progress is not None:
                progress(step, losses[-1])

        with torch.no_grad():
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
        seconds = time.perf_counter() - start
        info = {
            "pretrain": {k: v for k, v in asdict(config).items() if k != "model"},
            "model": config_dict(config.model),
            "threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            "final_loss_avg100": float(np.mean(losses[-100:])),
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "torch": torch.__version__,
            "image_convention": "pixel space, x = 2 * image - 1 (decode: x / 2 + 0.5)",
        }
        if extra_info:
            info.update(extra_info)
        path = save_toy_model(out, tokenizer, text_encoder.eval(), unet.eval(), info)
        return PretrainResult(path, seconds, info["final_loss_avg100"], losses)
    finally:
        torch.set_num_threads(old_threads)
