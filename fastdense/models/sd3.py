"""SD3 / SD3.5 (MMDiT): the prompt encoder (CLIP-L + CLIP-G + T5) and the transformer backbone.

Both do exactly what diffusers' ``StableDiffusion3Pipeline`` does (``encode_prompt`` and the
denoising loop's transformer call), so that fastdense's samples equal the pipeline's:

- each CLIP encoder (``CLIPTextModelWithProjection``) reads the prompt padded to the FIRST
  tokenizer's ``model_max_length`` and gives its penultimate hidden state (no clip skip) and its
  projected pooled embedding; the two hidden states are concatenated on the feature axis, in the
  first encoder's dtype, and zero-padded to the T5 width;
- T5 (``T5EncoderModel``) reads ``max_sequence_length`` tokens (default 256, as the pipeline's);
  without T5 (``text_encoder_3`` null in ``model_index.json``) that part is zeros of
  ``[max_sequence_length, transformer.config.joint_attention_dim]``;
- tokens = cat(CLIP, T5) on the sequence axis, pooled = cat(CLIP-L pooled, CLIP-G pooled): packed
  as one tensor per prompt, pooled as the last row (:func:`~fastdense.models.backbone.pack_conditioning`);
- the negative conditioning is the empty prompt ``""`` through all encoders (the pipeline's default).

A model directory may set ``max_sequence_length`` in its ``fastdense.json``
(``{"max_sequence_length": N}``; the toy flow model, which has no T5, sets 0: no T5 rows); otherwise 256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError
from fastdense.models.backbone import CFGBatch, ConditionedBackbone, pack_conditioning
from fastdense.models.prompts import EmbeddingCache

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["DEFAULT_MAX_SEQUENCE_LENGTH", "SD3Backbone", "SD3PromptEncoder", "model_max_sequence_length"]

#: StableDiffusion3Pipeline's default T5 length (its check_inputs refuses more than 512)
DEFAULT_MAX_SEQUENCE_LENGTH = 256
MAX_SEQUENCE_LENGTH_LIMIT = 512
MODEL_OPTIONS_FILE = "fastdense.json"  # in a model directory (also names its default prompts: fastdense.data)


def _check_max_sequence_length(value: Any, where: str = "max_sequence_length") -> int:
    """An int in [0, 512] (0: no T5 rows at all, for models without T5; the pipeline refuses more than 512)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise FastdenseError(
            f"{where}={value!r} is not allowed; allowed: an int in [0, {MAX_SEQUENCE_LENGTH_LIMIT}] "
            "(0 only without T5; StableDiffusion3Pipeline refuses more than 512)"
        )
    return value


