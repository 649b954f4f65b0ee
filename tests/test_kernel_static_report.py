"""The static kernel report: occupancy arithmetic (hand-computed cases), the launch options and
grids the report assumes are the launchers' own, and ``fastdense profile kernels --static``
through the real CLI (it compiles in a subprocess without TRITON_INTERPRET; no GPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastdense.kernels.dispatch import triton_available, triton_interpreted
from fastdense.kernels.occupancy import LIMITS, SMLimits, occupancy, waves

A100, H100 = LIMITS["sm_80"], LIMITS["sm_90"]


# ---------------------------------------------------------------------------
# Occupancy: every case worked by hand from the rules in kernels/occupancy.py


def test_published_limits():
    for arch, shared, per_block, sms in (("sm_80", 164, 163, 108), ("sm_90", 228, 227, 132),
                                         ("sm_100", 228, 227, 148)):
        lim = LIMITS[arch]
        assert (lim.shared_per_sm, lim.max_shared_per_block, lim.sm_count) == (shared * 1024, per_block * 1024, sms)
        assert (lim.max_warps, lim.max_blocks, lim.regs_per_sm, lim.max_regs_per_thread) == (64, 32, 65536, 255)
        assert (lim.reg_alloc_unit, lim.sub_partitions, lim.shared_alloc_unit, lim.reserved_shared_per_block) == (
            256, 4, 128, 1024)


def test_warp_limited_full_occupancy():
    # the log-ratio kernels on H100: 32 regs × 32 lanes = 1024 regs per warp; 16384 per sub-partition
    # hold 16 warps, 64 per SM = 16 blocks of 4 warps; shared 16 + 1024 reserved -> 1152 B: 202 blocks
    occ = occupancy(32, 16, 4, H100)
    assert (occ.by_warps, occ.by_blocks, occ.by_registers, occ.by_shared) == (16, 32, 16, 202)
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.limiter, occ.fraction) == (16, 64, "warps", 1.0)


def test_register_limited():
    # the log-ratio backward (bf16 ε, fp32 states) on A100: 34 regs -> 1088 -> 1280 per warp;
    # 16384 // 1280 = 12 warps per sub-partition, 48 per SM = 12 blocks of 4 warps: 75 %
    occ = occupancy(34, 0, 4, A100)
    assert (occ.by_registers, occ.blocks_per_sm, occ.warps_per_sm, occ.limiter) == (12, 12, 48, "registers")
    assert occ.fraction == 0.75
    # ddim's BLOCK_SIZE 8192 (8 warps, 255 regs): 8160 -> 8192 per warp, 2 per sub-partition, 8 per SM;
    # the block's 8 warps need 65536 registers, exactly the per-block limit: 1 block, 12.5 %
    occ = occupancy(255, 32, 8, H100)
    assert (occ.by_registers, occ.blocks_per_sm, occ.warps_per_sm, occ.fraction) == (1, 1, 8, 0.125)


def test_registers_are_allocated_per_sub_partition():
    # 80 regs, 1-warp blocks: 2560 per warp; 16384 // 2560 = 6 per sub-partition -> 24 warps
    # (65536 // 2560 = 25 if the register file were one pool)
    occ = occupancy(80, 0, 1, H100)
    assert (occ.by_registers, occ.blocks_per_sm, occ.limiter) == (24, 24, "registers")


def test_shared_memory_limited():
    # 100 KB + 1 KB reserved = 103424 B per block: A100's 164 KB hold 1 block, H100's 228 KB hold 2
    occ = occupancy(16, 100 * 1024, 4, A100)
    assert (occ.by_shared, occ.blocks_per_sm, occ.warps_per_sm, occ.limiter) == (1, 1, 4, "shared")
    assert occupancy(16, 100 * 1024, 4, H100).blocks_per_sm == 2
    # rounded up to 128 B: 2000 + 1024 = 3024 -> 3072; 233472 // 3072 = 76
    assert occupancy(16, 2000, 4, H100).by_shared == 76


def test_block_limited():
    # 1-warp blocks with few registers: 64 by warps, but at most 32 resident blocks
    occ = occupancy(16, 0, 1, H100)
    assert (occ.by_warps, occ.blocks_per_sm, occ.warps_per_sm, occ.limiter, occ.fraction) == (64, 32, 32, "blocks", 0.5)


def test_launches_that_cannot_run():
    assert occupancy(256, 0, 1, H100).blocks_per_sm == 0  # > 255 registers per thread
    assert occupancy(255, 0, 16, H100).by_registers == 0  # 16 warps × 8192 > 65536 per block
    assert occupancy(16, 227 * 1024, 1, H100).blocks_per_sm == 1  # the opt-in maximum fits
    occ = occupancy(16, 227 * 1024 + 1, 1, H100)
    assert (occ.blocks_per_sm, occ.limiter) == (0, "shared")
    assert occupancy(16, 164 * 1024, 1, A100).blocks_per_sm == 0  # over A100's 163 KB per block
    # the hardware check rounds warps up to the 4 sub-partitions: 5 warps of 168 regs (5376 per warp)
    # count as 8 × 5376 = 43008 <= 65536, fine; 7 warps of 255 count as 8 × 8192 = 65536, fine too
    assert occupancy(168, 0, 5, H100).blocks_per_sm == 2  # 16384 // 5376 = 3 per sub-partition: 12 warps
    assert occupancy(255, 0, 7, H100).blocks_per_sm == 1
    tight = SMLimits("sm_test", "test", 1, shared_per_sm=1 << 20, max_shared_per_block=1 << 20,
                     max_regs_per_block=40000)
    assert occupancy(168, 0, 5, tight).by_registers == 0  # 43008 assumed > 40000, though 5 × 5376 fits


def test_no_registers_do_not_limit():
    assert occupancy(0, 0, 4, H100).by_registers == 32


@pytest.mark.parametrize("args", [(-1, 0, 4), (32, -1, 4), (32, 0, 0), (32, 0, 33), (32.0, 0, 4)])
def test_bad_input_is_refused(args):
    with pytest.raises(ValueError, match="not allowed"):
        occupancy(*args, H100)


def test_waves():
    occ = occupancy(32, 16, 4, H100)  # 16 blocks per SM
    assert waves(1024, occ, H100) == 1024 / (16 * 132)  # the log-ratio grids at N = 128 and 1024
    assert waves(128, occ, H100) == 128 / 2112  # ddim_step, batch 8: 8 × 16 programs
    assert waves(4224, occ, H100) == 2.0
    assert math.isinf(waves(10, occupancy(256, 0, 1, H100), H100))


# ---------------------------------------------------------------------------
# What the report assumes of the launchers: their launch options and grids (run under the interpreter)


class _Recorder:
    """Stands in for a kernel: records ``kernel[grid](*args, **kwargs)`` launches, then runs them."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append((tuple(grid), kwargs))
            return launch(*args, **kwargs)

        return run


