"""Rewards: the :class:`Reward` contract, built-in rewards, model adapters, a registry.

>>> from fastdense.rewards import get_reward
>>> reward = get_reward("color_fidelity=1.0,aesthetic_proxy=0.1")
>>> scores = reward(images, prompts)  # images [B, 3, H, W] in [0, 1] -> float32 [B] on CPU

Heavy packages (transformers, open_clip, ImageReward) are imported only when an
adapter loads its model.

``color_fidelity`` is the toy world's reward (:mod:`fastdense.toy.reward`): registered by name
and imported when asked for. Its class and the toy palette and prompt grammar
(:mod:`fastdense.toy.colors`) stay importable from here as before, resolved on first use.
"""

from fastdense.rewards.adapters import (
    ClipPreprocess,
    HPSv2Reward,
    ImageRewardReward,
    LaionAestheticReward,
    PickScoreReward,
)
from fastdense.rewards.base import BaseReward, Reward, WeightedSum, to_pil
from fastdense.rewards.builtin import (
    AestheticProxy,
    Brightness,
    JpegCompressibility,
    JpegIncompressibility,
)
from fastdense.rewards.registry import (
    available_rewards,
    get_reward,
    parse_reward_spec,
    register_reward,
    reward_accepts,
)

__all__ = [
    "AestheticProxy",
    "BaseReward",
    "Brightness",
    "ClipPreprocess",
    "HPSv2Reward",
    "ImageRewardReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LaionAestheticReward",
    "PickScoreReward",
    "Reward",
    "WeightedSum",
    "available_rewards",
    "get_reward",
    "parse_reward_spec",
    "register_reward",
    "reward_accepts",
    "to_pil",
]

# Moved to the toy world; importable from here as before. Resolved by name (fastdense.data), so
# the rewards package never imports the toy world.
_MOVED = {
    "COLOR_NAMES": "fastdense.toy.colors",
    "PALETTE": "fastdense.toy.colors",
    "ToyPrompt": "fastdense.toy.colors",
    "format_toy_prompt": "fastdense.toy.colors",
    "parse_toy_prompt": "fastdense.toy.colors",
    "ColorFidelity": "fastdense.toy.reward",
}


def __getattr__(name: str):
    if name in _MOVED:
        from fastdense.data import resolve_provider

        return resolve_provider(f"{_MOVED[name]}:{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
