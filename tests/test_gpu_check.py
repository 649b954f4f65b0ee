"""benchmarks/gpu_check.py: the one-shot GPU check runs end to end with ``--dry-run`` on a machine
without a GPU (every case at small shapes, Triton interpreted) and writes its two reports."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the check must set it itself
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "fastdense.benchmarks.gpu_check", "--dry-run", "--json",
                          str(out / "report.json")], cwd=out, env=env, capture_output=True, text=True, timeout=600)
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
