"""SDXL: two CLIP text encoders, pooled embeddings and size ids as added conditioning, DDIM.

What ``StableDiffusionXLPipeline`` does, op for op (diffusers' ``encode_prompt``,
``_get_add_time_ids`` and the denoising loop), so that sampling with the same noise gives the
pipeline's latents:

- prompt embeddings: each tokenizer pads / truncates to its ``model_max_length`` (no attention
  mask), each encoder runs with ``output_hidden_states=True`` and gives its penultimate hidden
  states (``hidden_states[-2]``: clip_skip None); the two are concatenated along the feature
  axis (``[77, 768 + 1280]`` in the real model) and cast to ``text_encoder_2``'s dtype;
- pooled embeddings: ``text_encoder_2``'s projected ``text_embeds`` (``[1280]``), packed as the
  last row of the one conditioning tensor per prompt
  (:func:`~fastdense.models.backbone.pack_conditioning`);
- the unconditional half: zeros, embeddings and pooled, when the pipeline config's
  ``force_zeros_for_empty_prompt`` is true (SDXL's default; read from ``model_index.json``),
  else the empty prompt encoded like any other;
- added conditioning: ``added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}``
  with time ids ``(original_size, crops_coords_top_left, target_size) = (H, W, 0, 0, H, W)``,
  H × W the image size in pixels (latent size × VAE scale factor), in the embeddings' dtype,
  the same for both halves;
- guidance: ε̂ = ε_u + w·(ε_c − ε_u) (done by the fused kernels); ``guidance_rescale`` is 0,
  the pipeline's default: rescaling would make the step non-linear in the model output.

The step tables are DDIM's, as for SD (SDXL ships an EulerDiscreteScheduler config with
``scaled_linear`` betas, leading spacing and ``steps_offset=1``, plus ``clip_sample: false`` and
``set_alpha_to_one: false``, which :func:`fastdense.schedule.step_table` reads as DDIM does).
Without a VAE (a pixel-space model of ours) the image is the latent, so the time ids are the
latent size; diffusers' pipeline would assume a scale factor of 8 there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError
from fastdense.models.backbone import CFGBatch, ConditionedBackbone, pack_conditioning
from fastdense.models.prompts import EmbeddingCache

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["SDXLBackbone", "SDXLPromptEncoder", "force_zeros_for_empty_prompt", "sdxl_time_ids"]

#: number of size ids: original (H, W), crop top-left (y, x), target (H, W)
TIME_IDS = 6


def force_zeros_for_empty_prompt(parts) -> bool:
    """The pipeline config's ``force_zeros_for_empty_prompt`` (``model_index.json``); True, the
    pipeline's default, when the directory does not say."""
    from fastdense.models.loading import read_json_object

    if parts.model_path is None or not (parts.model_path / "model_index.json").is_file():
        return True
    index = read_json_object(parts.model_path / "model_index.json", f"model {parts.model_path}")
    value = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(value, bool):
        raise FastdenseError(
            f"model {parts.model_path}: model_index.json has force_zeros_for_empty_prompt={value!r}; "
            "allowed: true, false"
        )
    return value


def sdxl_time_ids(image_size: tuple[int, int], rows: int, *, dtype, device) -> Tensor:
    """``[rows, 6]`` time ids ``(H, W, 0, 0, H, W)`` of an image of ``image_size`` pixels, built as
    ``_get_add_time_ids`` does (a tensor of python ints in ``dtype``), repeated per row."""
    import torch

    height, width = (int(v) for v in image_size)
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(rows, 1)


