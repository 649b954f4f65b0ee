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

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from fastdense.cli import _signals
from fastdense.cli import bench as bench_cmds
from fastdense.cli import env as env_cmds
from fastdense.cli import eval as eval_cmds
from fastdense.cli import experiment as experiment_cmds
from fastdense.cli import profile as profile_cmds
from fastdense.cli import sample as sample_cmds
from fastdense.cli import toy as toy_cmds
from fastdense.cli import train as train_cmds
from fastdense.cli._signals import Terminated, stop_signals_raise  # noqa: F401 (Terminated: public name)

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
app.add_typer(experiment_cmds.app, name="experiment", help="Experiments: dense reward vs trajectory-level.")
app.add_typer(toy_cmds.app, name="toy", help="The toy world: pretrain and evaluate the shipped tiny model.")
app.command("sample", help="Generate images (DDIM + CFG); PNGs, a grid, x̂0 trajectory pictures.")(sample_cmds.sample)
app.command("eval", help="Base vs aligned LoRAs on seen/unseen prompts: rewards, win rates, CIs, pictures.")(
    eval_cmds.eval
)
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


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(app)
    debug = os.environ.get("FASTDENSE_DEBUG", "0") == "1"
    argv = _strip_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    with stop_signals_raise():
        _run(command, argv, debug)


def _fail_for_signal() -> None:
    """After a stop signal, whatever surfaced (a library may have wrapped the KeyboardInterrupt)
    is reported as the interruption."""
    if _signals.received == signal.SIGTERM:
        _fail("terminated", 143)
    _fail("interrupted", 130)


def _run(command, argv: list[str], debug: bool) -> None:
    try:
        code = command.main(args=argv, prog_name="fastdense", standalone_mode=False)
    except (KeyboardInterrupt, Terminated, typer.Abort):  # typer.Abort: Ctrl-C in click < 8.2
        _fail_for_signal()
    except Exception as err:
        if _signals.received is not None and not debug:
            _fail_for_signal()
        _fail_for_error(err, debug)
    if _signals.received is not None:
        _fail_for_signal()
    # Without standalone mode, typer returns the code of an Exit raised in a command instead of
    # exiting, and turns Ctrl-C (KeyboardInterrupt) into that code 130. Our commands return None.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130:
            _fail("interrupted", 130)
        sys.exit(code)


def _fail_for_error(err: Exception, debug: bool) -> None:
    if isinstance(err, typer.Exit):
        sys.exit(err.exit_code)
    if isinstance(err, click_exceptions.NoArgsIsHelpError):
        sys.exit(0)  # typer has printed the help already
    if debug or not isinstance(err, (click_exceptions.ClickException, *USER_ERRORS)):
        raise err
    if isinstance(err, click_exceptions.ClickException):
        _fail(err.format_message(), err.exit_code if err.exit_code else 2)
    _fail(str(err))


if __name__ == "__main__":
    main()
