"""The flow-matching toy model (SD3-style): architecture, conditioning and saving in diffusers layout.

A pixel-space model (no VAE, ``x = 2 * image - 1`` as the SD toy) in the layout of an SD3
directory, so it loads as the ``sd3`` family (:mod:`fastdense.models.families`) and runs the
flow-matching path end to end on a laptop. Layout written by :func:`save_flow_model`::

    model_index.json   "_class_name": "FastdensePixelSD3Pipeline"; vae, text_encoder_3, tokenizer_3: [null, null]
    transformer/       SD3Transformer2DModel, in/out channels 3, sample_size R, patch 2
    text_encoder/      CLIPTextModelWithProjection (the CLIP-L stand-in), trained from scratch
    text_encoder_2/    CLIPTextModelWithProjection (the CLIP-G stand-in, wider), trained from scratch
    tokenizer/, tokenizer_2/   the toy CLIPTokenizer (:func:`fastdense.toy.model.toy_tokenizer`)
    scheduler/         FlowMatchEulerDiscreteScheduler (1000 train timesteps, shift 1)
    fastdense.json     the default prompt sources, and "max_sequence_length": 0 (no T5 rows)
    toy_info.json      how it was trained

Conditioning (:func:`sd3_conditioning`) is the SD3 pipeline's ``encode_prompt`` without T5:
penultimate hidden states of both CLIP encoders concatenated on features, zero-padded to the
transformer's ``joint_attention_dim``, followed by ``max_sequence_length`` zero rows (none here);
pooled = both projected ``text_embeds`` concatenated. Pretraining runs it with gradients; the
``sd3`` backbone computes the same at sampling time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastdense.errors import FastdenseError
from fastdense.toy import FLOW_PIPELINE_CLASS  # noqa: F401 (defined there: torch-free)
from fastdense.toy.model import TOY_PROMPT_SOURCES, finish_toy_dir, save_tokenizer, toy_tokenizer

__all__ = [
    "FLOW_PIPELINE_CLASS",
    "FlowModelConfig",
    "build_flow_model",
    "flow_scheduler_config",
    "save_flow_model",
    "sd3_conditioning",
]

#: model_index.json's pipeline class of the toy flow model (the "sd3" family, pixel space).


@dataclass(frozen=True)
class FlowModelConfig:
    """Architecture of the flow toy model (the defaults are the shipped model's)."""

    resolution: int = 16
    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    #: the T5 width in SD3 (4096); both CLIP widths together (64 + 96) are zero-padded up to it
    joint_attention_dim: int = 192
    text_hidden: int = 64  # CLIP-L stand-in (768 in SD3)
    text_2_hidden: int = 96  # CLIP-G stand-in (1280 in SD3)
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16
    #: FlowMatchEulerDiscreteScheduler's shift (see flow_scheduler_config)
    shift: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.resolution >= 4 and self.patch_size >= 1 and self.resolution % self.patch_size == 0,
             f"resolution={self.resolution} is not allowed with patch_size={self.patch_size}; "
             "allowed: a multiple of the patch size, >= 4"),
            (self.num_layers >= 1, f"num_layers={self.num_layers} is not allowed; allowed: >= 1"),
            (self.num_attention_heads >= 1 and self.attention_head_dim >= 1,
             f"num_attention_heads={self.num_attention_heads}, attention_head_dim={self.attention_head_dim} "
             "are not allowed; allowed: >= 1"),
            (self.text_hidden % self.text_heads == 0 and self.text_2_hidden % self.text_heads == 0,
             f"text widths {self.text_hidden}, {self.text_2_hidden} are not allowed with text_heads="
             f"{self.text_heads}; allowed: multiples of text_heads"),
            (self.joint_attention_dim >= self.text_hidden + self.text_2_hidden,
             f"joint_attention_dim={self.joint_attention_dim} is not allowed; allowed: >= "
             f"{self.text_hidden + self.text_2_hidden} (both CLIP widths, concatenated)"),
            (self.shift > 0, f"shift={self.shift} is not allowed; allowed: > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise FastdenseError(message)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled conditioning: both projected text embeddings (projection = hidden width)."""
        return self.text_hidden + self.text_2_hidden


def flow_scheduler_config(shift: float = 1.0) -> dict[str, Any]:
    """FlowMatchEulerDiscreteScheduler with 1000 train timesteps (the transformer sees ``s * 1000``).

    Shift 1 (none): SD3 shifts its sigmas by 3 at 1024² because a high-resolution latent
    (128² x 16 values) keeps much of its content at a given noise level, so more steps must be spent
    at high noise. A 16x16x3 pixel image has 768 values, far fewer than SD3's latents; its global
    colours are already decided by s ≈ 0.8 (the per-channel means of offset noise are as large as
    the signal there), and a uniform grid already gives them a quarter of the steps."""
    return {"num_train_timesteps": 1000, "shift": float(shift)}


def _clip_text_config(vocab: dict[str, int], hidden: int, config: FlowModelConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        projection_dim=hidden,  # as CLIP-L (768) and CLIP-G (1280): the pooled width is the hidden width
    )


def build_flow_model(config: FlowModelConfig = FlowModelConfig(), *, seed: int = 0):
    """Randomly initialised ``(tokenizer, text_encoder, text_encoder_2, transformer)``; the same seed
    gives the same weights. Both text encoders read the one toy tokenizer."""
    import torch
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer = toy_tokenizer(config.max_length)
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=config.resolution,
            patch_size=config.patch_size,
            in_channels=3,
            out_channels=3,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=config.inner_dim,
            pooled_projection_dim=config.pooled_dim,
            pos_embed_max_size=config.resolution // config.patch_size,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(vocab, config.text_hidden, config))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(vocab, config.text_2_hidden, config))
    return tokenizer, text_encoder, text_encoder_2, transformer


def _clip_embeds(tokenizer, text_encoder, prompts: list[str], max_length: int, device):
    """``StableDiffusion3Pipeline._get_clip_prompt_embeds`` (no clip skip, one image per prompt)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    out = text_encoder(ids.input_ids.to(device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sd3_conditioning(
    prompts: list[str],
    tokenizer,
    text_encoder,
    tokenizer_2,
    text_encoder_2,
    *,
    joint_attention_dim: int,
    max_sequence_length: int = 0,
):
    """``(prompt_embeds [n, L + max_sequence_length, joint_attention_dim], pooled [n, P])`` exactly as
    ``StableDiffusion3Pipeline.encode_prompt`` computes them without a T5 encoder (``text_encoder_3``
    None): same tokenization (both tokenizers padded to the first one's ``model_max_length``), the
    penultimate hidden states cast to the first encoder's dtype, zero T5 rows. Differentiable: the
    caller decides about gradients."""
    import torch
    import torch.nn.functional as F

    prompts = list(prompts)
    if not prompts:
        raise FastdenseError("sd3_conditioning needs at least one prompt")
    if max_sequence_length < 0:
        raise FastdenseError(f"max_sequence_length={max_sequence_length} is not allowed; allowed: >= 0")
    param = next(text_encoder.parameters())
    device, dtype = param.device, param.dtype
    max_length = tokenizer.model_max_length  # the pipeline's tokenizer_max_length, for both CLIP tokenizers
    embeds_1, pooled_1 = _clip_embeds(tokenizer, text_encoder, prompts, max_length, device)
    embeds_2, pooled_2 = _clip_embeds(tokenizer_2, text_encoder_2, prompts, max_length, device)
    embeds_1 = embeds_1.to(dtype=dtype, device=device)
    embeds_2 = embeds_2.to(dtype=dtype, device=device)  # the pipeline casts both to text_encoder's dtype
    clip_embeds = torch.cat([embeds_1, embeds_2], dim=-1)
    t5_rows = torch.zeros((len(prompts), max_sequence_length, joint_attention_dim), device=device, dtype=dtype)
    clip_embeds = F.pad(clip_embeds, (0, t5_rows.shape[-1] - clip_embeds.shape[-1]))
    prompt_embeds = torch.cat([clip_embeds, t5_rows], dim=-2)
    pooled = torch.cat([pooled_1, pooled_2], dim=-1)
    return prompt_embeds, pooled


def write_flow_model_index(root: Path) -> None:
    """The ``model_index.json`` of an SD3-layout pixel-space directory (no VAE, no T5)."""
    import diffusers

    index = {
        "_class_name": FLOW_PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": [None, None],
    }
    (Path(root) / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_flow_model(
    directory: str | Path,
    tokenizer,
    text_encoder,
    text_encoder_2,
    transformer,
    *,
    shift: float = 1.0,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the model in diffusers layout (safetensors weights) under ``directory``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(str(root / "transformer"), safe_serialization=True)
    text_encoder.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    text_encoder_2.save_pretrained(str(root / "text_encoder_2"), safe_serialization=True)
    save_tokenizer(root / "tokenizer", tokenizer)
    save_tokenizer(root / "tokenizer_2", tokenizer)
    FlowMatchEulerDiscreteScheduler(**flow_scheduler_config(shift)).save_pretrained(str(root / "scheduler"))
    write_flow_model_index(root)
    # default prompts (fastdense.data) and the T5 rows the sd3 encoder appends: none (no T5)
    return finish_toy_dir(root, {**TOY_PROMPT_SOURCES, "max_sequence_length": 0}, info)


def flow_config_dict(config: FlowModelConfig) -> dict[str, Any]:
    return asdict(config)
