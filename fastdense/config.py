"""Typed training configuration, validated at the edge (DESIGN.md §3).

A config is nested dataclasses; files are YAML, TOML or JSON with the same nesting;
presets ship as package data (``fastdense/presets/*.yaml``); dotted overrides
(``objective.gamma=0.8``) and CLI flags are applied on top. Every validation
error names the key, the bad value and what is allowed, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from fastdense.data import is_provider
from fastdense.errors import FastdenseError

PRECISIONS = ("fp32", "bf16", "fp16")
ESTIMATORS = ("exact", "sampled")
REFERENCES = ("init", "old", "both")
REDUCTIONS = ("mean", "sum")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_SAMPLERS = ("ddim", "sde", "cps")  # samplers with a density (fastdense.schedule); "ode" is for evaluation
SAMPLERS = (*TRAIN_SAMPLERS, "ode")  # fastdense.schedule.SAMPLERS, here without torch (the CLI checks flags early)


@dataclass
class ModelConfig:
    # diffusers directory, hub id, or 'module:attr' provider of one (fastdense.data); no default:
    # the trainer refuses None in one line (the toy preset names fastdense.toy:shipped_model_dir)
    path: str | None = None
    lora_rank: int = 4  # 0 = full fine-tuning
    lora_alpha: float | None = None  # None = rank
    lora_targets: list[str] | None = None  # None = the model family's attention projections
    compile: bool | None = None  # None = on for CUDA, off for CPU
    attention: str = "default"
    # where the text encoders run: None = the training device; "cpu" keeps a large T5 off the GPU
    # (prompts are encoded once and cached)
    text_encoder_device: str | None = None
    resolution: int | None = None  # image size in pixels; None = the model's own


@dataclass
class SamplingConfig:
    num_steps: int = 50
    guidance: float = 7.5
    eta: float = 1.0  # DDIM's η, or a flow sampler's noise level a
    # ddim (SD, SDXL), sde / cps (flow matching: SD3, FLUX); None = the scheduler's own kind
    sampler: str | None = None
    rollouts_per_prompt: int = 5  # R; G of them are kept (spread across the reward range)
    latent_dtype: str = "fp32"
    micro_batch: int = 8


@dataclass
class ObjectiveConfig:
    gamma: float = 0.9
    beta: float = 10.0
    clip: float = 1e-4
    estimator: str = "sampled"
    k: int = 3
    reference: str = "init"
    reduction: str = "mean"
    group_size: int = 5  # G trajectories per comparison group (stored per prompt)
    warmup_steps: int = 0  # updates without regularisation (logit = log π_θ alone)
    # groups whose reward range (max - min) is below this carry no preference and are not
    # drawn for updates; 0 = every group (the paper). For near-binary rewards (the toy one).
    min_reward_gap: float = 0.0
    # [start, stop): the generation steps trained on (Flow-GRPO trains on a window); the discount
    # γ^t keeps the true step index t. None = every step with a density
    step_window: list[int] | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-5
    weight_decay: float = 2e-3
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    zero_stage: int = 2
    precision: str = "fp32"
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged over the generated one


@dataclass
class TrainConfig:
    rounds: int = 10
    prompts_per_round: int = 1
    updates_per_round: int = 10
    groups_per_step: int = 1  # comparison groups per micro-batch
    grad_accum: int = 4
    buffer_prompts: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    prompts: list[str] = field(default_factory=list)
    # prompt sources (fastdense.data): one prompt per line, DrawBench-style JSON {prompt: {...}},
    # or a 'module:attr' provider (the toy preset: fastdense.toy.world:train_prompts)
    prompts_file: str | None = None
    eval_prompts: list[str] = field(default_factory=list)
    eval_prompts_file: str | None = None  # a prompt source; no eval prompts at all: the first 8 training prompts
    eval_seeds: list[int] = field(default_factory=lambda: list(range(1000, 1008)))


@dataclass
class EvalConfig:
    # the held-out evaluation (eval prompts x data.eval_seeds) after every N rounds, logged to
    # metrics.jsonl, drawn in reward_curve.png and saved as eval/round_K.png; 0 = before and after only
    every_rounds: int = 0
    # the summary's paired before/after comparison (a 95 % CI) runs on eval prompts x
    # (data.eval_seeds + this many more seeds, counting up from the largest eval seed)
    paired_seeds: int = 0


@dataclass
class RewardConfig:
    name: str = "color_fidelity"
    batch_size: int = 8


@dataclass
class RunConfig:
    out: str | None = None  # run directory; None = runs/<timestamp>
    checkpoint_every: int = 50
    keep_last: int = 2
    tensorboard: bool = False
    device: str = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- building


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``(type, whether None is allowed)``: ``int | None`` → ``(int, True)``, ``int`` → ``(int, False)``."""
    if get_origin(hint) not in (Union, types.UnionType):
        return hint, False
    args = get_args(hint)
    rest = tuple(arg for arg in args if arg is not type(None))
    return (rest[0] if len(rest) == 1 else Union[rest]), len(rest) < len(args)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_list(value: Any, item: Any) -> list:
    """A list of ``item`` (str or int); one string is one item, or for ints a comma-separated list."""
    if item is str:
        return [str(v) for v in ([value] if isinstance(value, str) else value)]
    if isinstance(value, (str, int)):
        value = [int(v) for v in str(value).split(",") if v.strip()]
    return [int(v) for v in value]