needs_interpreter = pytest.mark.skipif(not (triton_available() and triton_interpreted()),
                                       reason="needs triton with TRITON_INTERPRET=1 in the test process")


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("n,shape", [(3, (4, 8, 8)), (2, (3, 25, 20))])
def test_log_ratio_launches_pass_fp_fusion_and_the_grids_of_their_launch_config(monkeypatch, n, shape):
    from fastdense.kernels import log_ratio as lr

    calls = {name: [] for name in ("_log_ratio_fwd_kernel", "_log_ratio_logits_kernel", "_log_ratio_bwd_kernel")}
    for name, recorded in calls.items():
        monkeypatch.setattr(lr, name, _Recorder(getattr(lr, name), recorded))
    d = math.prod(shape)
    eps_c, eps_u = (torch.randn(n, *shape, requires_grad=True) for _ in range(2))
    x, x_next = torch.randn(n, *shape), torch.randn(n, *shape)
    out = lr.log_ratio(eps_c, eps_u, x, x_next, 0.9, -0.1, 0.5, torch.rand(n), torch.ones(n),
                       torch.arange(n) % 2, 2, guidance=7.5, clip=1.0, impl="triton")
    out.logits.sum().backward()
    block, _, num_chunks = lr._launch_config(n, d)
    (fwd_grid, fwd), = calls["_log_ratio_fwd_kernel"]
    (logits_grid, logits), = calls["_log_ratio_logits_kernel"]
    (bwd_grid, bwd), = calls["_log_ratio_bwd_kernel"]
    assert fwd_grid == bwd_grid == (n, num_chunks) and logits_grid == (2,)
    for kwargs in (fwd, logits, bwd):
        assert kwargs["enable_fp_fusion"] is lr._FP_FUSION
    assert fwd["BLOCK"] == bwd["BLOCK"] == block and fwd["num_warps"] == bwd["num_warps"] == lr._num_warps(block)


