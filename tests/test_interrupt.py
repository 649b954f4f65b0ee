"""Interrupting ``fastdense train`` with real signals sent to a real process.

SIGINT / SIGTERM: the update in progress finishes, a checkpoint is written, one line says how to
continue, and the process exits 130 / 143; resuming ends bitwise equal to an uninterrupted run.
A second signal exits at once. With several ranks, a signal on one rank stops all of them at the
same step with a complete checkpoint. Every other command: ``error: interrupted`` and 130.

The timing is made deterministic by a reward that pauses on a chosen call: call 1 scores the
held-out evaluation before training, call 2 round 0's rollouts, call 3 round 1's. The test sends
the signal during that pause, so the run always stops right after the first update of round 1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdense import checkpoint as ckpt

FASTDENSE = Path(sys.executable).parent / "fastdense"
TIMING = {"seconds", "samples_per_s", "elapsed"}
UPDATES_PER_ROUND = 2
PAUSE_CALL = 3  # round 1's rollouts: the run stops after update UPDATES_PER_ROUND + 1
STOP_STEP = UPDATES_PER_ROUND + 1
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE", "LOCAL_WORLD_SIZE")

REWARD_MODULE = textwrap.dedent(
    """
    import os, time
    from pathlib import Path

    from fastdense.rewards import BaseReward


    class PausingBrightness(BaseReward):
        '''Brightness; on call $FD_PAUSE_CALL (on rank $FD_PAUSE_RANK, default all) it writes its pid
        to $FD_MARKER_DIR/paused-<rank> and sleeps $FD_PAUSE_S seconds.'''

        name = "pausing_brightness"
        calls = 0

        def score_batch(self, images, prompts):
            PausingBrightness.calls += 1
            rank = os.environ.get("RANK", "0")
            marker_dir = os.environ.get("FD_MARKER_DIR")
            if (marker_dir and PausingBrightness.calls == int(os.environ["FD_PAUSE_CALL"])
                    and os.environ.get("FD_PAUSE_RANK", rank) == rank):
                Path(marker_dir, f"paused-{rank}").write_text(str(os.getpid()))
                time.sleep(float(os.environ["FD_PAUSE_S"]))
            return images.mean(dim=(1, 2, 3))
    """
)


def _sets(grey_dir) -> list[str]:
    sets = [
        f"model.path={grey_dir}", "model.lora_rank=4", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "reward.name=fd_pausing_reward:PausingBrightness", "optim.lr=0.01", "optim.lr_schedule=cosine",
        "sampling.num_steps=3", "sampling.guidance=2.0", "sampling.rollouts_per_prompt=2", "sampling.micro_batch=4",
        "objective.group_size=2", "objective.k=2", "objective.beta=10.0", "objective.min_reward_gap=0",
        "objective.reference=both", "train.rounds=3", f"train.updates_per_round={UPDATES_PER_ROUND}",
        "train.prompts_per_round=2", "train.groups_per_step=1", "train.grad_accum=2", "run.checkpoint_every=4",
        "run.keep_last=1", "data.prompts=[a red cat, the dog, a cat, red dog]", "data.eval_prompts=[a red cat]",
        "data.eval_seeds=[1,2]",
        # the toy preset's evaluations (after each round, the paired set) would call the reward
        # more often before round 1 and move the pause (PAUSE_CALL) into round 0
        "eval.every_rounds=0", "eval.paired_seeds=0",
    ]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward")
    (path / "fd_pausing_reward.py").write_text(REWARD_MODULE)
    return path


def _env(reward_dir, markers: Path | None = None, pause_s: float = 0.0, pause_rank: int | None = None):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("FD_")}
    env.update(PYTHONPATH=str(reward_dir), FASTDENSE_KERNEL_IMPL="torch", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    env.pop("FASTDENSE_DS_SHM", None)
    if markers is not None:
        markers.mkdir(exist_ok=True)
        env.update(FD_MARKER_DIR=str(markers), FD_PAUSE_CALL=str(PAUSE_CALL), FD_PAUSE_S=str(pause_s))
        if pause_rank is not None:
            env["FD_PAUSE_RANK"] = str(pause_rank)
    return env


def _default_stop_signals() -> None:
    """In the child: SIGINT and SIGTERM at their defaults. A shell without job control starts
    background jobs (``make test &``) with SIGINT ignored, and an ignored signal is inherited and
    stays ignored (nohup's convention, which the CLI keeps)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(cmd, env, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, env=env, stdout=open(logs / "stdout", "w"), stderr=open(logs / "stderr", "w"),
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_stop_signals)


