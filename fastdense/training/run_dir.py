"""Run directories: where a run writes, checked before anything heavy starts.

A fresh run needs a new or empty directory (``--out``, else ``run.out``, else ``runs/<time>``);
a resumed run continues in an existing one (``--out``, else the run that holds the checkpoint).
:func:`resume_checkpoint` and :func:`resolve_run_dir` are the one place for that rule: the
library's :func:`fastdense.training.trainer.train` and ``fastdense train`` both call them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastdense import checkpoint as ckpt_mod
from fastdense.config import Config
from fastdense.errors import FastdenseError, one_line

__all__ = ["check_run_dir", "default_run_dir", "prepare_run_dir", "resolve_run_dir", "resume_checkpoint"]


def default_run_dir(base: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / stamp
    k = 1
    while path.exists():
        path = Path(base) / f"{stamp}-{k}"
        k += 1
    return path


def _probe_writable(directory: Path) -> bool:
    """True when a directory can be created inside ``directory`` (os.access says yes to root everywhere)."""
    import tempfile

    try:
        Path(tempfile.mkdtemp(prefix=".fastdense-probe-", dir=directory)).rmdir()
    except OSError:
        return False
    return True


def check_run_dir(out: Path, *, resuming: bool) -> None:
    """A fresh run needs a new or empty directory we can create; a resumed one an existing directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastdenseError(f"output {out} exists and is not a directory; allowed: a new or empty directory")
    if out.is_dir():
        if not resuming and any(out.iterdir()):
            raise FastdenseError(
                f"output {out} is not empty; allowed: a new or empty directory (or --resume latest to continue it)"
            )
        if not _probe_writable(out):
            raise FastdenseError(f"output {out} is not writable")
        return
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FastdenseError(f"output {out} cannot be created: {parent} is not a directory")
    if not _probe_writable(parent):
        raise FastdenseError(f"output {out} cannot be created: {parent} is not writable")



def resume_checkpoint(resume: str | Path, run_dir: str | Path | None) -> Path:
    """The checkpoint that ``resume`` names (``"latest"`` in ``run_dir``, or a checkpoint / run
    directory), validated; raises FastdenseError before anything is built."""
    ckpt = ckpt_mod.resolve_resume(resume, run_dir)
    ckpt_mod.validate_checkpoint(ckpt)
    return ckpt


def resolve_run_dir(cfg: Config, out: str | Path | None, checkpoint: Path | None) -> Path:
    """The run directory, checked: ``out``; else, resuming, the run holding ``checkpoint``;
    else ``run.out``; else a new ``runs/<time>``."""
    if checkpoint is not None:
        run_dir = Path(out) if out is not None else ckpt_mod.run_dir_of(checkpoint)
        check_run_dir(run_dir, resuming=True)
    else:
        if out is None and not cfg.run.out and _launched_world_size() > 1:
            # each rank would stamp its own runs/<time>: the ranks must be told one shared directory
            raise FastdenseError(f"{_launched_world_size()} ranks need one run directory: give --out (or run.out) "
                                 "on storage every rank can reach")
        run_dir = Path(out) if out is not None else (Path(cfg.run.out) if cfg.run.out else default_run_dir())
        check_run_dir(run_dir, resuming=False)
    return run_dir


def _launched_world_size() -> int:
    """WORLD_SIZE as a launcher (torchrun, deepspeed) sets it before the process group starts."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def prepare_run_dir(run_dir: Path, cfg: Config, *, resumed: bool, metrics_lines: int) -> None:
    """Rank 0, when the run starts: a fresh run checks the directory again and writes config.json;
    a resumed one cuts metrics.jsonl back to the ``metrics_lines`` its checkpoint had written."""
    if resumed:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
        kept = lines[:metrics_lines]
        if len(kept) != len(lines):
            tmp = metrics.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, metrics)
    else:
        check_run_dir(run_dir, resuming=False)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(cfg.to_json())
        except OSError as err:
            raise FastdenseError(f"output {run_dir} cannot be written ({one_line(err)})") from None
