"""A tiny SDXL-shaped pipeline, built offline (nothing downloaded) for tests and CPU benchmarks.

:func:`build_tiny_sdxl_pipeline` assembles a real ``StableDiffusionXLPipeline`` from tiny random
components and writes it with the pipeline's own ``save_pretrained``, so the directory loads with
``StableDiffusionXLPipeline.from_pretrained`` and with ``load_pipeline_parts`` alike::

    model_index.json  StableDiffusionXLPipeline, force_zeros_for_empty_prompt
    unet/             UNet2DConditionModel, addition_embed_type="text_time" (2 levels, 32/64 channels)
    text_encoder/     CLIPTextModel (hidden 32, 3 layers, quick_gelu; CLIP-L's place)
    text_encoder_2/   CLIPTextModelWithProjection (hidden 48, projection 40, gelu; OpenCLIP-G's place)
    tokenizer/        CLIPTokenizer, pads with <|endoftext|>
    tokenizer_2/      CLIPTokenizer, pads with "!" (as SDXL's second tokenizer does)
    scheduler/        EulerDiscreteScheduler, SDXL's schedule (scaled_linear 0.00085..0.012,
                      leading spacing, steps_offset 1) and the DDIM keys SDXL's file carries
    vae/              AutoencoderKL (2 levels: scale factor 2), only when ``with_vae``

The two encoders differ in width (32 and 48, pooled 40) so that a swapped concatenation or a
pooled vector taken from the wrong encoder changes shapes or numbers, not nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastdense.errors import FastdenseError

__all__ = [
    "TINY_SDXL_HIDDEN",
    "TINY_SDXL_HIDDEN_2",
    "TINY_SDXL_POOLED",
    "TINY_SDXL_TIME_DIM",
    "build_tiny_sdxl_pipeline",
]

TINY_SDXL_HIDDEN = 32  # text_encoder (CLIP-L's 768)
TINY_SDXL_HIDDEN_2 = 48  # text_encoder_2 (OpenCLIP-G's 1280)
TINY_SDXL_POOLED = 40  # text_encoder_2's projection_dim (1280)
TINY_SDXL_TIME_DIM = 8  # the UNet's addition_time_embed_dim (256)
TINY_SDXL_WORDS = ("a", "red", "green", "blue", "cat", "dog", "photo", "of", "the", "and", "on", "grass")

# What stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json holds besides the Euler keys:
# keys of compatible schedulers that diffusers keeps (DDIMScheduler.from_config(pipe.scheduler.config)
# reads clip_sample=False and set_alpha_to_one=False from them).
_SDXL_SCHEDULER_EXTRA = {
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
}


def build_tiny_sdxl_pipeline(
    root: str | Path,
    *,
    seed: int = 0,
    with_vae: bool = True,
    sample_size: int = 8,
    max_length: int = 16,
    force_zeros_for_empty_prompt: bool = True,
) -> Path:
    """Build a randomly initialised tiny SDXL pipeline and save it under ``root``; returns ``root``.

    ``sample_size``: the latent side (images are twice that with the VAE). ``max_length``: both
    tokenizers' window (SDXL: 77). ``force_zeros_for_empty_prompt``: the pipeline config that makes
    the unconditional conditioning zeros (SDXL's default) instead of the empty prompt's encoding.
    Without a VAE the directory is a pixel-space model for fastdense (``vae`` is ``[null, null]``).
    The same ``seed`` gives the same weights.
    """
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 4 or sample_size % 2:
        raise FastdenseError(f"sample_size={sample_size!r} is not allowed; allowed: an even int >= 4")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise FastdenseError(f"max_length={max_length!r} is not allowed; allowed: an int >= 4")

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastdense.testing import tiny_vae, write_clip_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Tokenizers are written by hand (no hub); the second pads with "!" like SDXL's tokenizer_2.
    tokenizer = write_clip_tokenizer(root / "tokenizer", words=TINY_SDXL_WORDS, max_length=max_length)
    tokenizer_2 = write_clip_tokenizer(root / "tokenizer_2", words=TINY_SDXL_WORDS, max_length=max_length)
    tokenizer_2.pad_token = "!"
    vocab = tokenizer.get_vocab()
    special = {
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }

    def text_config(hidden: int, **kwargs) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=3,  # hidden_states[-2] (penultimate) differs from the last one
            num_attention_heads=4,
            max_position_embeddings=max_length,
            **special,
            **kwargs,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=TINY_SDXL_HIDDEN + TINY_SDXL_HIDDEN_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_DIM + TINY_SDXL_POOLED,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(text_config(TINY_SDXL_HIDDEN, hidden_act="quick_gelu"))
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(
            text_config(TINY_SDXL_HIDDEN_2, hidden_act="gelu", projection_dim=TINY_SDXL_POOLED)
        )
        vae = None
        if with_vae:
            torch.manual_seed(seed + 3)
            vae = tiny_vae(4, sample_size=sample_size * 2, scaling_factor=0.13025)  # SDXL's VAE
    scheduler = EulerDiscreteScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "timestep_spacing": "leading",
            "steps_offset": 1,
            **_SDXL_SCHEDULER_EXTRA,
        }
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipeline.save_pretrained(str(root), safe_serialization=True)
    _check_scheduler_file(root)
    return root


def _check_scheduler_file(root: Path) -> None:
    """The saved scheduler config must keep the DDIM keys (a diffusers change dropping them would
    make DDIM's defaults, e.g. clip_sample=True, apply silently)."""
    saved = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    missing = {k: v for k, v in _SDXL_SCHEDULER_EXTRA.items() if saved.get(k) != v}
    if missing:  # pragma: no cover - depends on the installed diffusers
        raise RuntimeError(f"scheduler_config.json lost the keys {missing}")
