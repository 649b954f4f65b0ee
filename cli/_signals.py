"""Ctrl-C and SIGTERM for every command: the signal must end the command, wherever it lands.

Python's default SIGINT handler raises KeyboardInterrupt at the next bytecode, and two places
lose it: a finalizer (``__del__``, a weakref callback) where Python prints "Exception ignored"
and carries on, and libraries that catch ``BaseException`` and re-raise something else
(transformers' lazy imports turn it into "Could not import module ..."). Measured: a
``fastdense sample`` interrupted 2 s into model loading kept sampling, and one interrupted at
0.3 s exited 2 with an import error. So the handlers here remember the signal, re-deliver it
when a finalizer swallowed it (``sys.unraisablehook``), and ``received`` lets the entry point
report any error that follows a signal as the interruption it is.
``fastdense train`` replaces these handlers while it trains (fastdense.training.interrupt).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT): ``finally`` blocks run, and the
    command ends with ``error: terminated`` and exit code 143 instead of dying mid-write."""


STOP_SIGNALS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}
# what the default disposition of each signal is; a signal the parent set to SIG_IGN stays ignored
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

received: int | None = None  # the stop signal this process got, if any
REDELIVER_AFTER_S = 0.05


def _raise_for_signal(signum: int, frame) -> None:
    global received
    received = signum
    raise STOP_SIGNALS[signal.Signals(signum)]()


def _redeliver_swallowed(unraisable, *, previous) -> None:
    """An interruption raised inside a finalizer is dropped by Python: send the signal again, a
    moment later from another thread, so the main thread raises it after the finalizer is done
    (sent from here, the handler would run inside this hook and be dropped again)."""
    if received is not None and isinstance(unraisable.exc_value, tuple(STOP_SIGNALS.values())):
        resend = threading.Timer(REDELIVER_AFTER_S, os.kill, (os.getpid(), received))
        resend.daemon = True
        resend.start()
        return
    previous(unraisable)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, and neither can be lost.
    A no-op outside the main thread (Python delivers signals to the main thread only)."""
    global received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = None
    installed = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is _DEFAULTS[signum]:
            installed[signum] = signal.signal(signum, _raise_for_signal)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _redeliver_swallowed(unraisable, previous=previous_hook)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in installed.items():
            signal.signal(signum, handler)