def _to_float_tuple(value: Any, length: int) -> tuple[float, ...]:
    out = tuple(float(v) for v in (value.split(",") if isinstance(value, str) else value))
    if len(out) != length:
        raise ValueError
    return out


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Coerce a parsed value to the field's type (the type hint itself, read with typing's
    get_origin / get_args), or fail naming the key. Types without a rule pass unchanged."""
    kind, optional = _without_none(hint)
    if value is None:
        if optional:
            return None
        raise FastdenseError(f"{key}: null is not allowed; expected {hint}")
    origin, args = get_origin(kind), get_args(kind)
    try:
        if kind in _SCALARS:
            return _SCALARS[kind](value)
        if origin is list and args in ((str,), (int,)):
            return _to_list(value, args[0])
        if origin is tuple and args and all(arg is float for arg in args):
            return _to_float_tuple(value, len(args))
    except (TypeError, ValueError):
        raise FastdenseError(f"{key}={value!r} is not allowed; expected {hint}") from None
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise FastdenseError(f"unknown config key {dotted!r}; allowed: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise FastdenseError(f"{dotted} must be a table of keys, got {value!r}")
            _apply(current, value, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


CONFIG_FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}
_ALLOWED_FILES = "allowed: a YAML, TOML or JSON config file (UTF-8 text)"


def _kind(value: Any) -> str:
    """What a parsed value is, in the words of a config file."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _parse_problem(err: Exception) -> str:
    """One line saying what the parser disliked and where (1-based line and column)."""
    return " ".join(_describe_parse_error(err).split()) or type(err).__name__


def _describe_parse_error(err: Exception) -> str:
    import yaml

    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno}, column {err.colno}"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{err.problem or err.context}{where}{context}"
    if isinstance(err, yaml.reader.ReaderError):  # a control character (binary data that happens to be UTF-8)
        return f"unacceptable character #x{err.character:04x} at position {err.position}"
    return str(err)  # tomllib's messages carry their own (line, column)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's sections; every problem with the file is one line naming it."""
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise FastdenseError(f"config file {name} does not exist")
    fmt = CONFIG_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FastdenseError(f"config file {name}: unknown format; allowed: .yaml, .yml, .toml, .json")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FastdenseError(f"config file {name} cannot be read: {err.strerror or err}; {_ALLOWED_FILES}") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading BOM (Windows editors) is not content
    except UnicodeDecodeError as err:
        raise FastdenseError(
            f"config file {name} cannot be read: not UTF-8 text (byte 0x{raw[err.start]:02x} at position "
            f"{err.start}); {_ALLOWED_FILES}"
        ) from None
    try:
        if not text.strip():
            data: Any = {}  # an empty file changes nothing
        elif fmt == "TOML":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: tomli is the same parser (tomllib's origin)
                import tomli as tomllib

            data = tomllib.loads(text)
        elif fmt == "JSON":
            data = json.loads(text)  # strict JSON: YAML would accept a trailing comma or comments
        else:
            import yaml

            data = yaml.safe_load(text)
            data = {} if data is None else data  # only comments
    except Exception as err:  # the parsers' errors, and whatever else they raise on odd input
        raise FastdenseError(f"config file {name} does not parse as {fmt}: {_parse_problem(err)}") from None
    if not isinstance(data, dict):
        raise FastdenseError(
            f"config file {name} must hold a mapping of sections (objective, sampling, ...) at its top level, "
            f"not {_kind(data)}"
        )
    return data


def preset_names() -> list[str]:
    return sorted(p.name.rsplit(".", 1)[0] for p in resources.files("fastdense.presets").iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("ds_"))


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("fastdense.presets").joinpath(f"{name}.yaml")))
    if not path.is_file() or name.startswith("ds_"):
        raise FastdenseError(f"unknown preset {name!r}; allowed: {', '.join(preset_names())}")
    return path


def parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` → nested dict; the value is parsed as YAML (numbers, lists, booleans)."""
    import yaml

    if "=" not in text:
        raise FastdenseError(f"override {text!r} is not allowed; expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise FastdenseError(f"override key {key!r} is not allowed; expected section.key (e.g. objective.gamma)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {parts[0]: {parts[1]: value}}


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults ← preset ← config file ← overrides, then validation."""
    cfg = Config()
    if preset is not None:
        _apply(cfg, read_config_file(preset_path(preset)))
    if config_file is not None:
        _apply(cfg, _read_legacy_model_path(read_config_file(config_file)))
    for text in overrides or []:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


# Until 2026-12-04, ``model.path: null`` meant the shipped toy model (runs saved it that way in
# config.json); the toy preset now names it. Read so, old configs and checkpoints keep working.
LEGACY_NULL_MODEL = "fastdense.toy:shipped_model_dir"


def _read_legacy_model_path(values: dict[str, Any]) -> dict[str, Any]:
    model = values.get("model")
    if isinstance(model, dict) and "path" in model and model["path"] is None:
        values = {**values, "model": {**model, "path": LEGACY_NULL_MODEL}}
    return values


# ------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise FastdenseError(f"{key}={value!r} is not allowed; {allowed}")


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def validate(cfg: Config) -> Config:
    o, s, t, opt, m, r = cfg.objective, cfg.sampling, cfg.train, cfg.optim, cfg.model, cfg.run
    _check(_finite(o.gamma) and 0 < o.gamma <= 1, "objective.gamma", o.gamma, "it must be in (0, 1]")
    _check(_finite(o.beta) and o.beta > 0, "objective.beta", o.beta, "it must be > 0")
    _check(not math.isnan(o.clip) and o.clip > 0, "objective.clip", o.clip, "it must be > 0 (inf = no clip)")
    _check(o.estimator in ESTIMATORS, "objective.estimator", o.estimator, f"allowed: {', '.join(ESTIMATORS)}")
    _check(o.k >= 1, "objective.k", o.k, "it must be >= 1")
    _check(o.reference in REFERENCES, "objective.reference", o.reference, f"allowed: {', '.join(REFERENCES)}")
    _check(o.reduction in REDUCTIONS, "objective.reduction", o.reduction, f"allowed: {', '.join(REDUCTIONS)}")
    _check(o.group_size >= 2, "objective.group_size", o.group_size, "a comparison group needs >= 2 trajectories")
    _check(o.warmup_steps >= 0, "objective.warmup_steps", o.warmup_steps, "it must be >= 0")
    _check(_finite(o.min_reward_gap) and o.min_reward_gap >= 0, "objective.min_reward_gap", o.min_reward_gap,
           "it must be a number >= 0 (0 = every group)")
    _check(1 <= s.num_steps <= 1000, "sampling.num_steps", s.num_steps, "it must be in [1, 1000]")
    _check(_finite(s.guidance) and s.guidance >= 0, "sampling.guidance", s.guidance, "it must be a number >= 0")
    _check(_finite(s.eta) and 0 < s.eta <= 1, "sampling.eta", s.eta,
           "it must be in (0, 1] for training (DDIM's η or a flow sampler's noise level; 0 has no density)")
    _check(s.sampler in (None, *TRAIN_SAMPLERS), "sampling.sampler", s.sampler,
           f"allowed for training: {', '.join(TRAIN_SAMPLERS)} or null (the ode sampler has no density)")
    w = o.step_window
    _check(w is None or (len(w) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in w)
                         and 0 <= w[0] < w[1] <= s.num_steps),
           "objective.step_window", w, f"it must be [start, stop) with 0 <= start < stop <= sampling.num_steps "
           f"({s.num_steps}), or null")
    _check(s.rollouts_per_prompt >= o.group_size, "sampling.rollouts_per_prompt", s.rollouts_per_prompt,
           f"it must be >= objective.group_size ({o.group_size})")
    _check(s.latent_dtype in PRECISIONS, "sampling.latent_dtype", s.latent_dtype, f"allowed: {', '.join(PRECISIONS)}")
    _check(s.micro_batch >= 1, "sampling.micro_batch", s.micro_batch, "it must be >= 1")
    _check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, "it must be >= 0 (0 = full fine-tuning)")
    _check(m.lora_alpha is None or (_finite(m.lora_alpha) and m.lora_alpha > 0), "model.lora_alpha", m.lora_alpha,
           "it must be > 0 or null")
    _check(m.attention in ("default", "sdpa", "xformers"), "model.attention", m.attention,
           "allowed: default, sdpa, xformers")
    targets = m.lora_targets
    _check(targets is None or (len(targets) > 0 and all(isinstance(x, str) and x for x in targets)),
           "model.lora_targets", m.lora_targets, "it must be a non-empty list of layer names, or null")
    _check(m.text_encoder_device is None or m.text_encoder_device in ("cpu", "cuda")
           or str(m.text_encoder_device).startswith("cuda:"), "model.text_encoder_device", m.text_encoder_device,
           "allowed: null (the training device), cpu, cuda, cuda:N")
    _check(m.resolution is None or (isinstance(m.resolution, int) and not isinstance(m.resolution, bool)
                                    and m.resolution >= 8), "model.resolution", m.resolution,
           "it must be an image size in pixels >= 8, or null (the model's own)")
    if m.path is not None and (m.path.startswith((".", "/", "~")) or Path(m.path).exists()):
        _check(Path(m.path).expanduser().is_dir(), "model.path", m.path, "no such model directory")
    _check(_finite(opt.lr) and opt.lr > 0, "optim.lr", opt.lr, "it must be > 0")
    _check(_finite(opt.weight_decay) and opt.weight_decay >= 0, "optim.weight_decay", opt.weight_decay,
           "it must be >= 0")
    _check(_finite(opt.grad_clip) and opt.grad_clip >= 0, "optim.grad_clip", opt.grad_clip, "it must be >= 0 (0 = off)")
    _check(all(_finite(b) and 0 <= b < 1 for b in opt.betas), "optim.betas", opt.betas, "each must be in [0, 1)")
    _check(opt.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", opt.lr_schedule,
           f"allowed: {', '.join(LR_SCHEDULES)}")
    _check(opt.lr_warmup_steps >= 0, "optim.lr_warmup_steps", opt.lr_warmup_steps, "it must be >= 0")
    _check(opt.zero_stage in (0, 1, 2, 3), "optim.zero_stage", opt.zero_stage, "allowed: 0, 1, 2, 3")
    _check(opt.precision in PRECISIONS, "optim.precision", opt.precision, f"allowed: {', '.join(PRECISIONS)}")
    if opt.deepspeed_config is not None:
        _check(Path(opt.deepspeed_config).is_file(), "optim.deepspeed_config", opt.deepspeed_config,
               "no such file")
    for key in ("rounds", "prompts_per_round", "updates_per_round", "groups_per_step", "grad_accum",
                "buffer_prompts"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "it must be >= 1")
    _check(t.seed >= 0, "train.seed", t.seed, "it must be >= 0")
    d = cfg.data
    for key in ("prompts_file", "eval_prompts_file"):
        source = getattr(d, key)
        if source is not None:
            _check(Path(source).is_file() or is_provider(source), f"data.{key}", source,
                   "no such file (nor a 'package.module:attr' prompt provider)")
    _check(all(p.strip() for p in d.prompts), "data.prompts", d.prompts, "prompts must not be empty strings")
    _check(cfg.eval.every_rounds >= 0, "eval.every_rounds", cfg.eval.every_rounds, "it must be >= 0 (0 = off)")
    _check(cfg.eval.paired_seeds >= 0, "eval.paired_seeds", cfg.eval.paired_seeds, "it must be >= 0")
    _check(cfg.reward.batch_size >= 1, "reward.batch_size", cfg.reward.batch_size, "it must be >= 1")
    _check(r.checkpoint_every >= 1, "run.checkpoint_every", r.checkpoint_every, "it must be >= 1")
    _check(r.keep_last >= 1, "run.keep_last", r.keep_last, "it must be >= 1")
    _check(r.device in ("auto", "cpu", "cuda") or r.device.startswith("cuda:"), "run.device", r.device,
           "allowed: auto, cpu, cuda, cuda:N")
    return cfg
