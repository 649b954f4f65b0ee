"""Build rewards from strings (config files, CLI flags).

Spec syntax, accepted by :func:`get_reward`::

    spec  := term | sum
    term  := NAME | MODULE ":" ATTR          # a built-in name, or an import path
    sum   := item { "," item }
    item  := term [ "=" WEIGHT ]             # WEIGHT: a float, default 1

- ``"color_fidelity"`` -- one reward (names are case-insensitive, ``-`` = ``_``).
- ``"mypkg.rewards:MyReward"`` -- ``MyReward(**kwargs)`` from an importable module;
  the attribute may be a class or a factory and must produce a
  :class:`~fastdense.rewards.base.Reward` (subclassing ``BaseReward`` is simplest).
- ``"color_fidelity=1.0,aesthetic_proxy=0.1"`` -- a
  :class:`~fastdense.rewards.base.WeightedSum`. Any ``=`` or ``,`` makes a sum, so
  ``"jpeg_compressibility=0.5"`` is a one-term sum scaled by 0.5. Whitespace around
  items is ignored; weights may be negative or use exponents (``1e-2``).

Keyword arguments: for a single reward they go to its constructor. For a sum, a
keyword named after a term whose value is a mapping holds that term's own options
(``get_reward("pickscore=1,hpsv2=1", pickscore={"path": ...})``); every other
keyword goes to each term that accepts it (``device=``, ``batch_size=``), and a keyword
no term accepts is an error.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from fastdense.data import is_provider, resolve_provider
from fastdense.errors import FastdenseError
from fastdense.rewards.adapters import HPSv2Reward, ImageRewardReward, LaionAestheticReward, PickScoreReward
from fastdense.rewards.base import Reward, WeightedSum
from fastdense.rewards.builtin import (
    AestheticProxy,
    Brightness,
    JpegCompressibility,
    JpegIncompressibility,
)

__all__ = ["available_rewards", "get_reward", "parse_reward_spec", "register_reward", "reward_accepts"]

# A factory, or the import path of one: imported when the reward is asked for (the toy world's
# reward is named here, never imported by the rewards package).
_REGISTRY: dict[str, Callable[..., Reward] | str] = {
    "color_fidelity": "fastdense.toy.reward:ColorFidelity",
    "jpeg_compressibility": JpegCompressibility,
    "jpeg_incompressibility": JpegIncompressibility,
    "aesthetic_proxy": AestheticProxy,
    "brightness": Brightness,
    "imagereward": ImageRewardReward,
    "hpsv2": HPSv2Reward,
    "pickscore": PickScoreReward,
    "laion_aesthetic": LaionAestheticReward,
}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def register_reward(name: str, factory: Callable[..., Reward] | str, *, overwrite: bool = False) -> None:
    """Make ``factory`` (or its import path ``"package.module:Class"``, imported on first use)
    available under ``name`` (plugins, tests)."""
    key = _normalize(name)
    if not key.isidentifier():
        raise FastdenseError(f"reward names must be identifiers, got {name!r}")
    if key in _REGISTRY and not overwrite:
        raise FastdenseError(f"reward {key!r} is already registered")
    _REGISTRY[key] = factory


def _allowed() -> str:
    return f"allowed: {', '.join(available_rewards())}, or an import path 'package.module:Class'"


def parse_reward_spec(spec: str) -> list[tuple[str, float | None]]:
    """Split a spec into ``(term, weight)`` pairs; ``weight`` is None for a lone bare term.

    >>> parse_reward_spec("color_fidelity=1.0, aesthetic_proxy=0.1")
    [('color_fidelity', 1.0), ('aesthetic_proxy', 0.1)]
    >>> parse_reward_spec("pickscore")
    [('pickscore', None)]
    """
    if not isinstance(spec, str) or not spec.strip():
        raise FastdenseError(f"empty reward spec {spec!r}; {_allowed()}")
    if "," not in spec and "=" not in spec:
        return [(spec.strip(), None)]
    items: list[tuple[str, float | None]] = []
    for raw in spec.split(","):
        term, eq, weight_text = raw.partition("=")
        term = term.strip()
        if not term:
            raise FastdenseError(
                f"reward spec {spec!r} has an empty term; write e.g. 'color_fidelity=1,aesthetic_proxy=0.1'"
            )
        weight = 1.0
        if eq:
            try:
                weight = float(weight_text.strip())
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise FastdenseError(
                    f"reward spec {spec!r}: weight {weight_text.strip()!r} of {term!r} is not a finite number"
                )
        items.append((term, weight))
    return items


def _resolve(term: str) -> Callable[..., Any]:
    if ":" in term:
        if not is_provider(term):
            raise FastdenseError(f"bad reward import path {term!r}; expected 'package.module:Class'")
        obj = resolve_provider(term, "reward")
        if not callable(obj):
            raise FastdenseError(f"reward {term!r} is not a class or factory")
        return obj
    key = _normalize(term)
    if key not in _REGISTRY:
        raise FastdenseError(f"unknown reward {term!r}; {_allowed()}")
    factory = _REGISTRY[key]
    return _resolve(factory) if isinstance(factory, str) else factory


def _accepted(factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}


def reward_accepts(name_or_spec: str, option: str) -> bool:
    """Whether :func:`get_reward` takes ``option`` for this name or spec: the reward's factory (for
    a weighted sum, at least one term's) names it, takes ``**kwargs``, or has no signature to read.
    Raises FastdenseError for an unknown reward, as :func:`get_reward` does."""
    return any(option in _accepted(_resolve(term), {option: None}) for term, _ in parse_reward_spec(name_or_spec))


def _build(term: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> Reward:
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise FastdenseError(f"reward {term!r} does not accept these options {sorted(kwargs)}: {exc}") from None
    except ValueError:  # no signature (builtins): let the call decide
        pass
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        raise FastdenseError(
            f"reward {term!r} produced a {type(reward).__name__}, which is not a Reward "
            "(needs __call__(images, prompts), device, batch_size, needs_pil; subclass "
            "fastdense.rewards.BaseReward)"
        )
    return reward


def get_reward(name_or_spec: str, **kwargs: Any) -> Reward:
    """A reward from a name, an import path or a weighted-sum spec (module doc)."""
    items = parse_reward_spec(name_or_spec)
    if len(items) == 1 and items[0][1] is None:
        term = items[0][0]
        return _build(term, _resolve(term), kwargs)

    factories = [(term, _resolve(term), weight) for term, weight in items]
    keys = {_normalize(t) if ":" not in t else t for t, _, _ in factories}
    own = {k: v for k, v in kwargs.items() if k in keys and isinstance(v, Mapping)}
    shared = {k: v for k, v in kwargs.items() if k not in own}
    used: set[str] = set()
    terms = []
    for term, factory, weight in factories:
        key = _normalize(term) if ":" not in term else term
        options = _accepted(factory, shared)
        used.update(options)
        options.update(own.get(key, {}))
        terms.append((_build(term, factory, options), weight))
    unused = sorted(set(shared) - used)
    if unused:
        raise FastdenseError(f"no reward in {name_or_spec!r} accepts the option(s) {', '.join(unused)}")
    return WeightedSum(terms)
