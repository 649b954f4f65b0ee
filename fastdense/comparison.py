"""Base model against aligned models (LoRAs) on fixed prompts × fixed seeds: ``fastdense eval``.

Every model samples every (prompt, seed) pair of two prompt groups, as in the paper: ``seen``
(prompts the aligned runs trained on) and ``unseen`` (held out); ``all`` is both. Each model's
samples are drawn by one sampler call (:func:`fastdense.evaluate.generate`), every sample from its
own seeded generator, so a sample does not depend on which other pairs are evaluated with it
(bit for bit at a fixed micro-batch; another micro-batch changes the UNet's batch, hence the
float rounding). Each image is scored by every reward; per group, per reward and per model the
statistics are :mod:`fastdense.stats`' (bootstrap intervals over the (prompt, seed) pairs, seeded).

``eval.json`` (:meth:`Comparison.to_json`), schema ``fastdense.eval/1``::

    schema          "fastdense.eval/1"
    model           the base model (directory or hub id)
    models          [{"label", "lora", "run"}]: the base first (lora and run null), then each aligned
                    model (its LoRA directory, and the run directory it came from, or null)
    rewards         the reward specs, as given (fastdense.rewards.get_reward)
    seeds           the noise seeds; sample (prompt, seed) is the same noise for every model
    prompts         {group: [prompt, ...]} for "seen" and/or "unseen" (groups without prompts left out)
    prompt_sources  {group: where the prompts came from}
    settings        steps, guidance, eta, micro_batch, device, dtype, level, resamples, bootstrap_seed,
                    ties ({reward: the score difference counted as a tie in win rates, the reward's
                    tie_tolerance})
    scores          {label: {reward: {group: [[score per seed] per prompt]}}}: every image's reward
                    (null where not finite), prompts in the order of "prompts"
    results         {group: {reward: {"overall": {label: stats}, "per_prompt": [{"prompt", "models":
                    {label: stats}}]}}} for each group and "all" (seen then unseen), where stats is
                    {"mean": E, "win_rate": E, "difference": E} (win_rate and difference: aligned models
                    only, against the base, pair by pair, ties half) and E is an estimate
                    {"value", "std", "low", "high", "n", "dropped", "level"} (fastdense.stats.Estimate)
    pictures        {"grids": {group: file}, "trajectories": [{"file", "group", "prompt", "seed", "steps"}]}
    files           every file written, eval.json last

``eval.md`` has the same numbers as tables (overall, then per prompt, per group and reward).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fastdense.errors import FastdenseError
from fastdense.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Estimate,
    mean_ci,
    paired_difference,
    tie_tolerance,
    win_rate,
)

if TYPE_CHECKING:
    import torch

    from fastdense.config import Config
    from fastdense.models.loading import PipelineParts
    from fastdense.rewards.base import Reward

__all__ = [
    "GROUPS",
    "SCHEMA",
    "Comparison",
    "Contender",
    "PromptGroups",
    "ModelStats",
    "compare",
    "markdown",
    "previous_files",
    "prompt_groups",
    "resolve_contender",
    "run_config",
    "summarise",
    "write_outputs",
]

SCHEMA = "fastdense.eval/1"
GROUPS = ("seen", "unseen")
ALL = "all"
BASE = "base"
JSON_FILE, MARKDOWN_FILE = "eval.json", "eval.md"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Contender:
    """A column of the comparison: the base model (``lora`` None) or a LoRA on it, maybe from a run."""

    label: str
    lora: Path | None = None
    run_dir: Path | None = None


def _has_lora_weights(path: Path) -> bool:
    from fastdense.lora import LORA_WEIGHT_NAMES

    if path.is_file():
        return path.suffix == ".safetensors"
    return any((path / n).is_file() for n in LORA_WEIGHT_NAMES) or any(path.glob("*.safetensors"))


def resolve_contender(path: str | Path, label: str | None = None, what: str = "--lora") -> Contender:
    """A LoRA directory (or weight file), or a training run directory whose ``lora/`` is used; the
    label defaults to the run's (else the LoRA's) directory name. Checked without loading anything."""
    path = Path(path).expanduser()
    allowed = "allowed: a LoRA directory or a training run directory (with lora/ and config.json)"
    if not path.exists():
        raise FastdenseError(f"{what} {path} does not exist; {allowed}")
    run = None
    if path.is_dir() and (path / "lora").is_dir():
        run, lora = path, path / "lora"
    elif path.is_dir() and (path / "config.json").is_file() and not _has_lora_weights(path):
        raise FastdenseError(f"{what} {path} is a run directory without lora/ (unfinished, or it trained full "
                             f"weights); {allowed}")
    else:
        lora = path
        if path.name == "lora" and (path.parent / "config.json").is_file():
            run = path.parent
    if not _has_lora_weights(lora):
        raise FastdenseError(f"{what} {lora} holds no LoRA weights (*.safetensors); {allowed}")
    name = label if label is not None else (run.name if run is not None else (lora.stem if lora.is_file() else
                                                                                lora.name))
    if not name.strip():
        raise FastdenseError(f"{what} {path}: empty label; give --label NAME")
    return Contender(name, lora, run)


def run_config(contender: Contender) -> Config | None:
    """The saved config of the run a contender came from (None for a bare LoRA)."""
    from fastdense.config import build_config

    if contender.run_dir is None or not (contender.run_dir / "config.json").is_file():
        return None
    return build_config(config_file=contender.run_dir / "config.json")


@dataclass
class PromptGroups:
    """The prompts of each non-empty group (``seen`` / ``unseen``) and where they came from."""

    groups: dict[str, list[str]]
    sources: dict[str, str]


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(p for prompts in lists for p in prompts))


def prompt_groups(
    *,
    seen_source: str | None = None,
    unseen_source: str | None = None,
    runs: Sequence[Config] = (),
    model_path: str | Path | None = None,
    limits: Mapping[str, int | None] | None = None,
    what: Mapping[str, str] | None = None,
) -> PromptGroups:
    """Seen and unseen prompts. Each group from, in order: its prompt source (a file or a provider,
    :mod:`fastdense.data`); the runs' configs (seen: their training prompts, unseen: their evaluation
    prompts that none of them trained on); the model directory's defaults (``fastdense.json``).
    ``limits``: per group, the first that many prompts (None or missing: all; 0: leave the group out).
    ``what`` names the sources in
    errors (e.g. ``{"seen": "--seen-prompts-file", "unseen": "--prompts-file"}``)."""
    from fastdense.data import load_prompts, model_prompt_defaults, read_prompt_source, resolve_model_path

    what = {"seen": "seen prompt source", "unseen": "unseen prompt source", **(what or {})}
    loaded = [load_prompts(cfg, resolve_model_path(cfg.model.path)) for cfg in runs]
    trained = _union([train for train, _ in loaded])
    defaults = model_prompt_defaults(model_path) if model_path is not None else {}
    prompts: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    if seen_source is not None:
        prompts["seen"], sources["seen"] = read_prompt_source(seen_source, what["seen"]), str(seen_source)
    elif runs:
        prompts["seen"], sources["seen"] = trained, "the training prompts of the runs' configs"
    elif "train_prompts" in defaults:
        prompts["seen"] = read_prompt_source(defaults["train_prompts"], "the model's fastdense.json train_prompts")
        sources["seen"] = f"{defaults['train_prompts']} (the model's training prompts, fastdense.json)"
    seen_all = set(prompts.get("seen", ())) | set(trained)
    if unseen_source is not None:
        prompts["unseen"], sources["unseen"] = read_prompt_source(unseen_source, what["unseen"]), str(unseen_source)
        both = [p for p in prompts["unseen"] if p in seen_all]
        if both:
            raise FastdenseError(f"{what['unseen']} {unseen_source!r}: prompt {both[0]!r} is also a seen (training) "
                                 "prompt; allowed: prompts the aligned models did not train on")
    elif runs:
        held_out = [p for p in _union([ev for _, ev in loaded]) if p not in seen_all]
        if held_out:
            prompts["unseen"], sources["unseen"] = held_out, "the evaluation prompts of the runs' configs"
    elif "eval_prompts" in defaults:
        held_out = read_prompt_source(defaults["eval_prompts"], "the model's fastdense.json eval_prompts")
        prompts["unseen"] = [p for p in held_out if p not in seen_all]
        sources["unseen"] = f"{defaults['eval_prompts']} (the model's held-out prompts, fastdense.json)"
    limits = dict(limits or {})
    groups = {g: list(dict.fromkeys(prompts[g]))[: limits.get(g)] for g in GROUPS
              if prompts.get(g) and limits.get(g) != 0}
    if not groups and any(prompts.values()):
        raise FastdenseError(f"no prompts to evaluate: the limit of every group with prompts "
                             f"({', '.join(g for g in GROUPS if prompts.get(g))}) is 0; allowed: limits >= 1")
    if not groups:
        raise FastdenseError(f"no prompts to evaluate: give {what['unseen']} and/or {what['seen']}, or a run "
                             "directory whose config.json names its prompts")
    return PromptGroups(groups, {g: sources[g] for g in groups})


# --------------------------------------------------------------------------- the comparison


@dataclass
class ModelStats:
    """A model's statistics on a set of pairs: its mean; against the base, its win rate and the mean
    paired difference (None for the base itself)."""

    mean: Estimate
    win_rate: Estimate | None = None
    difference: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean.to_dict()}
        if self.win_rate is not None and self.difference is not None:
            out["win_rate"], out["difference"] = self.win_rate.to_dict(), self.difference.to_dict()
        return out


@dataclass
class Comparison:
    """Scores, statistics and the pictures' images of a comparison (see the module doc)."""

    model: str
    contenders: list[Contender]  # the base first
    groups: dict[str, list[str]]  # "seen" / "unseen" -> prompts
    sources: dict[str, str]
    seeds: list[int]
    rewards: list[str]
    scores: dict[str, dict[str, np.ndarray]]  # label -> reward -> [P, S] over all prompts (seen, then unseen)
    settings: dict[str, Any]
    stats: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # group -> reward -> ...
    images: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # label -> sample -> [3, H, W]
    x0: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # label -> sample -> [K, 3, H, W]
    x0_steps: tuple[int, ...] = ()
    shown: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # group -> (prompt, seed) indices
    trajectories: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        """Every prompt, in sample order: the seen ones, then the unseen ones."""
        return [p for g in GROUPS for p in self.groups.get(g, ())]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.contenders]

    def rows(self, group: str) -> list[int]:
        """Indices into :attr:`prompts` of a group's prompts (``all``: every prompt)."""
        start = 0
        for g in GROUPS:
            count = len(self.groups.get(g, ()))
            if g == group:
                return list(range(start, start + count))
            start += count
        if group == ALL:
            return list(range(start))
        raise FastdenseError(f"unknown prompt group {group!r}; allowed: {', '.join([*self.groups, ALL])}")

    def to_json(self) -> dict[str, Any]:
        """The eval.json record (schema in the module doc; non-finite numbers as null)."""
        from fastdense.training.tracking import json_value

        scores = {label: {r: {g: self.scores[label][r][self.rows(g)].tolist() for g in self.groups}
                          for r in self.rewards} for label in self.labels}
        results = {g: {r: {"overall": {k: s.to_dict() for k, s in block["overall"].items()},
                           "per_prompt": [{"prompt": p, "models": {k: s.to_dict() for k, s in stats.items()}}
                                          for p, stats in block["per_prompt"]]}
                       for r, block in per_reward.items()} for g, per_reward in self.stats.items()}
        record = {
            "schema": SCHEMA,
            "model": self.model,
            "models": [{"label": c.label, "lora": None if c.lora is None else str(c.lora),
                        "run": None if c.run_dir is None else str(c.run_dir)} for c in self.contenders],
            "rewards": list(self.rewards),
            "seeds": list(self.seeds),
            "prompts": {g: list(p) for g, p in self.groups.items()},
            "prompt_sources": dict(self.sources),
            "settings": dict(self.settings),
            "scores": scores,
            "results": results,
        }
        return json_value(record)