def model_max_sequence_length(model_path: str | Path | None) -> int:
    """The T5 length a model directory asks for in its ``fastdense.json`` (other keys there are
    not read here), else :data:`DEFAULT_MAX_SEQUENCE_LENGTH`."""
    if model_path is None:
        return DEFAULT_MAX_SEQUENCE_LENGTH
    path = Path(model_path) / MODEL_OPTIONS_FILE
    if not path.is_file():
        return DEFAULT_MAX_SEQUENCE_LENGTH
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastdenseError(f"{path} cannot be read as JSON ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict) or "max_sequence_length" not in values:
        return DEFAULT_MAX_SEQUENCE_LENGTH
    return _check_max_sequence_length(values["max_sequence_length"], f"{path}: max_sequence_length")


class SD3PromptEncoder(EmbeddingCache):
    """CLIP-L + CLIP-G (+ T5) conditioning of SD3, one packed tensor ``[L_clip + L_t5 + 1, W]`` per
    prompt (``W = max(joint_attention_dim, pooled width)``); cached per prompt.

    ``text_encoder_3`` / ``tokenizer_3`` None: the T5 part is zeros, as in the pipeline.
    ``joint_attention_dim``: the transformer's text width (the T5 width; the zeros' width without T5).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        tokenizer_3=None,
        text_encoder_3=None,
        *,
        joint_attention_dim: int,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device=None,
        batch_size: int = 64,
    ):
        param = next(text_encoder.parameters())
        super().__init__(device=device if device is not None else param.device, dtype=param.dtype,
                         batch_size=batch_size)
        if (tokenizer_3 is None) != (text_encoder_3 is None):
            raise FastdenseError("SD3 needs both tokenizer_3 and text_encoder_3, or neither (no T5)")
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = (text_encoder, text_encoder_2)
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = text_encoder_3
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = _check_max_sequence_length(max_sequence_length)
        if self.max_sequence_length == 0 and text_encoder_3 is not None:
            raise FastdenseError("max_sequence_length=0 is not allowed with a T5 encoder; allowed: 1 to 512")
        # the pipeline pads both CLIP prompts to the first tokenizer's length
        self.clip_length = int(tokenizer.model_max_length)

    @classmethod
    def from_parts(cls, parts, *, max_sequence_length: int | None = None, **kwargs) -> SD3PromptEncoder:
        """The encoder of loaded SD3 ``PipelineParts``; ``max_sequence_length`` defaults to the model
        directory's ``fastdense.json``, else 256."""
        extra = parts.extra
        if max_sequence_length is None:
            max_sequence_length = model_max_sequence_length(parts.model_path)
        return cls(
            parts.tokenizer,
            parts.text_encoder,
            extra["tokenizer_2"],
            extra["text_encoder_2"],
            extra.get("tokenizer_3"),
            extra.get("text_encoder_3"),
            joint_attention_dim=parts.unet.config.joint_attention_dim,
            max_sequence_length=max_sequence_length,
            **kwargs,
        )

    @property
    def has_t5(self) -> bool:
        return self.text_encoder_3 is not None

    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(penultimate hidden state in CLIP-L's dtype, pooled text embedding) of CLIP encoder ``index``."""
        tokenizer, text_encoder = self.tokenizers[index], self.text_encoders[index]
        tokens = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                           return_tensors="pt")
        out = text_encoder(tokens.input_ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(dtype=self.text_encoders[0].dtype, device=self.device), out[0]

    def _t5(self, prompts: list[str]) -> Tensor:
        import torch

        if self.text_encoder_3 is None:
            return torch.zeros((len(prompts), self.max_sequence_length, self.joint_attention_dim),
                               device=self.device, dtype=self.text_encoders[0].dtype)
        tokens = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt")
        out = self.text_encoder_3(tokens.input_ids.to(self.device))[0]
        return out.to(dtype=self.text_encoder_3.dtype, device=self.device)

    def _run(self, prompts: list[str]) -> torch.Tensor:
        import torch

        # T5 reads the longest window; without it CLIP's window is the whole prompt
        if self.has_t5:
            self._warn_truncated(self.tokenizer_3, prompts, self.max_sequence_length, "T5's max_sequence_length")
        else:
            self._warn_truncated(self.tokenizers[0], prompts, self.clip_length, "CLIP's model_max_length")
        with torch.no_grad():
            hidden_l, pooled_l = self._clip(0, prompts)
            hidden_g, pooled_g = self._clip(1, prompts)
            t5 = self._t5(prompts)
        clip = torch.cat([hidden_l, hidden_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        tokens = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([pooled_l, pooled_g], dim=-1)
        return pack_conditioning(tokens, pooled).to(dtype=self.dtype, device=self.device)


class SD3Backbone(ConditionedBackbone):
    """``SD3Transformer2DModel`` with CLIP-L + CLIP-G + T5 conditioning: a velocity-predicting flow model.

    The model call is the pipeline's: ``transformer(hidden_states=x, timestep=t.expand(rows),
    encoder_hidden_states=tokens, pooled_projections=pooled, return_dict=False)[0]`` with ``t`` the
    scheduler's float32 timestep (σ·1000).
    """

    family = "sd3"
    flow = True
    lora_prefix = "transformer"
    # the MMDiT's attention projections of both streams (image: to_*, text: add_*), as Flow-GRPO's SD3 LoRA
    default_lora_targets = (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    )
    latent_multiple = 2  # SD3's patch size

    def __init__(self, transformer, encoder, *, module: Any = None, scheduler_config: dict | None = None):
        super().__init__(transformer, encoder, module=module)
        self.transformer = transformer
        config = transformer.config
        self.token_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.patch_size = int(config.patch_size)
        self.scheduler_config = dict(scheduler_config or {})

    @classmethod
    def from_parts(cls, parts, *, module: Any = None, encoder: Any = None) -> SD3Backbone:
        if encoder is None:
            encoder = SD3PromptEncoder.from_parts(parts)
        return cls(parts.unet, encoder, module=module, scheduler_config=parts.scheduler_config)

    def table_options(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """The pipeline's timesteps: its shift, or with ``use_dynamic_shifting`` a ``mu`` from the number
        of image tokens (H/p)·(W/p)."""
        if not self.scheduler_config.get("use_dynamic_shifting", None):
            return {"style": "sd3"}
        height, width = int(latent_shape[-2]), int(latent_shape[-1])
        return {"image_seq_len": (height // self.patch_size) * (width // self.patch_size), "style": "sd3"}

    def forward(self, module: Any, x: Tensor, t: Tensor, batch: CFGBatch) -> Tensor:
        tokens, pooled = self.unpacked(batch.context)
        timestep = t.expand(x.shape[0]) if t.dim() == 0 else t
        return module(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
