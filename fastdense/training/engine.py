"""The DeepSpeed engine's configuration, generated from a :class:`~fastdense.config.Config`,
and the learning-rate schedule the trainer hands to it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fastdense.config import Config
from fastdense.errors import FastdenseError, one_line

__all__ = ["LRFactor", "deepspeed_config"]


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _preset_zero_section(stage: int) -> dict:
    """The shipped ``ds_zero{stage}.json`` (its ``zero_optimization`` table), when there is one."""
    from importlib import resources

    path = resources.files("fastdense.presets").joinpath(f"ds_zero{stage}.json")
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("zero_optimization", {}))


def deepspeed_config(cfg: Config, world_size: int = 1, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config generated from ``cfg`` (then ``optim.deepspeed_config`` merged over it).

    Batch = comparison groups: ``train_micro_batch_size_per_gpu`` = train.groups_per_step,
    ``gradient_accumulation_steps`` = train.grad_accum. Gradient accumulation boundaries
    are owned by the trainer (``managed_gradient_accumulation: false``): ``engine.step()``
    applies the update once per optimizer step, after the micro-batches that were finite.
    """
    device = torch.device(device)
    opt, t = cfg.optim, cfg.train
    zero: dict[str, Any] = {"stage": opt.zero_stage}
    if opt.zero_stage >= 2:
        zero.update(_preset_zero_section(opt.zero_stage))
    if device.type == "cpu":
        zero["overlap_comm"] = False  # no streams to overlap on
    zero["stage"] = opt.zero_stage
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.groups_per_step,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.groups_per_step * t.grad_accum * world_size,
        "gradient_clipping": float(opt.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no op to build, on CPU too
        "bf16": {"enabled": opt.precision == "bf16"},
        "fp16": {"enabled": opt.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "managed_gradient_accumulation": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if opt.deepspeed_config is not None:
        try:
            extra = json.loads(Path(opt.deepspeed_config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FastdenseError(
                f"optim.deepspeed_config={opt.deepspeed_config!r} cannot be read as JSON ({one_line(err)})"
            ) from None
        if not isinstance(extra, dict):
            raise FastdenseError(f"optim.deepspeed_config={opt.deepspeed_config!r} must hold a JSON object")
        config = _deep_merge(config, extra)
    return config


class LRFactor:
    """Multiplier of the peak learning rate after ``step`` applied updates: linear warm-up, then
    constant, linear decay or cosine decay to 0 at ``total`` updates (picklable: DeepSpeed saves it)."""

    def __init__(self, schedule: str, warmup: int, total: int):
        self.schedule = schedule
        self.warmup = int(warmup)
        self.total = int(total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
