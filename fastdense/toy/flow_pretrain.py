"""Pretraining the flow-matching toy model (SD3-style) from scratch on freshly rendered toy images.

Rectified flow, as SD3: ``x_s = (1 - s)·x0 + s·ε``, the transformer (timestep ``s · 1000``, the
scheduler's ``num_train_timesteps``) regresses the velocity ``v = ε - x0`` (MSE). Both text
encoders and the transformer train jointly; the conditioning is
:func:`fastdense.toy.flow_model.sd3_conditioning`, the computation the ``sd3`` backbone does at
sampling time, with gradients.

The data are the SD toy's (:func:`fastdense.toy.pretrain.make_batch`): fresh scenes each step
(held-out combinations excluded), ``wrong_color_fraction`` of the captions naming a wrong shape
colour, ``cfg_dropout`` replaced by ``""``. Offset noise as in the SD toy (see
:mod:`fastdense.toy.pretrain`): without it the model reads the colours off the mean of ``x_s``
and, at sampling time, off the seed's noise instead of the prompt (2000-step trials, held-out
fidelity at guidance 3, ODE: 0.81 without, 0.94 with offset noise 0.3; more samples lose their shape).

``s`` is drawn ``uniform`` by default. SD3 draws it logit-normal(0, 1), which concentrates on
mid noise levels, where a large latent's detail is decided; here the prompt's content (two
colours, one shape) is decided at high noise (s ≳ 0.7), which logit-normal(0, 1) draws for 20 %
of the samples against 30 % for uniform (2000-step trials, same fidelity protocol: 0.86
logit-normal, 0.94 uniform; ``time_sampling="logit_normal"`` stays available). BENCHMARKS.md has
the numbers.

Reproducible: everything random comes from ``seed`` (numpy ``PCG64`` for the scenes and captions,
a torch generator for ``s`` and the noise, ``manual_seed`` for the initial weights), so the same
seed, steps and thread count give bitwise-equal weights on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastdense.errors import FastdenseError
from fastdense.toy.flow_model import (
    FlowModelConfig,
    build_flow_model,
    flow_config_dict,
    flow_scheduler_config,
    save_flow_model,
    sd3_conditioning,
)
from fastdense.toy.pretrain import PretrainConfig, PretrainResult, make_batch, optimizer_step
from fastdense.toy.world import render_batch

__all__ = ["TIME_SAMPLINGS", "FlowPretrainConfig", "pretrain_flow", "sample_noise_levels"]

#: How the noise level s of a training example is drawn.
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowPretrainConfig:
    """Training settings of the flow toy model (the defaults trained the shipped one)."""

    seed: int = 0
    steps: int = 4000
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
    time_sampling: str = "uniform"
    #: logit-normal's location and scale (SD3: 0 and 1)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    model: FlowModelConfig = field(default_factory=FlowModelConfig)

    def __post_init__(self) -> None:
        if self.time_sampling not in TIME_SAMPLINGS:
            raise FastdenseError(
                f"time_sampling={self.time_sampling!r} is not allowed; allowed: {', '.join(TIME_SAMPLINGS)}"
            )
        if not self.logit_std > 0:
            raise FastdenseError(f"logit_std={self.logit_std} is not allowed; allowed: > 0")
        self.shared()  # the SD toy's checks of the shared settings

    def shared(self) -> PretrainConfig:
        """The settings shared with the SD toy's pretraining (data, optimiser schedule), as its config:
        what :func:`make_batch` and the learning-rate schedule read."""
        names = ("seed", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "min_lr_fraction", "grad_clip",
                 "ema_decay", "wrong_color_fraction", "cfg_dropout", "size_word_fraction", "offset_noise")
        return PretrainConfig(**{name: getattr(self, name) for name in names})


def sample_noise_levels(n: int, config: FlowPretrainConfig, generator):
    """``n`` noise levels s in (0, 1) drawn from ``config.time_sampling`` with ``generator``."""
    import torch

    if config.time_sampling == "uniform":
        return torch.rand((n,), generator=generator)
    return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn((n,), generator=generator))


def pretrain_flow(
    out: str | Path,
    config: FlowPretrainConfig = FlowPretrainConfig(),
    *,
    threads: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    extra_info: dict[str, Any] | None = None,
) -> PretrainResult:
    """Train the flow toy model from scratch and save it (EMA weights) under ``out``.

    ``progress(step, loss)`` is called after every step. ``threads`` sets
    ``torch.set_num_threads`` for the run (restored afterwards).
    """
    import torch
    import torch.nn.functional as F

    if threads is not None and threads < 1:
        raise FastdenseError(f"threads={threads} is not allowed; allowed: >= 1")
    shared = config.shared()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        start = time.perf_counter()
        model = config.model
        tokenizer, text_encoder, text_encoder_2, transformer = build_flow_model(model, seed=config.seed)
        modules = (transformer, text_encoder, text_encoder_2)
        for module in modules:
            module.train()
        params = [p for module in modules for p in module.parameters()]
        ema = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        train_timesteps = flow_scheduler_config(model.shift)["num_train_timesteps"]

        rng = np.random.default_rng([config.seed, 1])
        gen = torch.Generator().manual_seed(config.seed + 2)
        losses: list[float] = []
        for step in range(config.steps):
            scenes, captions = make_batch(rng, shared)
            x0 = render_batch(scenes, model.resolution) * 2.0 - 1.0
            s = sample_noise_levels(config.batch_size, config, gen)
            noise = torch.randn(x0.shape, generator=gen)
            if config.offset_noise > 0:
                offset = torch.randn((config.batch_size, x0.shape[1], 1, 1), generator=gen)
                noise = noise + config.offset_noise * offset
            s4 = s[:, None, None, None]
            xs = (1.0 - s4) * x0 + s4 * noise
            prompt_embeds, pooled = sd3_conditioning(
                captions, tokenizer, text_encoder, tokenizer, text_encoder_2,
                joint_attention_dim=model.joint_attention_dim, max_sequence_length=0,
            )
            pred = transformer(hidden_states=xs, timestep=s * train_timesteps, encoder_hidden_states=prompt_embeds,
                               pooled_projections=pooled, return_dict=False)[0]
            loss = F.mse_loss(pred, noise - x0)

            losses.append(optimizer_step(loss, optimizer, params, ema, step, shared))
            if progress is not None:
                progress(step, losses[-1])

        with torch.no_grad():
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
        seconds = time.perf_counter() - start
        info = {
            "backbone": "sd3",
            "pretrain": {k: v for k, v in asdict(config).items() if k != "model"},
            "model": flow_config_dict(model),
            "objective": "rectified flow: x_s = (1 - s) x0 + s eps, v = eps - x0, timestep s * 1000",
            "threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            "final_loss_avg100": float(np.mean(losses[-100:])),
            "transformer_params": sum(p.numel() for p in transformer.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "text_encoder_2_params": sum(p.numel() for p in text_encoder_2.parameters()),
            "torch": torch.__version__,
            "image_convention": "pixel space, x = 2 * image - 1 (decode: x / 2 + 0.5)",
        }
        if extra_info:
            info.update(extra_info)
        for module in modules:
            module.eval()
        path = save_flow_model(out, tokenizer, text_encoder, text_encoder_2, transformer, shift=model.shift, info=info)
        return PretrainResult(path, seconds, info["final_loss_avg100"], losses)
    finally:
        torch.set_num_threads(old_threads)
