"""Stopping a training run cleanly on SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send
before they kill a preempted job).

The first signal asks the trainer to stop after the update in progress: it writes a checkpoint
and raises :class:`TrainingInterrupted`; ``fastdense train`` then prints how to continue and exits
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal exits at once, with the
same code and no checkpoint (the last complete one stays: checkpoints are published atomically).

The signals are read by a watcher thread from the wakeup fd that Python's C-level handler writes
to (``signal.set_wakeup_fd``), not by a Python-level handler: that one runs only once the main
thread is back in the interpreter, and the main thread may sit in a long C call (a UNet forward,
a collective waiting for a peer) just when the second signal must work.

Several ranks agree on the stop through one collective per update (the trainer all-reduces the
signal number with MAX), so every rank checkpoints the same step even if only some got the
signal. Launchers forward a terminal's Ctrl-C: the ``deepspeed`` launcher's ranks get the
terminal's SIGINT and, milliseconds later, the launcher's SIGTERM. Signals within ``GRACE_S`` of
the first one are therefore the same request, not the second one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["GRACE_S", "StopRequest", "TrainingInterrupted", "stop_on_signals"]

GRACE_S = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set once, by a signal or by code (``request``); read by the trainer after each update."""

    def __init__(self) -> None:
        self._signum = 0
        self._lock = threading.Lock()

    @property
    def signum(self) -> int:
        """The signal that asked for the stop (0: none)."""
        return self._signum

    def request(self, signum: int = signal.SIGINT) -> bool:
        """Ask for a stop; False when one was asked for already."""
        with self._lock:
            if self._signum:
                return False
            self._signum = int(signum)
            return True


class TrainingInterrupted(Exception):
    """The run stopped on request after ``step`` updates and wrote ``checkpoint``."""

    def __init__(self, step: int, signum: int, run_dir: Path, checkpoint: Path):
        super().__init__(f"interrupted at step {step} by {signal_name(signum)}; checkpoint {checkpoint}")
        self.step = step
        self.signum = signum
        self.run_dir = Path(run_dir)
        self.checkpoint = Path(checkpoint)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _ignore(signum, frame) -> None:  # the watcher thread acts; a handler must exist for the wakeup fd
    return None


def _watch(read_fd: int, stop: StopRequest, signals: frozenset[int], announce: bool, stream: TextIO) -> None:
    first_at = None
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:  # the write end was closed: the context is over
            return
        for signum in data:
            if signum not in signals:
                continue
            now = time.monotonic()
            if first_at is None:
                first_at = now
                stop.request(signum)
                if announce:
                    print(f"{signal_name(signum)}: stopping after the current update and writing a checkpoint "
                          "(send it again to stop at once, without one)", file=stream, flush=True)
            elif now - first_at > GRACE_S:
                print(f"error: {signal_name(signum)} again: stopped at once, without a checkpoint",
                      file=stream, flush=True)
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(128 + signum)


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, *, announce: bool = True, stream: TextIO | None = None,
                    signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """While inside, SIGINT / SIGTERM set ``stop`` (first) or end the process (a later one, after
    ``GRACE_S``). ``announce``: print a line on the first (rank 0). Outside the main thread, where
    Python cannot take signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # set_wakeup_fd needs it; a full pipe just drops bytes
    previous = {s: signal.signal(s, _ignore) for s in signals}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(
        target=_watch, args=(read_fd, stop, frozenset(int(s) for s in signals), announce, stream or sys.stderr),
        name="fastdense-stop-signals", daemon=True,
    )
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)
        watcher.join(timeout=5)
        os.close(read_fd)
