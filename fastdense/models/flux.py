"""FLUX.1 (``FluxPipeline``): CLIP-L + T5 conditioning, packed latents, guidance as a model input.

Everything here does what diffusers' ``FluxPipeline`` does, op for op, so that with the same initial
noise fastdense's ODE sampler ends on the pipeline's latents:

- conditioning (``encode_prompt``): T5's last hidden state over ``max_sequence_length`` tokens
  (default 512, padded, no attention mask) is ``encoder_hidden_states`` ``[L, 4096]``; CLIP-L's
  ``pooler_output`` is ``pooled_projections`` ``[768]``. One tensor per prompt, the pooled vector
  as its last row (:func:`~fastdense.models.backbone.pack_conditioning`); ``txt_ids`` are zeros.
- latents are kept UNPACKED ``[C, H, W]`` (C = ``in_channels // 4``, H and W even) like every other
  family's; the model call packs them into 2×2 patches ``[(H/2)(W/2), 4C]`` (``_pack_latents``) with
  their position ids (``_prepare_latent_image_ids``) and unpacks the velocity (``_unpack_latents``).
  Packing is a permutation and the flow-matching step is elementwise, so a step on unpacked latents
  is the pipeline's step on packed ones, element for element.
- guidance-distilled: FLUX.1-dev takes the guidance weight as an input (``guidance_embeds``), as a
  float32 tensor, one per row; there is never an unconditional branch. FLUX.1-schnell has no
  guidance input: the weight is ignored. "True CFG" (``true_cfg_scale`` with a negative prompt,
  newer diffusers) is not supported.
- the timestep is ``t / 1000`` in the latents' dtype (the transformer multiplies by 1000 again);
  the schedule's shift depends on the image token count (:meth:`FluxBackbone.table_options`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError
from fastdense.models.backbone import CFGBatch, ConditionedBackbone, pack_conditioning
from fastdense.models.prompts import EmbeddingCache

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "DEFAULT_LATENT_SIZE",
    "FluxBackbone",
    "FluxPromptEncoder",
    "MAX_SEQUENCE_LENGTH",
    "image_ids",
    "pack_latents",
    "unpack_latents",
]

#: FluxPipeline's ``max_sequence_length`` default (and its maximum)
MAX_SEQUENCE_LENGTH = 512
#: latent side of FluxPipeline's default image (``default_sample_size`` 128: 1024 px at scale factor 8)
DEFAULT_LATENT_SIZE = 128


def pack_latents(x: Tensor) -> Tensor:
    """Latents ``[n, C, H, W]`` → 2×2 patches ``[n, (H/2)(W/2), 4C]`` (``FluxPipeline._pack_latents``)."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise FastdenseError(f"FLUX latents have shape {tuple(x.shape)}; height and width must be even")
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, height: int, width: int) -> Tensor:
    """Patches ``[n, (H/2)(W/2), 4C]`` → latents ``[n, C, H, W]`` (``FluxPipeline._unpack_latents``)."""
    n, _, channels = packed.shape
    x = packed.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, *, device=None, dtype=None) -> Tensor:
    """Position ids ``[(H/2)(W/2), 3]`` of the packed patches of ``[C, H, W]`` latents: (0, row, column)
    (``FluxPipeline._prepare_latent_image_ids`` for the halved sizes)."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxPromptEncoder(EmbeddingCache):
    """FLUX.1's two text encoders: T5's token embeddings ``[L, D_t5]`` with CLIP's pooled output
    ``[P]`` packed as the last row, ``[L+1, max(D_t5, P)]`` per prompt (``FluxPipeline.encode_prompt``).

    Each encoder runs on its own device and the result is cached on T5's, in T5's dtype.
    ``max_sequence_length``: T5's window (FluxPipeline's default 512, also its maximum).
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, device=None,
                 batch_size: int = 64, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or not (
            1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH
        ):
            raise FastdenseError(
                f"max_sequence_length={max_sequence_length!r} is not allowed; allowed: 1..{MAX_SEQUENCE_LENGTH}"
            )
        t5_param = next(text_encoder_2.parameters())
        super().__init__(device=device if device is not None else t5_param.device, dtype=t5_param.dtype,
                         batch_size=batch_size)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = max_sequence_length
        self.clip_max_length = int(tokenizer.model_max_length)  # FluxPipeline.tokenizer_max_length

    @classmethod
    def from_parts(cls, parts, **kwargs) -> FluxPromptEncoder:
        extra = parts.extra
        missing = [name for name in ("tokenizer_2", "text_encoder_2") if extra.get(name) is None]
        if missing or parts.tokenizer is None or parts.text_encoder is None:
            raise FastdenseError(f"a FLUX pipeline needs tokenizer, text_encoder, tokenizer_2 and text_encoder_2; "
                                 f"missing: {', '.join(missing) or 'tokenizer / text_encoder'}")
        return cls(parts.tokenizer, parts.text_encoder, extra["tokenizer_2"], extra["text_encoder_2"], **kwargs)

    def _tokens(self, tokenizer, prompts: list[str], max_length: int) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def _run(self, prompts: list[str]) -> torch.Tensor:
        import torch

        self._warn_truncated(self.tokenizer, prompts, self.clip_max_length, "CLIP's model_max_length")
        self._warn_truncated(self.tokenizer_2, prompts, self.max_sequence_length, "T5's max_sequence_length")
        clip, t5 = self.text_encoder, self.text_encoder_2
        clip_param, t5_param = next(clip.parameters()), next(t5.parameters())
        with torch.no_grad():
            # _get_clip_prompt_embeds: the pooled output, in the encoder's dtype
            ids = self._tokens(self.tokenizer, prompts, self.clip_max_length)
            pooled = clip(ids.to(clip_param.device), output_hidden_states=False).pooler_output
            pooled = pooled.to(dtype=clip_param.dtype, device=self.device)
            # _get_t5_prompt_embeds: the last hidden state, no attention mask
            ids = self._tokens(self.tokenizer_2, prompts, self.max_sequence_length)
            tokens = t5(ids.to(t5_param.device), output_hidden_states=False)[0]
            tokens = tokens.to(dtype=t5_param.dtype, device=self.device)
        return pack_conditioning(tokens, pooled).to(dtype=self.dtype)


