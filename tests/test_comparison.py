"""fastdense.comparison / fastdense.pictures / fastdense.evaluate.generate: base vs LoRA on fixed
prompts × seeds, statistics that agree with the stored per-image scores, and labelled pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdense.comparison import (
    Contender,
    PromptGroups,
    compare,
    markdown,
    prompt_groups,
    resolve_contender,
    run_config,
    write_outputs,
)
from fastdense.errors import FastdenseError
from fastdense.evaluate import evaluate, generate
from fastdense.models.loading import has_adapters, load_pipeline_parts
from fastdense.rewards import AestheticProxy, Brightness
from fastdense.sampler import Sampler
from fastdense.stats import mean_ci, paired_difference, win_rate
from fastdense.testing import random_lora

KW = dict(num_steps=2, guidance=2.0, eta=1.0)


def make_run(run_dir, model_dir, *, prompts, eval_prompts, reward="brightness", steps=2, guidance=2.0):
    """A finished run's directory as the trainer leaves it: config.json and lora/."""
    from fastdense.config import Config, validate

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.data.prompts, cfg.data.eval_prompts = list(prompts), list(eval_prompts)
    cfg.reward.name = reward
    cfg.sampling.num_steps, cfg.sampling.guidance = steps, guidance
    validate(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(cfg.to_json())
    random_lora(model_dir, run_dir / "lora")
    return run_dir


@pytest.fixture(scope="module")
def lora_dir(pixel_dir, tmp_path_factory):
    return random_lora(pixel_dir, tmp_path_factory.mktemp("lora") / "lora")


GROUPS = PromptGroups({"seen": ["a cat", "the dog"], "unseen": ["a red cat", "a blue dog", "a bird"]},
                      {"seen": "test", "unseen": "test"})
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def comparison(pixel_dir, lora_dir):
    parts = load_pipeline_parts(pixel_dir)
    rewards = {"brightness": Brightness(), "aesthetic_proxy": AestheticProxy()}
    aligned = [Contender("one", lora_dir), Contender("again", lora_dir)]  # the same LoRA twice
    return compare(parts, aligned, GROUPS, SEEDS, rewards, micro_batch=4, grid_rows=4, trajectories=1,
                   trajectory_steps=[0, 1], resamples=500, **KW), parts


# --------------------------------------------------------------------------- generation


def test_generate_scores_equal_evaluate_bit_for_bit(pixel_dir):
    parts = load_pipeline_parts(pixel_dir)
    sampler = Sampler(parts, micro_batch=3, compile=False)
    prompts, seeds = ["a cat", "a dog"], [7, 9]
    ref = evaluate(sampler, parts, Brightness(), prompts, seeds, **KW)
    gen = generate(sampler, parts, {"b": Brightness(), "a": AestheticProxy()}, prompts, seeds, keep=[3, 0],
                   x0_steps=[0, 1], x0_keep=[1], **KW)
    assert torch.equal(gen.scores["b"], ref.scores) and gen.scores["b"].dtype == torch.float64
    assert torch.equal(gen.images, ref.images[[3, 0]])
    assert gen.x0_images.shape == (1, 2, 3, 4, 4)
    # the x̂0 of the last step is close to the image, the first step's is not the image
    assert not torch.equal(gen.x0_images[0, 0], ref.images[1])
    with pytest.raises(FastdenseError, match="keep has sample index 4"):
        generate(sampler, parts, {"b": Brightness()}, prompts, seeds, keep=[4], **KW)
    with pytest.raises(FastdenseError, match="at least one reward"):
        generate(sampler, parts, {}, prompts, seeds, **KW)


# --------------------------------------------------------------------------- comparison


def test_lora_changes_scores_and_is_removed_afterwards(comparison, pixel_dir):
    c, parts = comparison
    assert c.labels == ["base", "one", "again"]
    base, one, again = (c.scores[k]["brightness"] for k in c.labels)
    assert base.shape == (5, 3) and np.array_equal(one, again)  # loading, removing, loading again: the same
    assert not np.array_equal(base, one)
    assert not has_adapters(parts.unet) and not getattr(parts.unet, "peft_config", None)
    # the base column is the plain model's evaluation, so no adapter was left on while it sampled
    fresh = load_pipeline_parts(pixel_dir)
    ref = evaluate(Sampler(fresh, micro_batch=4), fresh, Brightness(), c.prompts, SEEDS, **KW)
    assert np.array_equal(base.reshape(-1), ref.scores.numpy())


def test_reported_statistics_come_from_the_stored_scores(comparison):
    c, _ = comparison
    kw = dict(resamples=500, seed=0)
    for group, rows in (("seen", [0, 1]), ("unseen", [2, 3, 4]), ("all", [0, 1, 2, 3, 4])):
        for reward in c.rewards:
            base = c.scores["base"][reward][rows].reshape(-1)
            mine = c.scores["one"][reward][rows].reshape(-1)
            st = c.stats[group][reward]["overall"]
            assert st["base"].mean == mean_ci(base, **kw) and st["base"].win_rate is None
            assert st["one"].mean.value == pytest.approx(float(np.mean(mine)), abs=1e-12)
            # the win rate, recomputed by hand from the per-image scores (ties half)
            by_hand = float(np.mean(np.where(mine > base, 1.0, np.where(mine == base, 0.5, 0.0))))
            assert st["one"].win_rate.value == pytest.approx(by_hand, abs=1e-12)
            assert st["one"].win_rate == win_rate(mine, base, **kw)
            assert st["one"].difference == paired_difference(mine, base, **kw)
            assert st["one"].difference.value == pytest.approx(float(np.mean(mine - base)), abs=1e-12)
            per_prompt = c.stats[group][reward]["per_prompt"]
            assert [p for p, _ in per_prompt] == [c.prompts[i] for i in rows]
            for i, (_, pst) in zip(rows, per_prompt, strict=True):
                a, b = c.scores["one"][reward][i], c.scores["base"][reward][i]
                assert pst["one"].win_rate == win_rate(a, b, **kw) and pst["one"].mean.n == len(SEEDS)


def test_json_schema_and_numbers(comparison, tmp_path):
    c, _ = comparison
    files = write_outputs(c, tmp_path)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["schema"] == "fastdense.eval/1" and record["files"] == files and files[-1] == "eval.json"
    assert set(record) >= {"model", "models", "rewards", "seeds", "prompts", "prompt_sources", "settings",
                           "scores", "results", "pictures", "files"}
    assert [m["label"] for m in record["models"]] == ["base", "one", "again"] and record["models"][0]["lora"] is None
    assert record["prompts"] == GROUPS.groups and record["seeds"] == SEEDS
    assert set(record["results"]) == {"seen", "unseen", "all"}
    assert record["settings"]["steps"] == 2 and record["settings"]["resamples"] == 500
    for group in ("seen", "unseen"):
        scores = np.array(record["scores"]["one"]["brightness"][group])
        base = np.array(record["scores"]["base"]["brightness"][group])
        assert scores.shape == (len(GROUPS.groups[group]), len(SEEDS))
        res = record["results"][group]["brightness"]["overall"]
        assert res["one"]["mean"]["value"] == pytest.approx(float(scores.mean()), abs=1e-12)
        by_hand = float(np.mean((scores > base) + 0.5 * (scores == base)))
        assert res["one"]["win_rate"]["value"] == pytest.approx(by_hand, abs=1e-12)
        assert set(res["one"]["win_rate"]) == {"value", "std", "low", "high", "n", "dropped", "level"}
        assert "win_rate" not in res["base"]
        assert [e["prompt"] for e in record["results"][group]["brightness"]["per_prompt"]] == GROUPS.groups[group]
    assert record["pictures"]["grids"] == {"seen": "grid_seen.png", "unseen": "grid_unseen.png"}
    assert [t["file"] for t in record["pictures"]["trajectories"]] == ["trajectory_seen_00.png",
                                                                       "trajectory_unseen_00.png"]
    assert all((tmp_path / f).is_file() for f in files)
    text = (tmp_path / "eval.md").read_text()
    st = c.stats["unseen"]["brightness"]["overall"]["one"]
    assert f"{st.win_rate.value:.3f} [{st.win_rate.low:.3f}, {st.win_rate.high:.3f}]" in text
    assert "## Per prompt: seen" in text and "| a blue dog |" in text and text == markdown(c) + "\n"


def test_samples_do_not_depend_on_the_batch(pixel_dir, lora_dir, comparison):
    """A pair's scores are the same bit for bit whatever else is evaluated with it (at the same
    micro-batch); another micro-batch changes only the float rounding of the UNet's batch."""
    c, _ = comparison
    parts = load_pipeline_parts(pixel_dir)
    rewards = {"brightness": Brightness(), "aesthetic_proxy": AestheticProxy()}
    groups = PromptGroups({"unseen": ["a blue dog", "a red cat"]}, {"unseen": "test"})
    seeds = [7, 5]
    sub = compare(parts, [Contender("one", lora_dir)], groups, seeds, rewards, micro_batch=4, grid_rows=0,
                  trajectories=0, resamples=10, **KW)
    rows, cols = [3, 2], [2, 0]  # "a blue dog", "a red cat" and seeds 7, 5 in the full comparison
    for label in ("base", "one"):
        for r in rewards:
            assert np.array_equal(sub.scores[label][r], c.scores[label][r][np.ix_(rows, cols)])
    for mb in (1, 5):
        other = compare(parts, [Contender("one", lora_dir)], groups, seeds, rewards, micro_batch=mb, grid_rows=0,
                        trajectories=0, resamples=10, **KW)
        for label in ("base", "one"):
            np.testing.assert_allclose(other.scores[label]["brightness"], sub.scores[label]["brightness"],
                                       rtol=0, atol=1e-5)


def test_duplicate_labels_and_a_loaded_lora_are_refused(pixel_dir, lora_dir):
    parts = load_pipeline_parts(pixel_dir)
    with pytest.raises(FastdenseError, match="'base' is used twice"):
        compare(parts, [Contender("base", lora_dir)], GROUPS, SEEDS, {"b": Brightness()}, **KW)
    with_lora = load_pipeline_parts(pixel_dir, lora=lora_dir)
    with pytest.raises(FastdenseError, match="without adapters"):
        compare(with_lora, [], GROUPS, SEEDS, {"b": Brightness()}, **KW)


# --------------------------------------------------------------------------- inputs


def test_resolve_contender(tmp_path, pixel_dir, lora_dir):
    run = make_run(tmp_path / "run-a", pixel_dir, prompts=["a cat"], eval_prompts=["a dog"])
    assert resolve_contender(run) == Contender("run-a", run / "lora", run)
    assert resolve_contender(run / "lora") == Contender("run-a", run / "lora", run)  # RUN/lora: the run's
    assert resolve_contender(lora_dir, "mine") == Contender("mine", lora_dir, None)
    assert run_config(resolve_contender(run)).reward.name == "brightness"
    assert run_config(Contender("x", lora_dir)) is None
    with pytest.raises(FastdenseError, match=r"--lora .*missing does not exist; allowed: a LoRA directory"):
        resolve_contender(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastdenseError, match="holds no LoRA weights"):
        resolve_contender(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    with pytest.raises(FastdenseError, match="run directory without lora/"):
        resolve_contender(unfinished)


def test_prompt_groups_sources(tmp_path, pixel_dir):
    seen, unseen = tmp_path / "seen.txt", tmp_path / "unseen.txt"
    seen.write_text("a cat\nthe dog\na cat\n")
    unseen.write_text("a bird\na fish\na cow\n")
    g = prompt_groups(seen_source=str(seen), unseen_source=str(unseen), limits={"seen": 5, "unseen": 2})
    assert g.groups == {"seen": ["a cat", "the dog"], "unseen": ["a bird", "a fish"]}
    assert g.sources == {"seen": str(seen), "unseen": str(unseen)}
    g = prompt_groups(seen_source=str(seen), unseen_source=str(unseen), limits={"seen": 0})
    assert g.groups == {"unseen": ["a bird", "a fish", "a cow"]} and list(g.sources) == ["unseen"]
    assert prompt_groups(unseen_source=str(unseen)).groups == {"unseen": ["a bird", "a fish", "a cow"]}

    # from runs: seen = their training prompts, unseen = their evaluation prompts none trained on
    run = run_config(resolve_contender(make_run(tmp_path / "run", pixel_dir, prompts=["a cat", "a dog"],
                                                eval_prompts=["a dog", "a bird"])))
    g = prompt_groups(runs=[run])
    assert g.groups == {"seen": ["a cat", "a dog"], "unseen": ["a bird"]}
    # an explicit unseen source wins, but may not hold a prompt the runs trained on
    with pytest.raises(FastdenseError, match="'a cat' is also a seen"):
        prompt_groups(unseen_source=str(seen), runs=[run], what={"unseen": "--prompts-file"})

    # the toy model's fastdense.json: its training captions are seen, its held-out prompts unseen
    from fastdense.toy import shipped_model_dir
    from fastdense.toy.world import HELDOUT_PROMPTS, train_prompts

    g = prompt_groups(model_path=shipped_model_dir(), limits={"seen": 16, "unseen": 16})
    assert g.groups == {"seen": train_prompts()[:16], "unseen": list(HELDOUT_PROMPTS)[:16]}
    with pytest.raises(FastdenseError, match="no prompts to evaluate: give --prompts-file"):
        prompt_groups(model_path=pixel_dir, what={"unseen": "--prompts-file", "seen": "--seen-prompts-file"})


# --------------------------------------------------------------------------- pictures


def test_trajectory_figure_is_labelled_and_scaled(tmp_path):
    from PIL import Image

    from fastdense.pictures import save_png, tile_pixels, trajectory_figure, trajectory_labels

    assert trajectory_labels([0, 5, 19]) == ["step 0", "step 5", "step 19", "final"]
    assert tile_pixels(16, 16) == 128 and tile_pixels(4, 4) == 128 and tile_pixels(512, 512) == 256
    tiles = [list(torch.rand(4, 3, 16, 16)), list(torch.rand(4, 3, 16, 16))]
    fig = trajectory_figure(tiles, [0, 5, 19], row_labels=["base", "aligned"], title="a red circle")
    texts = [t.get_text() for t in fig.texts]
    assert texts[0] == "a red circle" and texts[1:] == ["step 0", "step 5", "step 19", "final"]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["base", "aligned"]
    image = Image.open(save_png(fig, tmp_path / "t.png"))
    assert image.mode == "RGB" and image.width > 4 * 128 and image.height > 2 * 128
    with pytest.raises(FastdenseError, match="needs 4 pictures"):
        trajectory_figure([tiles[0][:3]], [0, 5, 19])
