"""Where a run's inputs come from: the model directory, training prompts and evaluation prompts.

A *prompt source* is a file or a provider:

- a text file: one prompt a line (blank lines skipped); a ``.json`` file: a list of prompts or an
  object keyed by prompt (DrawBench style, ``{prompt: {...}}``);
- a provider ``"package.module:attr"``: a list of prompts, or a function returning one when
  called without arguments (e.g. ``fastdense.toy.world:train_prompts``).

``model.path`` is a diffusers directory, a hub id, or a provider of a directory (e.g.
``fastdense.toy:shipped_model_dir``, the toy preset's model). Providers are resolved here by
importlib, from strings in configs: the library itself never names a provider's package.

A model directory may name its own default prompt sources in ``fastdense.json``
(``{"train_prompts": source, "eval_prompts": source}``; the toy models carry one), used when the
config gives no prompts of that kind.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError, one_line

if TYPE_CHECKING:
    from fastdense.config import Config

__all__ = [
    "is_provider",
    "load_prompts",
    "read_prompt_file",
    "read_prompt_source",
    "resolve_model_path",
    "resolve_provider",
]

MODEL_DEFAULTS_FILE = "fastdense.json"  # in a model directory: its default prompt sources

# "package.module:attr.attr": no spaces, no slashes, so neither a prompt nor a file path or hub id.
_PROVIDER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_provider(text: str) -> bool:
    """Whether ``text`` is spelled as a provider ``"package.module:attr"``."""
    return bool(_PROVIDER.fullmatch(text.strip()))


def resolve_provider(spec: str, what: str = "provider") -> Any:
    """The object ``attr`` of ``package.module`` for ``"package.module:attr"`` (dots in ``attr``
    walk attributes); ``what`` names the setting in error messages."""
    if not is_provider(spec):
        raise FastdenseError(f"{what} {spec!r} is not an import path; expected 'package.module:attr'")
    module_name, _, attr = spec.strip().partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise FastdenseError(f"cannot import module {module_name!r} for {what} {spec!r}: {one_line(err)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FastdenseError(f"module {module_name!r} has no attribute {attr!r} ({what} {spec!r})") from None
    return obj


def read_prompt_file(path: str | Path, what: str) -> list[str]:
    """The prompts of a text or JSON file (module doc); ``what`` names the setting in error
    messages (``data.prompts_file``, ``--prompts-file``). At least one prompt, or FastdenseError."""
    path = Path(path)
    if not path.is_file():
        raise FastdenseError(f"{what} {str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FastdenseError(f"{what} {str(path)!r} cannot be read ({one_line(err)})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FastdenseError(f"{what} {str(path)!r} is not valid JSON ({err})") from None
        if isinstance(data, (dict, list)):
            prompts = [str(p) for p in data]
        else:
            raise FastdenseError(f"{what} {str(path)!r} must hold a list of prompts or {{prompt: {{...}}}}")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise FastdenseError(f"{what} {str(path)!r} holds no prompts")
    return prompts


def read_prompt_source(source: str | Path, what: str) -> list[str]:
    """The prompts of a file or a provider (module doc); at least one, or FastdenseError."""
    if isinstance(source, str) and is_provider(source) and not Path(source).is_file():
        value = resolve_provider(source, what)
        if callable(value):
            value = value()
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
            raise FastdenseError(f"{what} {source!r} gave a {type(value).__name__}, not a list of prompts")
        prompts = [p for p in value if p.strip()]
        if not prompts:
            raise FastdenseError(f"{what} {source!r} gave no prompts")
        return prompts
    return read_prompt_file(source, what)


def resolve_model_path(path: str | None) -> str | Path:
    """``model.path`` as a directory or hub id: a provider is called (or read) for its directory."""
    if path is None:
        raise FastdenseError(
            "model.path is not set; give a diffusers directory, a hub id, or a provider such as "
            "'fastdense.toy:shipped_model_dir' (the toy preset's model)"
        )
    if is_provider(path) and not Path(path).exists():
        value = resolve_provider(path, "model.path")
        value = value() if callable(value) else value
        if not isinstance(value, (str, Path)):
            raise FastdenseError(f"model.path {path!r} gave a {type(value).__name__}, not a directory or hub id")
        return value
    return path


def model_prompt_defaults(model_path: str | Path | None) -> dict[str, str]:
    """The default prompt sources a local model directory names in its ``fastdense.json`` ({} if none;
    the file's other keys are model options, not read here)."""
    if model_path is None:
        return {}
    path = Path(model_path).expanduser() / MODEL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastdenseError(f"{path} cannot be read as JSON ({one_line(err)})") from None
    keys = ("train_prompts", "eval_prompts")
    # model options live there too, read (and checked) where they are used: SD3's T5 length
    options = ("max_sequence_length",)
    if not (isinstance(values, dict) and set(values) <= {*keys, *options}
            and all(isinstance(values[k], str) for k in keys if k in values)):
        raise FastdenseError(f"{path} must be a JSON object with prompt sources (strings) under {list(keys)} "
                             f"and model options under {list(options)}")
    return {k: values[k] for k in keys if k in values}


def load_prompts(cfg: Config, model_path: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts) from the config, duplicates dropped (first kept).

    Training: ``data.prompts``, then ``data.prompts_file``; neither: the model directory's default
    (``fastdense.json``). Evaluation: ``data.eval_prompts``, then ``data.eval_prompts_file``; neither:
    the model directory's default, else the first 8 training prompts."""
    d = cfg.data
    defaults = model_prompt_defaults(model_path)
    prompts = list(d.prompts)
    if d.prompts_file is not None:
        prompts += read_prompt_source(d.prompts_file, "data.prompts_file")
    if not prompts and "train_prompts" in defaults:
        prompts = read_prompt_source(defaults["train_prompts"], f"{MODEL_DEFAULTS_FILE} train_prompts")
    if not prompts:
        raise FastdenseError("no training prompts: set data.prompts or data.prompts_file")
    eval_prompts = list(d.eval_prompts)
    if d.eval_prompts_file is not None:
        eval_prompts += read_prompt_source(d.eval_prompts_file, "data.eval_prompts_file")
    if not eval_prompts and "eval_prompts" in defaults:
        eval_prompts = read_prompt_source(defaults["eval_prompts"], f"{MODEL_DEFAULTS_FILE} eval_prompts")
    if not eval_prompts:
        eval_prompts = prompts[:8]
    if not d.eval_seeds:
        raise FastdenseError("data.eval_seeds=[] is not allowed; give at least one evaluation seed")
    return list(dict.fromkeys(prompts)), list(dict.fromkeys(eval_prompts))
