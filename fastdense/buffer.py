"""Replay buffer of stored trajectories (DESIGN.md §1 "Caching the reference").

Each trajectory's latents are stored once, [T+1, C, H, W]: a transition (x, x')
is two adjacent slots of the same tensor, never a separate copy of "state" and
"next state". Each unique prompt's embedding is stored once (reference-counted
across slots) plus one unconditional embedding. Per step the buffer keeps the
sampling policy's squared residual (for π_old) and the cached reference squared
residual (for π_init) with a validity mask, so the training step needs no
reference-model forward once the cache is filled.

Capacity is counted in prompts (FIFO); every prompt slot holds G trajectories,
chosen across the reward range when more than G rollouts were collected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdense.errors import FastdenseError


class NoEligibleGroups(FastdenseError):
    """No stored comparison group passes the reward-gap filter."""


def spread_selection(rewards: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of ``keep`` of the R rollouts spread evenly across the reward range (min and max included)."""
    r = rewards.numel()
    if keep > r:
        raise FastdenseError(f"cannot keep {keep} trajectories of {r} rollouts; collect at least {keep}")
    order = torch.argsort(rewards.double().cpu(), stable=True)
    picks = torch.linspace(0, r - 1, keep, dtype=torch.float64).round().long()
    return order[picks]


@dataclass
class ItemBatch:
    """Gathered (trajectory, step) items for one training micro-batch."""

    x: torch.Tensor  # [N, C, H, W] latents[step]
    x_next: torch.Tensor  # [N, C, H, W] latents[step + 1]
    step: torch.Tensor  # [N] int64
    prompt_embeds: torch.Tensor  # [N, L, E]
    ref_sq: torch.Tensor  # [N] fp32 (NaN where not cached yet)
    ref_valid: torch.Tensor  # [N] bool
    old_sq: torch.Tensor  # [N] fp32
    slot: torch.Tensor  # [N] int64
    member: torch.Tensor  # [N] int64 (trajectory within the slot's group)


