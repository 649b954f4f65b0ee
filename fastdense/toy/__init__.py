"""The built-in toy world and the shipped tiny text-to-image model.

- :mod:`fastdense.toy.colors`: the palette and the prompt grammar;
- :mod:`fastdense.toy.world`: coloured shapes on coloured backgrounds, their captions,
  the training prompts and the held-out evaluation prompts;
- :mod:`fastdense.toy.reward`: the ``color_fidelity`` reward;
- :mod:`fastdense.toy.model`: the model's architecture, tokenizer and diffusers layout;
- :mod:`fastdense.toy.pretrain`: training it from scratch (``fastdense toy pretrain``);
- :mod:`fastdense.toy.flow_model`, :mod:`fastdense.toy.flow_pretrain`: the flow-matching (SD3-style)
  toy model and its pretraining (``fastdense toy pretrain --backbone sd3``);
- here: the shipped model and its evaluation (:func:`fidelity_scores`, on top of
  :func:`fastdense.evaluate.evaluate`).

The library never imports this package; the toy preset names it by "module:attr" strings
(``model.path: fastdense.toy:shipped_model_dir``, the prompt providers of
:mod:`fastdense.toy.world`) and the reward registry by ``fastdense.toy.reward:ColorFidelity``.

The shipped model (:func:`shipped_model_dir`) is a pixel-space model: images in
[-1, 1] (``x = 2 * image - 1``), decoded by the identity (``fastdense.sampler.decode``
maps ``x / 2 + 0.5``). Its held-out colour fidelity with the defaults below
(DDIM 20 steps, guidance 3, eta 1, the 16 held-out prompts x seeds 1000..1015) is
0.779 (guidance 1: 0.47, 2: ~0.74, 5: ~0.87), recorded in ``toy_info.json`` next to
the weights; an untrained model scores ~0.14.

The shipped flow model (:func:`shipped_flow_model_dir`, ``fastdense/toy/weights_flow/``) is the
same world in SD3's layout (``FastdensePixelSD3Pipeline``: an ``SD3Transformer2DModel`` on the
[3, 16, 16] pixels, two CLIP text encoders, no T5, no VAE, ``FlowMatchEulerDiscreteScheduler``),
sampled by default with the ``DEFAULT_FLOW_*`` settings; :func:`sampling_defaults` picks a toy
model's defaults from its directory. Its held-out colour fidelity with them (Flow-GRPO's SDE,
a = 0.7, 10 steps, guidance 1.5, the same prompts and seeds) is 0.780 (ODE: 0.790; guidance 3:
0.87-0.89; guidance 1: 0.57), recorded in its ``toy_info.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastdense.errors import FastdenseError

__all__ = [
    "DEFAULT_EVAL_SEEDS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DEFAULT_ETA",
    "DEFAULT_FLOW_ETA",
    "DEFAULT_FLOW_GUIDANCE",
    "DEFAULT_FLOW_SAMPLER",
    "DEFAULT_FLOW_STEPS",
    "ToySampling",
    "evaluate_fidelity",
    "fidelity_scores",
    "is_toy_model",
    "sampling_defaults",
    "shipped_flow_model_dir",
    "shipped_flow_weights_path",
    "shipped_model_dir",
    "shipped_weights_path",
]

#: Sampling defaults for the toy model (DDIM, eta 1 as in training).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0
DEFAULT_ETA = 1.0
#: Sampling defaults for the flow toy model: Flow-GRPO's SDE (the stochastic sampler that training
#: needs a density for) with noise level a = 0.7 and 10 steps, as Flow-GRPO trains (held-out fidelity
#: 0.780 against 0.771 with 20 steps, at half the cost); guidance 1.5 puts the shipped model at 0.78,
#: where the SD toy starts (guidance 3: 0.88), leaving alignment room. Measured: BENCHMARKS.md.
FLOW_PIPELINE_CLASS = "FastdensePixelSD3Pipeline"
DEFAULT_FLOW_STEPS = 10
DEFAULT_FLOW_GUIDANCE = 1.5
DEFAULT_FLOW_SAMPLER = "sde"
DEFAULT_FLOW_ETA = 0.7
#: Noise seeds for evaluation (training never uses the sampler's seeds).
DEFAULT_EVAL_SEEDS: tuple[int, ...] = tuple(range(1000, 1016))


def shipped_weights_path() -> Path:
    """Where the shipped weights live inside the package (whether or not they exist yet)."""
    from importlib.resources import files

    return Path(str(files("fastdense.toy") / "weights"))


def shipped_model_dir() -> Path:
    """Directory of the shipped toy model (package data, diffusers layout)."""
    path = shipped_weights_path()
    if not (path / "model_index.json").is_file():
        raise FastdenseError(
            f"the shipped toy model is missing ({path} has no model_index.json); "
            "train one with `fastdense toy pretrain --ship`"
        )
    return path


def shipped_flow_weights_path() -> Path:
    """Where the shipped flow-matching toy model lives inside the package (whether or not it exists yet)."""
    from importlib.resources import files

    return Path(str(files("fastdense.toy") / "weights_flow"))


def shipped_flow_model_dir() -> Path:
    """Directory of the shipped flow-matching (SD3-style) toy model (package data, diffusers layout)."""
    path = shipped_flow_weights_path()
    if not (path / "model_index.json").is_file():
        raise FastdenseError(
            f"the shipped flow toy model is missing ({path} has no model_index.json); "
            "train one with `fastdense toy pretrain --backbone sd3 --ship`"
        )
    return path


@dataclass(frozen=True)
class ToySampling:
    """How a toy model is sampled by default: ``sampler`` None is the scheduler's own (DDIM)."""

    steps: int
    guidance: float
    eta: float
    sampler: str | None = None


