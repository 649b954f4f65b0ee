"""The trainer's update: micro-batches of comparison groups through the policy UNet and the
fused log-ratio op into the ranking loss, and one optimizer update from them.

A micro-batch (:meth:`UpdateMixin.micro_batch`): the (trajectory × step) items of ``plan_items``
go through the policy UNet in ONE call of the backbone seam (:mod:`fastdense.models.backbone`:
``[x | x]`` with ``[uncond | cond]``), then the fused ``log_ratio`` op (weights from the plan,
reference residuals from the buffer cache) gives logits [groups, G], ranked by reward into
``listmle_loss``, and ``engine.backward``. Missing
π_init residuals of the sampled items are computed in one batched no-grad pass with the adapters
disabled and cached in the buffer; in the first round (sampled by π_init itself) they are the
sampler's own residuals.

A micro-batch whose loss or rewards are not finite, or that finds no group passing
``objective.min_reward_gap`` in its rank's shard, does not backpropagate and is counted; an
update whose micro-batches all failed is skipped (weights, optimizer and LR schedule untouched)
and counted in ``skipped_updates``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from fastdense.training.distributed import _all_reduce

__all__ = ["MicroBatchResult", "UpdateMixin"]


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


class UpdateMixin:
    """Micro-batches and optimizer updates; part of :class:`fastdense.training.trainer.Trainer`."""

    def _unet_out(self, module, x: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor):
        """One call of ``module`` (the engine, or a reference UNet) through the backbone on all items
        at their generation steps: (eps_uncond or None, eps_cond)."""
        t = self.timesteps[steps.to(self.device)]
        return self.backbone(x, t, cond, cfg=self.cfg_guidance, module=module, guidance=self.cfg.sampling.guidance)

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
        window = {} if self.train_steps is None else {"steps": self.train_steps}  # None: the whole chain
        plan = plan_items(ng, G, T, gamma=o.gamma, beta=o.beta, estimator=o.estimator, k=o.k,
                          generator=self.generators["plan"], **window)
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
