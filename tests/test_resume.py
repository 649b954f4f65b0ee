"""Checkpoint / resume: a run killed with SIGKILL between checkpoints and resumed ends bitwise equal
to an uninterrupted run; broken checkpoints are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdense import checkpoint as ckpt
from fastdense.config import build_config
from fastdense.errors import FastdenseError

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch

    torch.set_num_threads(1)
    from fastdense.config import build_config
    from fastdense.rewards import Brightness
    from fastdense.train import train

    mode, out, model, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = build_config(overrides=[
        f"model.path={model}", "model.lora_rank=4", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "sampling.num_steps=4", "sampling.guidance=2.0", "sampling.rollouts_per_prompt=3", "sampling.micro_batch=8",
        "objective.group_size=2", "objective.k=2", "objective.beta=10.0", "objective.clip=0.05",
        "objective.reference=both", "train.rounds=2", "train.updates_per_round=3", "train.prompts_per_round=2",
        "train.groups_per_step=2", "train.grad_accum=2", "optim.lr=0.01", "optim.zero_stage=2",
        "optim.lr_schedule=cosine", "optim.lr_warmup_steps=1", "run.checkpoint_every=2", "run.keep_last=1",
        "data.prompts=[a red cat, the dog, a cat, red dog]", "data.eval_prompts=[a red cat]", "data.eval_seeds=[1,2]",
        "eval.every_rounds=1", "eval.paired_seeds=2",  # killed right after round 0's held-out evaluation
    ])


    def killer(trainer, record):
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


    train(cfg, out, reward=Brightness(), progress=False, callbacks=[killer],
          resume="latest" if mode == "resume" else None)
    """
)

TIMING = {"seconds", "samples_per_s", "elapsed"}


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["FASTDENSE_KERNEL_IMPL"] = "torch"  # the same kernels in every run; the fast ones
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(script, mode, out, model, kill_at=-1):
    return subprocess.Popen([sys.executable, str(script), mode, str(out), str(model), str(kill_at)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMING})
    return out


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_is_bitwise_identical(grey_dir, tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    full, cut = tmp_path / "full", tmp_path / "cut"
    procs = [_start(script, "fresh", full, grey_dir), _start(script, "fresh", cut, grey_dir, kill_at=3)]
    results = [p.communicate(timeout=240) + (p.returncode,) for p in procs]
    assert results[0][2] == 0, results[0][1][-3000:]
    assert results[1][2] == -signal.SIGKILL, results[1][1][-3000:]

    # killed after step 3: the checkpoint of step 2 is there, nothing of step 4, no final outputs
    assert [s for s, _ in ckpt.find_checkpoints(cut)] == [2]
    assert not (cut / "lora").exists()
    assert any(r.get("step") == 3 and r["event"] == "train" for r in _records(cut))

    resumed = _start(script, "resume", cut, grey_dir)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]

    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(cut / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    # the whole history too: same losses, logits, grad norms, rewards, held-out evaluations; step 3
    # and round 0's evaluation logged once
    assert _records(full) == _records(cut)
    assert [r["round"] for r in _records(cut) if r["event"] == "eval" and r["tag"] == "round"] == [0]
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, cut)]
    assert summaries[0]["paired"] == summaries[1]["paired"] and summaries[0]["paired"]["samples"] == 4
    assert (cut / "eval" / "round_1.png").is_file()
    # keep_last=1, but the checkpoint resumed from is never deleted
    assert [s for s, _ in ckpt.find_checkpoints(full)] == [6]
    assert [s for s, _ in ckpt.find_checkpoints(cut)] == [2, 6]
    fb = load_file(str(ckpt.buffer_dir(full / "checkpoints" / "step-00000006", 0) / "buffer.safetensors"))
    cb = load_file(str(ckpt.buffer_dir(cut / "checkpoints" / "step-00000006", 0) / "buffer.safetensors"))
    assert fb.keys() == cb.keys()
    assert all(torch.equal(fb[k].view(torch.uint8), cb[k].view(torch.uint8)) for k in fb)  # bitwise, NaN too


def _small_run(grey_dir, out):
    from fastdense.rewards import Brightness
    from fastdense.train import train

    cfg = build_config(overrides=[
        f"model.path={grey_dir}", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "sampling.num_steps=2", "sampling.rollouts_per_prompt=2", "objective.group_size=2", "objective.k=1",
        "train.rounds=1", "train.updates_per_round=2", "train.grad_accum=1", "train.groups_per_step=1",
        "run.checkpoint_every=1", "run.keep_last=2", "data.prompts=[a cat]", "data.eval_seeds=[1]",
    ])
    train(cfg, out, reward=Brightness(), progress=False)
    return cfg, Brightness


@pytest.mark.parametrize(
    "damage, message",
    [
        ("state", "state.json cannot be read"),
        ("complete", "incomplete"),
        ("engine", "engine"),
        ("buffer", "buffer"),
        ("rng", "rng"),
    ],
)
def test_broken_checkpoints_are_one_line_errors(grey_dir, tmp_path, damage, message):
    from fastdense.train import train

    out = tmp_path / "run"
    cfg, reward = _small_run(grey_dir, out)
    last = ckpt.latest_checkpoint(out)
    if damage == "state":
        (last / "state.json").write_text("{truncated")
    elif damage == "complete":
        (last / "COMPLETE").unlink()
    elif damage == "engine":
        target = next((last / "engine").rglob("*model_states.pt"))
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "buffer":
        target = ckpt.buffer_dir(last, 0) / "buffer.safetensors"
        target.write_bytes(b"garbage")
    else:
        (last / "rng" / "rank-00000.json").write_text("[")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FastdenseError, match=message) as info:
        train(cfg, out, resume=last if damage == "complete" else "latest", reward=reward(), progress=False)
    assert "\n" not in str(info.value)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing touched
