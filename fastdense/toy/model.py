"""The toy text-to-image model: architecture, tokenizer and saving in diffusers layout.

A pixel-space model (no VAE): the UNet works on ``[3, R, R]`` images in [-1, 1]
(``x = 2 * image - 1``; the sampler's ``decode`` maps back with ``x / 2 + 0.5``).
Layout written by :func:`save_toy_model`::

    model_index.json   "_class_name": "FastdensePixelPipeline", vae: [null, null]
    unet/              UNet2DConditionModel, in/out channels 3, sample_size R
    text_encoder/      CLIPTextModel (hidden 64, 2 layers), trained from scratch
    tokenizer/         CLIPTokenizer: printable ASCII plus one token per toy word
    scheduler/         DDIMScheduler (SD1.5 scaled_linear betas, epsilon, clip_sample off)
    toy_info.json      how it was trained (seed, steps, data settings, wall time)

``fastdense.models.loading.load_pipeline_parts(dir)`` loads it like a Stable
Diffusion directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastdense.errors import FastdenseError
from fastdense.testing import clip_bpe, write_bpe_files
from fastdense.toy.world import CAPTION_WORDS

__all__ = [
    "ToyModelConfig",
    "build_toy_model",
    "save_toy_model",
    "toy_scheduler_config",
    "toy_tokenizer",
    "toy_vocab_and_merges",
]

@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the toy model (the defaults are the shipped model's)."""

    resolution: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 128
    max_length: int = 16
    #: cross-attention at the finest level too (otherwise only at the coarser levels)
    attention_at_full_resolution: bool = False

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1 or self.resolution % (2 ** (levels - 1)):
            raise FastdenseError(
                f"resolution={self.resolution} is not divisible by 2^{levels - 1} "
                f"(block_out_channels={self.block_out_channels})"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise FastdenseError(
                f"block_out_channels={self.block_out_channels} are not all divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )

    def unet_blocks(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Cross-attention at every level (the finest one only with ``attention_at_full_resolution``)."""
        n = len(self.block_out_channels)
        plain_first = n > 1 and not self.attention_at_full_resolution
        down = tuple("DownBlock2D" if (i == 0 and plain_first) else "CrossAttnDownBlock2D" for i in range(n))
        up = tuple(reversed(["UpBlock2D" if d == "DownBlock2D" else "CrossAttnUpBlock2D" for d in down]))
        return down, up


TOY_PROMPT_SOURCES = {"train_prompts": "fastdense.toy.world:train_prompts",
                      "eval_prompts": "fastdense.toy.world:HELDOUT_PROMPTS"}


def toy_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The toy tokenizer's byte-level CLIP BPE vocabulary (:func:`fastdense.testing.clip_bpe`):
    the two specials, printable ASCII (plain and end-of-word), and merges that make every word
    of :data:`CAPTION_WORDS` one token."""
    return clip_bpe(words=CAPTION_WORDS)


def toy_tokenizer(max_length: int = 16):
    """The toy ``CLIPTokenizer`` (offline, built from :func:`toy_vocab_and_merges`)."""
    from transformers import CLIPTokenizer

    vocab, merges = toy_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def toy_scheduler_config() -> dict[str, Any]:
    """DDIM with Stable Diffusion 1.5's schedule (scaled_linear betas 0.00085..0.012):
    few timesteps are almost pure noise (ᾱ < 0.01 for 7% of them, against 33% with
    DDPM's linear 1e-4..0.02), so more of the training signal is where the prompt
    decides the picture."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
    }


def build_toy_model(config: ToyModelConfig = ToyModelConfig(), *, seed: int = 0):
    """Randomly initialised ``(tokenizer, text_encoder, unet)``; the same seed gives the same weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = toy_tokenizer(config.max_length)
    vocab = tokenizer.get_vocab()
    down, up = config.unet_blocks()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=config.resolution,
            in_channels=3,
            out_channels=3,
            layers_per_block=config.layers_per_block,
            block_out_channels=tuple(config.block_out_channels),
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=config.text_hidden,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=config.text_hidden,
                intermediate_size=config.text_intermediate,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_length,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                projection_dim=config.text_hidden,
            )
        )
    return tokenizer, text_encoder, unet


def save_toy_model(directory: str | Path, tokenizer, text_encoder, unet, info: dict[str, Any] | None = None) -> Path:
    """Write the model in diffusers layout (safetensors weights) under ``directory``."""
    from diffusers import DDIMScheduler

    from fastdense.models.loading import write_model_index

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(root / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    save_tokenizer(root / "tokenizer", tokenizer)
    DDIMScheduler(**toy_scheduler_config()).save_pretrained(str(root / "scheduler"))
    write_model_index(root, with_vae=False)
    # its default prompts, for `fastdense train --model DIR` without any (fastdense.data.load_prompts)
    return finish_toy_dir(root, TOY_PROMPT_SOURCES, info)


def finish_toy_dir(root: Path, model_defaults: dict[str, Any], info: dict[str, Any] | None) -> Path:
    """A saved toy model directory's last files: ``fastdense.json`` (default prompts, model options),
    ``toy_info.json`` (how it was trained) and readable permissions; returns ``root``."""
    (root / "fastdense.json").write_text(json.dumps(model_defaults, indent=2, sort_keys=True) + "\n")
    if info is not None:
        (root / "toy_info.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # transformers writes weights 0600; package data must be readable
    return root


def save_tokenizer(directory: Path, tokenizer) -> None:
    """``save_pretrained`` (tokenizer.json) plus the classic vocab.json / merges.txt pair."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = toy_vocab_and_merges()
    if tokenizer.get_vocab() != vocab:
        raise FastdenseError("the tokenizer to save is not the toy tokenizer")
    write_bpe_files(directory, vocab, merges)
    tokenizer.save_pretrained(str(directory))


def config_dict(config: ToyModelConfig) -> dict[str, Any]:
    out = asdict(config)
    out["block_out_channels"] = list(config.block_out_channels)
    return out
