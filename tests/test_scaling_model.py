"""The scaling model (fastdense.benchmarks.scaling, ``fastdense bench scaling``): collective costs,
buffer and LoRA counts against the real classes, a small case computed by hand, the stored FLOPs
against a fresh measurement, and the CLI."""

import json
import math

import pytest

from fastdense.benchmarks.roofline import GPUS, GpuSpec
from fastdense.benchmarks.scaling import (
    SD15,
    ScalingAssumptions,
    backbone_for,
    buffer_bytes,
    collective_us,
    scaling_rows,
    work_plan,
)
from fastdense.config import build_config


def test_collectives_by_hand():
    a = ScalingAssumptions(comm_efficiency=0.8)
    h100 = GPUS["h100"]
    # one node of 8: NVLink 450 GB/s one way × 0.8; 7 NVLink hops. LL128 (base 14, 1.9 per hop, ×0.92) wins:
    bw = 7 / 8 * 8e6 / 360e9 * 1e6  # 19.44 µs at the bus bandwidth
    assert collective_us(8e6, 8, h100, a) == pytest.approx(14 + 7 * 1.9 + bw / 0.92)
    # two nodes: bus = min(450·8/7, 8 NICs × 50) = 400 GB/s × 0.8; 14 NVLink hops and 1 network hop
    bw = 15 / 16 * 8e6 / 320e9 * 1e6
    assert collective_us(8e6, 16, h100, a) == pytest.approx(14 + 14 * 1.9 + 4.0 + bw / 0.92)
    # tiny messages: LL (base 6.6, 0.6 per NVLink hop, 2.7 per network hop)
    assert collective_us(1000, 16, h100, a) == pytest.approx(6.6 + 14 * 0.6 + 2.7 + 15 / 16 * 1000 / 320e9 * 1e6 * 4)
    # a large one over 512 GPUs (64 nodes): Simple, 448 NVLink hops + 63 network hops
    bw = 511 / 512 * 1e9 / 320e9 * 1e6
    assert collective_us(1e9, 512, h100, a) == pytest.approx(min(8.4 + 448 * 3.4 + 63 * 14.0 + bw,
                                                                 14 + 448 * 1.9 + 63 * 4.0 + bw / 0.92))
    assert collective_us(8e6, 1, h100, a) == 0.0
    # A100 nodes: 8 × HDR 200 Gb/s = 200 GB/s, under NVLink 3's 300 × 8/7
    assert collective_us(1e9, 16, GPUS["a100"], a, count=2) == pytest.approx(
        2 * (8.4 + 14 * 3.4 + 14.0 + 15 / 16 * 0.5e9 / 160e9 * 1e6))


def test_buffer_bytes_is_the_replay_buffer_layout():
    import torch

    from fastdense.buffer import ReplayBuffer

    P, G, T, shape = 3, 2, 4, (4, 3, 5)
    buf = ReplayBuffer(P, G)
    for p in range(P):
        buf.add(f"prompt {p}", torch.zeros(7, 6, dtype=torch.bfloat16), torch.zeros(G + 1, T + 1, *shape),
                torch.arange(G + 1, dtype=torch.float32), torch.zeros(G + 1, T),
                uncond_embed=torch.zeros(7, 6, dtype=torch.bfloat16))
    assert buffer_bytes(P, G, T, math.prod(shape), 4, 7, 6, 2) == buf.nbytes
    # SD1.5, sd15-multi: 64 prompts × 5 trajectories × 51 latents × 16384 × 4 B + caches + embeddings
    assert buffer_bytes(64, 5, 50, 16384, 4, 77, 768, 2) == (64 * 5 * 51 * 16384 * 4 + 64 * 5 * 4
                                                            + 64 * 5 * 50 * 9 + 65 * 77 * 768 * 2)


def test_lora_counts_from_the_layer_table():
    default = ("to_q", "to_k", "to_v", "to_out.0")
    assert SD15.lora_params(4, default) == 797_184  # the well-known SD1.5 attention LoRA at rank 4
    assert SD15.lora_params(32, default) == 6_377_472
    assert SD15.lora_params(8, ["proj_in"]) == 8 * 24960
    assert SD15.lora_fwd_flops(32, default) == 32 * 2 * (92_405_760 + 50_017_152)
    with pytest.raises(ValueError, match="names no layer"):
        SD15.lora_layers(["to_qq"])
    bwd, measured = SD15.backward_flops(32, default)
    assert measured and bwd == pytest.approx(925_625_991_168, rel=1e-9)  # measured at rank 32
    bwd, measured = SD15.backward_flops(32, ("to_q",))
    assert not measured and bwd == 2 * (SD15.fwd_flops + SD15.lora_fwd_flops(32, ("to_q",)))