class SDXLPromptEncoder(EmbeddingCache):
    """SDXL's two CLIP text encoders: per prompt ``[L + 1, W]``, the concatenated penultimate hidden
    states ``[L, D1 + D2]`` and ``text_encoder_2``'s pooled embedding as the last row (zero padded
    to W = max(D1 + D2, P)).

    ``zero_negative`` (the pipeline's ``force_zeros_for_empty_prompt``): :meth:`unconditional`
    is all zeros instead of the empty prompt's encoding.
    """

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[Any], *, zero_negative: bool = True,
                 device=None, batch_size: int = 64):
        if len(tokenizers) != 2 or len(text_encoders) != 2:
            raise FastdenseError(
                f"SDXL needs two tokenizers and two text encoders, got {len(tokenizers)} and {len(text_encoders)}"
            )
        param = next(text_encoders[1].parameters())
        super().__init__(device=device if device is not None else param.device, dtype=param.dtype,
                         batch_size=batch_size)
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.zero_negative = bool(zero_negative)
        lengths = {int(t.model_max_length) for t in self.tokenizers}
        if len(lengths) != 1:
            raise FastdenseError(
                f"SDXL's tokenizers have model_max_length {[int(t.model_max_length) for t in self.tokenizers]}; "
                "their embeddings are concatenated, so they must be equal"
            )
        self.max_length = lengths.pop()
        self.token_dim = sum(int(te.config.hidden_size) for te in self.text_encoders)
        self.pooled_dim = int(self.text_encoders[1].config.projection_dim)

    @classmethod
    def from_parts(cls, parts, **kwargs) -> SDXLPromptEncoder:
        kwargs.setdefault("zero_negative", force_zeros_for_empty_prompt(parts))
        return cls(
            [parts.tokenizer, parts.extra.get("tokenizer_2")],
            [parts.text_encoder, parts.extra.get("text_encoder_2")],
            **kwargs,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(L + 1, W)`` of one prompt's packed conditioning."""
        return (self.max_length + 1, max(self.token_dim, self.pooled_dim))

    def _run(self, prompts: list[str]) -> torch.Tensor:
        import torch

        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            self._warn_truncated(tokenizer, prompts, self.max_length, "model_max_length")
            ids = tokenizer(
                prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids
            where = next(text_encoder.parameters()).device
            with torch.no_grad():
                out = text_encoder(ids.to(where), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected text_embeds: text_encoder_2's
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise FastdenseError(
                "SDXL's text_encoder_2 gave no pooled embeddings (expected CLIPTextModelWithProjection)"
            )
        tokens = torch.concat(hidden, dim=-1).to(dtype=self.dtype)
        return pack_conditioning(tokens, pooled).to(device=self.device)

    def unconditional(self) -> torch.Tensor:
        """Zeros ``[L + 1, W]`` with ``zero_negative``, else the empty prompt's conditioning."""
        import torch

        if not self.zero_negative:
            return super().unconditional()
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)  # a new tensor, as encode() gives


class SDXLBackbone(ConditionedBackbone):
    """The SDXL UNet (``addition_embed_type="text_time"``) and its two-encoder prompt cache.

    ``forward`` unpacks each conditioning row into the token embeddings (encoder_hidden_states)
    and the pooled embedding (``text_embeds``) and adds the time ids of the image size of ``x``.
    See the module docstring for what matches ``StableDiffusionXLPipeline``.
    """

    family = "sdxl"
    lora_prefix = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, unet, encoder, *, vae_scale_factor: int, zero_negative: bool, max_length: int,
                 module: Any = None):
        super().__init__(unet, encoder, module=module)
        self.unet = unet
        cfg = unet.config
        if getattr(cfg, "addition_embed_type", None) != "text_time":
            raise FastdenseError(
                f"SDXL's UNet needs addition_embed_type='text_time', got {getattr(cfg, 'addition_embed_type', None)!r}"
            )
        if not isinstance(cfg.cross_attention_dim, int):
            raise FastdenseError(f"SDXL's UNet needs one cross_attention_dim, got {cfg.cross_attention_dim!r}")
        self.token_dim = int(cfg.cross_attention_dim)
        self.time_embed_dim = int(cfg.addition_time_embed_dim)
        self.pooled_dim = int(cfg.projection_class_embeddings_input_dim) - TIME_IDS * self.time_embed_dim
        if self.pooled_dim < 1:
            raise FastdenseError(
                f"SDXL's UNet has projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim} "
                f"and addition_time_embed_dim={self.time_embed_dim}: no room for pooled embeddings"
            )
        self.vae_scale_factor = int(vae_scale_factor)
        self.zero_negative = bool(zero_negative)
        self.max_length = int(max_length)
        self._time_ids: dict[tuple[int, int, int], Tensor] = {}

    @classmethod
    def from_parts(cls, parts, *, module: Any = None, encoder: Any = None) -> SDXLBackbone:
        text_encoder_2 = parts.extra.get("text_encoder_2")
        if parts.text_encoder is None or text_encoder_2 is None:
            raise FastdenseError("SDXL needs text_encoder and text_encoder_2; these parts lack one")
        cfg = parts.unet.config
        token_dim = int(parts.text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
        projection_dim = int(text_encoder_2.config.projection_dim)
        time_dim = getattr(cfg, "addition_time_embed_dim", None) or 0
        # the pipeline's own checks (_get_add_time_ids, and the UNet's cross attention width)
        want = TIME_IDS * int(time_dim) + projection_dim
        if cfg.projection_class_embeddings_input_dim != want:
            raise FastdenseError(
                f"SDXL's UNet has projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}; "
                f"expected addition_time_embed_dim·6 + text_encoder_2 projection_dim = {want}"
            )
        if cfg.cross_attention_dim != token_dim:
            raise FastdenseError(
                f"SDXL's UNet has cross_attention_dim={cfg.cross_attention_dim}; the text encoders give "
                f"{token_dim} (hidden sizes {parts.text_encoder.config.hidden_size} + "
                f"{text_encoder_2.config.hidden_size})"
            )
        zero_negative = force_zeros_for_empty_prompt(parts)
        if encoder is None:
            encoder = SDXLPromptEncoder.from_parts(parts, zero_negative=zero_negative)
        return cls(parts.unet, encoder, vae_scale_factor=parts.vae_scale_factor, zero_negative=zero_negative,
                   max_length=int(parts.tokenizer.model_max_length), module=module)

    @property
    def conditioning_shape(self) -> tuple[int, int]:
        """``(L + 1, W)`` of one prompt's packed conditioning."""
        return (self.max_length + 1, max(self.token_dim, self.pooled_dim))

    def unconditional(self) -> Tensor:
        """Zeros ``[L + 1, W]`` (embeddings and pooled) with ``force_zeros_for_empty_prompt``, else
        the empty prompt's conditioning; cached either way."""
        import torch

        if not self.zero_negative:
            return super().unconditional()
        if self._uncond is None:
            self._uncond = torch.zeros(self.conditioning_shape, dtype=self.dtype, device=self.device)
        return self._uncond

    def time_ids(self, latent_hw: tuple[int, int], rows: int) -> Tensor:
        """``[rows, 6]`` time ids for latents of ``latent_hw`` (cached per shape)."""
        key = (int(latent_hw[0]), int(latent_hw[1]), int(rows))
        ids = self._time_ids.get(key)
        if ids is None:
            size = (key[0] * self.vae_scale_factor, key[1] * self.vae_scale_factor)
            ids = self._time_ids[key] = sdxl_time_ids(size, rows, dtype=self.dtype, device=self.device)
        return ids

    def forward(self, module: Any, x: Tensor, t: Tensor, batch: CFGBatch) -> Tensor:
        context = batch.context
        if context.shape[-1] != max(self.token_dim, self.pooled_dim):
            raise FastdenseError(
                f"SDXL conditioning has width {context.shape[-1]}; expected {max(self.token_dim, self.pooled_dim)} "
                f"(token embeddings {self.token_dim}, pooled {self.pooled_dim})"
            )
        tokens, pooled = self.unpacked(context)  # contiguous, as the pipeline's (the same kernels, the same bits)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(x.shape[-2:], x.shape[0])}
        return module(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added, return_dict=False)[0]
