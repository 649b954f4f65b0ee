"""The trainer's checkpoints (layout and atomic publication: :mod:`fastdense.checkpoint`).

A checkpoint holds everything a bitwise-identical continuation needs: trainable weights,
optimizer and LR scheduler (DeepSpeed), the buffer shards, every generator (step plans,
buffer draws, tie-breaks) and the torch / numpy / python RNGs per rank, and the counters
(step, round, rounds collected, metrics written). Rollout seeds and prompt order are
functions of (seed, rank, round), so they need no state.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdense import checkpoint as ckpt_mod
from fastdense.errors import FastdenseError, one_line
from fastdense.training.distributed import _barrier
from fastdense.training.tracking import from_json_float, json_float

__all__ = ["CheckpointMixin", "TrainState"]


@dataclass
class TrainState:
    """The trainer's counters: what a checkpoint's state.json holds besides engine, buffer and RNGs."""

    step: int = 0  # update attempts done (applied or skipped)
    rounds_collected: int = 0
    skipped_updates: int = 0
    skipped_microbatches: int = 0
    ref_items: int = 0  # reference residuals computed by the trainer (not free from sampling)
    metrics_lines: int = 0
    reward_before: float | None = None
    round_reward_mean: float = float("nan")
    round_reward_max: float = float("nan")
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # per-round reward stats (for the curve)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """DeepSpeed prints checkpoint loading notes with print(): keep them off the console."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class CheckpointMixin:
    """Saving and loading checkpoints; part of :class:`fastdense.training.trainer.Trainer`."""

    def _state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "version": 1, "step": s.step, "round": (s.step // self.cfg.train.updates_per_round),
            "rounds_collected": s.rounds_collected, "skipped_updates": s.skipped_updates,
            "skipped_microbatches": s.skipped_microbatches, "ref_items": s.ref_items,
            "metrics_lines": s.metrics_lines, "reward_before": s.reward_before,
            "round_reward_mean": json_float(s.round_reward_mean), "round_reward_max": json_float(s.round_reward_max),
            "elapsed": s.elapsed, "history": s.history, "world_size": self.dist.world_size,
            "engine_global_steps": int(self.engine.global_steps),
        }

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """Full trainable parameters in place (ZeRO-3 partitions gathered) for reading them."""
        if self.cfg.optim.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(self.trainable, modifier_rank=None):
                yield
        else:
            yield

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step atomically; prune to run.keep_last."""
        from fastdense.lora import save_lora

        step = self.state.step
        main = self.dist.is_main
        if main:
            ckpt_mod.temp_checkpoint_dir(self.run_dir, step)
        _barrier(self.dist)
        tmp = self.run_dir / ckpt_mod.CHECKPOINTS / f".tmp-{ckpt_mod.checkpoint_name(step)}"
        self.engine.save_checkpoint(str(tmp), tag="engine", client_state={}, save_latest=False,
                                    exclude_frozen_parameters=self.lora)
        rank = self.dist.rank
        self.buffer.save(ckpt_mod.buffer_dir(tmp, rank))
        ckpt_mod.save_rng(tmp / "rng", rank, self.generators)
        if self.lora:
            with self._gathered():
                if main:
                    save_lora(self.unet, tmp / "lora", prefix=self.backbone.lora_prefix, family=self.backbone.family)
        if main:
            (tmp / "state.json").write_text(json.dumps(self._state_dict(), indent=1))
            (tmp / "config.json").write_text(self.cfg.to_json())
        _barrier(self.dist)
        final = tmp.parent / ckpt_mod.checkpoint_name(step)
        if main:
            final = ckpt_mod.publish_checkpoint(tmp, step)
            ckpt_mod.prune_checkpoints(self.run_dir, self.cfg.run.keep_last, protect=self.resume_from)
        _barrier(self.dist)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        from fastdense.buffer import ReplayBuffer

        state = ckpt_mod.validate_checkpoint(path, world_size=self.dist.world_size)
        rank = self.dist.rank
        buffer = ReplayBuffer.load(ckpt_mod.buffer_dir(path, rank), device=self.device)
        if buffer.group_size != self.cfg.objective.group_size:
            raise FastdenseError(
                f"checkpoint {path} holds groups of {buffer.group_size}; objective.group_size="
                f"{self.cfg.objective.group_size} does not match it"
            )
        try:
            with _quiet_stdout():
                loaded, _ = self.engine.load_checkpoint(
                    str(path), tag="engine", load_module_strict=False,
                    load_optimizer_states=True, load_lr_scheduler_states=True,
                )
        except Exception as err:  # DeepSpeed raises anything from torch.load to KeyError on a broken file
            raise FastdenseError(f"checkpoint {path} is corrupt: DeepSpeed cannot load engine/ ({one_line(err)})") \
                from None
        if loaded is None:
            raise FastdenseError(f"checkpoint {path} is corrupt: DeepSpeed found no engine state in engine/")
        ckpt_mod.restore_rng(path / "rng", rank, self.generators)
        self.buffer = buffer
        s = self.state
        s.step, s.rounds_collected = int(state["step"]), int(state.get("rounds_collected", 0))
        s.skipped_updates = int(state.get("skipped_updates", 0))
        s.skipped_microbatches = int(state.get("skipped_microbatches", 0))
        s.ref_items = int(state.get("ref_items", 0))
        s.metrics_lines = int(state.get("metrics_lines", 0))
        s.reward_before = state.get("reward_before")
        s.round_reward_mean = from_json_float(state.get("round_reward_mean"))
        s.round_reward_max = from_json_float(state.get("round_reward_max"))
        s.elapsed = float(state.get("elapsed", 0.0))
        s.history = list(state.get("history", []))
        self.resumed = True