class FluxBackbone(ConditionedBackbone):
    """``FluxTransformer2DModel`` with its prompt encoder (:class:`FluxPromptEncoder`)."""

    family = "flux"
    flow = True
    guidance_distilled = True  # dev: guidance is an input; schnell: none at all. Never an uncond branch.
    lora_prefix = "transformer"
    # the attention projections of the double-stream blocks (image and text streams) and of the
    # single-stream blocks (their attention has q/k/v only: its output goes through proj_out)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    latent_multiple = 2  # 2×2 patches

    def __init__(self, transformer, encoder, *, module: Any = None):
        super().__init__(transformer, encoder, module=module)
        self.transformer = transformer
        config = transformer.config
        self.token_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.guidance_embeds = bool(config.guidance_embeds)
        self._ids: dict[tuple, Tensor] = {}

    @classmethod
    def from_parts(cls, parts, *, module: Any = None, encoder: Any = None) -> FluxBackbone:
        return cls(parts.unet, encoder if encoder is not None else FluxPromptEncoder.from_parts(parts), module=module)

    @classmethod
    def latent_geometry(cls, denoiser) -> tuple[int, tuple[int, int]]:
        """(``in_channels // 4``, (128, 128)): packed 2×2 patches; FluxPipeline's default size (no
        ``sample_size`` in the config: ``default_sample_size`` = 128 latents, 1024 px at scale 8)."""
        in_channels = int(denoiser.config.in_channels)
        if in_channels % 4 or int(getattr(denoiser.config, "patch_size", 1)) != 1:
            raise FastdenseError(
                f"FLUX transformer with in_channels={in_channels}, patch_size={denoiser.config.patch_size} is not "
                "supported; allowed: patch_size 1 and in_channels a multiple of 4 (2×2 packed latents)"
            )
        return in_channels // 4, (DEFAULT_LATENT_SIZE, DEFAULT_LATENT_SIZE)

    def table_options(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas ``linspace(1, 1/T, T)`` shifted by ``mu`` of the image token
        count ``(H/2)·(W/2)``."""
        height, width = int(latent_shape[-2]), int(latent_shape[-1])
        return {"image_seq_len": (height // 2) * (width // 2), "style": "flux"}

    def _image_ids(self, height: int, width: int, device, dtype) -> Tensor:
        key = (height, width, str(device), dtype)
        if key not in self._ids:
            self._ids[key] = image_ids(height, width, device=device, dtype=dtype)
        return self._ids[key]

    def forward(self, module: Any, x: Tensor, t: Tensor, batch: CFGBatch) -> Tensor:
        import torch

        rows, _, height, width = x.shape
        tokens, pooled = self.unpacked(batch.context)
        guidance = None
        if self.guidance_embeds:
            if batch.guidance is None:
                raise FastdenseError(
                    "this FLUX transformer takes the guidance weight as an input (guidance_embeds); pass guidance="
                )
            guidance = torch.full([rows], float(batch.guidance), device=x.device, dtype=torch.float32)
        out = module(
            hidden_states=pack_latents(x),
            timestep=t.expand(rows).to(x.dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=tokens,
            txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=self._image_ids(height, width, x.device, x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)
