"""benchmarks/gpu_check.py: the one-shot GPU check runs end to end with ``--dry-run`` on a machine
without a GPU (every case at small shapes, Triton interpreted) and writes its two reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the check must set it itself
    env["OMP_NUM_THREADS"] = "1"
    # as the README says to run it: the script by its path (its folder lands first on sys.path)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--dry-run", "--json", str(out / "report.json")], cwd=out,
                         env=env, capture_output=True, text=True, timeout=600)
    return res, out


def test_dry_run_writes_both_reports(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert report["dry_run"] and report["failures"] == []
    if report["device"] == "cpu":
        assert report["triton_mode"] == "interpreter"
    for section in ("# fastdense GPU check (dry run", "## Correctness", "## Kernels", "## Bandwidth model",
                    "## Targets", "## Sampler", "## Training step", "## Skipped", "## Failures"):
        assert section in md


def test_dry_run_checks_every_case(dry_run):
    _, out = dry_run
    report = json.loads((out / "report.json").read_text())
    checks = report["correctness"]
    assert {(c["check"], c["dtype"]) for c in checks} == {
        (op, dt) for op in ("log_ratio", "ddim_step") for dt in ("float32", "bfloat16", "float16")}
    assert all(c["ok"] for c in checks)
    kernels = report["kernels"]
    assert {(r["op"], r["impl"], r["dtype"]) for r in kernels} == {
        (op, impl, dt) for op in ("log_ratio", "ddim_step") for impl in ("naive", "torch", "triton")
        for dt in ("fp32", "bf16")}
    assert all(r["fwd_ms"] > 0 for r in kernels)
    assert {r["impl"] for r in report["model"]} == {"triton", "naive"} and report["model_targets"] == []
    assert report["copy_bandwidth_gbps"] > 0
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert any(s.startswith("sampler: diffusers is not importable") for s in report["skipped"])
        return
    assert {r["impl"] for r in report["sampler"]} == {"fastdense", "fastdense_norecord", "diffusers"}
    train = report["train_step"]
    assert train["losses_finite"] and train["step_s"] > 0 and train["items"] == 5  # sd15-multi: 1 group x 5 x K=1
    assert train["trainable_params"] > 0


def test_without_a_gpu_it_asks_for_dry_run(capsys):
    import torch

    from fastdense.benchmarks import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--json", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--dry-run" in err


def test_cli_wrapper_forwards_its_options(run_cli, monkeypatch, tmp_path):
    from fastdense.benchmarks import gpu_check

    seen = []
    monkeypatch.setattr(gpu_check, "main", lambda argv: seen.append(argv) or 0)
    code, _, stderr = run_cli(["bench", "gpu-check", "--dry-run", "--json", tmp_path / "r.json", "--no-sampler",
                               "--model", "h200"])
    assert code == 0, stderr
    assert seen == [["--json", str(tmp_path / "r.json"), "--model", "h200", "--no-sampler", "--dry-run"]]
    monkeypatch.setattr(gpu_check, "main", lambda argv: 1)
    assert run_cli(["bench", "gpu-check", "--dry-run"])[0] == 1
    code, _, stderr = run_cli(["bench", "gpu-check", "--model", "v100"])
    assert code == 2 and stderr.startswith("error: --model 'v100' is not allowed")


def test_gpu_branches_on_tiny_stand_ins(monkeypatch):
    """What only a GPU run reaches, run here on stand-ins: the training step's SD1.5 branch (FLOPs and
    MFU from the measured constants) on the tiny UNet, the sampler's UNet throughput, the report."""
    pytest.importorskip("diffusers")
    import torch

    from fastdense.benchmarks import gpu_check, sampler
    from fastdense.benchmarks.roofline import GPUS
    from fastdense.benchmarks.scaling import SD15

    monkeypatch.setattr(sampler, "SD15_UNET", gpu_check.TINY_UNET)
    row = gpu_check.train_step_check(torch.device("cpu"), dry_run=False, spec=GPUS["h100"], repeats=1)
    assert row["lora_rank"] == 32 and row["items"] == 5 and row["losses_finite"]
    bwd, measured = SD15.backward_flops(32, ("to_q", "to_k", "to_v", "to_out.0"))
    flops = 10 * (SD15.fwd_flops + SD15.lora_fwd_flops(32, ("to_q", "to_k", "to_v", "to_out.0")) + bwd) \
        + 10 * SD15.fwd_flops
    assert measured and row["unet_tflops"] == pytest.approx(flops / row["step_s"] / 1e12)
    assert row["mfu"] == pytest.approx(row["unet_tflops"] / 989.0)

    thr = gpu_check.unet_throughput([{"impl": "fastdense", "compiled": False, "batch": 8, "steps": 50,
                                      "seconds_per_trajectory": 0.5}], GPUS["h200"])
    assert thr[0]["unet_tflops"] == pytest.approx(50 * 2 * SD15.fwd_flops / 0.5 / 1e12)  # 160.7 TFLOP/s
    report = {"date": "2026-12-04", "dry_run": False, "device": "cuda", "env": {"gpu": "NVIDIA H200"},
              "triton_mode": "compiled", "wall_s": 300.0, "copy_bandwidth_gbps": 4200.0, "correctness": [],
              "kernels": [], "model": [], "model_notes": [], "model_gpu": "H200 SXM 141GB",
              "targets": [{"target": "triton fwd >= 0.8 copy bw (bf16, n=1024)", "value": 0.85, "model": 0.9,
                           "ok": True}],
              "sampler": [], "unet_throughput": thr, "train_step": row, "skipped": [], "failures": []}
    md = gpu_check.markdown_report(report)
    assert "| triton fwd >= 0.8 copy bw (bf16, n=1024) | 0.85 | 0.9 | yes |" in md
    assert "161" in md and "## Training step" in md and "(nothing)" in md


def test_dry_run_needs_neither_diffusers_nor_deepspeed(tmp_path):
    """What a bare GPU image has is enough: without diffusers and deepspeed the check still runs, and
    says in the report what it skipped."""
    code = ("import sys\n"
            "for name in ('diffusers', 'deepspeed'):\n"
            "    sys.modules[name] = None  # import fails as if not installed\n"
            "from fastdense.benchmarks import gpu_check\n"
            f"sys.exit(gpu_check.main(['--dry-run', '--json', {str(tmp_path / 'r.json')!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    skipped = "\n".join(report["skipped"])
    assert "sampler: diffusers is not importable" in skipped and "training step: diffusers is not importable" in skipped
    assert "deepspeed is not importable" in skipped
    assert all(c["ok"] for c in report["correctness"]) and report["kernels"]
    assert "diffusers is not importable" in (tmp_path / "r.md").read_text()


def test_dry_run_times_every_model_family(dry_run):
    _, out = dry_run
    report = json.loads((out / "report.json").read_text())
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert any(s.startswith("model families: diffusers is not importable") for s in report["skipped"])
        return
    rows = report["families"]
    assert [r["family"] for r in rows] == ["sd", "sdxl", "sd3", "flux"]
    assert all(r["sample_step_ms"] > 0 and r["train_microbatch_ms"] > 0 for r in rows)
    assert "## Model families" in (out / "report.md").read_text()
