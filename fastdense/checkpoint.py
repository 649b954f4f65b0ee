"""Checkpoint directories: atomic writes, discovery, pruning, RNG states.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNNNN/``::

    engine/                DeepSpeed ``save_checkpoint`` (trainable weights, optimizer, LR scheduler)
    lora/                  the adapter in diffusers format (LoRA runs)
    buffer/rank-RRRRR/     ReplayBuffer.save of each rank's shard
    rng/rank-RRRRR.safetensors  torch (CPU, CUDA) and trainer generator states of each rank
    rng/rank-RRRRR.json    python and numpy RNG states of each rank
    state.json             counters (step, round, ...), evaluation so far, world size
    config.json            the resolved config
    COMPLETE               written last: a directory without it is incomplete

It is written into a temporary sibling (``.tmp-step-...``) and renamed into place,
so a crash never leaves a half-written ``step-*`` directory. Every problem reading
one is a one-line :class:`FastdenseError`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdense.errors import FastdenseError, one_line

__all__ = [
    "COMPLETE",
    "checkpoint_name",
    "find_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "publish_checkpoint",
    "read_state",
    "resolve_resume",
    "restore_rng",
    "save_rng",
    "temp_checkpoint_dir",
    "validate_checkpoint",
]

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = find_checkpoints(run_dir)
    return found[-1][1] if found else None


def temp_checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (any leftover of a crash is removed)."""
    tmp = Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_checkpoint(tmp: Path, step: int) -> Path:
    """Mark ``tmp`` complete and rename it to ``step-NNNNNNNN`` (atomic on one filesystem).

    An existing checkpoint of the same step (a run resumed from an older one) is kept,
    renamed ``step-NNNNNNNN.superseded-<time>``, never deleted.
    """
    final = tmp.parent / checkpoint_name(step)
    (tmp / COMPLETE).write_text(f"{time.time():.3f}\n")
    _fsync_dir(tmp)
    if final.exists():
        final.rename(final.with_name(f"{final.name}.superseded-{int(time.time() * 1000)}"))
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``protect``); returns the deleted."""
    found = find_checkpoints(run_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    protected = protect.resolve() if protect is not None else None
    deleted = []
    for path in doomed:
        if protected is not None and path.resolve() == protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


# --------------------------------------------------------------------------- reading


def _rank_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def buffer_dir(ckpt: Path, rank: int) -> Path:
    return ckpt / "buffer" / _rank_name(rank)


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastdenseError(f"checkpoint {ckpt} is corrupt: state.json cannot be read ({one_line(err)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise FastdenseError(f"checkpoint {ckpt} is corrupt: state.json holds no step counter")
    return state


def validate_checkpoint(ckpt: str | Path, *, world_size: int | None = None) -> dict[str, Any]:
    """Check that ``ckpt`` is a complete checkpoint (files present, state readable); returns its state."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FastdenseError(f"checkpoint {ckpt} does not exist")
    if not ckpt.is_dir():
        raise FastdenseError(f"checkpoint {ckpt} is not a directory")
    if not (ckpt / COMPLETE).is_file():
        raise FastdenseError(f"checkpoint {ckpt} is incomplete (no {COMPLETE} marker); resume from another one")
    state = read_state(ckpt)
    ranks = int(state.get("world_size", 1))
    if world_size is not None and ranks != world_size:
        raise FastdenseError(
            f"checkpoint {ckpt} was written by {ranks} rank(s); resume it with the same number of ranks, "
            f"not {world_size}"
        )
    required = ["config.json", "engine"]
    for rank in range(ranks):
        required += [f"buffer/{_rank_name(rank)}/buffer.json", f"buffer/{_rank_name(rank)}/buffer.safetensors",
                     f"rng/{_rank_name(rank)}.json", f"rng/{_rank_name(rank)}.safetensors"]
    for rel in required:
        if not (ckpt / rel).exists():
            raise FastdenseError(f"checkpoint {ckpt} is corrupt: {rel} is missing")
    engine = ckpt / "engine"
    if not any(engine.rglob("*model_states.pt")):
        raise FastdenseError(f"checkpoint {ckpt} is corrupt: engine/ holds no DeepSpeed model states")
    try:
        json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastdenseError(f"checkpoint {ckpt} is corrupt: config.json cannot be read ({one_line(err)})") from None
    return state


def resolve_resume(resume: str | Path, run_dir: str | Path | None) -> Path:
    """``"latest"`` (needs ``run_dir``) or a path (a checkpoint, or a run directory: its latest) → checkpoint dir."""
    if str(resume) == "latest":
        if run_dir is None:
            raise FastdenseError("resume='latest' needs the run directory (--out DIR) to look for checkpoints in")
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FastdenseError(f"cannot resume: run directory {run_dir} does not exist")
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FastdenseError(f"cannot resume: {run_dir} holds no complete checkpoint (looked in {CHECKPOINTS}/)")
        return found
    path = Path(resume).expanduser()
    if not path.exists():
        raise FastdenseError(f"resume={str(resume)!r}: no such checkpoint; allowed: 'latest' or a checkpoint directory")
    if path.is_dir() and (path / CHECKPOINTS).is_dir() and not (path / "state.json").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FastdenseError(f"cannot resume: {path} holds no complete checkpoint (looked in {CHECKPOINTS}/)")
        return found
    return path


def run_dir_of(ckpt: Path) -> Path:
    """The run directory that holds checkpoint ``ckpt`` (``<run>/checkpoints/step-N``)."""
    return ckpt.resolve().parent.parent


# ------------------------------------------------------------------------------ RNG


def save_rng(directory: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    """torch (CPU and current CUDA device), numpy and python RNG states plus ``generators``, for one rank."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, gen in generators.items():
        tensors[f"gen.{name}"] = gen.get_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"{_rank_name(rank)}.safetensors"))
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what we restore
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    (directory / f"{_rank_name(rank)}.json").write_text(json.dumps(meta))


def restore_rng(directory: Path, rank: int, generators: dict[str, torch.Generator]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(directory / f"{_rank_name(rank)}.safetensors"))
        meta = json.loads((directory / f"{_rank_name(rank)}.json").read_text())
        np_state = meta["numpy"]
        py_state = meta["python"]
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise FastdenseError(f"checkpoint RNG states in {directory} cannot be read ({one_line(err)})") from None
    missing = [name for name in generators if f"gen.{name}" not in tensors]
    if missing or "torch_cpu" not in tensors:
        raise FastdenseError(f"checkpoint RNG states in {directory} lack {missing or ['torch_cpu']}")
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    for name, gen in generators.items():
        gen.set_state(tensors[f"gen.{name}"])
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))  # noqa: NPY002
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
