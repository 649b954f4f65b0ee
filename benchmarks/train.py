"""Side-by-side training-step benchmark: our step vs a naive step that does what the
paper's code does (a separate reference-UNet forward for every item, one UNet call
per trajectory and step, log-probs via ``Normal.log_prob``), at the same batch,
steps and model; plus replay-buffer bytes per trajectory at SD1.5 shapes.

Used by ``fastdense bench train``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastdense.benchmarks.sampler import PeakMemory
from fastdense.benchmarks.timing import sync


@dataclass
class TrainRow:
    mode: str  # "fastdense" or "naive"
    step_seconds: float
    peak_mem_mb: float
    mem_kind: str
    unet_calls: int  # UNet forward calls of one training step (after the reference cache is filled)
    items: int  # (trajectory × step) items per step
    device: str
    speedup_vs_naive: float | None = None
    backbone: str = "sd"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BufferBytesRow:
    layout: str  # "fastdense" or "state+next_state+embedding"
    dtype: str
    bytes_per_trajectory: float
    ratio_vs_naive: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class CallCounter:
    """Counts forward calls of a module (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def naive_update(trainer) -> None:
    """One update the way the paper's code computes it: per item, a reference forward and a
    policy forward of their own (CFG pair batched), Normal.log_prob of each, subtract."""
    from fastdense.kernels.log_ratio_torch import log_ratio_naive
    from fastdense.models.loading import adapters_disabled
    from fastdense.objective import listmle_loss, plan_items, ranking_from_rewards

    cfg, o, buf = trainer.cfg, trainer.cfg.objective, trainer.buffer
    G, T, ng = o.group_size, trainer.table.num_steps, cfg.train.groups_per_step
    trainer.engine.train()
    for _ in range(cfg.train.grad_accum):
        slots = buf.sample_slots(ng, generator=trainer.generators["slots"])
        plan = plan_items(ng, G, T, gamma=o.gamma, beta=o.beta, estimator=o.estimator, k=o.k,
                          generator=trainer.generators["plan"])
        ranking = ranking_from_rewards(buf.rewards[slots], generator=trainer.generators["ties"])
        slot, member, step = slots[plan.traj // G], plan.traj % G, plan.step
        items = buf.gather(slot, member, step)
        eps_c, eps_u, ref_c, ref_u = [], [], [], []
        for i in range(step.numel()):
            one = slice(i, i + 1)
            with torch.no_grad(), adapters_disabled(trainer.unet):
                ru, rc = trainer._unet_out(trainer.unet, items.x[one], step[one], items.prompt_embeds[one])
            pu, pc = trainer._unet_out(trainer.engine, items.x[one], step[one], items.prompt_embeds[one])
            eps_c.append(pc)
            ref_c.append(rc)
            if pu is not None:
                eps_u.append(pu)
                ref_u.append(ru)
        a, b, sigma = trainer.table.coefs_at(step, dtype=torch.float32)
        logits = log_ratio_naive(
            torch.cat(eps_c), torch.cat(eps_u) if eps_u else None, torch.cat(ref_c),
            torch.cat(ref_u) if ref_u else None, items.x, items.x_next, a, b, sigma,
            plan.weight.float(), plan.traj, ng * G, guidance=cfg.sampling.guidance, clip=o.clip,
            reduction=o.reduction,
        )
        loss = listmle_loss(logits.reshape(ng, G), ranking)
        trainer.engine.backward(loss)
        if trainer.managed_ga:
            trainer.engine.step()
    if not trainer.managed_ga:
        trainer.engine.step()


def buffer_bytes_rows(num_steps: int = 50, latent=(4, 64, 64), embed=(77, 768), group: int = 5,
                      dtype: torch.dtype = torch.float32) -> list[BufferBytesRow]:
    """Bytes per stored trajectory of our buffer against storing state and next state plus a
    per-trajectory embedding (and per-step log-prob and timestep, as DDPO-style buffers do), in
    the same dtype.

    Ours is measured with ``ReplayBuffer.nbytes`` as the marginal cost of one more prompt (its G
    trajectories and its embedding) on SD1.5-shaped data; the one unconditional embedding per
    buffer (77×768) is a fixed cost, not per trajectory.
    """
    from fastdense.buffer import ReplayBuffer

    def filled(prompts: int) -> int:
        buf = ReplayBuffer(prompts, group)
        for p in range(prompts):
            buf.add(f"prompt {p}", torch.zeros(embed, dtype=dtype),
                    torch.zeros(group, num_steps + 1, *latent, dtype=dtype), torch.arange(group, dtype=torch.float32),
                    torch.zeros(group, num_steps), uncond_embed=torch.zeros(embed, dtype=dtype))
        return buf.nbytes

    ours = (filled(2) - filled(1)) / group
    elt = torch.empty((), dtype=dtype).element_size()
    naive = (2 * num_steps * math.prod(latent) + math.prod(embed)) * elt + num_steps * (4 + 8)
    name = str(dtype).replace("torch.", "")
    return [BufferBytesRow("fastdense", name, ours, ours / naive),
            BufferBytesRow("state+next_state+embedding", name, naive, 1.0)]


def run_train_benchmarks(device: torch.device, *, repeats: int = 3, num_steps: int = 10, group_size: int = 4,
                         k: int = 4, groups_per_step: int = 1, progress=None, backbone: str = "sd") -> list[TrainRow]:
    """Our training step against the naive one on the family's tiny pipeline (``backbone``: sd,
    sdxl, sd3, flux; the flow families train on their SDE chain)."""
    from fastdense.benchmarks.sampler import TINY_RESOLUTION, build_tiny_family
    from fastdense.config import build_config
    from fastdense.train import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_family(backbone, Path(tmp) / "tiny")
        cfg = build_config(overrides=[
            f"model.path={model}", "model.lora_rank=4", f"sampling.num_steps={num_steps}", "sampling.guidance=7.5",
            f"sampling.rollouts_per_prompt={group_size}", f"objective.group_size={group_size}",
            "objective.estimator=sampled", f"objective.k={k}", "objective.reference=init",
            "train.rounds=1", "train.prompts_per_round=2", f"train.updates_per_round={2 * repeats + 2}",
            f"train.groups_per_step={groups_per_step}", "train.grad_accum=1", "optim.zero_stage=0",
            "reward.name=aesthetic_proxy", f"run.device={device.type}",
            "data.prompts=[a red circle, a blue square]", "data.eval_prompts=[a red circle]", "data.eval_seeds=[0]",
            *([f"model.resolution={TINY_RESOLUTION[backbone]}"] if backbone in TINY_RESOLUTION else []),
        ])
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        if progress:
            progress("collecting rollouts")
        trainer.collect(0)
        counter = CallCounter(trainer.unet)
        modes = {"fastdense": trainer.update, "naive": lambda: naive_update(trainer)}
        for fn in modes.values():  # warm-up; also fills the reference cache of our step
            fn()
        times = {m: [] for m in modes}
        calls, peaks = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0.0)
        for rep in range(repeats):  # round-robin against drift on shared machines
            for mode, fn in modes.items():
                if progress:
                    progress(f"{mode} repeat {rep + 1}/{repeats}")
                counter.calls = 0
                with PeakMemory(device) as mem:
                    sync(device)
                    start = time.perf_counter()
                    fn()
                    sync(device)
                    times[mode].append(time.perf_counter() - start)
                calls[mode] = counter.calls
                peaks[mode] = max(peaks[mode], mem.peak_mb)
        counter.remove()
        items = groups_per_step * group_size * k
        for mode in modes:
            rows.append(TrainRow(mode=mode, step_seconds=statistics.median(times[mode]), peak_mem_mb=peaks[mode],
                                 mem_kind="cuda max_memory_allocated" if device.type == "cuda"
                                 else "cpu peak RSS growth", unet_calls=calls[mode], items=items,
                                 device=device.type, backbone=backbone))
    naive = next(r for r in rows if r.mode == "naive")
    for r in rows:
        r.speedup_vs_naive = naive.step_seconds / r.step_seconds
    return rows
