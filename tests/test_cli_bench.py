"""The benchmark, profile and env commands run end to end (tiny sizes) and fail cleanly."""

import json
import subprocess
import sys

import pytest

from fastdense.cli.main import main

FASTDENSE = [sys.executable, "-m", "fastdense.cli.main"]


def test_bench_kernels_writes_rows(tmp_path, capsys):
    out = tmp_path / "k.json"
    main(["bench", "kernels", "--device", "cpu", "--n", "2", "--dtype", "fp32", "--impl", "naive",
          "--impl", "torch", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("log_ratio", "naive"), ("log_ratio", "torch"), ("ddim_step", "naive"), ("ddim_step", "torch")}
    for r in rows:
        for key in ("op", "impl", "dtype", "n", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "gbps"):
            assert key in r
        assert r["fwd_ms"] > 0 and r["n"] == 2
    lr_torch = next(r for r in rows if r["op"] == "log_ratio" and r["impl"] == "torch")
    assert lr_torch["bwd_ms"] > 0 and lr_torch["gbps"] > 0 and lr_torch["speedup_vs_naive"] > 0
    assert "log_ratio" in capsys.readouterr().out


def test_bench_sampler_writes_rows(tmp_path):
    out = tmp_path / "s.json"
    main(["bench", "sampler", "--device", "cpu", "--no-compile", "--batch", "2", "--steps", "2",
          "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {r["impl"] for r in rows} == {"fastdense", "fastdense_norecord", "diffusers"}
    for r in rows:
        assert r["seconds_per_trajectory"] > 0 and r["batch"] == 2 and r["steps"] == 2
        assert "peak_mem_mb" in r and r["compiled"] is False


def test_profile_kernels_writes_a_chrome_trace(tmp_path, capsys):
    main(["profile", "kernels", "--device", "cpu", "--impl", "torch", "--n", "2", "--steps", "1",
          "--out", str(tmp_path / "prof")])
    traces = list((tmp_path / "prof").glob("*.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    assert trace["traceEvents"]
    assert "Self CPU" in capsys.readouterr().out


def test_env_json_names_dispatch():
    res = subprocess.run([*FASTDENSE, "env", "--json"], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    for key in ("torch", "triton", "diffusers", "peft", "deepspeed", "device", "triton mode",
                "kernel impl (auto, cpu)"):
        assert key in info
    assert info["kernel impl (auto, cpu)"] in ("torch", "triton")


@pytest.mark.parametrize("args,needle", [
    (["bench", "kernels", "--device", "tpu"], "--device 'tpu'"),
    (["bench", "kernels", "--device", "cpu", "--dtype", "fp8"], "--dtype 'fp8'"),
    (["bench", "kernels", "--device", "cpu", "--impl", "triton"], "--impl triton needs --device cuda"),
    (["bench", "kernels", "--device", "cpu", "--n", "0"], "--n"),
    (["bench", "kernels", "--bogus"], "No such option"),
    (["bench", "sampler", "--device", "cpu", "--batch", "0"], "--batch 0"),
    (["profile", "kernels", "--device", "cpu", "--dtype", "int8"], "--dtype 'int8'"),
    (["bench", "kernels", "--model", "x100"], "--model 'x100'"),
    (["bench", "scaling", "--gpu", "v100"], "--gpu 'v100'"),
    (["bench", "scaling", "--gpus", "8,0"], "--gpus '8,0'"),
    (["bench", "gpu-check", "--model", "b200"], "--model 'b200'"),
])
def test_bad_arguments_are_one_line_errors(args, needle):
    res = subprocess.run([*FASTDENSE, *args], capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_bench_train_counts_unet_calls_and_buffer_bytes(tmp_path):
    out = tmp_path / "t.json"
    main(["bench", "train", "--device", "cpu", "--repeats", "1", "--steps", "2", "--group-size", "2", "--k", "2",
          "--json", str(out)])
    rows = json.loads(out.read_text())
    steps = {r["mode"]: r for r in rows if "mode" in r}
    assert steps["fastdense"]["unet_calls"] == 1  # all items in one call, no reference forward
    items = steps["naive"]["items"]
    assert items == 2 * 2 and steps["naive"]["unet_calls"] == 2 * items  # a reference and a policy call per item
    assert steps["fastdense"]["step_seconds"] > 0 and steps["naive"]["step_seconds"] > 0
    buffers = [r for r in rows if "layout" in r]
    ours = [r for r in buffers if r["layout"] == "fastdense"]
    assert {r["dtype"] for r in ours} == {"float32", "bfloat16"}
    assert all(r["ratio_vs_naive"] <= 0.5 for r in ours)
