"""Scaling model for clusters: per GPU count, rollout time per round, training step time, ZeRO-2/3
communication per step over NVLink / InfiniBand, buffer and optimizer memory per rank, and where the
bottleneck sits. Paper arithmetic, for planning runs we cannot measure (no cluster); used by
``fastdense bench scaling``. Pure arithmetic on three kinds of input, none invented:

* **our own counts** from the training config (the preset): rollouts, steps, items per micro-batch,
  buffer layout (the byte layout of :class:`fastdense.buffer.ReplayBuffer`), what the trainer does
  per round (:mod:`fastdense.training.trainer`, :mod:`fastdense.training.update`) and what DeepSpeed
  0.19 does per ZeRO stage (read in its source, cited at each use);
* **measured FLOPs** of the denoiser (:data:`BACKBONES`): torch's ``FlopCounterMode`` on the real
  model config with random weights, stored with the date and the command that measured them
  (:func:`measure_backbone`; a test re-measures them);
* **published GPU and network figures** (:data:`fastdense.benchmarks.roofline.GPUS`) and NCCL's
  own latency constants (:data:`NCCL_RING`).

Everything else is a named assumption of :class:`ScalingAssumptions`, printed with every table.

Per-rank work follows the trainer: each rank samples ``train.prompts_per_round`` prompts × R
rollouts per round into its own buffer shard and runs ``train.grad_accum`` micro-batches of
``train.groups_per_step`` groups per optimizer step (DeepSpeed's train_batch_size = micro ×
accumulation × world), so the per-rank work is the same at every GPU count (weak scaling: the
global batch grows with the GPU count) and what changes with the count is the communication.

Another backbone plugs in by adding a :class:`BackboneCost` (measured the same way) under the
hub ids its presets name in ``model.path``; nothing here is specific to SD1.5 but those numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fastdense.benchmarks.roofline import DTYPE_BYTES, GpuSpec

__all__ = [
    "BACKBONES",
    "NCCL_RING",
    "BackboneCost",
    "LoraGroup",
    "ScalingAssumptions",
    "ScalingRow",
    "WorkPlan",
    "backbone_for",
    "buffer_bytes",
    "collective_us",
    "comm_bound_from",
    "measure_backbone",
    "scaling_rows",
    "work_plan",
]


# ---------------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class LoraGroup:
    """The linear / conv layers of a denoiser that share a name suffix (what ``lora_targets`` names).

    A LoRA of rank r on a layer with ``in_eff`` = in_features (or in_channels·kh·kw) and ``out``
    adds r·(in_eff + out) parameters and, at P output positions, 2·P·r·(in_eff + out) forward FLOPs.
    """

    layers: int
    io: int  # Σ (in_eff + out): LoRA parameters per unit of rank
    flops_io: int  # Σ 2·P·(in_eff + out) at batch 1: LoRA forward FLOPs per unit of rank
    max_dim: int  # largest in_eff or out: a LoRA matrix holds at most rank × max_dim elements


@dataclass(frozen=True)
class BackboneCost:
    """Measured costs of one backbone at its training resolution, batch 1, one CFG branch."""

    key: str
    family: str  # fastdense.models.families name
    model_ids: tuple[str, ...]  # model.path values (hub ids) whose presets use these numbers
    latent_shape: tuple[int, ...]
    resolution: int  # image pixels per side the costs were measured at
    default_lora_targets: tuple[str, ...]  # the family backbone's (model.lora_targets = null)
    text_tokens: int
    text_dim: int
    fwd_flops: float  # denoiser forward, base weights (no LoRA)
    # backward FLOPs with LoRA on these targets (the base weights frozen), as (a, b): a + b·rank;
    # measured at two ranks. The base part is only the activation gradients back to the first
    # LoRA layer (frozen weights need no weight gradient), so it depends on the targets.
    bwd_flops: dict[tuple[str, ...], tuple[float, float]]
    vae_decode_flops: float  # one latent → image
    text_encoder_flops: float  # one prompt
    params: int  # denoiser parameters
    gathered_params: int  # those over DeepSpeed's stage3_param_persistence_threshold (ZeRO-3 partitions them)
    persistence_threshold: int
    lora_groups: dict[str, LoraGroup]
    measured: str  # when and how

    @property
    def latent_elems(self) -> int:
        return math.prod(self.latent_shape)

    def lora_layers(self, targets) -> list[LoraGroup]:
        """The groups peft's ``target_modules`` matching (name == t or name ends with '.t') selects."""
        names: list[str] = []
        for t in targets:
            hit = [name for name in self.lora_groups if name == t or name.endswith("." + t)]
            if not hit:
                raise ValueError(f"model.lora_targets: {t!r} names no layer of the {self.key} denoiser; "
                                 f"allowed: {', '.join(sorted(self.lora_groups))}")
            names += [name for name in hit if name not in names]
        return [self.lora_groups[name] for name in names]

    def lora_params(self, rank: int, targets) -> int:
        return rank * sum(g.io for g in self.lora_layers(targets)) if rank > 0 else self.params

    def lora_fwd_flops(self, rank: int, targets) -> float:
        return rank * sum(g.flops_io for g in self.lora_layers(targets)) if rank > 0 else 0.0

    def backward_flops(self, rank: int, targets) -> tuple[float, bool]:
        """(backward FLOPs at batch 1, whether measured): measured for the stored target sets, else
        the assumption backward = 2 × forward (full weight + activation gradients: an upper bound)."""
        if rank > 0:
            ab = self.bwd_flops.get(tuple(targets))
            if ab is not None:
                return ab[0] + ab[1] * rank, True
        return 2.0 * (self.fwd_flops + self.lora_fwd_flops(rank, targets)), False