class ReplayBuffer:
    def __init__(self, capacity_prompts: int, group_size: int, *, device: torch.device | str = "cpu"):
        if capacity_prompts < 1:
            raise FastdenseError(f"buffer capacity {capacity_prompts} is not allowed; it must be >= 1 prompt")
        if group_size < 2:
            raise FastdenseError(f"group size {group_size} is not allowed; a comparison needs >= 2 trajectories")
        self.capacity = capacity_prompts
        self.group_size = group_size
        self.device = torch.device(device)
        self.latents: torch.Tensor | None = None  # [P, G, T+1, C, H, W]
        self.rewards: torch.Tensor | None = None  # [P, G] fp32
        self.old_sq: torch.Tensor | None = None  # [P, G, T] fp32
        self.ref_sq: torch.Tensor | None = None  # [P, G, T] fp32
        self.ref_valid: torch.Tensor | None = None  # [P, G, T] bool
        self.slot_prompt: list[str | None] = [None] * capacity_prompts
        self.embeds: dict[str, torch.Tensor] = {}  # unique prompt -> [L, E]
        self.uncond_embed: torch.Tensor | None = None
        self.next_slot = 0
        self.size = 0
        self.total_added = 0

    # ------------------------------------------------------------------ storage
    def _allocate(self, latents: torch.Tensor) -> None:
        g, p = self.group_size, self.capacity
        steps = latents.shape[1] - 1
        self.latents = torch.zeros((p, g, *latents.shape[1:]), dtype=latents.dtype, device=self.device)
        self.rewards = torch.zeros((p, g), dtype=torch.float32, device=self.device)
        self.old_sq = torch.zeros((p, g, steps), dtype=torch.float32, device=self.device)
        self.ref_sq = torch.full((p, g, steps), float("nan"), dtype=torch.float32, device=self.device)
        self.ref_valid = torch.zeros((p, g, steps), dtype=torch.bool, device=self.device)

    def add(
        self,
        prompt: str,
        prompt_embed: torch.Tensor,
        latents: torch.Tensor,
        rewards: torch.Tensor,
        old_sq: torch.Tensor,
        ref_sq: torch.Tensor | None = None,
        uncond_embed: torch.Tensor | None = None,
    ) -> int:
        """Store R >= G rollouts of one prompt (keeping G across the reward range); returns the slot."""
        if latents.dim() < 3:
            raise FastdenseError(f"latents have shape {tuple(latents.shape)}; expected (R, T+1, C, H, W)")
        rollouts, steps = latents.shape[0], latents.shape[1] - 1
        if tuple(old_sq.shape) != (rollouts, steps):
            raise FastdenseError(
                f"old_sq has shape {tuple(old_sq.shape)}; expected (R, T) = ({rollouts}, {steps}) "
                f"for latents {tuple(latents.shape)}"
            )
        if rewards.numel() != latents.shape[0]:
            raise FastdenseError(f"{rewards.numel()} rewards for {latents.shape[0]} trajectories")
        if self.latents is None:
            self._allocate(latents)
        elif latents.shape[1:] != self.latents.shape[2:] or latents.dtype != self.latents.dtype:
            raise FastdenseError(
                f"latents {tuple(latents.shape[1:])} {latents.dtype} do not match the buffer's "
                f"{tuple(self.latents.shape[2:])} {self.latents.dtype}"
            )
        keep = spread_selection(rewards, self.group_size).to(latents.device)
        slot = self.next_slot
        self._release(slot)
        self.latents[slot] = latents[keep].to(self.device)
        self.rewards[slot] = rewards.reshape(-1)[keep.to(rewards.device)].float().to(self.device)
        self.old_sq[slot] = old_sq[keep.to(old_sq.device)].float().to(self.device)
        if ref_sq is not None:
            self.ref_sq[slot] = ref_sq[keep.to(ref_sq.device)].float().to(self.device)
            self.ref_valid[slot] = torch.isfinite(self.ref_sq[slot])
        else:
            self.ref_sq[slot] = float("nan")
            self.ref_valid[slot] = False
        if prompt not in self.embeds:
            self.embeds[prompt] = prompt_embed.detach().to(self.device)
        if uncond_embed is not None and self.uncond_embed is None:
            self.uncond_embed = uncond_embed.detach().to(self.device)
        self.slot_prompt[slot] = prompt
        self.next_slot = (slot + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.total_added += 1
        return slot

    def _release(self, slot: int) -> None:
        old = self.slot_prompt[slot]
        self.slot_prompt[slot] = None
        if old is not None and old not in self.slot_prompt:
            del self.embeds[old]  # last slot using this prompt's embedding is gone

    # ----------------------------------------------------------------- sampling
    def filled_slots(self) -> torch.Tensor:
        return torch.tensor([i for i, p in enumerate(self.slot_prompt) if p is not None], dtype=torch.long)

    def eligible_slots(self, min_reward_gap: float = 0.0) -> torch.Tensor:
        """Filled slots whose reward range (max - min, finite rewards) is at least ``min_reward_gap``."""
        filled = self.filled_slots()
        if min_reward_gap <= 0 or filled.numel() == 0:
            return filled
        r = self.rewards[filled.to(self.device)].double()
        finite = torch.isfinite(r)
        hi = torch.where(finite, r, -math.inf).amax(1)
        lo = torch.where(finite, r, math.inf).amin(1)
        return filled[((hi - lo) >= min_reward_gap).cpu()]

    def sample_slots(
        self, num_groups: int, generator: torch.Generator | None = None, min_reward_gap: float = 0.0
    ) -> torch.Tensor:
        """``num_groups`` slots drawn uniformly (with replacement) from the eligible ones.

        Raises :class:`NoEligibleGroups` when no filled slot has a reward range of at least
        ``min_reward_gap`` (the caller skips that update)."""
        if self.size == 0:
            raise FastdenseError("the replay buffer is empty; collect rollouts first")
        eligible = self.eligible_slots(min_reward_gap)
        if eligible.numel() == 0:
            raise NoEligibleGroups(
                f"no stored group has a reward range >= {min_reward_gap} (objective.min_reward_gap)"
            )
        pick = torch.randint(len(eligible), (num_groups,), generator=generator)
        return eligible[pick]

    def gather(self, slot: torch.Tensor, member: torch.Tensor, step: torch.Tensor) -> ItemBatch:
        """Items (slot, member, step): x = latents[..., step], x' = latents[..., step + 1] of the same tensor."""
        assert self.latents is not None
        slot, member, step = (t.to(self.device) for t in (slot, member, step))
        x = self.latents[slot, member, step]
        x_next = self.latents[slot, member, step + 1]
        embeds = torch.stack([self.embeds[self.slot_prompt[s]] for s in slot.tolist()])
        return ItemBatch(
            x=x, x_next=x_next, step=step, prompt_embeds=embeds,
            ref_sq=self.ref_sq[slot, member, step], ref_valid=self.ref_valid[slot, member, step],
            old_sq=self.old_sq[slot, member, step], slot=slot, member=member,
        )

    def write_ref(self, slot: torch.Tensor, member: torch.Tensor, step: torch.Tensor, ref_sq: torch.Tensor) -> None:
        """Cache reference residuals computed for these items (each is computed at most once)."""
        assert self.ref_sq is not None and self.ref_valid is not None
        self.ref_sq[slot, member, step] = ref_sq.float().to(self.device)
        self.ref_valid[slot, member, step] = True

    # -------------------------------------------------------------- accounting
    @property
    def nbytes(self) -> int:
        tensors = [self.latents, self.rewards, self.old_sq, self.ref_sq, self.ref_valid, self.uncond_embed]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total + sum(e.numel() * e.element_size() for e in self.embeds.values())

    # ------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        """Tensors in safetensors, prompts and counters in JSON: no pickle."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        prompts = sorted(self.embeds)
        tensors: dict[str, torch.Tensor] = {}
        if self.latents is not None:
            tensors.update(latents=self.latents, rewards=self.rewards, old_sq=self.old_sq, ref_sq=self.ref_sq,
                           ref_valid=self.ref_valid.to(torch.uint8))
        for i, prompt in enumerate(prompts):
            tensors[f"embed.{i}"] = self.embeds[prompt]
        if self.uncond_embed is not None:
            tensors["uncond_embed"] = self.uncond_embed
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / "buffer.safetensors"))
        meta = {
            "capacity": self.capacity, "group_size": self.group_size, "next_slot": self.next_slot, "size": self.size,
            "total_added": self.total_added, "prompts": prompts, "slot_prompt": self.slot_prompt,
        }
        (directory / "buffer.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> ReplayBuffer:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / "buffer.json").read_text())
            tensors = load_file(str(directory / "buffer.safetensors"), device=str(device))
        except (OSError, ValueError, SafetensorError) as err:
            raise FastdenseError(f"cannot read the replay buffer in {directory}: {err}") from err
        buf = cls(meta["capacity"], meta["group_size"], device=device)
        if "latents" in tensors:
            buf.latents, buf.rewards = tensors["latents"], tensors["rewards"]
            buf.old_sq, buf.ref_sq = tensors["old_sq"], tensors["ref_sq"]
            buf.ref_valid = tensors["ref_valid"].bool()
        buf.embeds = {p: tensors[f"embed.{i}"] for i, p in enumerate(meta["prompts"])}
        buf.uncond_embed = tensors.get("uncond_embed")
        buf.slot_prompt = meta["slot_prompt"]
        buf.next_slot, buf.size, buf.total_added = meta["next_slot"], meta["size"], meta["total_added"]
        return buf
