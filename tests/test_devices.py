"""One device rule and one dtype table (fastdense.devices), the same for the trainer, the CLI and benchmarks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastdense import devices
from fastdense.config import PRECISIONS
from fastdense.devices import DTYPES, parse_dtype, resolve_device
from fastdense.errors import FastdenseError

FASTDENSE = [sys.executable, "-m", "fastdense.cli.main"]


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cpu_and_auto_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", local_rank=3) == torch.device("cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_cpu_machine_is_a_one_line_error(monkeypatch, device):
    _no_cuda(monkeypatch)
    with pytest.raises(FastdenseError) as err:
        resolve_device(device)
    assert str(err.value) == f"run.device={device!r} is not allowed: torch sees no CUDA device; use cpu or auto"


@pytest.mark.parametrize(
    "device", ["tpu", "gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "", "cuda:0:1", " cpu", "cuda:²"]
)
def test_unknown_devices_name_the_allowed_ones(monkeypatch, device):
    _no_cuda(monkeypatch)
    with pytest.raises(FastdenseError, match="allowed: auto, cpu, cuda, cuda:N$") as err:
        resolve_device(device)
    assert "\n" not in str(err.value) and repr(device) in str(err.value)


def test_cuda_indices_follow_the_local_rank_or_the_given_index(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(FastdenseError, match=r"^run.device='cuda:2' is not allowed: torch sees 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_flags_are_named_as_flags(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(FastdenseError, match=r"^--device 'tpu' is not allowed; allowed: auto, cpu, cuda, cuda:N$"):
        resolve_device("tpu", what="--device")
    with pytest.raises(FastdenseError, match=r"^--dtype 'fp8' is not allowed; allowed: fp32, bf16, fp16$"):
        parse_dtype("fp8", what="--dtype")


def test_one_dtype_table():
    assert {name: parse_dtype(name) for name in DTYPES} == {
        "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert tuple(DTYPES) == PRECISIONS  # the names the config accepts
    from fastdense.benchmarks.kernels import DTYPES as bench_dtypes
    from fastdense.train import LATENT_DTYPES

    assert LATENT_DTYPES is devices.DTYPES and bench_dtypes is devices.DTYPES


def test_the_trainer_uses_the_same_rule():
    from fastdense.train import resolve_device as train_resolve
    from fastdense.training.distributed import resolve_device as distributed_resolve

    assert train_resolve is resolve_device and distributed_resolve is resolve_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["bench", "kernels"], ["profile", "kernels"]])
def test_every_command_takes_cuda_n_and_refuses_it_without_cuda(command):
    """Every --device takes cuda:N (once refused by bench and profile); on a CPU machine: one line, exit 2."""
    res = subprocess.run([*FASTDENSE, *command, "--device", "cuda:1"], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["error: --device 'cuda:1' is not allowed: torch sees no CUDA device; use cpu or auto"]