def test_stored_forward_flops_and_layer_table_are_measured():
    """Re-measure what a few seconds allow (forward FLOPs, layer table, parameter counts); the backward,
    VAE and text-encoder numbers come from the same function with full=True (about 15 s of CPU)."""
    from fastdense.benchmarks.scaling import measure_backbone

    m = measure_backbone("sd15", full=False)
    assert m["fwd_flops"] == SD15.fwd_flops
    assert (m["params"], m["gathered_params"], m["persistence_threshold"]) == (
        SD15.params, SD15.gathered_params, SD15.persistence_threshold)
    assert m["lora_groups"] == {k: (g.layers, g.io, g.flops_io, g.max_dim) for k, g in SD15.lora_groups.items()}


def test_lora_count_is_what_add_lora_makes_on_the_sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    from fastdense.benchmarks.sampler import SD15_UNET
    from fastdense.lora import add_lora, trainable_parameters

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    cfg = build_config(preset="sd15-multi")
    targets = cfg.model.lora_targets or list(SD15.default_lora_targets)
    add_lora(unet, cfg.model.lora_rank, None, targets)
    assert sum(p.numel() for p in trainable_parameters(unet)) == SD15.lora_params(cfg.model.lora_rank, targets)


def test_presets_plug_in_by_model_path():
    assert backbone_for("runwayml/stable-diffusion-v1-5") is SD15
    with pytest.raises(ValueError, match="has no measured costs"):
        backbone_for("stabilityai/stable-diffusion-3.5-medium")
    plan = work_plan(build_config(preset="sd15-multi"))
    assert (plan.rollouts, plan.sampling_calls, plan.items, plan.micro_batches, plan.cfg_rows) == (12, 100, 5, 32, 2)
    assert plan.trainable == 6_377_472 and plan.bwd_measured and plan.zero_stage == 2


TEST_GPU = GpuSpec("test", "test GPU", hbm_tb_s=1.0, bf16_dense_tflops=100.0, memory_gb=80.0, nvlink_gb_s=200.0,
                   nic_gb_s=10.0, nics_per_node=8, gpus_per_node=8, fabric="test")


def test_small_case_by_hand():
    cfg = build_config(preset="sd15-multi", overrides=[
        "sampling.num_steps=10", "sampling.rollouts_per_prompt=4", "sampling.micro_batch=4", "objective.group_size=2",
        "objective.k=1", "train.prompts_per_round=1", "train.grad_accum=2", "train.groups_per_step=1",
        "train.updates_per_round=3", "train.buffer_prompts=2", "model.lora_rank=4", "model.lora_targets=[to_q]",
    ])
    a = ScalingAssumptions(mfu=0.5, comm_efficiency=1.0, ref_fill_fraction=1.0)
    plan, rows = scaling_rows(cfg, TEST_GPU, [8, 16], (2, 3), a)
    by = {(r.gpus, r.zero): r for r in rows}
    flops_s = 100e12 * 0.5
    F = SD15.fwd_flops + 4 * 92_405_760  # LoRA on to_q: 2·P·(in+out) summed = 92,405,760 per unit rank
    B = 2 * F  # no measured backward for [to_q]: the 2 × forward assumption
    rollout = (4 * 10 * 2 * F + 4 * SD15.vae_decode_flops + 1 * SD15.text_encoder_flops) / flops_s
    mb = (2 * 2 * (F + B) + 2 * 2 * SD15.fwd_flops) / flops_s  # 2 items × 2 CFG rows, + the π_init pass
    p_bytes = 4 * 49_920 * 2  # trainable to_q LoRA in bf16
    # ZeRO-2 on one node: a gradient reduce-scatter per micro-batch (hidden), a parameter all-gather after
    # the step; at 399 kB LL wins: 6.6 + 7 × 0.6 µs + (7/8 · bytes / 100 GB/s) × 3
    rs = (6.6 + 7 * 0.6 + 7 / 8 * p_bytes / 100e9 * 1e6 * 3) * 1e-6
    r = by[(8, 2)]
    assert r.rollout_s == pytest.approx(rollout)
    assert r.step_compute_s == pytest.approx(2 * mb)
    assert r.step_s == pytest.approx(2 * mb + rs)
    assert r.comm_mb_step == pytest.approx(7 / 8 * 3 * p_bytes / 1e6)
    assert r.round_s == pytest.approx(rollout + 3 * (2 * mb + rs))
    assert r.buffer_gb == pytest.approx(buffer_bytes(2, 2, 10, 16384, 4, 77, 768, 2) / 1e9)
    assert r.optimizer_gb == pytest.approx((12 * 4 * 49_920 / 8 + 4 * 4 * 49_920 / 8) / 1e9)
    assert r.buckets_gb == pytest.approx(2 * 200_000_000 * 2 / 1e9)  # ds_zero2.json: 2 buffers (overlap_comm)
    assert r.weights_gb == pytest.approx((SD15.params + 4 * 49_920) * 2 / 1e9)
    # ZeRO-3: three passes per micro-batch (policy forward, backward, reference forward) all-gather the
    # 859,054,080 partitioned weights in ceil(/5e7) = 18 collectives: Simple wins at 95 MB each
    g_bytes = SD15.gathered_params * 2
    gather = 18 * (8.4 + 7 * 3.4 + 7 / 8 * g_bytes / 18 / 100e9 * 1e6) * 1e-6
    r3 = by[(8, 3)]
    assert r3.comm_s_step == pytest.approx(2 * (rs + 3 * gather) + rs)
    assert r3.step_s == pytest.approx(2 * max(mb, rs + 3 * gather) + rs)
    assert r3.rollout_comm_s == pytest.approx(10 * gather)  # 10 sampling calls per round
    assert r3.rollout_s == pytest.approx(max(rollout, 10 * gather))
    assert r3.weights_gb == pytest.approx(((SD15.params + 4 * 49_920 - SD15.gathered_params) * 2 + g_bytes / 8) / 1e9)
    assert r3.zero3_live_gb == pytest.approx(g_bytes / 1e9)  # stage3_max_live_parameters 1e9 > the UNet
    # 16 GPUs: two nodes, the ring crosses InfiniBand (bus 8 × 10 GB/s = 80 GB/s < 100 × 8/7)
    r16 = by[(16, 2)]
    rs16 = min(6.6 + 14 * 0.6 + 2.7 + 15 / 16 * p_bytes / 80e9 * 1e6 * 4,
               14 + 14 * 1.9 + 4.0 + 15 / 16 * p_bytes / 80e9 * 1e6 / 0.92,
               8.4 + 14 * 3.4 + 14.0 + 15 / 16 * p_bytes / 80e9 * 1e6) * 1e-6
    assert r16.step_s == pytest.approx(2 * mb + rs16)
    assert r16.global_groups_per_step == 16 * 1 * 2
    assert r16.bottleneck.startswith("train compute")


