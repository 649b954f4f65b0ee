"""The bandwidth model (fastdense.benchmarks.roofline, ``fastdense bench kernels --model``): its
arithmetic on hand-computed cells, the naive path's counted traffic, and the CLI."""

import json
import math

import pytest

from fastdense.benchmarks import roofline
from fastdense.benchmarks.roofline import GPUS, Assumptions, model_rows, model_targets

D = 4 * 64 * 64


def _row(rows, op, direction, dtype, n, impl):
    return next(r for r in rows if (r.op, r.dir, r.dtype, r.n, r.impl) == (op, direction, dtype, n, impl))


def test_published_figures_are_the_datasheets():
    a100, h100, h200 = GPUS["a100"], GPUS["h100"], GPUS["h200"]
    assert (a100.hbm_tb_s, h100.hbm_tb_s, h200.hbm_tb_s) == (2.039, 3.35, 4.8)
    assert (a100.bf16_dense_tflops, h100.bf16_dense_tflops, h200.bf16_dense_tflops) == (312.0, 989.0, 989.0)
    assert (a100.nvlink_gb_s, h100.nvlink_gb_s, h200.nvlink_gb_s) == (600.0, 900.0, 900.0)
    assert (a100.nic_gb_s, h100.nic_gb_s) == (200 / 8, 400 / 8)  # HDR 200 Gb/s, NDR 400 Gb/s per port
    assert all(s.nics_per_node == 8 and s.gpus_per_node == 8 and s.sources for s in GPUS.values())


def test_minimum_bytes_by_hand():
    # forward: ε_u, ε_c (bf16) + x, x' (fp32) = 12 B per element; 6 fp32 scalars + an int64 index per
    # item; 4 B per trajectory (N // 4 of them)
    assert roofline.log_ratio_min_bytes(1024, D, 2) == (1024 * D * 12 + 1024 * 32 + 256 * 4,
                                                       1024 * D * 16 + 1024 * 32 + 256 * 4)
    assert roofline.log_ratio_min_bytes(128, D, 4) == (128 * D * 16 + 128 * 32 + 32 * 4,
                                                      128 * D * 24 + 128 * 32 + 32 * 4)
    # ddim step: ε_u, ε_c in bf16, x, z, x' in fp32, one fp32 residual per item
    assert roofline.ddim_step_min_bytes(8, D, 2) == 8 * D * (2 * 2 + 3 * 4) + 8 * 4


def test_kernel_benchmark_rows_use_the_same_byte_counts():
    import torch

    from fastdense.benchmarks.kernels import _min_bytes_log_ratio, make_log_ratio_inputs

    inp = make_log_ratio_inputs(8, torch.bfloat16, torch.device("cpu"), shape=(4, 8, 8))
    assert _min_bytes_log_ratio(inp) == roofline.log_ratio_min_bytes(8, 256, 2)


def test_model_cells_by_hand():
    a = Assumptions(copy_efficiency=0.9, launch_us=5.0, sync_us=10.0)
    rows = model_rows(GPUS["h100"], (128, 1024), ("fp32", "bf16"), assumptions=a)
    copy = 3.35e12 * 0.9  # B/s

    r = _row(rows, "log_ratio", "fwd", "bf16", 1024, "triton")
    nbytes = 1024 * D * 12 + 1024 * 32 + 256 * 4
    assert r.min_bytes == nbytes
    assert r.bytes_us == pytest.approx(nbytes / copy * 1e6)  # 66.79 µs
    assert r.bytes_us == pytest.approx(66.786, abs=1e-3)
    assert r.launches == 2 and r.latency_us == 10.0 and r.model_us == pytest.approx(76.786, abs=1e-3)
    assert r.model_gbps / r.copy_gbps == pytest.approx(66.786 / 76.786, abs=1e-4)

    r = _row(rows, "log_ratio", "fwd+bwd", "bf16", 128, "triton")
    nbytes = 2 * (128 * 32 + 32 * 4) + 128 * D * (12 + 16)
    assert r.min_bytes == nbytes and r.launches == 3
    assert r.model_us == pytest.approx(15 + nbytes / copy * 1e6)

    # the naive formula: 368 + 108 B per element, 54 + 21 eager ops, 6 host syncs (Normal's checks)
    n = _row(rows, "log_ratio", "fwd+bwd", "bf16", 128, "naive")
    assert n.min_bytes == (368 + 108) * 128 * D
    assert (n.launches, n.syncs, n.latency_us) == (75, 6, 75 * 5 + 6 * 10)
    assert n.model_us == pytest.approx(435 + (368 + 108) * 128 * D / copy * 1e6)  # 766.09 µs

    a100 = model_rows(GPUS["a100"], (128,), ("fp32",), ops=("log_ratio",), assumptions=a, naive=False)
    r = _row(a100, "log_ratio", "bwd", "fp32", 128, "triton")
    assert r.min_bytes == 50_335_872
    assert r.model_us == pytest.approx(5 + 50_335_872 / (2.039e12 * 0.9) * 1e6)  # 32.43 µs

    h200 = model_rows(GPUS["h200"], (8,), ("bf16",), ops=("ddim_step",), assumptions=a, naive=False)
    assert h200[0].min_bytes == 2_097_184
    assert h200[0].model_us == pytest.approx(7 * 5 + 2_097_184 / (4.8e12 * 0.9) * 1e6)


