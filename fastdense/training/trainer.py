"""The trainer: rounds of rollouts → rewards → replay buffer → dense-reward updates on a DeepSpeed engine.

One round (DESIGN.md §2 data flow)::

    collect   each rank samples R rollouts for each of its prompts with the current policy
              (``sampling`` config, seeds that differ per rank and round), decodes them and
              scores them in batches; G of the R go into its own buffer shard
    update    P = train.updates_per_round optimizer updates; each is grad_accum micro-batches
              of train.groups_per_step comparison groups drawn from the buffer
              (:mod:`fastdense.training.update`)

Distributed: every run is a DeepSpeed engine (:mod:`fastdense.training.distributed`); each rank
keeps its own buffer shard. Checkpoints: :mod:`fastdense.training.checkpointing`. Outputs (rank 0):
metrics.jsonl (:mod:`fastdense.training.tracking`), the LoRA (or full UNet), the evaluation grids,
before_after.png and reward_curve.png (:mod:`fastdense.training.plots`), summary.json.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastdense import checkpoint as ckpt_mod
from fastdense.config import Config, validate
from fastdense.data import load_prompts, resolve_model_path
from fastdense.devices import DTYPES
from fastdense.errors import FastdenseError, one_line
from fastdense.training import run_dir as run_dir_mod
from fastdense.training.checkpointing import CheckpointMixin, TrainState
from fastdense.training.distributed import _all_reduce, init_distributed
from fastdense.training.engine import LRFactor, deepspeed_config
from fastdense.training.interrupt import StopRequest, TrainingInterrupted
from fastdense.training.outputs import Evaluation, OutputsMixin, TrainResult
from fastdense.training.tracking import MetricsWriter, progress_bar
from fastdense.training.update import UpdateMixin

__all__ = ["LATENT_DTYPES", "Evaluation", "StepCallback", "TrainResult", "Trainer", "train"]

LATENT_DTYPES = DTYPES  # sampling.latent_dtype names → torch dtypes: the one table in fastdense.devices


StepCallback = Callable[["Trainer", dict[str, Any]], None]


def train_steps(table, window: list[int] | None) -> list[int] | None:
    """The generation steps the objective trains on: ``window`` ([start, stop)) or every step, less
    the steps without a density (σ = 0, e.g. the CPS sampler's last step), which are excluded when
    no window is given and refused inside one. None: every step of the chain (the plan's default)."""
    sigma = table.sigma.tolist()
    T = len(sigma)
    with_density = [t for t in range(T) if sigma[t] > 0]
    if not with_density:
        raise FastdenseError(
            f"sampling.sampler={getattr(table, 'sampler', 'ddim')!r} with sampling.eta={table.eta} has no density at "
            "any step, so there is nothing to train on; use a noise level > 0 (a flow model's sde or cps sampler)"
        )
    if window is None:
        return None if len(with_density) == T else with_density
    start, stop = int(window[0]), int(window[1])
    if not 0 <= start < stop <= T:
        raise FastdenseError(
            f"objective.step_window={list(window)} is outside the chain; allowed: 0 <= start < stop <= {T}"
        )
    flat = [t for t in range(start, stop) if sigma[t] <= 0]
    if flat:
        raise FastdenseError(
            f"objective.step_window={list(window)} includes step {flat[0]}, which has σ = 0 (no density); "
            f"allowed: a window inside the steps with a density ({with_density[0]}..{with_density[-1]})"
        )
    return None if (start, stop) == (0, T) else list(range(start, stop))


class Trainer(UpdateMixin, CheckpointMixin, OutputsMixin):
    """Builds everything from a validated :class:`Config` (model, LoRA, DeepSpeed engine, sampler,
    reward, buffer); :meth:`run` trains. Nothing is written until :meth:`run`.

    ``reward``: a Reward object instead of ``cfg.reward.name``. ``resume``: a checkpoint directory
    (see :func:`fastdense.checkpoint.resolve_resume`), loaded here. ``callbacks``: called after every
    update with the metrics record. ``progress``: a rich progress bar on rank 0.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        reward=None,
        resume: str | Path | None = None,
        callbacks: Sequence[StepCallback] = (),
        progress: bool = True,
        console=None,
    ):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        self.show_progress = progress
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.resume_from: Path | None = None
        resume_state = None
        if resume is not None:
            self.resume_from = Path(resume)
            resume_state = ckpt_mod.validate_checkpoint(self.resume_from)  # before anything heavy

        self.model_path = resolve_model_path(cfg.model.path)  # a directory or hub id (providers resolved)
        self.prompts, self.eval_prompts = load_prompts(cfg, self.model_path)
        self.dist = init_distributed(cfg.run.device)
        if resume_state is not None:
            ckpt_mod.validate_checkpoint(self.resume_from, world_size=self.dist.world_size)
        self.device = self.dist.device
        self._build_model()
        self.reward = reward if reward is not None else self._build_reward()
        self._build_engine()
        self._build_rest()
        self.state = TrainState()
        self.stop = StopRequest()  # set by a signal (fastdense.training.interrupt) or by code
        self.resumed = False
        self._warned_no_gap = False
        self._metrics: MetricsWriter | None = None  # rank 0, while run() runs
        self.paired: dict[str, Any] | None = None  # the summary's paired comparison (rank 0, at the end)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    # ------------------------------------------------------------------ building
    def _build_model(self) -> None:
        from fastdense.lora import add_lora
        from fastdense.models.loading import load_pipeline_parts

        cfg = self.cfg
        path = self.model_path
        from fastdense.models.families import backbone_class

        self.parts = load_pipeline_parts(path, device=self.device, text_encoder_device=cfg.model.text_encoder_device,
                                         resolution=cfg.model.resolution)
        self.unet = self.parts.unet  # the denoiser: a UNet, or SD3's / FLUX's transformer
        self.lora = cfg.model.lora_rank > 0
        targets = cfg.model.lora_targets
        if targets is None:
            targets = list(backbone_class(self.parts.family).default_lora_targets)
        add_lora(self.unet, cfg.model.lora_rank, cfg.model.lora_alpha, targets, seed=cfg.train.seed)
        needs_init = cfg.objective.reference in ("init", "both")
        # Full fine-tuning has no adapters to switch off: keep a frozen copy of π_init for the reference.
        self.ref_unet = None
        if not self.lora and needs_init:
            self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()

    def _build_reward(self):
        from fastdense.rewards import get_reward, reward_accepts

        name, bs = self.cfg.reward.name, self.cfg.reward.batch_size
        # learned rewards (ImageReward, HPSv2, ...) score on the training device, not the CPU default
        options = {"device": self.device} if reward_accepts(name, "device") else {}
        if reward_accepts(name, "batch_size"):
            return get_reward(name, batch_size=bs, **options)
        reward = get_reward(name, **options)
        if hasattr(reward, "batch_size"):
            reward.batch_size = bs
        return reward

    def _build_engine(self) -> None:
        import deepspeed

        from fastdense.lora import trainable_parameters

        cfg = self.cfg
        params = trainable_parameters(self.unet)
        self.trainable = params
        self.total_steps = cfg.train.rounds * cfg.train.updates_per_round
        opt = torch.optim.AdamW(
            params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, eps=1e-8
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, LRFactor(cfg.optim.lr_schedule, cfg.optim.lr_warmup_steps, self.total_steps)
        )
        self.ds_config = deepspeed_config(cfg, self.dist.world_size, self.device)
        try:
            engine, _, _, _ = deepspeed.initialize(
                model=self.unet, optimizer=opt, lr_scheduler=sched, config=self.ds_config, dist_init_required=False
            )
        except (AssertionError, ValueError, RuntimeError, NotImplementedError) as err:
            raise FastdenseError(
                f"DeepSpeed cannot start with optim.zero_stage={cfg.optim.zero_stage}, "
                f"optim.precision={cfg.optim.precision!r} on {self.device} ({one_line(err)})"
            ) from None
        self.engine = engine
        self.managed_ga = bool(getattr(engine, "managed_gradient_accumulation", lambda: True)())
        self.model_dtype = next(self.unet.parameters()).dtype
        if self.ref_unet is not None and next(self.ref_unet.parameters()).dtype != self.model_dtype:
            self.ref_unet.to(dtype=self.model_dtype)

    def _build_rest(self) -> None:
        from fastdense.buffer import ReplayBuffer
        from fastdense.sampler import Sampler

        cfg = self.cfg
        self.sampler = Sampler(
            self.parts,
            micro_batch=cfg.sampling.micro_batch,
            compile=cfg.model.compile,
            attention=cfg.model.attention,
        )
        self.backbone = self.sampler.backbone  # prompt encoding and the CFG UNet call, shared with the sampler
        self.encoder = self.backbone.encoder
        # Every prompt encoded once, in a fixed order: the same embeddings bit for bit in a resumed run.
        self.encoder.encode(list(dict.fromkeys([*self.prompts, *self.eval_prompts])))
        self.uncond = self.backbone.unconditional()
        self.table = self.sampler.table(cfg.sampling.num_steps, cfg.sampling.eta, cfg.sampling.sampler)
        self.timesteps = self.table.timesteps.to(self.device)
        self.train_steps = train_steps(self.table, cfg.objective.step_window)
        self.buffer = ReplayBuffer(cfg.train.buffer_prompts, cfg.objective.group_size, device=self.device)
        seed, rank = cfg.train.seed, self.dist.rank
        self.generators = {
            "plan": torch.Generator().manual_seed(_mix(seed, rank, 1)),
            "slots": torch.Generator().manual_seed(_mix(seed, rank, 2)),
            "ties": torch.Generator().manual_seed(_mix(seed, rank, 3)),
        }
        self.cfg_guidance = self.backbone.uses_cfg(cfg.sampling.guidance)

    # ------------------------------------------------------------------- helpers
    @property
    def step(self) -> int:
        return self.state.step

    @property
    def policy_is_init(self) -> bool:
        """No update applied yet: the policy is π_init exactly (LoRA B = 0, or untouched weights)."""
        return int(self.engine.global_steps) == 0

    def round_prompts(self, round_index: int) -> list[str]:
        """This rank's prompts of a round: a fresh permutation of all prompts per pass (seeded by the
        pass), cut into rounds of train.prompts_per_round × world prompts; rank r takes every world-th."""
        per_round = self.cfg.train.prompts_per_round * self.dist.world_size
        n = len(self.prompts)
        start = round_index * per_round
        out = []
        for k in range(start, start + per_round):
            epoch, pos = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(self.cfg.train.seed, epoch, 7)))
            out.append(self.prompts[int(perm[pos])])
        return out[self.dist.rank :: self.dist.world_size]

    def rollout_seeds(self, round_index: int, count: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.cfg.train.seed, self.dist.rank, 1_000 + round_index))
        return torch.randint(0, 2**62, (count,), generator=g).tolist()

    # ----------------------------------------------------------------- collecting
    @torch.no_grad()
    def collect(self, round_index: int) -> dict[str, Any]:
        """Rollouts of this rank's prompts with the current policy → rewards → buffer."""
        from fastdense.sampler import decode

        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.round_prompts(round_index)
        R = cfg.sampling.rollouts_per_prompt
        batch = [p for p in prompts for _ in range(R)]
        free_ref = self.policy_is_init and cfg.objective.reference in ("init", "both")
        traj = self.sampler.sample(
            batch,
            num_steps=cfg.sampling.num_steps,
            guidance=cfg.sampling.guidance,
            eta=cfg.sampling.eta,
            sampler=cfg.sampling.sampler,
            seed=self.rollout_seeds(round_index, len(batch)),
            latent_dtype=LATENT_DTYPES[cfg.sampling.latent_dtype],
        )
        images = decode(self.parts, traj.final_latents, batch_size=cfg.reward.batch_size)
        rewards = self.reward(images, batch).float()
        for i, prompt in enumerate(prompts):
            sl = slice(i * R, (i + 1) * R)
            self.buffer.add(
                prompt,
                self.encoder.encode([prompt])[0].to(self.model_dtype),
                traj.latents[sl],
                rewards[sl],
                traj.sq_residual[sl],
                ref_sq=traj.sq_residual[sl] if free_ref else None,
                uncond_embed=self.uncond,
            )
        finite = rewards[torch.isfinite(rewards)]
        s, c, m = float(finite.sum()), float(finite.numel()), float(finite.max()) if finite.numel() else -math.inf
        s, c = _all_reduce([s, c], "sum", self.dist)
        (m,) = _all_reduce([m], "max", self.dist)
        seconds = time.perf_counter() - t0
        self.state.rounds_collected = round_index + 1
        self.state.round_reward_mean = s / c if c else float("nan")
        self.state.round_reward_max = m if c else float("nan")
        record = {
            "event": "round", "round": round_index, "step": self.state.step,
            "reward_mean": self.state.round_reward_mean, "reward_max": self.state.round_reward_max,
            "nonfinite_rewards": int(rewards.numel() - finite.numel()), "rollouts": len(batch),
            "samples_per_s": len(batch) / max(seconds, 1e-9), "seconds": seconds,
        }
        self.state.history.append({"round": round_index, "reward_mean": record["reward_mean"],
                                   "reward_max": record["reward_max"]})
        return record

    # ----------------------------------------------------------------------- run
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        if self._metrics is None:
            self._metrics = MetricsWriter(self.run_dir)
        self._metrics.write(record)
        self.state.metrics_lines += 1

    def _agreed_stop(self) -> int:
        """The signal that stops the run after this update (0: go on), the same on every rank:
        one collective, so all ranks checkpoint the same step."""
        (signum,) = _all_reduce([float(self.stop.signum)], "max", self.dist)
        return int(signum)

    def run(self) -> TrainResult:
        """Train to the end; raises :class:`TrainingInterrupted` after writing a checkpoint when
        ``self.stop`` is requested (checked after every update)."""
        if self.dist.is_main:
            run_dir_mod.prepare_run_dir(self.run_dir, self.cfg, resumed=self.resumed,
                                        metrics_lines=self.state.metrics_lines)
            self._metrics = MetricsWriter(self.run_dir, tensorboard=self.cfg.run.tensorboard, console=self.console)
        try:
            return self._run()
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None

    def _run(self) -> TrainResult:
        cfg = self.cfg
        P = cfg.train.updates_per_round
        t_start = time.perf_counter() - self.state.elapsed
        main = self.dist.is_main
        if self.state.reward_before is None:
            before = self.evaluate()
            before_extra = self.evaluate_extra()
            self.state.reward_before = before.reward
            if main:
                self._save_eval_before(before, before_extra)
            self._log({"event": "eval", "tag": "before", "step": self.state.step, "reward": before.reward})
        bar = progress_bar(self.console, enabled=self.show_progress and main)
        with bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.state.step, loss=float("nan"),
                                reward=self.state.round_reward_mean)
            while self.state.step < self.total_steps:
                round_index = self.state.step // P
                if self.state.rounds_collected <= round_index:
                    bar.update(task, description=f"round {round_index + 1}/{cfg.train.rounds}: sampling")
                    self._log(self.collect(round_index))
                    bar.update(task, description=f"round {round_index + 1}/{cfg.train.rounds}: training")
                record = self.update()
                self.state.elapsed = time.perf_counter() - t_start
                record["elapsed"] = self.state.elapsed
                self._log(record)
                if self._round_eval_due():  # before the checkpoint of this step, which then holds it
                    bar.update(task, description=f"round {round_index + 1}/{cfg.train.rounds}: evaluating")
                    self._round_eval(round_index)
                bar.update(task, completed=self.state.step,
                           loss=record["loss"] if record["loss"] is not None else float("nan"),
                           reward=self.state.round_reward_mean)
                checkpoint = None
                if self.state.step % cfg.run.checkpoint_every == 0 or self.state.step == self.total_steps:
                    checkpoint = self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, record)
                signum = self._agreed_stop()
                if signum:
                    checkpoint = checkpoint or self.save_checkpoint()
                    raise TrainingInterrupted(self.state.step, signum, self.run_dir, checkpoint)
        after = self.evaluate()
        after_extra = self.evaluate_extra()
        self._log({"event": "eval", "tag": "after", "step": self.state.step, "reward": after.reward})
        output = None
        with self._gathered():  # a collective under ZeRO-3: every rank enters, rank 0 writes
            if main:
                output = self._write_outputs(after, after_extra)
        return TrainResult(
            run_dir=self.run_dir, reward_before=float(self.state.reward_before), reward_after=after.reward,
            steps=self.state.step, rounds=cfg.train.rounds, skipped_updates=self.state.skipped_updates,
            output=output, metrics=self.run_dir / "metrics.jsonl", paired=self.paired,
        )


def train(
    cfg: Config,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    reward=None,
    callbacks: Sequence[StepCallback] = (),
    progress: bool = True,
    console=None,
) -> TrainResult:
    """Train from ``cfg`` into a fresh run directory ``out`` (default: run.out, else runs/<time>),
    or continue a run: ``resume="latest"`` (the newest complete checkpoint in ``out``) or a
    checkpoint / run directory. Raises FastdenseError for bad input before anything is written."""
    validate(cfg)
    ckpt = None
    if resume is not None:
        ckpt = run_dir_mod.resume_checkpoint(resume, out if out is not None else cfg.run.out)
    run_dir = run_dir_mod.resolve_run_dir(cfg, out, ckpt)
    trainer = Trainer(cfg, run_dir, reward=reward, resume=ckpt, callbacks=callbacks, progress=progress,
                      console=console)
    return trainer.run()


# ============================================================================== helpers


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