def test_zero3_communication_outgrows_compute_at_scale():
    from fastdense.benchmarks.scaling import comm_bound_from

    cfg = build_config(preset="sd15-multi")
    _, rows = scaling_rows(cfg, GPUS["h100"], [8, 64, 512], (2, 3))
    ratio = {(r.gpus, r.zero): r.comm_per_compute for r in rows}
    assert ratio[(8, 2)] < ratio[(64, 2)] < ratio[(512, 2)] < 0.1  # ZeRO-2: a few MB of LoRA gradients
    assert ratio[(8, 3)] < ratio[(64, 3)] < 1 < ratio[(512, 3)]  # ZeRO-3: the UNet's weights, every pass
    bound = comm_bound_from(cfg, GPUS["h100"], 3)
    assert bound is not None and 64 < bound <= 512
    assert comm_bound_from(cfg, GPUS["h100"], 2) is None


def test_cli_prints_the_table(run_cli, tmp_path):
    out = tmp_path / "scaling.json"
    code, stdout, stderr = run_cli(["bench", "scaling", "--gpu", "h100", "--gpus", "8,64,512", "--preset",
                                    "sd15-multi", "--json", out])
    assert code == 0, stderr
    assert "scaling model: sd15-multi on H100 SXM5 80GB" in stdout
    for needle in ("assumption: MFU 40%", "bottleneck, ZeRO-2:", "bottleneck, ZeRO-3:", "6,377,472 trainable",
                   "803.3 GFLOP", "tuning.cc"):
        assert needle in stdout
    rows = json.loads(out.read_text())
    assert [(r["gpus"], r["zero"]) for r in rows] == [(8, 2), (8, 3), (64, 2), (64, 3), (512, 2), (512, 3)]
    assert {r["nodes"] for r in rows} == {1, 8, 64}
    assert all(r["fits"] for r in rows)


@pytest.mark.parametrize("args,needle", [
    (["--gpu", "v100"], "--gpu 'v100'"),
    (["--gpus", "8,x"], "--gpus '8,x'"),
    (["--gpus", "0"], "--gpus '0'"),
    (["--zero", "4"], "--zero '4'"),
    (["--mfu", "1.5"], "--mfu 1.5"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "model.path=stabilityai/stable-diffusion-3.5-medium"], "has no measured costs"),
])
def test_cli_bad_arguments(run_cli, args, needle):
    code, stdout, stderr = run_cli(["bench", "scaling", *args])
    assert code == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
