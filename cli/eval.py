"""``fastdense eval``: the base model against aligned LoRAs on seen and unseen prompts × fixed seeds.

Writes ``eval.json`` (every image's reward and the statistics; schema in
:mod:`fastdense.comparison`), ``eval.md`` (the tables), ``grid_<group>.png`` (a row per (prompt,
seed), a column per model) and ``trajectory_<group>_NN.png`` (x̂0 at chosen steps, a row per model)
into ``--out``. The work is :func:`fastdense.comparison.compare`; this module resolves defaults:
the model, prompts, rewards and sampling settings of the runs given (their config.json), else of
the toy model (the shipped one without ``--model``), else the config defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fastdense.cli._options import check_out_dir, device_option, dtype_option, library_warnings, out_option
from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    import torch

    from fastdense.comparison import Comparison, Contender, PromptGroups
    from fastdense.config import Config
    from fastdense.rewards import Reward

MAX_PROMPTS = 16
GRID_ROWS = 8


def check_counts(**counts: tuple[int, int]) -> None:
    """Each ``--option value`` (name: (value, minimum)) must be at least its minimum."""
    for name, (value, minimum) in counts.items():
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise FastdenseError(f"{flag} {value} is not allowed; allowed: an integer >= {minimum}")


def check_out(out: Path, overwrite: bool) -> None:
    """``--out``: a new or empty directory, or any directory with ``--overwrite``."""
    check_out_dir(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FastdenseError(f"--out {out} is not empty; allowed: a new or empty directory, or --overwrite")


def contenders(loras: list[Path], labels: list[str]) -> list[Contender]:
    """The aligned models of ``--lora`` (named by ``--label``, in order, when given)."""
    from fastdense.comparison import resolve_contender

    if labels and len(labels) != len(loras):
        raise FastdenseError(f"--label given {len(labels)} times for {len(loras)} --lora; allowed: none, or one "
                             "per --lora")
    return [resolve_contender(path, labels[k] if labels else None) for k, path in enumerate(loras)]


def default_model(model: str | None, runs: list[Config]) -> str:
    """``--model``; else the model the runs trained (when they agree); else the shipped toy model."""
    from fastdense.data import resolve_model_path

    if model is not None:
        return model
    trained = list(dict.fromkeys(str(resolve_model_path(cfg.model.path)) for cfg in runs))
    if len(trained) > 1:
        raise FastdenseError(f"the runs trained different models ({', '.join(trained)}); give --model")
    if trained:
        return trained[0]
    from fastdense.toy import shipped_model_dir

    return str(shipped_model_dir())


def sampling_defaults(model: str, runs: list[Config]) -> tuple[int, float, float, int, str | None]:
    """(steps, guidance, eta, micro-batch, sampler): the first run's sampling settings (its micro-batch
    too, so the numbers match its own evaluation bit for bit); else the toy model's (the SD toy's DDIM
    or the flow toy's SDE defaults, and the toy preset's micro-batch: a tiny model call costs little
    more for 128 images than for 8); else 50, 7.5, 1, 8 and the scheduler's own sampler."""
    from fastdense.config import build_config
    from fastdense.toy import is_toy_model
    from fastdense.toy import sampling_defaults as toy_sampling

    if runs:
        s = runs[0].sampling
        return s.num_steps, s.guidance, s.eta, s.micro_batch, s.sampler
    if is_toy_model(model):
        d = toy_sampling(model)
        return d.steps, d.guidance, d.eta, build_config("toy").sampling.micro_batch, d.sampler
    return 50, 7.5, 1.0, 8, None


def default_rewards(model: str, runs: list[Config]) -> list[str]:
    """The rewards the runs trained with; else the toy world's colour fidelity for a toy model; else
    the config default (``reward.name``)."""
    from fastdense.config import RewardConfig
    from fastdense.toy import is_toy_model

    if runs:
        return list(dict.fromkeys(cfg.reward.name for cfg in runs))
    return ["color_fidelity"] if is_toy_model(model) else [RewardConfig().name]