@pytest.fixture
def default_stop_signals():
    """In this process, for one test: SIGINT and SIGTERM at Python's defaults (see above)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _finish(proc: subprocess.Popen, logs: Path, timeout: float = 300) -> tuple[int, str, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return code, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def _wait_for(path: Path, proc: subprocess.Popen, logs: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            stderr = (logs / "stderr").read_text()[-3000:]
            raise AssertionError(f"exited {proc.returncode} before {path.name}: {stderr}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"no {path.name} after {timeout} s")
        time.sleep(0.05)


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def full_run(grey_dir, reward_dir, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    root = tmp_path_factory.mktemp("full")
    out = root / "run"
    proc = _start([str(FASTDENSE), "train", *_sets(grey_dir), "--out", str(out), "--no-progress"],
                  _env(reward_dir), root / "logs")
    code, stdout, stderr = _finish(proc, root / "logs")
    assert code == 0, stderr[-3000:]
    assert "reward before → after on held-out seeds:" in stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_exits_and_resumes_bitwise(grey_dir, reward_dir, full_run, tmp_path, sig):
    out, markers = tmp_path / "run", tmp_path / "markers"
    proc = _start([str(FASTDENSE), "train", *_sets(grey_dir), "--out", str(out), "--no-progress"],
                  _env(reward_dir, markers, pause_s=2.0), tmp_path / "logs")
    _wait_for(markers / "paused-0", proc, tmp_path / "logs")
    proc.send_signal(sig)
    code, stdout, stderr = _finish(proc, tmp_path / "logs")

    assert code == 128 + sig, stderr[-3000:]
    assert f"{sig.name}: stopping after the current update and writing a checkpoint" in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line == f"interrupted at step {STOP_STEP}; continue with: fastdense train --resume latest --out {out}"
    assert "Traceback" not in stderr and "reward before → after" not in stdout
    # the update in progress finished, and its checkpoint is complete; no final outputs yet
    assert [r["step"] for r in _records(out) if r["event"] == "train"] == list(range(1, STOP_STEP + 1))
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == ckpt.checkpoint_name(STOP_STEP) and (latest / "COMPLETE").is_file()
    assert json.loads((latest / "state.json").read_text())["step"] == STOP_STEP
    assert not (out / "lora").exists() and not (out / "summary.json").exists()

    resumed = _start([str(FASTDENSE), "train", "--resume", "latest", "--out", str(out), "--no-progress"],
                     _env(reward_dir), tmp_path / "logs-resume")
    code, stdout, stderr = _finish(resumed, tmp_path / "logs-resume")
    assert code == 0, stderr[-3000:]
    assert "reward before → after on held-out seeds:" in stdout
    a, b = _lora(full_run), _lora(out)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert _records(out) == _records(full_run)  # same losses, rewards, grad norms; no step logged twice


@pytest.mark.slow
def test_second_signal_exits_at_once_without_a_checkpoint(grey_dir, reward_dir, tmp_path):
    out, markers = tmp_path / "run", tmp_path / "markers"
    proc = _start([str(FASTDENSE), "train", *_sets(grey_dir), "--out", str(out), "--no-progress"],
                  _env(reward_dir, markers, pause_s=120.0), tmp_path / "logs")
    _wait_for(markers / "paused-0", proc, tmp_path / "logs")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the grace window in which a launcher's forwarded copy counts as the same signal
    assert proc.poll() is None  # still in the paused reward: the first signal only asked for a stop
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = _finish(proc, tmp_path / "logs", timeout=60)
    assert time.monotonic() - sent < 30  # at once, not after the reward's 120 s pause
    assert code == 130, stderr[-3000:]
    assert "error: SIGINT again: stopped at once, without a checkpoint" in stderr
    assert "interrupted at step" not in stderr and "Traceback" not in stderr
    assert [s for s, _ in ckpt.find_checkpoints(out)] == []  # checkpoint_every=4: none reached; none half-written
    assert not any(p.name.startswith(".tmp") for p in (out / ckpt.CHECKPOINTS).glob("*")) \
        if (out / ckpt.CHECKPOINTS).exists() else True


@pytest.mark.slow
def test_a_forwarded_copy_of_the_signal_is_not_a_second_one(grey_dir, reward_dir, tmp_path):
    """The ``deepspeed`` launcher's ranks get the terminal's SIGINT and then the launcher's SIGTERM."""
    out, markers = tmp_path / "run", tmp_path / "markers"
    proc = _start([str(FASTDENSE), "train", *_sets(grey_dir), "--out", str(out), "--no-progress"],
                  _env(reward_dir, markers, pause_s=2.0), tmp_path / "logs")
    _wait_for(markers / "paused-0", proc, tmp_path / "logs")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = _finish(proc, tmp_path / "logs")
    assert code == 130, stderr[-3000:]  # the first signal's code
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted at step {STOP_STEP}; continue with:")
    assert (ckpt.latest_checkpoint(out) / "COMPLETE").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(grey_dir, reward_dir, tmp_path):
    """Two ranks under torchrun; only rank 1 gets SIGTERM (as when a node is preempted). Both stop
    after the same update, the checkpoint holds both ranks' shards, and the run resumes."""
    out, markers = tmp_path / "run", tmp_path / "markers"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    proc = _start([*launch, "--master-port", str(_free_port()), str(FASTDENSE), "train", *_sets(grey_dir),
                   "--out", str(out), "--no-progress"],
                  _env(reward_dir, markers, pause_s=2.0, pause_rank=1), tmp_path / "logs")
    _wait_for(markers / "paused-1", proc, tmp_path / "logs")
    os.kill(int((markers / "paused-1").read_text()), signal.SIGTERM)  # rank 1 only
    code, stdout, stderr = _finish(proc, tmp_path / "logs")
    # torchrun reports rank 1's exit code 143 (and then stops rank 0, which may be past its own exit)
    assert code != 0 and "exitcode  : 143" in stderr, stderr[-3000:]
    latest = ckpt.latest_checkpoint(out)
    assert latest.name == ckpt.checkpoint_name(STOP_STEP) and (latest / "COMPLETE").is_file()
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == STOP_STEP and state["world_size"] == 2
    for rank in (0, 1):
        assert (ckpt.buffer_dir(latest, rank) / "buffer.safetensors").is_file()
    assert [r["step"] for r in _records(out) if r["event"] == "train"] == list(range(1, STOP_STEP + 1))

    resumed = _start([*launch, "--master-port", str(_free_port()), str(FASTDENSE), "train", "--resume", "latest",
                      "--out", str(out), "--no-progress"], _env(reward_dir), tmp_path / "logs-resume")
    code, stdout, stderr = _finish(resumed, tmp_path / "logs-resume")
    assert code == 0, stderr[-3000:]
    assert "reward before → after on held-out seeds:" in stdout
    assert [r["step"] for r in _records(out) if r["event"] == "train"] == list(range(1, 3 * UPDATES_PER_ROUND + 1))


