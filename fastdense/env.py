"""Facts about this environment for bug reports and benchmark records: versions, CPU, GPUs,
Triton mode and the kernel implementation ``auto`` picks. ``fastdense env`` prints them;
``benchmarks/gpu_check.py`` stores them with its results.
"""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["collect_env", "cpu_name"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), for benchmark records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> dict[str, str]:
    """Name → value (all strings, in a stable order) of what a bug report needs."""
    import torch

    from fastdense import __version__
    from fastdense.kernels import dispatch

    info: dict[str, str] = {
        "fastdense": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
    }
    for dist in ("triton", "diffusers", "transformers", "peft", "deepspeed", "xformers", "safetensors"):
        info[dist] = _version(dist)
    cuda = torch.cuda.is_available()
    info["cuda available"] = str(cuda)
    info["torch cuda build"] = str(torch.version.cuda)
    if cuda:
        info["device"] = "cuda"
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        info["device"] = "cpu"
        info["gpu"] = "none"
    info["torch threads"] = str(torch.get_num_threads())
    if not dispatch.triton_available():
        info["triton mode"] = "unavailable"
    elif dispatch.triton_interpreted():
        info["triton mode"] = "interpreted (TRITON_INTERPRET=1)"
    else:
        info["triton mode"] = "compiled (CUDA)" if cuda else "compiled, but no CUDA device: not used"
    info["kernel impl (auto, cpu)"] = dispatch.describe_auto_choice("cpu")
    if cuda:
        info["kernel impl (auto, cuda)"] = dispatch.describe_auto_choice("cuda")
    return info
