"""The trainer's evaluation and outputs: the policy on the held-out prompts × fixed seeds
(:func:`fastdense.evaluate.evaluate`: mean reward, images, per-image rewards), the evaluation
grids, and what a finished run writes on rank 0 (LoRA or full UNet, eval_after.png, before_after.png,
reward_curve.png, eval_after.json, summary.json).

The before evaluation runs when a run starts; its grid (eval_before.png) and per-image rewards
(eval_before.json) stay in the run directory, so a resumed run draws the same before_after.png
and makes the same paired comparison.

Three evaluation sets, all on the eval prompts, each sample seeded on its own (the sampler's
per-sample generators), so a sample is the same whichever set it is drawn in:

* held-out: × ``data.eval_seeds``: the grids, the reward curve and the summary's means;
* per round: the held-out set again after every ``eval.every_rounds`` rounds (eval/round_K.png);
* paired: × (``data.eval_seeds`` + ``eval.paired_seeds`` more seeds), before and after training:
  the summary's paired difference and win rate with 95 % bootstrap intervals (fastdense.stats).
  Only the extra seeds are sampled again; the held-out samples are reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdense.evaluate import Evaluation, evaluate
from fastdense.stats import tie_tolerance
from fastdense.training import plots
from fastdense.training.tracking import from_json_float, json_value

__all__ = ["EVAL_AFTER", "EVAL_BEFORE", "Evaluation", "OutputsMixin", "TrainResult", "paired_summary"]

@dataclass
class TrainResult:
    run_dir: Path
    reward_before: float
    reward_after: float
    steps: int
    rounds: int
    skipped_updates: int
    output: Path | None
    metrics: Path
    # the paired before/after comparison (fastdense.training.outputs.paired_summary); None when
    # the before evaluation's rewards are not in the run directory (rank > 0 has none either)
    paired: dict[str, Any] | None = None


EVAL_BEFORE = "eval_before.json"  # the before evaluation's prompts, seeds and per-image rewards
EVAL_AFTER = "eval_after.json"  # the same for the after evaluation (same prompts and seeds)
ROUND_EVALS = "eval"  # eval/round_K.png: the held-out images after round K


def paired_summary(before: list[list[float]], after: list[list[float]], seeds: list[int], tie: float = 0.0) -> dict:
    """The paired before/after comparison of per-image rewards [prompt][seed] on the same prompts
    and seeds: both means, the mean difference and the win rate (scores within ``tie``: a tie),
    each with a 95 % interval."""
    from fastdense.stats import mean_ci, paired_difference, win_rate

    b = np.asarray(before, dtype=np.float64).reshape(-1)
    a = np.asarray(after, dtype=np.float64).reshape(-1)
    return {
        "prompts": len(before), "seeds": seeds, "samples": int(a.size), "tie": tie,
        "before": mean_ci(b).to_dict(), "after": mean_ci(a).to_dict(),
        "difference": paired_difference(a, b).to_dict(), "win_rate": win_rate(a, b, tie=tie).to_dict(),
    }


class OutputsMixin:
    """Evaluation and outputs; part of :class:`fastdense.training.trainer.Trainer`."""

    def evaluate(self, seeds: list[int] | None = None) -> Evaluation:
        """The policy on eval prompts × ``seeds`` (default data.eval_seeds): mean reward, images
        [P·S, 3, H, W], per-image rewards."""
        cfg = self.cfg
        seeds = cfg.data.eval_seeds if seeds is None else seeds
        return evaluate(self.sampler, self.parts, self.reward, self.eval_prompts, seeds,
                        num_steps=cfg.sampling.num_steps, guidance=cfg.sampling.guidance, eta=cfg.sampling.eta,
                        sampler_kind=cfg.sampling.sampler, decode_batch_size=cfg.reward.batch_size)

    def paired_extra_seeds(self) -> list[int]:
        """The seeds that the paired comparison adds to data.eval_seeds (eval.paired_seeds of them)."""
        start = max(self.cfg.data.eval_seeds) + 1
        return list(range(start, start + self.cfg.eval.paired_seeds))

    def evaluate_extra(self) -> Evaluation | None:
        """The policy on eval prompts × the paired comparison's extra seeds (None: no extra seeds)."""
        seeds = self.paired_extra_seeds()
        return self.evaluate(seeds) if seeds else None

    def _paired_rewards(self, held_out: Evaluation, extra: Evaluation | None) -> list[list[float]]:
        """Per-image rewards [prompt][seed] over data.eval_seeds + the extra seeds."""
        P = len(self.eval_prompts)
        rows = held_out.scores.reshape(P, -1)
        if extra is not None:
            rows = torch.cat([rows, extra.scores.reshape(P, -1)], dim=1)
        return rows.tolist()

    def _eval_record(self, held_out: Evaluation, extra: Evaluation | None) -> dict:
        seeds = list(self.cfg.data.eval_seeds)
        return {"prompts": self.eval_prompts, "seeds": seeds,
                "rewards": json_value(held_out.scores.reshape(len(self.eval_prompts), len(seeds)).tolist()),
                "paired_seeds": seeds + self.paired_extra_seeds(),
                "paired_rewards": json_value(self._paired_rewards(held_out, extra))}

    def _round_eval_due(self) -> bool:
        """A round just ended, eval.every_rounds divides its number, and it is not the last round
        (the after evaluation covers that one)."""
        every, P = self.cfg.eval.every_rounds, self.cfg.train.updates_per_round
        step = self.state.step
        return every > 0 and step % P == 0 and (step // P) % every == 0 and step < self.total_steps

    def _round_eval(self, round_index: int) -> None:
        """The held-out evaluation after a round: its reward in metrics.jsonl and in the round's
        history entry (the reward curve), its images in eval/round_K.png."""
        ev = self.evaluate()
        for entry in self.state.history:
            if entry["round"] == round_index:
                entry["heldout"] = ev.reward
        self._log({"event": "eval", "tag": "round", "round": round_index, "step": self.state.step,
                   "reward": ev.reward})
        if self.dist.is_main:
            self.save_round_eval(round_index, ev)

    def save_round_eval(self, round_index: int, evaluation: Evaluation) -> None:
        """eval/round_K.png (K counted from 1): the held-out images after round K, named and scored."""
        prompts, seeds = self._shown()
        rows, cols, n_seeds = len(prompts), len(seeds), len(self.cfg.data.eval_seeds)
        scores = [float(evaluation.scores[r * n_seeds + c]) for r in range(rows) for c in range(cols)]
        folder = self.run_dir / ROUND_EVALS
        folder.mkdir(exist_ok=True)
        tiles = plots.grid_tiles(self._eval_grid(evaluation.images), rows, cols)
        plots.before_after(prompts, seeds, None, None, tiles, scores, folder / f"round_{round_index + 1}.png",
                           after_mean=evaluation.reward, after_title=f"after round {round_index + 1}",
                           caption=f"rows: the first {rows} of {len(self.eval_prompts)} evaluation prompts; "
                           f"mean reward over all {len(self.eval_prompts)} prompts × {n_seeds} seed(s)")

    def _eval_grid(self, images: torch.Tensor):
        return plots.eval_grid(images, len(self.eval_prompts), len(self.cfg.data.eval_seeds))

    def _shown(self) -> tuple[list[str], list[int]]:
        """The prompts and seeds the evaluation grids show."""
        return self.eval_prompts[: plots.MAX_ROWS], list(self.cfg.data.eval_seeds)[: plots.MAX_COLS]

    def _save_eval_before(self, before: Evaluation, extra: Evaluation | None) -> None:
        self._eval_grid(before.images).save(self.run_dir / "eval_before.png")
        (self.run_dir / EVAL_BEFORE).write_text(json.dumps(self._eval_record(before, extra)) + "\n")

    def _load_paired_before(self) -> list[list[float]] | None:
        """The before rewards of the paired comparison, from eval_before.json (None when missing or
        made for other prompts or seeds: then the summary has no paired comparison)."""
        try:
            saved = json.loads((self.run_dir / EVAL_BEFORE).read_text())
            if saved["prompts"] != self.eval_prompts or \
                    saved["paired_seeds"] != list(self.cfg.data.eval_seeds) + self.paired_extra_seeds():
                return None
            return [[from_json_float(v) for v in row] for row in saved["paired_rewards"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

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

    def _write_outputs(self, after: Evaluation, after_extra: Evaluation | None = None) -> Path:
        from fastdense.lora import save_lora

        if self.lora:  # full weights in place: the caller holds self._gathered()
            output = save_lora(self.unet, self.run_dir / "lora", prefix=self.backbone.lora_prefix,
                               family=self.backbone.family).parent
        else:
            from fastdense.models.families import family_named

            # the denoiser under its model_index.json name: unet/ (SD, SDXL) or transformer/ (SD3, FLUX)
            output = self.run_dir / family_named(self.backbone.family).denoiser
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
        record = self._eval_record(after, after_extra)
        (self.run_dir / EVAL_AFTER).write_text(json.dumps(record) + "\n")
        before_paired = self._load_paired_before()
        self.paired = None if before_paired is None else \
            paired_summary(before_paired, self._paired_rewards(after, after_extra), record["paired_seeds"],
                           tie=tie_tolerance(self.reward))
        summary = {
            "reward_before": self.state.reward_before, "reward_after": after.reward,
            "steps": self.state.step, "rounds": self.cfg.train.rounds,
            "skipped_updates": self.state.skipped_updates, "output": str(output),
            "eval_prompts": len(self.eval_prompts), "eval_seeds": list(self.cfg.data.eval_seeds),
            "seconds": self.state.elapsed, "paired": self.paired,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(json_value(summary), indent=2) + "\n")
        return output
