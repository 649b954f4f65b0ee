"""The trainer's evaluation and outputs: the policy on the held-out prompts × fixed seeds
(:func:`fastdense.evaluate.evaluate`: mean reward, images, per-image rewards), the evaluation
grids, and what a finished run writes on rank 0 (LoRA or full UNet, eval_after.png, before_after.png,
reward_curve.png, summary.json).

The before evaluation runs when a run starts; its grid (eval_before.png) and per-image rewards
(eval_before.json) stay in the run directory, so a resumed run draws the same before_after.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastdense.evaluate import Evaluation, evaluate
from fastdense.training import plots
from fastdense.training.tracking import from_json_float, json_value

__all__ = ["EVAL_BEFORE", "Evaluation", "OutputsMixin"]

EVAL_BEFORE = "eval_before.json"  # the before evaluation's prompts, seeds and per-image rewards


class OutputsMixin:
    """Evaluation and outputs; part of :class:`fastdense.training.trainer.Trainer`."""

    def evaluate(self) -> Evaluation:
        """The policy on eval prompts × eval seeds: mean reward, images [P·S, 3, H, W], per-image rewards."""
        cfg = self.cfg
        return evaluate(self.sampler, self.parts, self.reward, self.eval_prompts, cfg.data.eval_seeds,
                        num_steps=cfg.sampling.num_steps, guidance=cfg.sampling.guidance, eta=cfg.sampling.eta,
                        decode_batch_size=cfg.reward.batch_size)

    def _eval_grid(self, images: torch.Tensor):
        return plots.eval_grid(images, len(self.eval_prompts), len(self.cfg.data.eval_seeds))

    def _shown(self) -> tuple[list[str], list[int]]:
        """The prompts and seeds the evaluation grids show."""
        return self.eval_prompts[: plots.MAX_ROWS], list(self.cfg.data.eval_seeds)[: plots.MAX_COLS]

    def _save_eval_before(self, before: Evaluation) -> None:
        self._eval_grid(before.images).save(self.run_dir / "eval_before.png")
        seeds = list(self.cfg.data.eval_seeds)
        rewards = before.scores.reshape(len(self.eval_prompts), len(seeds)).tolist()
        record = {"prompts": self.eval_prompts, "seeds": seeds, "rewards": json_value(rewards)}
        (self.run_dir / EVAL_BEFORE).write_text(json.dumps(record) + "\n")

    def _load_eval_before(self, rows: int, cols: int) -> tuple[list | None, list[float] | None]:
        """The before tiles and rewards shown in before_after.png, from eval_before.png / .json
        (written when the run started, maybe by an earlier process); (None, None) when missing."""
        from PIL import Image

        png, meta = self.run_dir / "eval_before.png", self.run_dir / EVAL_BEFORE
        prompts, seeds = self._shown()
        try:
            saved = json.loads(meta.read_text())
            if saved["prompts"][:rows] != prompts or saved["seeds"][:cols] != seeds:
                return None, None
            scores = [from_json_float(saved["rewards"][r][c]) for r in range(rows) for c in range(cols)]
            grid = Image.open(png).convert("RGB")
        except (OSError, ValueError, KeyError, IndexError, TypeError):  # missing or not ours: no before block
            return None, None
        return plots.grid_tiles(grid, rows, cols), scores

    def _write_outputs(self, after: Evaluation) -> Path:
        from fastdense.lora import save_lora

        if self.lora:  # full weights in place: the caller holds self._gathered()
            output = save_lora(self.unet, self.run_dir / "lora").parent
        else:
            output = self.run_dir / "unet"
            self.unet.save_pretrained(str(output))
        after_grid = self._eval_grid(after.images)
        after_grid.save(self.run_dir / "eval_after.png")
        prompts, seeds = self._shown()
        rows, cols, n_seeds = len(prompts), len(seeds), len(self.cfg.data.eval_seeds)
        before_tiles, before_scores = self._load_eval_before(rows, cols)
        after_scores = [float(after.scores[r * n_seeds + c]) for r in range(rows) for c in range(cols)]
        plots.before_after(prompts, seeds, before_tiles, before_scores, plots.grid_tiles(after_grid, rows, cols),
                           after_scores, self.run_dir / "before_after.png",
                           before_mean=self.state.reward_before, after_mean=after.reward,
                           caption=f"rows: the first {rows} of {len(self.eval_prompts)} evaluation prompts; "
                           f"mean rewards over all {len(self.eval_prompts)} prompts × {n_seeds} seed(s)")
        plots.reward_curve(self.state.history, float(self.state.reward_before), after.reward,
                           self.run_dir / "reward_curve.png")
        summary = {
            "reward_before": self.state.reward_before, "reward_after": after.reward,
            "steps": self.state.step, "rounds": self.cfg.train.rounds,
            "skipped_updates": self.state.skipped_updates, "output": str(output),
            "eval_prompts": len(self.eval_prompts), "eval_seeds": list(self.cfg.data.eval_seeds),
            "seconds": self.state.elapsed,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(json_value(summary), indent=2) + "\n")
        return output