def sampling_defaults(model_dir: str | Path | None = None) -> ToySampling:
    """The sampling defaults of a toy model directory (None: the shipped SD toy): the flow ones
    (``DEFAULT_FLOW_*``) for an SD3-layout flow model, else the DDIM ones."""
    index = None if model_dir is None else Path(model_dir).expanduser() / "model_index.json"
    if index is not None and index.is_file():
        try:
            pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pipeline = None  # the loader reports a bad directory in its own words
        if pipeline == FLOW_PIPELINE_CLASS:
            return ToySampling(DEFAULT_FLOW_STEPS, DEFAULT_FLOW_GUIDANCE, DEFAULT_FLOW_ETA, DEFAULT_FLOW_SAMPLER)
    return ToySampling(DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_ETA)


def is_toy_model(path: str | Path | None) -> bool:
    """A model made by ``fastdense toy pretrain`` (it writes toy_info.json), or ``None``: the shipped one."""
    return path is None or (Path(path).expanduser() / "toy_info.json").is_file()


def fidelity_scores(
    model_dir: str | Path,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = DEFAULT_EVAL_SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = DEFAULT_ETA,
    *,
    parts=None,
    sampler: str | None = None,
):
    """Colour-fidelity reward ``[len(prompts), len(seeds)]`` (float32) of samples of the model.

    Sample ``(i, j)`` is ``prompts[i]`` with noise seed ``seeds[j]``, drawn by
    :class:`fastdense.sampler.Sampler` (``sampler``: None = the scheduler's own, DDIM for the SD toy;
    ``steps``, CFG ``guidance``, ``eta``: DDIM's η or a flow sampler's noise level), decoded and
    scored by :func:`fastdense.evaluate.evaluate`. ``prompts`` default to
    :data:`fastdense.toy.world.HELDOUT_PROMPTS`. ``parts``: already loaded
    ``PipelineParts`` (``model_dir`` is then ignored).
    """
    from fastdense.evaluate import evaluate
    from fastdense.models.loading import load_pipeline_parts
    from fastdense.sampler import Sampler
    from fastdense.toy.reward import ColorFidelity
    from fastdense.toy.world import HELDOUT_PROMPTS

    prompts = list(HELDOUT_PROMPTS if prompts is None else prompts)
    seeds = [int(s) for s in seeds]
    if not prompts or not seeds:
        raise FastdenseError("evaluate_fidelity needs at least one prompt and one seed")
    if parts is None:
        parts = load_pipeline_parts(model_dir)
    result = evaluate(Sampler(parts, compile=False), parts, ColorFidelity(), prompts, seeds,
                      num_steps=steps, guidance=guidance, eta=eta, sampler_kind=sampler)
    return result.scores.float().reshape(len(prompts), len(seeds))  # the reward's float32, exactly


def evaluate_fidelity(
    model_dir: str | Path,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = DEFAULT_EVAL_SEEDS,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    eta: float = DEFAULT_ETA,
    *,
    sampler: str | None = None,
) -> float:
    """Mean colour fidelity of the model on ``prompts`` x ``seeds`` (see :func:`fidelity_scores`)."""
    return float(fidelity_scores(model_dir, prompts, seeds, steps, guidance, eta, sampler=sampler).mean())
