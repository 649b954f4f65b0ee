"""Rewards: the :class:`Reward` contract, built-in rewards, model adapters, a registry.

>>> from fastdense.rewards import get_reward
>>> reward = get_reward("color_fidelity=1.0,aesthetic_proxy=0.1")
>>> scores = reward(images, prompts)  # images [B, 3, H, W] in [0, 1] -> float32 [B] on CPU

Heavy packages (transformers, open_clip, ImageReward) are imported only when an
adapter loads its model.
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
    ColorFidelity,
    JpegCompressibility,
    JpegIncompressibility,
)
from fastdense.rewards.colors import COLOR_NAMES, PALETTE, ToyPrompt, format_toy_prompt, parse_toy_prompt
from fastdense.rewards.registry import (
    available_rewards,
    get_reward,
    parse_reward_spec,
    register_reward,
    reward_accepts,
)

__all__ = [
    "COLOR_NAMES",
    "PALETTE",
    "AestheticProxy",
    "BaseReward",
    "Brightness",
    "ClipPreprocess",
    "ColorFidelity",
    "HPSv2Reward",
    "ImageRewardReward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "LaionAestheticReward",
    "PickScoreReward",
    "Reward",
    "ToyPrompt",
    "WeightedSum",
    "available_rewards",
    "format_toy_prompt",
    "get_reward",
    "parse_reward_spec",
    "parse_toy_prompt",
    "register_reward",
    "reward_accepts",
    "to_pil",
]
