"""The trainer: end to end on a tiny model, the one-UNet-call training step, cached reference
residuals, skipped non-finite updates, LoRA output loadable by diffusers, DeepSpeed config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastdense import checkpoint as ckpt
from fastdense.config import build_config
from fastdense.errors import FastdenseError
from fastdense.rewards import Brightness
from fastdense.testing import build_tiny_pipeline
from fastdense.train import LRFactor, Trainer, deepspeed_config, train


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tinyvae") / "model")


def small_config(model_dir, *extra):
    return build_config(overrides=[
        f"model.path={model_dir}", "model.lora_rank=4", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "sampling.num_steps=3", "sampling.guidance=2.0", "sampling.rollouts_per_prompt=3", "sampling.micro_batch=8",
        "objective.group_size=2", "objective.k=2", "objective.beta=10.0", "objective.clip=inf",
        "train.rounds=1", "train.updates_per_round=2", "train.prompts_per_round=2", "train.grad_accum=1",
        "train.groups_per_step=2", "optim.lr=0.01", "run.checkpoint_every=100",
        "data.prompts=[a red cat, the dog, a cat]", "data.eval_prompts=[a red cat]", "data.eval_seeds=[1,2]",
        *extra,
    ])


def _trainable(trainer):
    return [p.detach().clone() for p in trainer.trainable]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_two_rounds_reward_rises(grey_dir, tmp_path, monkeypatch):
    """Two rounds in one process: loss finite, held-out brightness rises by a clear margin.

    γ = 0.3 puts the weight on the first steps, where the grey level is decided (γ = 0.9 on this
    tiny chain learns nothing in two rounds: the dense-reward point, in miniature)."""
    monkeypatch.setenv("FASTDENSE_KERNEL_IMPL", "torch")  # the kernels are tested elsewhere; this is about learning
    seeds = ",".join(str(s) for s in range(100, 132))
    cfg = build_config(overrides=[
        f"model.path={grey_dir}", "model.lora_rank=4", "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out]",
        "sampling.num_steps=4", "sampling.guidance=2.0", "sampling.rollouts_per_prompt=16", "sampling.micro_batch=64",
        "objective.group_size=4", "objective.estimator=exact", "objective.gamma=0.3", "objective.beta=100.0",
        "objective.clip=inf", "train.rounds=2", "train.prompts_per_round=8", "train.updates_per_round=4",
        "train.groups_per_step=8", "train.grad_accum=2", "optim.lr=0.01", "optim.zero_stage=2",
        "run.checkpoint_every=4", "data.prompts=[a red cat, the dog, a cat on the red dog]",
        "data.eval_prompts=[a red cat, the dog]", f"data.eval_seeds=[{seeds}]",
    ])
    out = tmp_path / "run"
    result = train(cfg, out, reward=Brightness(), progress=False)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in steps)
    assert all(r["applied"] for r in steps) and steps[-1]["skipped_updates"] == 0
    for key in ("logits_mean", "logits_std", "clip_fraction", "grad_norm", "lr", "reward_mean", "reward_max",
                "samples_per_s"):
        assert steps[-1][key] is not None, key
    assert [r["round"] for r in records if r["event"] == "round"] == [0, 1]
    assert result.reward_after > result.reward_before + 0.04, (result.reward_before, result.reward_after)

    for name in ("lora/pytorch_lora_weights.safetensors", "reward_curve.png", "before_after.png", "summary.json",
                 "config.json", "eval_before.png", "eval_after.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_after"] == pytest.approx(result.reward_after)
    assert [s for s, _ in ckpt.find_checkpoints(out)] == [4, 8]


def test_training_step_one_unet_call_and_reference_cache(grey_dir, tmp_path):
    """Each micro-batch is ONE policy UNet call; π_init residuals are free in round 1 and are computed
    later in one batched no-grad pass per micro-batch, each at most once, with the adapters off."""
    from fastdense.kernels.log_ratio import squared_residual
    from fastdense.models.loading import adapters_disabled

    cfg = small_config(grey_dir, "train.grad_accum=2", "objective.k=3")
    trainer = Trainer(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    calls = []  # (batch rows, grad enabled) of every UNet forward

    def hook(module, args, output):
        calls.append((args[0].shape[0], torch.is_grad_enabled()))

    handle = trainer.unet.register_forward_hook(hook)
    try:
        trainer.collect(0)
        buf = trainer.buffer
        assert bool(buf.ref_valid[0].all()) and torch.equal(buf.ref_sq[0], buf.old_sq[0])  # free: π_init sampled
        calls.clear()
        record = trainer.update()
        assert record["applied"] and record["ref_items"] == 0
        n_items = trainer.cfg.train.groups_per_step * 2 * 3  # groups × G × K
        assert calls == [(2 * n_items, True), (2 * n_items, True)]  # one call per micro-batch: cat([x, x]) for CFG

        trainer.collect(1)  # sampled by the updated policy: no reference residuals yet
        new = [s for s in range(buf.capacity) if buf.slot_prompt[s] is not None and not bool(buf.ref_valid[s].any())]
        assert new
        computed = 0
        for _ in range(4):
            calls.clear()
            record = trainer.update()
            computed += record["ref_items"]
            policy = [c for c in calls if c[1]]
            reference = [c for c in calls if not c[1]]  # the batched no-grad π_init passes
            assert policy == [(2 * n_items, True)] * 2 and len(reference) <= 2
            assert sum(rows for rows, _ in reference) // 2 == record["ref_items"]
        assert computed == int(buf.ref_valid[new].sum()) > 0  # each computed once, then read from the cache
    finally:
        handle.remove()

    # the cached values are ‖x' − μ_init‖² of the stored transitions
    member, step = torch.nonzero(buf.ref_valid[new[0]])[:3].T
    slot = torch.full_like(member, new[0])
    items = buf.gather(slot, member, step)
    with torch.no_grad(), adapters_disabled(trainer.unet):
        eps_u, eps_c = trainer._unet_out(trainer.unet, items.x, step, items.prompt_embeds)
    a, b, _ = trainer.table.coefs_at(step, dtype=torch.float32)
    expect = squared_residual(eps_c, eps_u, items.x, items.x_next, a, b, guidance=2.0)
    torch.testing.assert_close(items.ref_sq, expect, rtol=1e-5, atol=1e-6)


def test_nonfinite_reward_or_loss_skips_the_update(grey_dir, tmp_path):
    cfg = small_config(grey_dir, "optim.zero_stage=2", "optim.weight_decay=0.01")
    trainer = Trainer(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    trainer.collect(0)
    buf = trainer.buffer
    before = _trainable(trainer)
    steps_before = int(trainer.engine.global_steps)
    lr_before = trainer.engine.get_lr()[0]

    rewards = buf.rewards.clone()
    buf.rewards[:] = float("nan")
    record = trainer.update()
    assert not record["applied"] and record["skipped_updates"] == 1 and record["loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, _trainable(trainer), strict=True))
    buf.rewards.copy_(rewards)

    latents = buf.latents.clone()
    buf.latents[:] = float("nan")  # every residual NaN: a NaN loss
    record = trainer.update()
    assert not record["applied"] and record["skipped_updates"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _trainable(trainer), strict=True))
    assert int(trainer.engine.global_steps) == steps_before and trainer.engine.get_lr()[0] == lr_before
    buf.latents.copy_(latents)

    record = trainer.update()
    assert record["applied"] and record["skipped_updates"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, _trainable(trainer), strict=True))


def test_groups_without_a_reward_gap_are_not_trained_on(grey_dir, tmp_path):
    from rich.console import Console

    cfg = small_config(grey_dir, "objective.min_reward_gap=0.5")
    console = Console(record=True, width=200)
    trainer = Trainer(cfg, tmp_path / "run", reward=Brightness(), progress=False, console=console)
    trainer.collect(0)
    buf = trainer.buffer
    before = _trainable(trainer)
    buf.rewards[:] = torch.tensor([0.2, 0.6])  # every stored group: a range of 0.4 < 0.5
    record = trainer.update()
    assert record["eligible_groups"] == 0 and not record["applied"] and record["loss"] is None
    assert record["skipped_updates"] == 1 and record["skipped_microbatches"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _trainable(trainer), strict=True))
    trainer.update()  # warned once, not on every skipped update
    assert console.export_text().count("(objective.min_reward_gap); lower it") == 1

    buf.rewards[0] = torch.tensor([0.0, 1.0])  # one group with a preference: only it is drawn
    mb = trainer.micro_batch()
    assert mb.usable and mb.eligible_groups == 1
    record = trainer.update()
    assert record["applied"] and record["eligible_groups"] == 1 and record["skipped_updates"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, _trainable(trainer), strict=True))


def test_lora_output_loads_into_stable_diffusion_pipeline(vae_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from fastdense.models.loading import load_pipeline_parts

    cfg = small_config(vae_dir, "train.updates_per_round=1", "optim.zero_stage=0",
                       "model.lora_targets=[to_q,to_k,to_v,to_out.0,conv_out,proj_in]")
    out = tmp_path / "run"
    result = train(cfg, out, reward=Brightness(), progress=False)
    assert result.output == out / "lora"

    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g)
    enc = torch.randn((2, 16, 32), generator=g)
    t = torch.tensor([500, 20])

    def run(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=enc, return_dict=False)[0]

    base = run(load_pipeline_parts(vae_dir).unet)
    ours = run(load_pipeline_parts(vae_dir, lora=out / "lora").unet)
    pipe = StableDiffusionPipeline.from_pretrained(str(vae_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out / "lora"))
    theirs = run(pipe.unet)
    assert (ours - base).abs().max() > 1e-6  # the adapter learned something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    # and it is the policy the run ended with: the final checkpoint holds the same adapter
    last = ckpt.latest_checkpoint(out)
    from safetensors.torch import load_file

    a = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(last / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_train_and_checkpoint(grey_dir, tmp_path, stage):
    cfg = small_config(grey_dir, f"optim.zero_stage={stage}", "run.checkpoint_every=1", "run.keep_last=1",
                       "optim.lr_schedule=cosine", "optim.lr_warmup_steps=1")
    result = train(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert all(r["applied"] and r["grad_norm"] is not None and r["grad_norm"] > 0 for r in steps)
    assert [r["lr"] for r in steps] == pytest.approx([0.01 * LRFactor("cosine", 1, 2)(s) for s in (1, 2)])
    assert [s for s, _ in ckpt.find_checkpoints(result.run_dir)] == [2]  # keep_last=1


def test_full_finetuning_keeps_a_frozen_reference(grey_dir, tmp_path):
    cfg = small_config(grey_dir, "model.lora_rank=0", "optim.lr=1e-4", "optim.zero_stage=0", "train.rounds=2",
                       "train.updates_per_round=1", "run.tensorboard=true")  # tensorboard: used only if installed
    out = tmp_path / "run"
    result = train(cfg, out, reward=Brightness(), progress=False)
    assert result.output == out / "unet" and (out / "unet" / "config.json").is_file()
    records = [json.loads(line) for line in result.metrics.read_text().splitlines() if '"train"' in line]
    assert records[-1]["ref_items"] > 0 and all(r["applied"] for r in records)


def test_warmup_uses_the_policy_log_likelihood_alone(grey_dir, tmp_path):
    cfg = small_config(grey_dir, "objective.warmup_steps=1", "objective.clip=1e-9")
    trainer = Trainer(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    trainer.collect(0)
    warm = trainer.micro_batch(warmup=True)
    assert warm.clip == math.inf and bool((warm.ratio < 0).all())  # ℓ = -‖x' − μ_θ‖²/(2σ²D)
    cold = trainer.micro_batch(warmup=False)
    assert cold.clip == 1e-9 and cold.logits.abs().max() <= 10.0 * 2 * 1e-9 * 1.0001


# ------------------------------------------------------------------------------------- pieces


def test_deepspeed_config_generation(tmp_path):
    cfg = build_config(overrides=["optim.zero_stage=3", "optim.precision=bf16", "train.grad_accum=4",
                                  "train.groups_per_step=2", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2, device="cpu")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert "stage3_prefetch_bucket_size" in ds["zero_optimization"]  # from the shipped ds_zero3.json
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["managed_gradient_accumulation"] is False
    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "steps_per_print": 7}))
    cfg.optim.deepspeed_config = str(extra)
    merged = deepspeed_config(cfg, world_size=1, device="cuda")
    assert merged["zero_optimization"]["reduce_bucket_size"] == 123 and merged["zero_optimization"]["stage"] == 3
    assert merged["steps_per_print"] == 7 and merged["zero_optimization"]["overlap_comm"] is True
    extra.write_text("{not json")
    with pytest.raises(FastdenseError, match="deepspeed_config"):
        deepspeed_config(cfg)


def test_lr_schedules():
    const = LRFactor("constant", 2, 10)
    assert [const(s) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    lin = LRFactor("linear", 0, 10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    cos = LRFactor("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)


def test_checkpoint_directories(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        tmp = ckpt.temp_checkpoint_dir(run, step)
        (tmp / "x").write_text(str(step))
        ckpt.publish_checkpoint(tmp, step)
    (run / "checkpoints" / "step-00000008").mkdir()  # no COMPLETE marker: incomplete, ignored
    assert [s for s, _ in ckpt.find_checkpoints(run)] == [2, 4, 6]
    assert ckpt.latest_checkpoint(run).name == "step-00000006"
    assert ckpt.resolve_resume("latest", run).name == "step-00000006"
    assert ckpt.resolve_resume(run, None).name == "step-00000006"
    protect = run / "checkpoints" / "step-00000002"
    ckpt.prune_checkpoints(run, 1, protect=protect)
    assert [s for s, _ in ckpt.find_checkpoints(run)] == [2, 6]
    with pytest.raises(FastdenseError, match="incomplete"):
        ckpt.validate_checkpoint(run / "checkpoints" / "step-00000008")
    with pytest.raises(FastdenseError, match="corrupt: state.json"):
        ckpt.validate_checkpoint(run / "checkpoints" / "step-00000006")
    with pytest.raises(FastdenseError, match="no complete checkpoint"):
        ckpt.resolve_resume("latest", tmp_path)
    with pytest.raises(FastdenseError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path / "nope", None)


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy.random as npr

    gens = {"a": torch.Generator().manual_seed(3)}
    ckpt.save_rng(tmp_path, 0, gens)
    expect = (torch.rand(3), npr.rand(2), random.random(), torch.rand(2, generator=gens["a"]))  # noqa: NPY002
    torch.manual_seed(99)
    npr.seed(5)  # noqa: NPY002
    random.seed(7)
    gens["a"].manual_seed(11)
    ckpt.restore_rng(tmp_path, 0, gens)
    got = (torch.rand(3), npr.rand(2), random.random(), torch.rand(2, generator=gens["a"]))  # noqa: NPY002
    assert torch.equal(expect[0], got[0]) and (expect[1] == got[1]).all() and expect[2] == got[2]
    assert torch.equal(expect[3], got[3])


def test_round_evaluations_and_paired_summary_leave_training_unchanged(grey_dir, tmp_path):
    """eval.every_rounds and eval.paired_seeds only add evaluations: the same updates bit for bit,
    held-out rewards per round in metrics.jsonl, the history and eval/round_K.png, and a paired
    before/after comparison whose numbers are those of the per-image rewards it stores."""
    import numpy as np

    from fastdense.stats import paired_difference, win_rate

    common = ("train.rounds=3", "train.updates_per_round=1", "data.eval_seeds=[5,3]")
    plain = train(small_config(grey_dir, *common), tmp_path / "plain", reward=Brightness(), progress=False)
    cfg = small_config(grey_dir, *common, "eval.every_rounds=1", "eval.paired_seeds=3")
    result = train(cfg, tmp_path / "evals", reward=Brightness(), progress=False)

    def records(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    def updates(run):
        return [{k: v for k, v in r.items() if k not in ("elapsed", "seconds", "samples_per_s")}
                for r in records(run) if r["event"] == "train"]

    assert updates(tmp_path / "evals") == updates(tmp_path / "plain")
    assert result.reward_before == plain.reward_before and result.reward_after == plain.reward_after
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / run / "lora/pytorch_lora_weights.safetensors") for run in ("plain", "evals")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    evals = [r for r in records(tmp_path / "evals") if r["event"] == "eval"]
    tags = [(r["tag"], r.get("round")) for r in evals]
    assert tags == [("before", None), ("round", 0), ("round", 1), ("after", None)]
    assert [r for r in records(tmp_path / "plain") if r["event"] == "eval" and r["tag"] == "round"] == []
    state = json.loads((ckpt.find_checkpoints(tmp_path / "evals")[-1][1] / "state.json").read_text())
    assert [h.get("heldout") for h in state["history"]] == [evals[1]["reward"], evals[2]["reward"], None]
    assert sorted(p.name for p in (tmp_path / "evals" / "eval").iterdir()) == ["round_1.png", "round_2.png"]
    assert not (tmp_path / "plain" / "eval").exists()

    # the paired set: eval seeds 5, 3 (reused) then 6, 7, 8 (the largest eval seed + 1, ...)
    before = json.loads((tmp_path / "evals" / "eval_before.json").read_text())
    after = json.loads((tmp_path / "evals" / "eval_after.json").read_text())
    assert before["paired_seeds"] == after["paired_seeds"] == [5, 3, 6, 7, 8]
    assert before["paired_rewards"][0][:2] == before["rewards"][0]
    b, a = np.array(before["paired_rewards"]).ravel(), np.array(after["paired_rewards"]).ravel()
    assert np.mean(a[:2]) == pytest.approx(result.reward_after)
    assert np.mean(b[:2]) == pytest.approx(result.reward_before)
    paired = result.paired
    assert paired["samples"] == 5 and paired["prompts"] == 1
    assert paired["difference"]["value"] == pytest.approx(float(np.mean(a - b)))
    assert paired["difference"] == paired_difference(a, b).to_dict()
    assert paired["win_rate"] == win_rate(a, b).to_dict()
    assert paired["difference"]["low"] <= paired["difference"]["value"] <= paired["difference"]["high"]
    summary = json.loads((tmp_path / "evals" / "summary.json").read_text())
    assert summary["paired"] == json.loads(json.dumps(paired))
    assert plain.paired is not None and plain.paired["samples"] == 2  # no extra seeds: the held-out set itself
