"""Process-group setup for the trainer: every run is a DeepSpeed engine.

A single process needs no launcher (its process group is created on an in-memory store: no
port, no MPI); several ranks start with ``deepspeed`` or ``torchrun`` (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT from the environment). Also the two collectives the trainer uses
(``_all_reduce`` of a few floats, ``_barrier``). The device rule for ``run.device`` is
:func:`fastdense.devices.resolve_device` (re-exported here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fastdense.devices import resolve_device
from fastdense.errors import FastdenseError

__all__ = ["SHM_ENV_VAR", "DistInfo", "init_distributed", "resolve_device"]

SHM_ENV_VAR = "FASTDENSE_DS_SHM"  # "1": let DeepSpeed build/use its CPU shared-memory comm op (multi-rank CPU)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise FastdenseError(f"environment variable {name}={raw!r} is not allowed; it must be an integer") from None


def _prepare_deepspeed(device: torch.device, world_size: int) -> None:
    """Before DeepSpeed creates its communication backend.

    On CPU, DeepSpeed's ``TorchBackend`` JIT-builds a shared-memory all-reduce op
    (``deepspeed_shm_comm``, ~30 s of C++ compilation on first use) whenever the op
    probes as compatible. A single rank has nothing to reduce, and multi-rank CPU runs
    work with plain gloo, so the op is marked incompatible in DeepSpeed's (cached,
    mutable) ``deepspeed.ops.__compatible_ops__`` table unless FASTDENSE_DS_SHM=1 asks for it.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if device.type == "cpu" and (world_size == 1 or os.environ.get(SHM_ENV_VAR, "0") != "1"):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create) the process group that DeepSpeed uses; returns rank, world size and device.

    Launched by ``deepspeed`` / ``torchrun`` (WORLD_SIZE > 1): the usual env:// rendezvous.
    A single process (no WORLD_SIZE, or 1): RANK / LOCAL_RANK / WORLD_SIZE are set to
    0 / 0 / 1 when absent and the group is created on an in-memory ``HashStore`` — no
    MASTER_ADDR / MASTER_PORT, no free-port race, no MPI discovery.
    """
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise FastdenseError(f"RANK={rank} / WORLD_SIZE={world} are not allowed; need 0 <= RANK < WORLD_SIZE")
    dev = resolve_device(device, local)
    _prepare_deepspeed(dev, world)
    import deepspeed

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if world == 1:
            for key in ("RANK", "LOCAL_RANK"):
                os.environ.setdefault(key, "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise FastdenseError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} not set; start multi-rank runs with "
                    "`deepspeed` or `torchrun`"
                )
            os.environ.setdefault("LOCAL_RANK", str(local))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=dist.get_rank(), local_rank=local, world_size=dist.get_world_size(), device=dev)


def _all_reduce(values: list[float], op: str, dist_info: DistInfo) -> list[float]:
    if dist_info.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