def build_rewards(specs: list[str], device: torch.device) -> dict[str, Reward]:
    """Each ``--reward`` (a name, an import path or a weighted sum: fastdense.rewards.get_reward)."""
    from fastdense.rewards import get_reward, reward_accepts

    if len(set(specs)) != len(specs):
        raise FastdenseError(f"--reward given twice: {specs}; allowed: each reward once")
    rewards = {}
    for spec in specs:
        kwargs = {"device": device} if reward_accepts(spec, "device") else {}
        rewards[spec] = get_reward(spec, **kwargs)
    return rewards


def summary_lines(comparison: Comparison) -> list[str]:
    """One line per group (``all`` too when there are two), reward and model: mean [CI], and the
    aligned models' win rate [CI] and paired difference [CI]."""
    lines = []
    for group, per_reward in comparison.stats.items():
        if group not in comparison.groups and len(comparison.groups) == 1:
            continue  # "all" is the one group
        for reward, block in per_reward.items():
            for label, st in block["overall"].items():
                text = f"{group:>6} {reward} {label}: mean {st.mean:.3f}"
                if st.win_rate is not None:
                    text += f", win rate {st.win_rate:.3f}, Δ {st.difference:+.3f}"
                lines.append(text)
    return lines


def eval(
    lora: Annotated[
        list[Path] | None,
        typer.Option("--lora", help="An aligned model: a LoRA directory, or a run directory (its lora/). Repeatable."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Column name of each --lora, in order (default: its dir name).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="The base model (default: the runs' model, else the shipped toy model)."),
    ] = None,
    prompts_file: Annotated[
        str | None, typer.Option("--prompts-file", help="Unseen prompts: a file (text or JSON) or module:attr.")
    ] = None,
    seen_prompts_file: Annotated[
        str | None, typer.Option("--seen-prompts-file", help="Seen (training) prompts: a file or module:attr.")
    ] = None,
    max_seen: Annotated[
        int, typer.Option("--max-seen", help="At most this many seen prompts (the first; 0: no seen group).")
    ] = MAX_PROMPTS,
    max_unseen: Annotated[
        int, typer.Option("--max-unseen", help="At most this many unseen prompts (the first; 0: no unseen group).")
    ] = MAX_PROMPTS,
    seeds: Annotated[int, typer.Option("--seeds", help="Noise seeds per prompt: first-seed, first-seed + 1, ...")] = 8,
    first_seed: Annotated[int, typer.Option("--first-seed", help="The first noise seed.")] = 1000,
    reward: Annotated[
        list[str] | None,
        typer.Option("--reward", help="A reward name, import path or weighted sum (repeatable; default: the "
                     "runs' reward, else the toy colour fidelity or reward.name's default)."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="DDIM steps (default: the run's or model's).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="CFG scale (default: the run's or model's).")
    ] = None,
    eta: Annotated[
        float | None, typer.Option("--eta", help="DDIM eta or flow noise level (default: the run's or model's).")
    ] = None,
    sampler_kind: Annotated[
        str | None, typer.Option("--sampler", help="ddim, ode, sde or cps (default: the run's, else the scheduler's).")
    ] = None,
    device: Annotated[str, device_option()] = "auto",
    dtype: Annotated[str, dtype_option("Model dtype: fp32, bf16 or fp16.")] = "fp32",
    micro_batch: Annotated[
        int | None,
        typer.Option("--micro-batch", help="Images per UNet call (default: the run's; toy model 128; else 8)."),
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the UNet (default: on CUDA only).")
    ] = None,
    grid_rows: Annotated[
        int, typer.Option("--grid-rows", help="(prompt, seed) rows in each group's side-by-side grid (0: none).")
    ] = GRID_ROWS,
    trajectories: Annotated[
        int, typer.Option("--trajectories", help="x̂0 trajectory pictures per group (0: none).")
    ] = 2,
    trajectory_steps: Annotated[
        str | None, typer.Option("--trajectory-steps", help="Comma-separated steps (default: 5 evenly spaced).")
    ] = None,
    out: Annotated[Path, out_option("Output directory (new or empty, or --overwrite).")] = Path("out/eval"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty --out (an earlier eval's files are replaced).")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model components with custom code.")
    ] = False,
) -> None:
    """Compare the base model with aligned LoRAs: rewards, win rates, CIs, grids, x̂0 trajectories."""
    from fastdense.cli._options import parse_dtype, resolve_device
    from fastdense.cli.sample import check_args, check_sampler, parse_steps
    from fastdense.comparison import prompt_groups, run_config

    check_counts(seeds=(seeds, 1), first_seed=(first_seed, 0), max_seen=(max_seen, 0), max_unseen=(max_unseen, 0),
                 grid_rows=(grid_rows, 0), trajectories=(trajectories, 0))
    check_out(out, overwrite)
    aligned = contenders(list(lora or []), list(label or []))
    runs = [cfg for cfg in map(run_config, aligned) if cfg is not None]
    model = default_model(model, runs)
    d_steps, d_guidance, d_eta, d_micro_batch, d_sampler = sampling_defaults(model, runs)
    steps, guidance = d_steps if steps is None else steps, d_guidance if guidance is None else guidance
    eta, micro_batch = d_eta if eta is None else eta, d_micro_batch if micro_batch is None else micro_batch
    check_args(steps=steps, guidance=guidance, num_images=1, eta=eta, micro_batch=micro_batch)
    sampler_kind = d_sampler if sampler_kind is None else sampler_kind
    check_sampler(sampler_kind)
    x0_steps = parse_steps(trajectory_steps, steps) if trajectories else []
    groups = prompt_groups(seen_source=seen_prompts_file, unseen_source=prompts_file, runs=runs, model_path=model,
                           limits={"seen": max_seen, "unseen": max_unseen},
                           what={"seen": "--seen-prompts-file", "unseen": "--prompts-file"})
    torch_dtype, dev = parse_dtype(dtype), resolve_device(device)
    rewards = build_rewards(list(reward or default_rewards(model, runs)), dev)
    _run(model, aligned, groups, list(range(first_seed, first_seed + seeds)), rewards, out=out, overwrite=overwrite,
         load={"dtype": torch_dtype, "device": dev, "trust_remote_code": trust_remote_code},
         compare_kw={"num_steps": steps, "guidance": guidance, "eta": eta, "sampler_kind": sampler_kind,
                     "micro_batch": micro_batch,
                     "compile": compile, "grid_rows": grid_rows, "trajectories": trajectories,
                     "trajectory_steps": x0_steps, "settings": {"device": str(dev), "dtype": dtype}})


def _run(model: str, aligned: list[Contender], groups: PromptGroups, seeds: list[int], rewards: dict[str, Reward],
         *, out: Path, overwrite: bool, load: dict[str, Any], compare_kw: dict[str, Any]) -> None:
    """Load the model, compare, write; nothing is written before the comparison has finished."""
    from rich.console import Console

    from fastdense.cli._options import progress_bar
    from fastdense.comparison import compare, previous_files, write_outputs
    from fastdense.models.loading import load_pipeline_parts

    console = Console(stderr=True)
    parts = load_pipeline_parts(model, **load)
    pairs = sum(len(p) for p in groups.groups.values()) * len(seeds)
    total = (len(aligned) + 1) * pairs * compare_kw["num_steps"]
    with library_warnings(console), progress_bar("evaluating", console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=total)
        comparison = compare(parts, aligned, groups, seeds, rewards, progress=lambda n: bar.advance(task, n),
                             **compare_kw)
    if overwrite:
        for path in previous_files(out):
            path.unlink()
    files = write_outputs(comparison, out)
    for line in summary_lines(comparison):
        print(line)
    console.print(f"wrote {', '.join(files)} to {out}", markup=False, highlight=False, soft_wrap=True)