# Delays after libtorch is mapped: the first ones land in model loading (inside transformers'
# lazy imports, which wrap the KeyboardInterrupt, and inside finalizers, which drop it: both were
# seen to lose the signal), the last in sampling.
SIGNAL_DELAYS_S = (0.0, 0.3, 1.0, 2.0, 4.0)


@pytest.mark.parametrize("sig, code, message", [(signal.SIGINT, 130, "error: interrupted"),
                                                 (signal.SIGTERM, 143, "error: terminated")])
def test_other_commands_exit_130_on_ctrl_c(tiny_dir, tmp_path, sig, code, message):
    for delay in SIGNAL_DELAYS_S:
        logs = tmp_path / f"logs-{delay}"
        env = _env(tmp_path)
        proc = _start([str(FASTDENSE), "sample", "a cat", "--model", str(tiny_dir), "--num-images", "4096",
                       "--steps", "50", "--device", "cpu", "--out", str(tmp_path / f"samples-{delay}")], env, logs)
        # the CLI imports torch inside the command only: once libtorch is mapped, the command is running
        deadline = time.monotonic() + 120
        while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (logs / "stderr").read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(delay)
        assert proc.poll() is None
        proc.send_signal(sig)
        got, _, stderr = _finish(proc, logs, timeout=120)
        assert got == code, f"signal {delay} s after torch loaded: {stderr[-3000:]}"
        assert stderr.strip().splitlines()[-1] == message, delay
        assert "Traceback" not in stderr, delay