def test_model_targets_and_measured_fractions():
    rows = model_rows(GPUS["h100"], (128, 1024), ("bf16",), ops=("log_ratio",))
    targets = {t["target"]: t for t in model_targets(rows)}
    fwd = targets["log_ratio fwd bf16 N=1024 >= 80% of copy bandwidth"]
    assert fwd["model"] == pytest.approx(66.786 / 76.786, abs=1e-4) and fwd["ok_model"] and fwd["ok"] is None
    x3 = targets["log_ratio fwd+bwd bf16 N=128 >= 3x the naive formula"]
    tri = _row(rows, "log_ratio", "fwd+bwd", "bf16", 128, "triton")
    nai = _row(rows, "log_ratio", "fwd+bwd", "bf16", 128, "naive")
    assert x3["model"] == pytest.approx(nai.model_us / tri.model_us) and x3["model"] > 3

    # measured: Triton forward at N = 1024 in 100 µs, naive fwd+bwd at N = 128 10x the Triton one
    t1024 = _row(rows, "log_ratio", "fwd", "bf16", 1024, "triton")
    roofline.attach_measured(rows, {("log_ratio", "fwd", "bf16", 1024, "triton"): 0.100,
                                    ("log_ratio", "fwd+bwd", "bf16", 128, "triton"): 0.050,
                                    ("log_ratio", "fwd+bwd", "bf16", 128, "naive"): 0.500}, copy_gbps=2800.0)
    assert t1024.measured_us == pytest.approx(100.0)
    assert t1024.of_model == pytest.approx(t1024.model_us / 100.0)
    assert t1024.measured_gbps == pytest.approx(t1024.min_bytes / 100e-6 / 1e9)
    assert t1024.of_copy == pytest.approx(t1024.measured_gbps / 2800.0)
    targets = {t["target"]: t for t in model_targets(rows)}
    assert targets["log_ratio fwd bf16 N=1024 >= 80% of copy bandwidth"]["ok"] is (t1024.of_copy >= 0.8)
    assert targets["log_ratio fwd+bwd bf16 N=128 >= 3x the naive formula"]["measured"] == pytest.approx(10.0)
    assert targets["log_ratio fwd+bwd bf16 N=128 >= 3x the naive formula"]["ok"] is True


def test_crossover_is_where_streaming_reaches_the_launch_floor():
    a = Assumptions()
    n = roofline.crossover_n(GPUS["h100"], "log_ratio", "fwd", "bf16", assumptions=a)
    copy = 3.35e12 * a.copy_efficiency
    def streaming(k):
        return roofline.log_ratio_min_bytes(k, D, 2)[0] / copy * 1e6
    assert streaming(n) >= 2 * a.launch_us > streaming(n - 1)


def test_naive_traffic_is_what_the_counter_counts():
    """NAIVE_TRAFFIC (bytes per element of N·D, eager launches, host syncs) is the dispatch-mode count
    of the naive cells; per-element counts do not depend on the shape."""
    from fastdense.benchmarks.kernels import naive_traffic_table

    counted = naive_traffic_table(shape=(4, 8, 8), n=4)
    assert counted == naive_traffic_table(shape=(4, 4, 6), n=3)
    assert {k: (v.bytes_per_element, v.launches, v.syncs) for k, v in roofline.NAIVE_TRAFFIC.items()} == counted


