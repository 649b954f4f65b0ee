"""Entry point of the ``fastdense`` console script.

Command modules import their heavy dependencies (torch, diffusers, deepspeed)
inside the command functions, so ``fastdense --help`` stays fast.
Known user errors (``ValueError`` and friends, click usage errors) become one
line on stderr and exit code 2; set ``FASTDENSE_DEBUG=1`` for the traceback. Ctrl-C ends a
command with ``error: interrupted`` and exit code 130, SIGTERM with ``error: terminated`` and 143
(``fastdense train`` first finishes its update and writes a checkpoint: fastdense.training.interrupt).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from fastdense.cli import bench as bench_cmds
from fastdense.cli import env as env_cmds
from fastdense.cli import profile as profile_cmds
from fastdense.cli import sample as sample_cmds
from fastdense.cli import toy as toy_cmds
from fastdense.cli import train as train_cmds

app = typer.Typer(
    name="fastdense",
    help="Dense-reward preference alignment for text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("env", help="Print versions, device and kernel dispatch, for bug reports.")(env_cmds.env)
app.add_typer(bench_cmds.app, name="bench", help="Benchmarks: kernels, sampler, training step.")
app.add_typer(profile_cmds.app, name="profile", help="torch.profiler traces of the hot paths.")
app.add_typer(toy_cmds.app, name="toy", help="The toy world: pretrain and evaluate the shipped tiny model.")
app.command("sample", help="Generate images (DDIM + CFG); PNGs, a grid, x̂0 trajectory pictures.")(sample_cmds.sample)
app.command("train", help="Dense-reward preference training on DeepSpeed (default: the toy job).")(train_cmds.train)

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _fail(message: str, code: int = 2) -> None:
    first_line = " ".join(str(message).strip().splitlines()) or "unknown error"
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


def _strip_launcher_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` that the ``deepspeed`` launcher puts right after the script
    (``deepspeed $(which fastdense) train ...`` runs ``fastdense --local_rank=N train ...``);
    the launcher also exports LOCAL_RANK, which is what the trainer reads."""
    flag, _, value = argv[0].partition("=") if argv else ("", "", "")
    if flag not in ("--local_rank", "--local-rank"):
        return argv
    rest = argv[1:]
    if not value and rest:
        value, rest = rest[0], rest[1:]
    if not value.isdigit():
        _fail(f"{flag}={value!r} is not allowed; it must be a rank number >= 0 (set by the deepspeed launcher)")
    os.environ.setdefault("LOCAL_RANK", value)
    return rest


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT): ``finally`` blocks run, and the
    command ends with ``error: terminated`` and exit code 143 instead of dying mid-write."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    debug = os.environ.get("FASTDENSE_DEBUG", "0") == "1"
    argv = _strip_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        _run(command, argv, debug)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run(command, argv: list[str], debug: bool) -> None:
    try:
        code = command.main(args=argv, prog_name="fastdense", standalone_mode=False)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:  # click < 8.2 / older typer: what Ctrl-C becomes
        _fail("interrupted", 130)
    except click_exceptions.NoArgsIsHelpError:
        sys.exit(0)  # typer has printed the help already
    except click_exceptions.ClickException as err:
        if debug:
            raise
        _fail(err.format_message(), err.exit_code if err.exit_code else 2)
    except USER_ERRORS as err:
        if debug:
            raise
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Terminated:
        _fail("terminated", 143)
    # Without standalone mode, typer returns the code of an Exit raised in a command instead of
    # exiting, and turns Ctrl-C (KeyboardInterrupt) into that code 130. Our commands return None.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130:
            _fail("interrupted", 130)
        sys.exit(code)


if __name__ == "__main__":
    main()