def _in_a_finalizer_send(sig):
    class Dropped:
        def __del__(self):
            os.kill(os.getpid(), sig)
            for _ in range(10_000):  # the Python handler runs in here: Python drops what it raises
                pass

    Dropped()


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, None)])
def test_a_signal_raised_inside_a_finalizer_is_delivered_again(sig, expected, default_stop_signals):
    from fastdense.cli._signals import Terminated, stop_signals_raise

    expected = expected or Terminated
    with pytest.raises(expected), stop_signals_raise():
        _in_a_finalizer_send(sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_error_that_follows_a_signal_is_reported_as_the_interruption(monkeypatch, capsys, default_stop_signals):
    """transformers' lazy import catches the KeyboardInterrupt and raises an import error."""
    from fastdense.cli import main as cli_main

    def wrapped_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException as err:
            raise RuntimeError("Could not import module 'CLIPTextModel'") from err

    monkeypatch.setattr("fastdense.env.collect_env", wrapped_interrupt)
    with pytest.raises(SystemExit) as exit_:
        cli_main.main(["env"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"


def test_a_stop_requested_by_code_checkpoints_and_raises(grey_dir, tmp_path):
    """The library path: ``Trainer.stop`` is what the signals set; a callback can set it too."""
    from fastdense.config import build_config
    from fastdense.rewards import Brightness
    from fastdense.train import train
    from fastdense.training.interrupt import TrainingInterrupted

    cfg = build_config(overrides=[
        f"model.path={grey_dir}", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "sampling.num_steps=2", "sampling.rollouts_per_prompt=2", "objective.group_size=2", "objective.k=1",
        "train.rounds=1", "train.updates_per_round=4", "train.grad_accum=1", "train.groups_per_step=1",
        "run.checkpoint_every=10", "data.prompts=[a cat]", "data.eval_seeds=[1]",
    ])

    def stop_at_two(trainer, record):
        if record["step"] == 2:
            trainer.stop.request(signal.SIGTERM)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, out, reward=Brightness(), progress=False, callbacks=[stop_at_two])
    stopped = info.value
    assert (stopped.step, stopped.signum, stopped.exit_code) == (2, signal.SIGTERM, 143)
    assert stopped.checkpoint == ckpt.latest_checkpoint(out) and stopped.checkpoint.name == ckpt.checkpoint_name(2)
    assert not (out / "lora").exists()


def test_a_signal_the_parent_ignores_stays_ignored(default_stop_signals):
    """nohup / a background job of a shell without job control: an ignored SIGINT is left ignored."""
    from fastdense.cli._signals import stop_signals_raise

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_signals_raise():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM: ours
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
