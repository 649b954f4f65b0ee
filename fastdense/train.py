"""The trainer: rounds of rollouts → rewards → replay buffer → dense-reward updates on a DeepSpeed engine.

One round (DESIGN.md §2 data flow)::

    collect   each rank samples R rollouts for each of its prompts with the current policy
              (``sampling`` config, seeds that differ per rank and round), decodes them and
              scores them in batches; G of the R go into its own buffer shard
    update    P = train.updates_per_round optimizer updates; each is grad_accum micro-batches
              of train.groups_per_step comparison groups drawn from the buffer

A micro-batch (``Trainer.micro_batch``): the (trajectory × step) items of ``plan_items``
go through the policy UNet in ONE call (``cat([x, x])`` with ``cat([uncond, cond])``),
then the fused ``log_ratio`` op (weights from the plan, reference residuals from the
buffer cache) gives logits [groups, G], ranked by reward into ``listmle_loss``, and
``engine.backward``. Missing π_init residuals of the sampled items are computed in
one batched no-grad pass with the adapters disabled and cached in the buffer; in
the first round (sampled by π_init itself) they are the sampler's own residuals.

A micro-batch whose loss or rewards are not finite, or that finds no group passing
``objective.min_reward_gap`` in its rank's shard, does not backpropagate and is
counted; an update whose micro-batches all failed is skipped (weights, optimizer
and LR schedule untouched) and counted in ``skipped_updates``.

Distributed: every run is a DeepSpeed engine. A single process needs no launcher
(its process group is created on an in-memory store: no port, no MPI); several
ranks start with ``deepspeed`` or ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT from the environment). Each rank keeps its own buffer shard.

Checkpoints (``fastdense.checkpoint``) hold everything a bitwise-identical
continuation needs: trainable weights, optimizer and LR scheduler (DeepSpeed), the
buffer shards, every generator (step plans, buffer draws, tie-breaks) and the
torch / numpy / python RNGs per rank, and the counters (step, round, rounds
collected, metrics written). Rollout seeds and prompt order are functions of
(seed, rank, round), so they need no state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdense import checkpoint as ckpt_mod
from fastdense.config import Config, validate
from fastdense.errors import FastdenseError
from fastdense.training.interrupt import StopRequest, TrainingInterrupted

__all__ = [
    "DistInfo",
    "MicroBatchResult",
    "TrainResult",
    "Trainer",
    "check_run_dir",
    "deepspeed_config",
    "default_run_dir",
    "init_distributed",
    "is_toy_model",
    "load_prompts",
    "toy_train_prompts",
    "train",
]

LATENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHM_ENV_VAR = "FASTDENSE_DS_SHM"  # "1": let DeepSpeed build/use its CPU shared-memory comm op (multi-rank CPU)


# =========================================================================== distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise FastdenseError(f"environment variable {name}={raw!r} is not allowed; it must be an integer") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FastdenseError(f"run.device={device!r} is not allowed: torch sees no CUDA device; use cpu or auto")
        return torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if device != "cpu":
        raise FastdenseError(f"run.device={device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def _prepare_deepspeed(device: torch.device, world_size: int) -> None:
    """Before DeepSpeed creates its communication backend.

    On CPU, DeepSpeed's ``TorchBackend`` JIT-builds a shared-memory all-reduce op
    (``deepspeed_shm_comm``, ~30 s of C++ compilation on first use) whenever the op
    probes as compatible. A single rank has nothing to reduce, and multi-rank CPU runs
    work with plain gloo, so the op is marked incompatible in DeepSpeed's (cached,
    mutable) ``deepspeed.ops.__compatible_ops__`` table unless FASTDENSE_DS_SHM=1 asks for it.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if device.type == "cpu" and (world_size == 1 or os.environ.get(SHM_ENV_VAR, "0") != "1"):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create) the process group that DeepSpeed uses; returns rank, world size and device.

    Launched by ``deepspeed`` / ``torchrun`` (WORLD_SIZE > 1): the usual env:// rendezvous.
    A single process (no WORLD_SIZE, or 1): RANK / LOCAL_RANK / WORLD_SIZE are set to
    0 / 0 / 1 when absent and the group is created on an in-memory ``HashStore`` — no
    MASTER_ADDR / MASTER_PORT, no free-port race, no MPI discovery.
    """
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise FastdenseError(f"RANK={rank} / WORLD_SIZE={world} are not allowed; need 0 <= RANK < WORLD_SIZE")
    dev = resolve_device(device, local)
    _prepare_deepspeed(dev, world)
    import deepspeed

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if world == 1:
            for key in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(key, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise FastdenseError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} not set; start multi-rank runs with "
                    "`deepspeed` or `torchrun`"
                )
            os.environ.setdefault("LOCAL_RANK", str(local))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=dist.get_rank(), local_rank=local, world_size=dist.get_world_size(), device=dev)


def _all_reduce(values: list[float], op: str, dist_info: DistInfo) -> list[float]:
    if dist_info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


# ============================================================================ DeepSpeed


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
                f"optim.deepspeed_config={opt.deepspeed_config!r} cannot be read as JSON ({_one_line(err)})"
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


# ============================================================================== prompts


TOY_TRAIN_PROMPTS = 256  # of the toy world's 528 training captions: many prompts, few rollouts each


def toy_train_prompts(count: int = TOY_TRAIN_PROMPTS, seed: int = 0) -> list[str]:
    """Distinct training captions of the toy world (held-out combinations excluded)."""
    import numpy as np

    from fastdense.toy.world import caption, random_scene

    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    for _ in range(50 * count):
        out.setdefault(caption(random_scene(rng)))
        if len(out) >= count:
            break
    return list(out)


def is_toy_model(path: str | None) -> bool:
    """The shipped toy model (``None``) or one made by ``fastdense toy pretrain`` (it writes toy_info.json)."""
    return path is None or (Path(path).expanduser() / "toy_info.json").is_file()


def load_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts) from the config; by default the toy world's captions and
    held-out prompts when the model is a toy model."""
    d = cfg.data
    prompts = list(d.prompts)
    if d.prompts_file is not None:
        path = Path(d.prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise FastdenseError(f"data.prompts_file={d.prompts_file!r} cannot be read ({_one_line(err)})") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise FastdenseError(f"data.prompts_file={d.prompts_file!r} is not valid JSON ({err})") from None
            if isinstance(data, dict):
                prompts += [str(k) for k in data]
            elif isinstance(data, list):
                prompts += [str(p) for p in data]
            else:
                raise FastdenseError(
                    f"data.prompts_file={d.prompts_file!r} must hold a list of prompts or {{prompt: {{...}}}}"
                )
        else:
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise FastdenseError(f"data.prompts_file={d.prompts_file!r} holds no prompts")
    toy = is_toy_model(cfg.model.path)
    if not prompts:
        if not toy:
            raise FastdenseError("no training prompts: set data.prompts or data.prompts_file")
        prompts = toy_train_prompts(TOY_TRAIN_PROMPTS, seed=0)
    eval_prompts = list(d.eval_prompts)
    if not eval_prompts:
        if toy:
            from fastdense.toy.world import HELDOUT_PROMPTS

            eval_prompts = list(HELDOUT_PROMPTS)
        else:
            eval_prompts = prompts[:8]
    if not d.eval_seeds:
        raise FastdenseError("data.eval_seeds=[] is not allowed; give at least one evaluation seed")
    return list(dict.fromkeys(prompts)), list(dict.fromkeys(eval_prompts))


# ============================================================================= run dirs


def default_run_dir(base: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    k = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{k}"
        k += 1
    return path


def _probe_writable(directory: Path) -> bool:
    """True when a directory can be created inside ``directory`` (os.access says yes to root everywhere)."""
    import tempfile

    try:
        Path(tempfile.mkdtemp(prefix=".fastdense-probe-", dir=directory)).rmdir()
    except OSError:
        return False
    return True


def check_run_dir(out: Path, *, resuming: bool) -> None:
    """A fresh run needs a new or empty directory we can create; a resumed one an existing directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastdenseError(f"output {out} exists and is not a directory; allowed: a new or empty directory")
    if out.is_dir():
        if not resuming and any(out.iterdir()):
            raise FastdenseError(
                f"output {out} is not empty; allowed: a new or empty directory (or --resume latest to continue it)"
            )
        if not _probe_writable(out):
            raise FastdenseError(f"output {out} is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FastdenseError(f"output {out} cannot be created: {parent} is not a directory")
    if not _probe_writable(parent):
        raise FastdenseError(f"output {out} cannot be created: {parent} is not writable")


# ============================================================================== trainer


@dataclass
class MicroBatchResult:
    """One micro-batch: its loss (None when not usable), logits [groups, G], stats for the metrics."""

    loss: torch.Tensor | None
    usable: bool  # finite loss and rewards, and a group passing objective.min_reward_gap
    logits: torch.Tensor
    ratio: torch.Tensor
    clip: float
    num_items: int
    ref_items: int
    eligible_groups: int = 0  # groups in this rank's shard passing objective.min_reward_gap


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


@dataclass
class _State:
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


StepCallback = Callable[["Trainer", dict[str, Any]], None]


class Trainer:
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

        self.prompts, self.eval_prompts = load_prompts(cfg)
        self.dist = init_distributed(cfg.run.device)
        if resume_state is not None:
            ckpt_mod.validate_checkpoint(self.resume_from, world_size=self.dist.world_size)
        self.device = self.dist.device
        self._build_model()
        self.reward = reward if reward is not None else self._build_reward()
        self._build_engine()
        self._build_rest()
        self.state = _State()
        self.stop = StopRequest()  # set by a signal (fastdense.training.interrupt) or by code
        self.resumed = False
        self._warned_no_gap = False
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    # ------------------------------------------------------------------ building
    def _build_model(self) -> None:
        from fastdense.lora import add_lora
        from fastdense.models.loading import load_pipeline_parts

        cfg = self.cfg
        path = cfg.model.path
        if path is None:
            from fastdense.toy import shipped_model_dir

            path = shipped_model_dir()
        self.parts = load_pipeline_parts(path, device=self.device)
        self.unet = self.parts.unet
        self.lora = cfg.model.lora_rank > 0
        add_lora(self.unet, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets, seed=cfg.train.seed)
        needs_init = cfg.objective.reference in ("init", "both")
        # Full fine-tuning has no adapters to switch off: keep a frozen copy of π_init for the reference.
        self.ref_unet = None
        if not self.lora and needs_init:
            self.ref_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()

    def _build_reward(self):
        from fastdense.rewards import get_reward

        name, bs = self.cfg.reward.name, self.cfg.reward.batch_size
        try:
            reward = get_reward(name, batch_size=bs)
        except FastdenseError as err:
            if "accept" not in str(err):
                raise
            reward = get_reward(name)
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
                f"optim.precision={cfg.optim.precision!r} on {self.device} ({_one_line(err)})"
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
        self.encoder = self.sampler.encoder
        # Every prompt encoded once, in a fixed order: the same embeddings bit for bit in a resumed run.
        self.encoder.encode(list(dict.fromkeys([*self.prompts, *self.eval_prompts])))
        self.uncond = self.encoder.unconditional().to(device=self.device, dtype=self.model_dtype)
        self.table = self.sampler.table(cfg.sampling.num_steps, cfg.sampling.eta)
        self.timesteps = self.table.timesteps.to(self.device)
        self.buffer = ReplayBuffer(cfg.train.buffer_prompts, cfg.objective.group_size, device=self.device)
        seed, rank = cfg.train.seed, self.dist.rank
        self.generators = {
            "plan": torch.Generator().manual_seed(_mix(seed, rank, 1)),
            "slots": torch.Generator().manual_seed(_mix(seed, rank, 2)),
            "ties": torch.Generator().manual_seed(_mix(seed, rank, 3)),
        }
        self.cfg_guidance = cfg.sampling.guidance != 1.0

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

    def _unet_out(self, module, x: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor):
        """One UNet call on all items: (eps_uncond or None, eps_cond)."""
        n = x.shape[0]
        t = self.timesteps[steps.to(self.device)]
        xin = x.to(self.model_dtype)
        cond = cond.to(self.model_dtype)
        if self.cfg_guidance:
            xin = torch.cat([xin, xin])
            t = torch.cat([t, t])
            cond = torch.cat([self.uncond.unsqueeze(0).expand(n, -1, -1), cond])
        out = module(xin, t, encoder_hidden_states=cond, return_dict=False)[0]
        return (out[:n], out[n:]) if self.cfg_guidance else (None, out)

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

    # ------------------------------------------------------------------- training
    def _fill_reference(self, slot: torch.Tensor, member: torch.Tensor, step: torch.Tensor, force: bool) -> int:
        """π_init residuals of the items not cached yet: one batched no-grad pass, written to the buffer."""
        from fastdense.kernels.log_ratio import squared_residual
        from fastdense.models.loading import adapters_disabled

        buf = self.buffer
        G, T = buf.group_size, self.table.num_steps
        valid = buf.ref_valid[slot.to(buf.device), member.to(buf.device), step.to(buf.device)]
        key = (slot.to(buf.device) * G + member.to(buf.device)) * T + step.to(buf.device)
        missing = torch.unique(key[~valid])  # duplicates (the same item drawn twice) computed once
        count = int(missing.numel())
        if count == 0 and not force:
            return 0
        if count == 0:  # ZeRO-3 with several ranks: every rank must run the same UNet calls
            missing = key[:1]
        ms, rest = missing // (G * T), missing % (G * T)
        mm, mt = rest // T, rest % T
        items = buf.gather(ms, mm, mt)
        a, b, _ = self.table.coefs_at(mt.cpu(), dtype=torch.float32)
        module = self.ref_unet if self.ref_unet is not None else self.unet
        ctx = contextlib.nullcontext() if self.ref_unet is not None else adapters_disabled(self.unet)
        with torch.no_grad(), ctx:
            eps_u, eps_c = self._unet_out(module, items.x, mt, items.prompt_embeds)
        sq = squared_residual(eps_c, eps_u, items.x, items.x_next, a.to(self.device), b.to(self.device),
                              guidance=self.cfg.sampling.guidance)
        if count:
            buf.write_ref(ms, mm, mt, sq)
        return count

    def micro_batch(self, warmup: bool | None = None) -> MicroBatchResult:
        """Loss of one micro-batch of train.groups_per_step comparison groups (module docstring)."""
        from fastdense.kernels.log_ratio import log_ratio
        from fastdense.objective import listmle_loss, plan_items, ranking_from_rewards

        cfg, o = self.cfg, self.cfg.objective
        buf = self.buffer
        G, T, ng = o.group_size, self.table.num_steps, self.cfg.train.groups_per_step
        eligible = int(buf.eligible_slots(o.min_reward_gap).numel())
        # none eligible: draw from every group so this rank runs the same calls as the others (ZeRO
        # collectives), then the backward is skipped
        gap = o.min_reward_gap if eligible else 0.0
        slots = buf.sample_slots(ng, generator=self.generators["slots"], min_reward_gap=gap)
        plan = plan_items(ng, G, T, gamma=o.gamma, beta=o.beta, estimator=o.estimator, k=o.k,
                          generator=self.generators["plan"])
        ranking = ranking_from_rewards(buf.rewards[slots.to(buf.device)], generator=self.generators["ties"])
        rewards = buf.rewards[slots.to(buf.device)]
        slot, member, step = slots[plan.traj // G], plan.traj % G, plan.step
        if warmup is None:
            warmup = self.state.step < o.warmup_steps
        ref_items = 0
        if not warmup and o.reference in ("init", "both"):
            force = cfg.optim.zero_stage == 3 and self.dist.world_size > 1
            ref_items = self._fill_reference(slot, member, step, force)
        items = buf.gather(slot, member, step)
        if warmup:  # no regularisation: ℓ = -s·‖x' − μ_θ‖², the logit uses log π_θ alone
            ref = torch.zeros(plan.traj.numel(), dtype=torch.float32, device=self.device)
            clip = math.inf
        else:
            clip = o.clip
            cols = []
            if o.reference in ("init", "both"):
                cols.append(items.ref_sq)
            if o.reference in ("old", "both"):
                cols.append(items.old_sq)
            ref = cols[0] if len(cols) == 1 else torch.stack(cols, dim=1)
        eps_u, eps_c = self._unet_out(self.engine, items.x, step, items.prompt_embeds)
        a, b, sigma = self.table.coefs_at(step, dtype=torch.float32)
        out = log_ratio(
            eps_c, eps_u, items.x, items.x_next,
            a.to(self.device), b.to(self.device), sigma.to(self.device),
            ref.to(device=self.device, dtype=torch.float32).contiguous(),
            plan.weight.to(device=self.device, dtype=torch.float32),
            plan.traj.to(self.device), ng * G,
            guidance=cfg.sampling.guidance, clip=clip, reduction=o.reduction,
        )
        logits = out.logits.reshape(ng, G)
        loss = listmle_loss(logits, ranking.to(logits.device))
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(rewards).all())
        usable = finite and eligible > 0
        return MicroBatchResult(loss if usable else None, usable, logits.detach(), out.ratio.detach(), clip,
                                int(plan.traj.numel()), ref_items, eligible)

    def _grad_norm_stage0(self) -> float | None:
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def update(self) -> dict[str, Any]:
        """One optimizer update (train.grad_accum micro-batches); returns its metrics record."""
        t0 = time.perf_counter()
        self.engine.train()
        gas = self.cfg.train.grad_accum
        good, losses, logits, ratios, items, ref_items, clip = 0, [], [], [], 0, 0, math.inf
        eligible = 0
        for _ in range(gas):
            mb = self.micro_batch()
            eligible = mb.eligible_groups
            items += mb.num_items
            ref_items += mb.ref_items
            clip = mb.clip
            (bad,) = _all_reduce([0.0 if mb.usable else 1.0], "max", self.dist)
            if bad:
                self.state.skipped_microbatches += 1
                continue
            self.engine.backward(mb.loss)
            good += 1
            losses.append(float(mb.loss.detach()))
            logits.append(mb.logits.float().reshape(-1))
            ratios.append(mb.ratio.float().reshape(-1))
            if self.managed_ga:
                self.engine.step()
        grad_norm = None
        applied = False
        if good == 0:
            self.state.skipped_updates += 1
            if eligible == 0 and self.dist.is_main and not self._warned_no_gap:
                self._warned_no_gap = True  # the gap is on the reward's scale: a silent trap with another reward
                self.console.print(
                    f"warning: update {self.state.step + 1} skipped: no stored group has a reward range >= "
                    f"{self.cfg.objective.min_reward_gap} (objective.min_reward_gap); lower it for a reward "
                    "on another scale", markup=False, highlight=False, soft_wrap=True)
        elif not self.managed_ga:
            if self.cfg.optim.zero_stage == 0:
                grad_norm = self._grad_norm_stage0()
            before = int(self.engine.global_steps)
            skipped_before = int(getattr(self.engine, "skipped_steps", 0))
            self.engine.step()
            applied = int(self.engine.global_steps) > before
            if int(getattr(self.engine, "skipped_steps", 0)) > skipped_before:  # fp16 overflow
                applied = False
                self.state.skipped_updates += 1
        else:
            applied = True
        if grad_norm is None and applied and self.cfg.optim.zero_stage > 0:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else None
        self.state.ref_items += ref_items
        self.state.step += 1
        seconds = time.perf_counter() - t0
        all_logits = torch.cat(logits) if logits else torch.zeros(0)
        all_ratio = torch.cat(ratios) if ratios else torch.zeros(0)
        record = {
            "event": "train",
            "step": self.state.step,
            "round": (self.state.step - 1) // self.cfg.train.updates_per_round,
            "loss": sum(losses) / len(losses) if losses else None,
            "logits_mean": float(all_logits.mean()) if all_logits.numel() else None,
            "logits_std": float(all_logits.std(unbiased=False)) if all_logits.numel() else None,
            "clip_fraction": float((all_ratio.abs() >= clip).float().mean()) if all_ratio.numel() else None,
            "grad_norm": grad_norm,
            "lr": float(self.engine.get_lr()[0]),
            "reward_mean": self.state.round_reward_mean,
            "reward_max": self.state.round_reward_max,
            "samples_per_s": items / max(seconds, 1e-9),
            "eligible_groups": eligible,
            "items": items,
            "ref_items": ref_items,
            "applied": applied,
            "skipped_updates": self.state.skipped_updates,
            "skipped_microbatches": self.state.skipped_microbatches,
            "seconds": seconds,
        }
        return record

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[float, torch.Tensor]:
        """Mean reward of the policy on eval prompts × eval seeds; also the images [P·S, 3, H, W]."""
        from fastdense.sampler import decode

        cfg = self.cfg
        seeds = list(cfg.data.eval_seeds)
        prompts = [p for p in self.eval_prompts for _ in seeds]
        traj = self.sampler.sample(prompts, num_steps=cfg.sampling.num_steps, guidance=cfg.sampling.guidance,
                                   eta=cfg.sampling.eta, seed=[s for _ in self.eval_prompts for s in seeds])
        images = decode(self.parts, traj.final_latents, batch_size=cfg.reward.batch_size)
        scores = self.reward(images, prompts).double()
        finite = scores[torch.isfinite(scores)]
        return (float(finite.mean()) if finite.numel() else float("nan")), images.cpu()

    def _eval_grid(self, images: torch.Tensor):
        rows = min(4, len(self.eval_prompts))
        cols = min(4, len(self.cfg.data.eval_seeds))
        n_seeds = len(self.cfg.data.eval_seeds)
        picked = torch.stack([images[r * n_seeds + c] for r in range(rows) for c in range(cols)])
        return _grid(picked, rows, cols)

    # ---------------------------------------------------------------- checkpoints
    def _state_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "version": 1, "step": s.step, "round": (s.step // self.cfg.train.updates_per_round),
            "rounds_collected": s.rounds_collected, "skipped_updates": s.skipped_updates,
            "skipped_microbatches": s.skipped_microbatches, "ref_items": s.ref_items,
            "metrics_lines": s.metrics_lines, "reward_before": s.reward_before,
            "round_reward_mean": _json_float(s.round_reward_mean), "round_reward_max": _json_float(s.round_reward_max),
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
                    save_lora(self.unet, tmp / "lora")
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
            raise FastdenseError(f"checkpoint {path} is corrupt: DeepSpeed cannot load engine/ ({_one_line(err)})") \
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
        s.round_reward_mean = _from_json_float(state.get("round_reward_mean"))
        s.round_reward_max = _from_json_float(state.get("round_reward_max"))
        s.elapsed = float(state.get("elapsed", 0.0))
        s.history = list(state.get("history", []))
        self.resumed = True

    # ----------------------------------------------------------------------- run
    def _prepare_run_dir(self) -> None:
        if not self.dist.is_main:
            return
        if self.resumed:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            metrics = self.run_dir / "metrics.jsonl"
            lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
            kept = lines[: self.state.metrics_lines]
            if len(kept) != len(lines):
                tmp = metrics.with_name("metrics.jsonl.tmp")
                tmp.write_text("".join(kept))
                os.replace(tmp, metrics)
        else:
            check_run_dir(self.run_dir, resuming=False)
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.json").write_text(self.cfg.to_json())
            except OSError as err:
                raise FastdenseError(f"output {self.run_dir} cannot be written ({_one_line(err)})") from None

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        clean = {k: _json_value(v) for k, v in record.items()}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")
        self.state.metrics_lines += 1
        if self._tb is not None and record.get("event") == "train":
            for k, v in clean.items():
                if isinstance(v, float) and k != "seconds":
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
        if self._tb is not None and record.get("event") in ("round", "eval"):
            tag = record.get("tag", "round")
            value = record.get("reward_mean", record.get("reward"))
            if isinstance(value, float):
                self._tb.add_scalar(f"reward/{tag}", value, record["step"])

    def _open_tensorboard(self):
        if not (self.cfg.run.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.console.print("run.tensorboard: tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _agreed_stop(self) -> int:
        """The signal that stops the run after this update (0: go on), the same on every rank:
        one collective, so all ranks checkpoint the same step."""
        (signum,) = _all_reduce([float(self.stop.signum)], "max", self.dist)
        return int(signum)

    def run(self) -> TrainResult:
        """Train to the end; raises :class:`TrainingInterrupted` after writing a checkpoint when
        ``self.stop`` is requested (checked after every update)."""
        self._prepare_run_dir()
        self._tb = self._open_tensorboard()
        try:
            return self._run()
        finally:
            if self._tb is not None:
                self._tb.close()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        P = cfg.train.updates_per_round
        t_start = time.perf_counter() - self.state.elapsed
        main = self.dist.is_main
        if self.state.reward_before is None:
            before, images = self.evaluate()
            self.state.reward_before = before
            if main:
                self._eval_grid(images).save(self.run_dir / "eval_before.png")
            self._log({"event": "eval", "tag": "before", "step": self.state.step, "reward": before})
        bar = _progress_bar(self.console, enabled=self.show_progress and main)
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
        after, images = self.evaluate()
        self._log({"event": "eval", "tag": "after", "step": self.state.step, "reward": after})
        output = None
        with self._gathered():  # a collective under ZeRO-3: every rank enters, rank 0 writes
            if main:
                output = self._write_outputs(after, images)
        return TrainResult(
            run_dir=self.run_dir, reward_before=float(self.state.reward_before), reward_after=after,
            steps=self.state.step, rounds=cfg.train.rounds, skipped_updates=self.state.skipped_updates,
            output=output, metrics=self.run_dir / "metrics.jsonl",
        )

    def _write_outputs(self, after: float, images: torch.Tensor) -> Path:
        from PIL import Image

        from fastdense.lora import save_lora

        if self.lora:  # full weights in place: the caller holds self._gathered()
            output = save_lora(self.unet, self.run_dir / "lora").parent
        else:
            output = self.run_dir / "unet"
            self.unet.save_pretrained(str(output))
        after_grid = self._eval_grid(images)
        after_grid.save(self.run_dir / "eval_after.png")
        before_path = self.run_dir / "eval_before.png"
        before_grid = Image.open(before_path).convert("RGB") if before_path.is_file() else None
        _before_after(before_grid, after_grid).save(self.run_dir / "before_after.png")
        _reward_curve(self.state.history, float(self.state.reward_before), after).save(
            self.run_dir / "reward_curve.png"
        )
        summary = {
            "reward_before": self.state.reward_before, "reward_after": after,
            "steps": self.state.step, "rounds": self.cfg.train.rounds,
            "skipped_updates": self.state.skipped_updates, "output": str(output),
            "eval_prompts": len(self.eval_prompts), "eval_seeds": list(self.cfg.data.eval_seeds),
            "seconds": self.state.elapsed,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(_json_value(summary), indent=2) + "\n")
        return output


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
        base = out if out is not None else cfg.run.out
        ckpt = ckpt_mod.resolve_resume(resume, base)
        ckpt_mod.validate_checkpoint(ckpt)
        run_dir = Path(out) if out is not None else ckpt_mod.run_dir_of(ckpt)
        check_run_dir(run_dir, resuming=True)
    else:
        run_dir = Path(out) if out is not None else (Path(cfg.run.out) if cfg.run.out else default_run_dir())
        check_run_dir(run_dir, resuming=False)
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


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


def _json_float(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _from_json_float(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, float):
        return _json_float(v)
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """DeepSpeed prints checkpoint loading notes with print(): keep them off the console."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        yield


def _progress_bar(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("reward {task.fields[reward]:.4f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def _grid(images: torch.Tensor, rows: int, cols: int, pad: int = 2, scale: int | None = None):
    """[rows·cols, 3, H, W] in [0, 1] → one PIL image (small images scaled up to ≥ 64 px)."""
    from PIL import Image

    h, w = images.shape[-2:]
    scale = scale or max(1, 64 // max(h, w))
    h, w = h * scale, w * scale
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for k in range(images.shape[0]):
        r, c = divmod(k, cols)
        tile = _to_pil(images[k]).resize((w, h), Image.NEAREST)
        grid.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def _before_after(before, after):
    """Two grids side by side under the captions "before" and "after"."""
    from PIL import Image, ImageDraw

    panels = [p for p in (before, after) if p is not None]
    width = sum(p.width for p in panels) + 10 * (len(panels) + 1)
    height = max(p.height for p in panels) + 30
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 10
    for label, panel in (("before", before), ("after", after)):
        if panel is None:
            continue
        draw.text((x, 6), label, fill=(0, 0, 0))
        canvas.paste(panel, (x, 24))
        x += panel.width + 10
    return canvas


def _reward_curve(history: list[dict[str, Any]], before: float, after: float, size=(640, 400)):
    """Reward per round (mean and max of the rollouts) and the held-out before/after, drawn with PIL."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    means = [(h["round"], h["reward_mean"]) for h in history if _finite(h.get("reward_mean"))]
    maxes = [(h["round"], h["reward_max"]) for h in history if _finite(h.get("reward_max"))]
    n_rounds = max([r for r, _ in means] + [0]) + 1
    values = [v for _, v in means + maxes] + [v for v in (before, after) if _finite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        px = left + (W - left - right) * (x / max(1, n_rounds - 1) if n_rounds > 1 else 0.5)
        py = top + (H - top - bottom) * (1 - (y - lo) / (hi - lo))
        return px, py

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        _, py = xy(0, y)
        d.line([left - 4, py, left, py], fill=(0, 0, 0))
        d.text((4, py - 6), f"{y:.3f}", fill=(0, 0, 0))
    for r in range(n_rounds):
        px, _ = xy(r, lo)
        d.line([px, H - bottom, px, H - bottom + 4], fill=(0, 0, 0))
        d.text((px - 4, H - bottom + 6), str(r + 1), fill=(0, 0, 0))
    for series, colour in ((means, (31, 119, 180)), (maxes, (255, 127, 14))):
        pts = [xy(r, v) for r, v in series]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    for v, colour in ((before, (150, 150, 150)), (after, (44, 160, 44))):
        if _finite(v):
            _, py = xy(0, v)
            for x0 in range(left, W - right, 12):
                d.line([x0, py, min(x0 + 6, W - right), py], fill=colour, width=1)
    d.text((left, 8), "reward per round: rollout mean (blue), max (orange); held-out before (grey), after (green)",
           fill=(0, 0, 0))
    d.text((W // 2 - 20, H - 18), "round", fill=(0, 0, 0))
    return img


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)