def test_count_traffic_of_one_add():
    import torch

    from fastdense.benchmarks.kernels import count_traffic

    x, y = torch.ones(3, 100), torch.ones(3, 100)
    t = count_traffic(lambda: (x + y).view(-1), item_elems=100)
    assert (t.bytes_big, t.launches, t.syncs) == (3 * 1200, 1, 0)  # two reads and one write, the view is free
    t = count_traffic(lambda: bool((x > 0).all()), item_elems=100)
    assert t.syncs == 1 and t.launches == 2


def test_cli_model_alone_without_cuda(run_cli, tmp_path):
    out = tmp_path / "model.json"
    code, stdout, stderr = run_cli(["bench", "kernels", "--model", "h100", "--device", "cpu", "--json", out])
    assert code == 0, stderr
    assert "bandwidth model: H100 SXM5 80GB" in stdout
    assert "no CUDA device" in stdout and "assumption: copy efficiency 90%" in stdout
    assert "target log_ratio fwd bf16 N=1024 >= 80% of copy bandwidth: the model gives 0.87" in stdout
    rows = json.loads(out.read_text())
    model = [r for r in rows if "model_us" in r]
    assert {r["n"] for r in model} == {8, 32, 128, 1024}  # --model adds N = 1024 to the default Ns
    cell = next(r for r in model if (r["op"], r["dir"], r["dtype"], r["n"], r["impl"]) ==
                ("log_ratio", "fwd", "bf16", 1024, "triton"))
    assert cell["min_bytes"] == 1024 * D * 12 + 1024 * 32 + 256 * 4 and cell["measured_us"] is None
    assert any("target" in r for r in rows)


def test_cli_measured_columns_beside_the_model(capsys):
    """On a GPU the kernel rows' times land beside the model (fabricated rows here)."""
    from fastdense.benchmarks.kernels import KernelRow
    from fastdense.cli.bench import print_bandwidth_model

    def krow(impl, n, fwd, bwd, fb):
        return KernelRow(op="log_ratio", impl=impl, dtype="bf16", n=n, d=D, fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=fb,
                         min_bytes_fwd=0, min_bytes_bwd=0, gbps=None, fwd_gbps=None, bwd_gbps=None, launches_fwd=2,
                         launches_bwd=1, device="cuda")

    rows = print_bandwidth_model(GPUS["h100"], [128, 1024], ["bf16"], ["log_ratio"],
                                 kernel_rows=[krow("triton", 128, 0.02, 0.02, 0.04), krow("naive", 128, 1, 0.3, 1.2),
                                              krow("triton", 1024, 0.08, 0.1, 0.18)],
                                 device_name="NVIDIA A100-SXM4-80GB", copy_gbps=2900.0)
    out = capsys.readouterr().out
    cell = next(r for r in rows if r.get("impl") == "triton" and r.get("n") == 1024 and r.get("dir") == "fwd")
    assert cell["measured_us"] == pytest.approx(80.0) and cell["of_model"] == pytest.approx(cell["model_us"] / 80.0)
    assert cell["of_copy"] == pytest.approx(cell["min_bytes"] / 80e-6 / 1e9 / 2900.0)
    assert "warning: measured on NVIDIA A100-SXM4-80GB, modelled for H100 SXM5 80GB" in out
    assert "measured 30.00 (met)" in out  # naive 1.2 ms / Triton 0.04 ms at N = 128


@pytest.mark.parametrize("value", ["x100", "H800", ""])
def test_cli_bad_model_is_a_one_line_error(run_cli, value):
    code, stdout, stderr = run_cli(["bench", "kernels", "--model", value, "--device", "cpu"])
    assert code == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "allowed: a100, h100, h200" in lines[0]
    assert "Traceback" not in stderr and stdout == ""


def test_gpu_names_map_to_the_table():
    assert roofline.gpu_key_of("NVIDIA H100 80GB HBM3") == "h100"
    assert roofline.gpu_key_of("NVIDIA H200") == "h200"
    assert roofline.gpu_key_of("NVIDIA A100-SXM4-80GB") == "a100"
    assert roofline.gpu_key_of("NVIDIA L4") is None
    assert math.isclose(GPUS["h200"].nvlink_one_way_gb_s, 450.0)
