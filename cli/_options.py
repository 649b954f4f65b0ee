"""Options several commands share, the flag-side device/dtype parsers and the progress-bar factory.

Each ``*_option`` returns a fresh ``typer.Option`` for an ``Annotated`` parameter, e.g.
``device: Annotated[str, device_option()] = "auto"``; ``help`` changes only the text.
torch and rich load inside the functions, so ``fastdense --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn

DEVICE_HELP = "auto, cpu, cuda or cuda:N."


def device_option(help: str = DEVICE_HELP) -> Any:
    return typer.Option("--device", help=help)


def dtype_option(help: str) -> Any:
    return typer.Option("--dtype", help=help)


def seed_option(help: str) -> Any:
    return typer.Option("--seed", help=help)


def out_option(help: str) -> Any:
    return typer.Option("--out", help=help)


def json_option(help: str = "Write the rows as JSON to this file.") -> Any:
    return typer.Option("--json", help=help)


def progress_option(help: str = "Show a progress bar.") -> Any:
    return typer.Option("--progress/--no-progress", help=help)


def resolve_device(device: str) -> torch.device:
    """``--device`` as a torch device (the one rule of :func:`fastdense.devices.resolve_device`)."""
    from fastdense.devices import resolve_device as resolve

    return resolve(device, what="--device")


def parse_dtype(name: str) -> torch.dtype:
    """``--dtype`` (fp32, bf16, fp16) as a torch dtype; a one-line error names the allowed values."""
    from fastdense.devices import parse_dtype as parse

    return parse(name, what="--dtype")


def check_out_dir(out: Path) -> None:
    """``--out`` must be a directory or not exist yet."""
    from fastdense.errors import FastdenseError

    if out.exists() and not out.is_dir():
        raise FastdenseError(f"--out {out} exists and is not a directory")


def progress_bar(
    label: str, *extra: ProgressColumn, console: Console | None = None, transient: bool = True
) -> Progress:
    """A rich progress bar: ``label``, the bar, done/total, ``extra`` columns, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(),
        console=console, transient=transient,
    )


@contextlib.contextmanager
def library_warnings(console: Console) -> Iterator[None]:
    """The library's ``warning: ...`` lines (a truncated prompt) printed once each through the
    console, so they land above the progress bar; not also through any root logging handler."""

    class _ToConsole(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            console.print(record.getMessage(), markup=False, highlight=False, soft_wrap=True)

    log = logging.getLogger("fastdense")
    handler, propagate = _ToConsole(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
