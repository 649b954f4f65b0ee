"""Timing helpers: medians over repeats, CUDA-synchronised, peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn: Callable[[], object], device: torch.device, setup: Callable[[], object] | None = None) -> float:
    """Wall time of one ``fn()`` in milliseconds, synchronised; ``setup()`` runs untimed first."""
    if setup is not None:
        setup()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int = 10,
    warmup: int = 2,
    setup: Callable[[], object] | None = None,
) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        time_once_ms(fn, device, setup)
    return statistics.median(time_once_ms(fn, device, setup) for _ in range(repeats))


def count_cuda_kernels(fn: Callable[[], object]) -> int | None:
    """Number of CUDA kernel launches one call of ``fn`` makes (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=repeats, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9