@pytest.mark.triton
@needs_interpreter
@pytest.mark.parametrize("shape", [(3, 5), (4, 8, 8), (3, 25, 20)])
def test_ddim_launch_matches_the_report_mirror(monkeypatch, shape):
    """ddim_step_triton has no launch-config function: kernels/aot.py mirrors its rule (_ddim_config)."""
    from fastdense.kernels import aot
    from fastdense.kernels import ddim_step as dd

    calls = []
    monkeypatch.setattr(dd, "_ddim_step_fwd_kernel", _Recorder(dd._ddim_step_fwd_kernel, calls))
    n = 2
    x, eps_c, eps_u, noise = (torch.randn(n, *shape) for _ in range(4))
    dd.ddim_step(x, eps_c, eps_u, noise, 0.9, -0.1, 0.2, 7.5, torch.empty_like(x), impl="triton")
    (grid, kwargs), = calls
    block, n_chunks, warps = aot._ddim_config(dd, math.prod(shape))
    assert grid == (n, n_chunks)
    assert (kwargs["BLOCK_SIZE"], kwargs["num_warps"], kwargs["enable_fp_fusion"]) == (block, warps, dd._FP_FUSION)


def test_ddim_mirror_grows_the_block_for_huge_items():
    from fastdense.kernels import aot
    from fastdense.kernels import ddim_step as dd

    if not triton_available():
        pytest.skip("needs triton")
    assert aot._ddim_config(dd, 4 * 64 * 64) == (1024, 16, 4)
    assert aot._ddim_config(dd, 1024 * 65535 + 1) == (2048, 32768, 8)


# ---------------------------------------------------------------------------
# The command


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_static_report_through_the_cli(run_cli, tmp_path):
    out = tmp_path / "static.json"
    code, stdout, stderr = run_cli(["profile", "kernels", "--static", "--arch", "sm_90", "--kernel", "ddim_step",
                                    "--dtype", "fp32", "--json", out])
    assert code == 0, stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["arch"] == "sm_90" and row["kernel"] == "ddim_step_fwd" and row["ok"], row
    assert row["specialisation"] == "ddim_step_fwd[x=fp32 eps=fp32 acc=fp32 BLOCK_SIZE=1024 HAS_CFG w4 nodiv:n_items]"
    # SD1.5 latents (4×64×64 = 16384 elements) at batch 8 with CFG: 8 items × 16 blocks of 1024
    assert (row["case"], row["grid"], row["programs"], row["num_warps"]) == ("B=8", [8, 16], 128, 4)
    assert row["spills"] == 0 and row["v4_loads"] == 8 and row["fp_fusion"] is True
    expected = occupancy(row["regs"], row["shared"], 4, H100)
    assert (row["blocks_per_sm"], row["warps_per_sm"], row["limiter"]) == (
        expected.blocks_per_sm, expected.warps_per_sm, expected.limiter)
    assert row["waves"] == pytest.approx(128 / (expected.blocks_per_sm * 132))
    assert "ddim_step_fwd" in stdout and "8×16" in stdout and "H100 SXM / H200" in stdout


@pytest.mark.parametrize("args,needle", [
    (["--static", "--arch", "sm_42"], "--arch 'sm_42' is not allowed; allowed: sm_80, sm_90, sm_100"),
    (["--static", "--kernel", "attention"], "--kernel 'attention' is not allowed"),
    (["--static", "--dtype", "fp64"], "--dtype 'fp64' is not allowed"),
    (["--static", "--batch", "0"], "--batch 0 is not allowed"),
    (["--static", "--n", "0"], "--n 0 is not allowed"),
    (["--static", "--jobs", "0"], "--jobs 0 is not allowed"),
    (["--static", "--device", "cpu", "--steps", "2"], "--device, --steps do not apply with --static"),
    (["--static", "--all", "--n", "128"], "--n does not apply with --all"),
    (["--arch", "sm_90"], "--arch needs --static"),
    (["--device", "cpu", "--json", "x.json", "--all"], "--all, --json need --static"),
])
def test_bad_static_options_are_one_line_errors(run_cli, args, needle):
    code, stdout, stderr = run_cli(["profile", "kernels", *args])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (code, stderr)
