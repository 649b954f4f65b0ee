"""Two CPU ranks through the ``deepspeed`` launcher, ZeRO-2 and ZeRO-3 (and once through
``torchrun``): ``fastdense train`` runs on both (gloo, a free port, the shm op disabled so nothing
JIT-builds), each rank trains on its own buffer shard, and both ranks end with bitwise identical
LoRA weights, equal to the saved LoRA."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdense import checkpoint as ckpt

WORKER = Path(__file__).with_name("ds_rank_worker.py")
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE", "LOCAL_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, port: int) -> list[str]:
    """Two local ranks with this environment's ``deepspeed`` launcher (it passes ``--local_rank=N``)
    or ``torchrun`` (environment only)."""
    if launcher == "deepspeed":
        script = Path(sys.executable).parent / "deepspeed"
        cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        return [*cmd, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, stage", [("deepspeed", 2), ("deepspeed", 3), ("torchrun", 2)])
def test_two_ranks_train_to_identical_weights(grey_dir, tmp_path, launcher, stage):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    sets = [
        f"model.path={grey_dir}", "model.lora_rank=4", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "reward.name=brightness", f"optim.zero_stage={stage}", "optim.lr=0.01",
        "sampling.num_steps=3", "sampling.guidance=2.0", "sampling.rollouts_per_prompt=2", "sampling.micro_batch=4",
        "objective.group_size=2", "objective.k=2", "objective.beta=10.0", "objective.min_reward_gap=0",
        "train.rounds=2", "train.updates_per_round=2", "train.prompts_per_round=1", "train.groups_per_step=1",
        "train.grad_accum=1", "run.checkpoint_every=4",
        "data.prompts=[a red cat, the dog, a cat, red dog]", "data.eval_prompts=[a red cat]", "data.eval_seeds=[1,2]",
    ]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", FASTDENSE_TEST_DUMP=str(dump), FASTDENSE_KERNEL_IMPL="torch",
               OMP_NUM_THREADS="1")
    env.pop("FASTDENSE_DS_SHM", None)  # keep the shm op off: no 30 s C++ build
    cmd = [*_launch(launcher, _free_port()), str(WORKER), "train", *[a for s in sets for a in ("--set", s)],
           "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reward before → after on held-out seeds:" in proc.stdout  # rank 0's summary line

    ranks = [load_file(str(dump / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and any("lora" in k for k in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    lora_b = [t for k, t in ranks[0].items() if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # training moved the adapters off their zero init

    saved = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert len(saved) == len(ranks[0])
    flat = sorted(t.flatten().tolist() for t in ranks[0].values())
    assert sorted(t.flatten().tolist() for t in saved.values()) == flat  # rank 0 wrote exactly these weights

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and abs(r["loss"]) < float("inf") for r in train_records)
    last = ckpt.latest_checkpoint(out)
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    for rank in (0, 1):  # each rank saved its own buffer shard
        assert (ckpt.buffer_dir(last, rank) / "buffer.safetensors").is_file()