def _groups(rows: dict[str, tuple[int, int, int, int]]) -> dict[str, LoraGroup]:
    return {k: LoraGroup(*v) for k, v in rows.items()}


# Measured 2026-12-04 (torch 2.13.0, diffusers 0.42.1, peft 0.21.2) by
#   python -m fastdense.benchmarks.scaling --measure sd15
# on the meta device (shapes only, so no weights are allocated; torch's FlopCounterMode counts
# matmuls, convolutions and attention at 2 FLOPs per multiply-add, softmax / norms / pointwise
# not counted). Not on the CPU device: there scaled_dot_product_attention runs a CPU flash
# kernel FlopCounterMode has no formula for, and the UNet forward reads 677.2 GFLOP instead of
# 803.3 (the attention matmuls missing); on meta (and on CUDA) attention is counted.
SD15 = BackboneCost(
    key="sd15",
    family="sd",
    model_ids=("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "CompVis/stable-diffusion-v1-4"),
    latent_shape=(4, 64, 64),
    resolution=512,
    default_lora_targets=("to_q", "to_k", "to_v", "to_out.0"),  # fastdense.models.backbone.UNetBackbone
    text_tokens=77,
    text_dim=768,
    fwd_flops=803_273_441_280.0,
    bwd_flops={("to_q", "to_k", "to_v", "to_out.0"): (907_768_627_200.0, 558_042_624.0)},
    vae_decode_flops=2_514_518_933_504.0,
    text_encoder_flops=13_298_503_680.0,
    params=859_520_964,
    gathered_params=859_054_080,
    persistence_threshold=100_000,
    lora_groups=_groups({
        "conv": (6, 54400, 96665600, 11520), "conv1": (22, 288000, 386826240, 23040),
        "conv2": (22, 201600, 240844800, 11520), "conv_in": (1, 356, 2916352, 320),
        "conv_out": (1, 2884, 23625728, 2880), "conv_shortcut": (14, 34560, 48660480, 2560),
        "linear_1": (1, 1600, 3200, 1280), "linear_2": (1, 2560, 5120, 1280),
        "net.2": (16, 62400, 115507200, 5120), "proj": (16, 112320, 207912960, 10240),
        "proj_in": (16, 24960, 46202880, 1280), "proj_out": (16, 24960, 46202880, 1280),
        "time_emb_proj": (22, 48320, 96640, 1280), "to_k": (32, 49728, 50017152, 1280),
        "to_out.0": (32, 49920, 92405760, 1280), "to_q": (32, 49920, 92405760, 1280),
        "to_v": (32, 49728, 50017152, 1280),
    }),
    measured="2026-12-04, python -m fastdense.benchmarks.scaling --measure sd15 (FlopCounterMode, meta device)",
)

BACKBONES: dict[str, BackboneCost] = {"sd15": SD15}


def backbone_for(model_path: str | None) -> BackboneCost:
    """The measured costs of the backbone a config's ``model.path`` names (a hub id, or a key of
    :data:`BACKBONES`); a one-line error naming what is known otherwise."""
    for cost in BACKBONES.values():
        if model_path == cost.key or model_path in cost.model_ids:
            return cost
    known = ", ".join(f"{c.key} ({', '.join(c.model_ids)})" for c in BACKBONES.values())
    raise ValueError(f"model.path={model_path!r} has no measured costs for the scaling model; known: {known} "
                     "(measure another with fastdense.benchmarks.scaling.measure_backbone)")


# ------------------------------------------------------------------------------ assumptions


@dataclass(frozen=True)
class ScalingAssumptions:
    """The scaling model's named assumptions (not published figures, not measured here)."""

    # Model-FLOP utilisation of the denoiser's forward and backward in bf16 at the micro-batch
    # sizes used (10-16 rows): the fraction of peak dense bf16 FLOP/s reached. gpu_check measures
    # the real figure (sampler and training step at SD1.5 shapes).
    mfu: float = 0.40
    # Fraction of the link bandwidth a collective reaches (NCCL bus bandwidth / wire rate).
    comm_efficiency: float = 0.80
    # Share of a micro-batch's items whose π_init residual is not cached yet (one no-grad
    # reference forward each): 1 in the steady state (a round's draws are mostly new
    # transitions), 0 in round 1 (sampled by π_init itself: free).
    ref_fill_fraction: float = 1.0

    def describe(self) -> list[str]:
        return [
            f"MFU {self.mfu:.0%} of peak dense bf16 FLOP/s for the denoiser forward and backward (gpu_check "
            "measures it)",
            f"collectives reach {self.comm_efficiency:.0%} of the link bandwidth; latency from NCCL's ring model "
            "(Ring LL / LL128 / Simple, the fastest for the size, as NCCL's tuner picks)",
            "overlap_comm (both shipped ZeRO configs): a micro-batch's gradient reduce-scatter and ZeRO-3's "
            "prefetched all-gathers hide behind its compute up to the compute time; the all-gather of updated "
            "parameters after the optimizer step is serial",
            f"steady-state round: {self.ref_fill_fraction:.0%} of drawn items need a π_init reference forward "
            "(round 1: none)",
            "ZeRO-3 as written: every forward (sampling call, reference pass, policy pass) and every backward "
            "all-gathers the partitioned weights once, in ceil(partitioned / stage3_prefetch_bucket_size) "
            "collectives; the shipped stage3_max_reuse_distance / max_live_parameters (1e9 >= the UNet) may "
            "keep them gathered instead (less traffic, no weight-memory saving)",
            "not counted: reward model, prompt encoding of the unconditional prompt, the optimizer step, the "
            "log-ratio kernel (µs per micro-batch), activations (memory), data loading",
            "weak scaling (the trainer's): per-rank prompts per round and micro-batches per step are the "
            "preset's at every GPU count, so the global batch grows with the GPU count",
        ]


# NCCL's ring latency model (NVIDIA/nccl src/graph/tuning.cc, commit b6475625): per protocol
# (base latency µs, per NVLink hop µs, per network hop µs, bus-bandwidth factor for
# reduce-scatter / all-gather). NCCL picks the protocol with the smallest latency + bytes / bw.
NCCL_RING = {
    "LL": (6.6, 0.6, 2.7, 1.0 / 3.0),  # ×1/4 instead of 1/3 across nodes (tuning.cc)
    "LL128": (14.0, 1.9, 4.0, 0.92),
    "Simple": (8.4, 3.4, 14.0, 1.0),
}
NCCL_SOURCE = "NVIDIA/nccl src/graph/tuning.cc (commit b6475625): baseLat / hwLat Ring, nsteps = n-1, inter = nodes-1"


def bus_bandwidth_gb_s(spec: GpuSpec, n: int) -> float:
    """Per-rank bus bandwidth of a ring collective over ``n`` GPUs (GB/s, one direction, at the wire).

    One node: NVLink one way. Several: NCCL runs one ring per NIC (rail), each crossing the node
    boundary once, so a node's traffic leaves through all its NICs at once and the bus bandwidth is
    min(NVLink one way × g/(g-1) (the g-1 NVLink hops of each ring), NICs per node × NIC bandwidth).
    """
    g = spec.gpus_per_node
    if n <= g:
        return spec.nvlink_one_way_gb_s
    return min(spec.nvlink_one_way_gb_s * g / (g - 1), spec.nics_per_node * spec.nic_gb_s)


def collective_us(nbytes: float, n: int, spec: GpuSpec, a: ScalingAssumptions, count: int = 1) -> float:
    """Time of a reduce-scatter or all-gather of ``nbytes`` (the full tensor) over ``n`` ranks, as
    ``count`` equal collectives: ring volume (n-1)/n·bytes per rank at the bus bandwidth, plus NCCL's
    ring latency (base + (n-1-(nodes-1))·NVLink hop + (nodes-1)·network hop) per collective."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    nodes = math.ceil(n / spec.gpus_per_node)
    bus = bus_bandwidth_gb_s(spec, n) * a.comm_efficiency * 1e9
    per = nbytes / count
    best = math.inf
    for proto, (base, hop_nvl, hop_net, factor) in NCCL_RING.items():
        if proto == "LL" and nodes > 1:
            factor = 0.25
        lat = base + (n - nodes) * hop_nvl + (nodes - 1) * hop_net
        best = min(best, lat + (n - 1) / n * per / (bus * factor) * 1e6)
    return count * best


# ---------------------------------------------------------------------------------- the plan


def buffer_bytes(buffer_prompts: int, group: int, steps: int, latent_elems: int, latent_bytes: int,
                 text_tokens: int, text_dim: int, embed_bytes: int) -> int:
    """Bytes of a full replay-buffer shard (the layout of fastdense.buffer.ReplayBuffer.nbytes):
    latents [P, G, T+1, D], rewards [P, G] fp32, old_sq and ref_sq [P, G, T] fp32, ref_valid
    [P, G, T] bool, one embedding per (unique) prompt and one unconditional embedding."""
    p, g, t = buffer_prompts, group, steps
    return (p * g * (t + 1) * latent_elems * latent_bytes + p * g * 4 + p * g * t * (4 + 4 + 1)
            + (p + 1) * text_tokens * text_dim * embed_bytes)


@dataclass(frozen=True)
class WorkPlan:
    """What one rank does per round and per optimizer step, from a config (the trainer's loops)."""

    backbone: BackboneCost
    steps: int  # T
    cfg_rows: int  # 2 with classifier-free guidance (guidance != 1), else 1
    rollouts: int  # trajectories per rank per round: prompts_per_round × R
    prompts: int
    sampling_calls: int  # denoiser calls per round: T × ceil(rollouts / sampling.micro_batch)
    items: int  # (trajectory, step) items per micro-batch: groups × G × K
    micro_batches: int  # per optimizer step (grad_accum)
    updates: int  # optimizer steps per round
    ref_forward: bool  # objective.reference needs π_init residuals
    lora_rank: int
    lora_targets: tuple[str, ...]
    trainable: int  # parameters in the optimizer
    model_bytes: int  # weights and gradient communication (DeepSpeed's communication_data_type default)
    buffer_bytes: int
    zero_stage: int
    fwd_flops: float  # policy forward (base + LoRA), batch 1
    bwd_flops: float
    bwd_measured: bool


def work_plan(cfg) -> WorkPlan:
    """The per-rank work of a validated :class:`fastdense.config.Config`."""
    bb = backbone_for(cfg.model.path)
    s, o, t, m = cfg.sampling, cfg.objective, cfg.train, cfg.model
    resolution = getattr(m, "resolution", None)
    if resolution is not None and resolution != bb.resolution:
        raise ValueError(f"model.resolution={resolution} is not allowed here: the {bb.key} costs were measured at "
                         f"{bb.resolution}x{bb.resolution} only")
    targets = tuple(m.lora_targets) if m.lora_targets is not None else bb.default_lora_targets
    rollouts = t.prompts_per_round * s.rollouts_per_prompt
    k = o.k if o.estimator == "sampled" else s.num_steps
    model_bytes = DTYPE_BYTES[cfg.optim.precision]
    bwd, measured = bb.backward_flops(m.lora_rank, targets)
    return WorkPlan(
        backbone=bb, steps=s.num_steps, cfg_rows=2 if s.guidance != 1.0 else 1,  # backbone.cfg_enabled
        rollouts=rollouts, prompts=t.prompts_per_round,
        sampling_calls=s.num_steps * math.ceil(rollouts / s.micro_batch),
        items=t.groups_per_step * o.group_size * k, micro_batches=t.grad_accum, updates=t.updates_per_round,
        ref_forward=o.reference in ("init", "both"),
        lora_rank=m.lora_rank, lora_targets=targets, trainable=bb.lora_params(m.lora_rank, targets),
        model_bytes=model_bytes,
        buffer_bytes=buffer_bytes(t.buffer_prompts, o.group_size, s.num_steps, bb.latent_elems,
                                  DTYPE_BYTES[s.latent_dtype], bb.text_tokens, bb.text_dim, model_bytes),
        zero_stage=cfg.optim.zero_stage, fwd_flops=bb.fwd_flops + bb.lora_fwd_flops(m.lora_rank, targets),
        bwd_flops=bwd, bwd_measured=measured,
    )


def zero_settings(stage: int) -> dict[str, Any]:
    """The shipped ``ds_zero{stage}.json`` zero_optimization table (empty for stages 0 and 1)."""
    from importlib import resources

    path = resources.files("fastdense.presets").joinpath(f"ds_zero{stage}.json")
    return dict(json.loads(path.read_text()).get("zero_optimization", {})) if path.is_file() else {}


@dataclass
class ScalingRow:
    gpus: int
    nodes: int
    zero: int
    link: str  # what bounds the collectives: NVLink (one node) or NVLink+IB
    rollout_s: float  # per round: max(sampling compute, ZeRO-3 sampling gathers)
    rollout_compute_s: float
    rollout_comm_s: float
    step_s: float  # one optimizer step: grad_accum × max(compute, overlapped comm) + serial comm
    step_compute_s: float
    comm_mb_step: float  # MB each rank sends per optimizer step (ring volumes)
    comm_s_step: float  # their time at the bus bandwidth, with NCCL's latency
    comm_per_compute: float  # comm_s_step / the step's compute time: > 1, communication cannot hide
    exposed_comm_s_step: float  # the part not hidden behind compute
    rollout_comm_gb_round: float  # ZeRO-3: the sampling calls' weight all-gathers per round
    round_s: float
    buffer_gb: float
    optimizer_gb: float  # fp32 master weights + Adam m, v + fp32 gradient partition of the trainable set
    weights_gb: float  # denoiser weights resident per rank (ZeRO-3: its shard + persistent ones)
    zero3_live_gb: float  # ZeRO-3: weights gathered at the peak (up to stage3_max_live_parameters)
    buckets_gb: float  # DeepSpeed gradient bucket buffers
    total_gb: float  # all of the above, no activations
    fits: bool  # total < the GPU's memory
    global_groups_per_step: int
    bottleneck: str
    shares: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def scaling_rows(cfg, spec: GpuSpec, gpu_counts, stages=(2, 3),
                 a: ScalingAssumptions | None = None) -> tuple[WorkPlan, list[ScalingRow]]:
    """One row per (GPU count, ZeRO stage)."""
    a = a or ScalingAssumptions()
    plan = work_plan(cfg)
    bb = plan.backbone
    flops_s = spec.bf16_dense_tflops * 1e12 * a.mfu
    # per rank, independent of the GPU count
    rollout_flops = (plan.rollouts * plan.steps * plan.cfg_rows * plan.fwd_flops
                     + plan.rollouts * bb.vae_decode_flops + plan.prompts * bb.text_encoder_flops)
    rollout_compute = rollout_flops / flops_s
    rows_per_mb = plan.items * plan.cfg_rows
    mb_flops = rows_per_mb * (plan.fwd_flops + plan.bwd_flops)
    if plan.ref_forward:
        mb_flops += a.ref_fill_fraction * rows_per_mb * bb.fwd_flops
    mb_compute = mb_flops / flops_s
    p_bytes = plan.trainable * plan.model_bytes
    lora_persistent = plan.lora_rank > 0 and plan.lora_rank * max(
        (g.max_dim for g in bb.lora_layers(plan.lora_targets)), default=0) <= bb.persistence_threshold
    rows = []
    for n in gpu_counts:
        nodes = math.ceil(n / spec.gpus_per_node)
        for stage in stages:
            ds = zero_settings(stage)
            gathered = bb.gathered_params if stage == 3 else 0
            if stage == 3 and not lora_persistent:
                gathered += plan.trainable
            g_bytes = gathered * plan.model_bytes
            g_count = max(1, math.ceil(gathered / ds.get("stage3_prefetch_bucket_size", 50_000_000))) if gathered else 0
            rs = collective_us(p_bytes, n, spec, a) * 1e-6
            ag = rs  # same volume and ring for an all-gather of the same bytes
            gather = collective_us(g_bytes, n, spec, a, g_count) * 1e-6 if gathered else 0.0
            passes = 2 + (1 if plan.ref_forward and a.ref_fill_fraction > 0 else 0)  # fwd, bwd, reference fwd
            vol = (n - 1) / n if n > 1 else 0.0
            if stage >= 2:  # reduce-scatter of the gradients in every backward (stage_1_and_2: partition_gradients)
                mb_comm = rs + (passes * gather if stage == 3 else 0.0)
                serial = ag  # updated (ZeRO-3: persistent) trainable parameters all-gathered after the step
                step_bytes = vol * (plan.micro_batches * p_bytes + p_bytes
                                    + (plan.micro_batches * passes * g_bytes if stage == 3 else 0))
            else:  # stage 0: one all-reduce at the boundary; stage 1: reduce-scatter + all-gather there
                mb_comm = 0.0
                serial = rs + ag
                step_bytes = vol * 2 * p_bytes
            step_compute = plan.micro_batches * mb_compute
            comm_total = plan.micro_batches * mb_comm + serial
            step = plan.micro_batches * max(mb_compute, mb_comm) + serial
            rollout_comm = plan.sampling_calls * gather if stage == 3 else 0.0
            rollout = max(rollout_compute, rollout_comm)
            round_s = rollout + plan.updates * step
            # memory per rank
            opt = 12 * plan.trainable / (n if stage >= 1 else 1)  # fp32 master + Adam m, v
            opt += 4 * plan.trainable / n if stage >= 2 else plan.model_bytes * plan.trainable  # gradients
            total_params = bb.params + (plan.trainable if plan.lora_rank > 0 else 0)
            if stage == 3:
                weights = (total_params - gathered) * plan.model_bytes + g_bytes / n
                live = min(gathered, ds.get("stage3_max_live_parameters", gathered)) * plan.model_bytes
            else:
                weights, live = total_params * plan.model_bytes, 0.0
            bucket_elems = ds.get("reduce_bucket_size", 0)
            buckets = bucket_elems * plan.model_bytes * (2 if stage == 2 and ds.get("overlap_comm") else 1)
            total = plan.buffer_bytes + opt + weights + live + buckets
            shares = {
                "rollout compute": rollout_compute * (1 if rollout_compute >= rollout_comm else 0),
                "rollout gathers (ZeRO-3)": rollout_comm * (1 if rollout_comm > rollout_compute else 0),
                "train compute": plan.updates * step_compute,
                "exposed communication": plan.updates * (step - step_compute),
            }
            shares = {k: v / round_s for k, v in shares.items() if v > 0}
            top = max(shares, key=shares.get)
            rows.append(ScalingRow(
                gpus=n, nodes=nodes, zero=stage, link="NVLink" if nodes == 1 else "NVLink+IB",
                rollout_s=rollout, rollout_compute_s=rollout_compute, rollout_comm_s=rollout_comm, step_s=step,
                step_compute_s=step_compute, comm_mb_step=step_bytes / 1e6, comm_s_step=comm_total,
                comm_per_compute=comm_total / step_compute if step_compute > 0 else math.inf,
                exposed_comm_s_step=step - step_compute,
                rollout_comm_gb_round=(vol * plan.sampling_calls * g_bytes / 1e9) if stage == 3 else 0.0,
                round_s=round_s, buffer_gb=plan.buffer_bytes / 1e9, optimizer_gb=opt / 1e9,
                weights_gb=weights / 1e9, zero3_live_gb=live / 1e9, buckets_gb=buckets / 1e9, total_gb=total / 1e9,
                fits=total < spec.memory_gb * 1e9,
                global_groups_per_step=n * cfg.train.groups_per_step * plan.micro_batches,
                bottleneck=f"{top} {shares[top]:.0%}", shares=shares,
            ))
    return plan, rows


def comm_bound_from(cfg, spec: GpuSpec, stage: int, a: ScalingAssumptions | None = None,
                    limit: int = 65536) -> int | None:
    """The smallest GPU count (a multiple of the node size, up to ``limit``) at which a step's
    communication takes as long as its compute (so overlap can no longer hide it), or None."""
    counts = list(range(spec.gpus_per_node, limit + 1, spec.gpus_per_node))
    _, rows = scaling_rows(cfg, spec, counts, (stage,), a)
    return next((r.gpus for r in rows if r.comm_per_compute >= 1.0), None)


# ------------------------------------------------------------------------------ measurement


def measure_backbone(key: str = "sd15", ranks=(4, 32), targets=("to_q", "to_k", "to_v", "to_out.0"),
                     full: bool = True) -> dict:
    """Re-measure a backbone's costs (what :data:`BACKBONES` stores) with torch's FlopCounterMode on
    the meta device: the denoiser forward at batch 1, the LoRA layer table (forward hooks) and
    parameter counts; with ``full`` also its backward with LoRA (``targets``) at two ranks
    (a + b·rank), the VAE decoder and the text encoder. Needs diffusers, transformers and peft; no
    weights are allocated (~5 s without ``full``, ~15 s of CPU with it)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastdense.benchmarks.sampler import SD15_UNET
    from fastdense.lora import add_lora

    if key != "sd15":
        raise ValueError(f"no measurement recipe for backbone {key!r}; allowed: sd15")
    meta = torch.device("meta")

    def unet():
        with meta:
            return UNet2DConditionModel(**SD15_UNET)

    x = torch.empty(1, 4, 64, 64, device=meta)
    t = torch.tensor([500], device=meta)
    ctx = torch.empty(1, 77, 768, device=meta)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    base = unet()
    positions: dict[str, int] = {}
    hooks = []
    for name, mod in base.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            outs = mod.out_features if isinstance(mod, torch.nn.Linear) else mod.out_channels
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, name=name, outs=outs: positions.__setitem__(name, out.numel() // outs)))
    with torch.no_grad():
        fwd = flops(lambda: base(x, t, ctx))
    for h in hooks:
        h.remove()
    groups: dict[str, list[int]] = {}
    for name, mod in base.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            if isinstance(mod, torch.nn.Linear):
                i, o = mod.in_features, mod.out_features
            else:
                i, o = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1], mod.out_channels
            parts = name.split(".")
            suffix = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
            g = groups.setdefault(suffix, [0, 0, 0, 0])
            g[0] += 1
            g[1] += i + o
            g[2] += 2 * positions[name] * (i + o)
            g[3] = max(g[3], i, o)
    threshold = int(zero_settings(3).get("stage3_param_persistence_threshold", 100_000))
    params = sum(p.numel() for p in base.parameters())
    gathered = sum(p.numel() for p in base.parameters() if p.numel() > threshold)
    table = {k: tuple(v) for k, v in sorted(groups.items())}
    basic = {"fwd_flops": fwd, "params": params, "gathered_params": gathered, "persistence_threshold": threshold,
             "lora_groups": table}
    if not full:
        return basic

    bwd, lora_fwd, lora_params = {}, {}, {}
    for rank in ranks:
        model = unet()
        add_lora(model, rank, None, list(targets))
        lora_params[rank] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out = {}
        lora_fwd[rank] = flops(lambda model=model, out=out: out.__setitem__("y", model(x, t, ctx).sample))
        bwd[rank] = flops(lambda out=out: out["y"].sum().backward())
    r0, r1 = ranks
    slope = (bwd[r1] - bwd[r0]) / (r1 - r0)

    with meta:
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu", projection_dim=768))
    with torch.no_grad():
        vae_flops = flops(lambda: vae.decode(torch.empty(1, 4, 64, 64, device=meta)))
        text_flops = flops(lambda: text(torch.zeros(1, 77, dtype=torch.long, device=meta)))
    return {
        **basic, "lora_fwd_flops": {r: lora_fwd[r] - fwd for r in ranks}, "lora_params": lora_params,
        "bwd_flops": {tuple(targets): (bwd[r0] - slope * r0, slope)}, "bwd_at": bwd,
        "vae_decode_flops": vae_flops, "text_encoder_flops": text_flops,
    }


if __name__ == "__main__":  # pragma: no cover - the measuring command quoted above
    import argparse

    parser = argparse.ArgumentParser(description="Re-measure a backbone's FLOPs and layer table.")
    parser.add_argument("--measure", default="sd15")
    args = parser.parse_args()
    for k, v in measure_backbone(args.measure).items():
        print(f"{k} = {v!r}")