def _stats(scores: Mapping[str, np.ndarray], labels: Sequence[str], rows: Sequence[int], *, level: float,
           resamples: int, seed: int, tie: float = 0.0) -> dict[str, ModelStats]:
    """Per model, over the pairs of ``rows`` × every seed (base: ``labels[0]``); ``tie``: the
    reward's tie tolerance for the win rate."""
    kw = dict(level=level, resamples=resamples, seed=seed)
    base = scores[labels[0]][rows].reshape(-1)
    out = {labels[0]: ModelStats(mean_ci(base, **kw))}
    for label in labels[1:]:
        mine = scores[label][rows].reshape(-1)
        out[label] = ModelStats(mean_ci(mine, **kw), win_rate(mine, base, tie=tie, **kw),
                                paired_difference(mine, base, **kw))
    return out


def summarise(comparison: Comparison, *, level: float = DEFAULT_LEVEL, resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> None:
    """Fill ``comparison.stats``: per group (and ``all``), per reward, overall and per prompt."""
    prompts, labels = comparison.prompts, comparison.labels
    kw = dict(level=level, resamples=resamples, seed=seed)
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    for group in [*comparison.groups, ALL]:
        rows = comparison.rows(group)
        stats[group] = {}
        for reward in comparison.rewards:
            scores = {label: comparison.scores[label][reward] for label in labels}
            tie = float(comparison.settings.get("ties", {}).get(reward, 0.0))
            stats[group][reward] = {
                "overall": _stats(scores, labels, rows, tie=tie, **kw),
                "per_prompt": [(prompts[i], _stats(scores, labels, [i], tie=tie, **kw)) for i in rows],
            }
    comparison.stats = stats


def _ties(settings: Mapping[str, Any]) -> str:
    ties = settings.get("ties", {})
    return ", ".join(f"`{r}` {t:g}" for r, t in ties.items()) or "exact ties only"


def _shown_pairs(rows: Sequence[int], num_seeds: int, count: int) -> list[tuple[int, int]]:
    """The first ``count`` (prompt, seed) pairs, seed-major, so the rows shown cover many prompts."""
    pairs = [(p, s) for s in range(num_seeds) for p in rows]
    return pairs[:count]


@contextlib.contextmanager
def _adapter(unet, contender: Contender, name: str, family: str | None = None) -> Iterator[None]:
    """The contender's LoRA on the UNet while it samples (none for the base); afterwards every peft
    layer is unwrapped again (deleting the adapter would leave empty LoRA layers behind), so the
    UNet is the plain base model for the next contender and for the caller."""
    if contender.lora is None:
        yield
        return
    from fastdense.lora import load_lora

    try:
        load_lora(unet, contender.lora, adapter_name=name, family=family)
        yield
    finally:
        unet.unload_lora()


def _check_labels(contenders: Sequence[Contender]) -> None:
    labels = [c.label for c in contenders]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise FastdenseError(f"model label {duplicates[0]!r} is used twice; allowed: one label per model "
                             f"(the base is {labels[0]!r}; fastdense eval: --label NAME for each --lora)")


def compare(
    parts: PipelineParts,
    aligned: Sequence[Contender],
    groups: PromptGroups,
    seeds: Sequence[int],
    rewards: Mapping[str, Reward],
    *,
    num_steps: int,
    guidance: float,
    eta: float,
    sampler_kind: str | None = None,
    micro_batch: int = 8,
    compile: bool | None = None,
    decode_batch_size: int = 8,
    grid_rows: int = 8,
    trajectories: int = 2,
    trajectory_steps: Sequence[int] = (),
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    base_label: str = BASE,
    settings: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Comparison:
    """The base model (``parts``, no adapters) and each ``aligned`` LoRA on every (prompt, seed) pair.

    Per group, the first ``grid_rows`` pairs (seed-major) keep their images for the side-by-side
    grid, and the first ``trajectories`` of them their x̂0 at ``trajectory_steps`` (no steps: no
    trajectories). ``progress(n)``: called with sample counts, ``len(aligned) + 1`` × pairs × steps in all.
    """
    from fastdense.evaluate import generate
    from fastdense.sampler import Sampler

    contenders = [Contender(base_label), *aligned]
    _check_labels(contenders)
    if getattr(parts.unet, "peft_config", None):
        raise FastdenseError("compare() needs the base model without adapters; load it without a LoRA and give "
                             "the LoRAs as aligned models")
    seeds = [int(s) for s in seeds]
    comparison = Comparison(
        model=str(parts.model_path), contenders=contenders, groups=dict(groups.groups), sources=dict(groups.sources),
        seeds=seeds, rewards=list(rewards), scores={},
        settings={"steps": num_steps, "guidance": guidance, "eta": eta, "sampler": sampler_kind,
                  "micro_batch": micro_batch,
                  **(settings or {}), "level": level, "resamples": resamples, "bootstrap_seed": bootstrap_seed,
                  "ties": {name: tie_tolerance(reward) for name, reward in rewards.items()}},
        x0_steps=tuple(int(t) for t in trajectory_steps),
    )
    S = len(seeds)
    for group in comparison.groups:
        comparison.shown[group] = _shown_pairs(comparison.rows(group), S, grid_rows)
        comparison.trajectories[group] = (_shown_pairs(comparison.rows(group), S, trajectories)
                                          if comparison.x0_steps else [])
    keep = sorted({p * S + s for pairs in (*comparison.shown.values(), *comparison.trajectories.values())
                   for p, s in pairs})
    x0_keep = [p * S + s for pairs in comparison.trajectories.values() for p, s in pairs]
    sampler = Sampler(parts, micro_batch=micro_batch, compile=compile)
    comparison.settings["sampler"] = sampler.table(num_steps, eta, sampler_kind).sampler  # the kind actually used
    for k, contender in enumerate(contenders):
        with _adapter(parts.unet, contender, f"fastdense_eval_{k}", parts.family):
            gen = generate(sampler, parts, rewards, comparison.prompts, seeds, num_steps=num_steps,
                           guidance=guidance, eta=eta, sampler_kind=sampler_kind,
                           decode_batch_size=decode_batch_size, keep=keep, x0_steps=comparison.x0_steps,
                           x0_keep=x0_keep, progress=progress)
        comparison.scores[contender.label] = {r: s.numpy().reshape(-1, S) for r, s in gen.scores.items()}
        comparison.images[contender.label] = dict(zip(keep, gen.images, strict=True))
        if gen.x0_images is not None:
            comparison.x0[contender.label] = dict(zip(x0_keep, gen.x0_images, strict=True))
    summarise(comparison, level=level, resamples=resamples, seed=bootstrap_seed)
    return comparison


# --------------------------------------------------------------------------- outputs


def _fmt(e: Estimate, sign: bool = False) -> str:
    if e.n == 0:
        return "n/a"
    spec = "+.3f" if sign else ".3f"
    return f"{e.value:{spec}} [{e.low:{spec}}, {e.high:{spec}}]"


def _fmt_mean(e: Estimate) -> str:
    return "n/a" if e.n == 0 else f"{e.value:.3f} ± {e.std:.3f} [{e.low:.3f}, {e.high:.3f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def markdown(c: Comparison) -> str:
    """eval.md: the overall table per reward (groups × models), then per group and reward a table
    per prompt (each model's mean, each aligned model's win rate)."""
    s = c.settings
    level = round(100 * float(s["level"]))
    aligned = c.contenders[1:]
    lines = ["# fastdense eval", "",
             f"Base model `{c.model}`; aligned: "
             + (", ".join(f"`{a.label}` (LoRA `{a.lora}`)" for a in aligned) or "none") + ".",
             f"{str(s.get('sampler') or 'ddim').upper()} {s['steps']} steps, guidance {s['guidance']:g}, "
             f"eta {s['eta']:g}; seeds {c.seeds[0]}"
             + (f"–{c.seeds[-1]}" if len(c.seeds) > 1 else "") + f" ({len(c.seeds)} per prompt); "
             f"rewards: {', '.join(f'`{r}`' for r in c.rewards)}.", "",
             f"Mean ± std over the (prompt, seed) pairs [{level}% bootstrap CI]. Win rate: the fraction of pairs "
             f"(same prompt, same seed) where the aligned model scores above the base (ties count half; a tie: "
             f"scores within the reward's tie tolerance, {_ties(s)}) [{level}% CI]; Δ: the mean paired difference "
             f"aligned − base [{level}% CI].", ""]
    for g in c.groups:
        lines.append(f"- {g}: {len(c.groups[g])} prompts, from {c.sources[g]}")
    lines += ["", "## Overall", ""]
    for r in c.rewards:
        rows = []
        for g in (c.stats if len(c.groups) > 1 else c.groups):  # "all" = the one group
            for label, st in c.stats[g][r]["overall"].items():
                rows.append([g, label, str(st.mean.n), _fmt_mean(st.mean),
                             _fmt(st.win_rate) if st.win_rate else "", _fmt(st.difference, True) if st.difference
                             else ""])
        lines += [f"### {r}", "", *_table(["prompts", "model", "pairs", "mean ± std [CI]", "win rate vs base [CI]",
                                           "Δ vs base [CI]"], rows), ""]
    for g in c.groups:
        lines += [f"## Per prompt: {g}", ""]
        for r in c.rewards:
            header = ["prompt", *(f"{label} mean ± std [CI]" for label in c.labels),
                      *(f"{a.label} win rate [CI]" for a in aligned)]
            rows = [[p, *(_fmt_mean(st[label].mean) for label in c.labels),
                     *(_fmt(st[a.label].win_rate) for a in aligned)] for p, st in c.stats[g][r]["per_prompt"]]
            lines += [f"### {r}", "", *_table(header, rows), ""]
    return "\n".join(lines)


def _score_title(c: Comparison, label: str, p: int, s: int) -> str:
    values = [float(c.scores[label][r][p, s]) for r in c.rewards]
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return "\n".join(f"{r[:14]}: {v:.3f}" for r, v in zip(c.rewards, values, strict=True))


def _write_grid(c: Comparison, group: str, path: Path) -> None:
    from fastdense.pictures import grid_figure, save_png, wrap

    S, prompts = len(c.seeds), c.prompts
    pairs = c.shown[group]
    tiles = [[c.images[label][p * S + s] for label in c.labels] for p, s in pairs]
    titles = [[_score_title(c, label, p, s) for label in c.labels] for p, s in pairs]
    row_labels = [f"{wrap(prompts[p])}\nseed {c.seeds[s]}" for p, s in pairs]
    title = f"{group} prompts: reward per image"
    save_png(grid_figure(tiles, col_labels=c.labels, row_labels=row_labels, titles=titles, title=title), path)


def _write_trajectory(c: Comparison, group: str, pair: tuple[int, int], path: Path) -> None:
    from fastdense.pictures import save_png, trajectory_figure, wrap

    p, s = pair
    k = p * len(c.seeds) + s
    rows = [[*c.x0[label][k], c.images[label][k]] for label in c.labels]
    row_labels = [f"{label}\n{c.rewards[0][:14]}: {float(c.scores[label][c.rewards[0]][p, s]):.3f}"
                  for label in c.labels]
    title = f"{wrap(c.prompts[p], 60, 2)}\nseed {c.seeds[s]} ({group}): x̂0 at each step, then the image"
    save_png(trajectory_figure(rows, c.x0_steps, row_labels=row_labels, title=title), path)


def write_outputs(c: Comparison, out: str | Path) -> list[str]:
    """Write the pictures, eval.md and eval.json (last, listing every file) into ``out``; returns the
    file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    pictures: dict[str, Any] = {"grids": {}, "trajectories": []}
    for g in c.groups:
        if c.shown[g]:
            name = f"grid_{g}.png"
            _write_grid(c, g, out / name)
            pictures["grids"][g] = name
            files.append(name)
        for j, pair in enumerate(c.trajectories.get(g, ())):
            name = f"trajectory_{g}_{j:02d}.png"
            _write_trajectory(c, g, pair, out / name)
            pictures["trajectories"].append({"file": name, "group": g, "prompt": c.prompts[pair[0]],
                                             "seed": c.seeds[pair[1]], "steps": list(c.x0_steps)})
            files.append(name)
    (out / MARKDOWN_FILE).write_text(markdown(c) + "\n", encoding="utf-8")
    files += [MARKDOWN_FILE, JSON_FILE]
    record = {**c.to_json(), "pictures": pictures, "files": files}
    (out / JSON_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files


def previous_files(out: str | Path) -> list[Path]:
    """The files an earlier ``fastdense eval`` wrote into ``out`` (its eval.json lists them), for
    ``--overwrite`` to remove, so no stale picture survives a new evaluation."""
    path = Path(out) / JSON_FILE
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("files", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return [Path(out) / n for n in names if isinstance(n, str) and n == Path(n).name and (Path(out) / n).is_file()]
