"""Prompt sources of a training run: ``data.prompts``, ``data.prompts_file`` (text: one prompt a
line; JSON: a list or an object keyed by prompt) and, for a toy model, the toy world's captions."""

from __future__ import annotations

import json
from pathlib import Path

from fastdense.config import Config
from fastdense.errors import FastdenseError, one_line

__all__ = ["TOY_TRAIN_PROMPTS", "is_toy_model", "load_prompts", "toy_train_prompts"]

TOY_TRAIN_PROMPTS = 256  # of the toy world's 528 training captions: many prompts, few rollouts each


def toy_train_prompts(count: int = TOY_TRAIN_PROMPTS, seed: int = 0) -> list[str]:
    """Distinct training captions of the toy world (held-out combinations excluded)."""
    import numpy as np

    from fastdense.toy.world import caption, random_scene

    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    for _ in range(50 * count):
        out.setdefault(caption(random_scene(rng)))
        if len(out) >= count:
            break
    return list(out)


def is_toy_model(path: str | None) -> bool:
    """The shipped toy model (``None``) or one made by ``fastdense toy pretrain`` (it writes toy_info.json)."""
    return path is None or (Path(path).expanduser() / "toy_info.json").is_file()


def load_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts) from the config; by default the toy world's captions and
    held-out prompts when the model is a toy model."""
    d = cfg.data
    prompts = list(d.prompts)
    if d.prompts_file is not None:
        path = Path(d.prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise FastdenseError(f"data.prompts_file={d.prompts_file!r} cannot be read ({one_line(err)})") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise FastdenseError(f"data.prompts_file={d.prompts_file!r} is not valid JSON ({err})") from None
            if isinstance(data, dict):
                prompts += [str(k) for k in data]
            elif isinstance(data, list):
                prompts += [str(p) for p in data]
            else:
                raise FastdenseError(
                    f"data.prompts_file={d.prompts_file!r} must hold a list of prompts or {{prompt: {{...}}}}"
                )
        else:
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise FastdenseError(f"data.prompts_file={d.prompts_file!r} holds no prompts")
    toy = is_toy_model(cfg.model.path)
    if not prompts:
        if not toy:
            raise FastdenseError("no training prompts: set data.prompts or data.prompts_file")
        prompts = toy_train_prompts(TOY_TRAIN_PROMPTS, seed=0)
    eval_prompts = list(d.eval_prompts)
    if not eval_prompts:
        if toy:
            from fastdense.toy.world import HELDOUT_PROMPTS

            eval_prompts = list(HELDOUT_PROMPTS)
        else:
            eval_prompts = prompts[:8]
    if not d.eval_seeds:
        raise FastdenseError("data.eval_seeds=[] is not allowed; give at least one evaluation seed")
    return list(dict.fromkeys(prompts)), list(dict.fromkeys(eval_prompts))
