"""A tiny SD3-shaped pipeline, built offline (nothing downloaded) for tests and CPU benchmarks.

:func:`build_tiny_sd3_pipeline` assembles a real ``StableDiffusion3Pipeline`` from tiny random
components and writes it with the pipeline's own ``save_pretrained``, so the directory loads with
``StableDiffusion3Pipeline.from_pretrained`` and with ``load_pipeline_parts`` alike::

    model_index.json  StableDiffusion3Pipeline (FastdensePixelSD3Pipeline without a VAE)
    transformer/      SD3Transformer2DModel (2 blocks, 2 heads of 8, patch 2, joint_attention_dim 48)
    text_encoder/     CLIPTextModelWithProjection (hidden 16, projection 16; CLIP-L's place)
    text_encoder_2/   CLIPTextModelWithProjection (hidden 24, projection 24; CLIP-G's place)
    text_encoder_3/   T5EncoderModel (d_model 48, 2 layers), only when ``with_t5``
    tokenizer/        CLIPTokenizer, window ``max_length``, pads with <|endoftext|>
    tokenizer_2/      CLIPTokenizer, other token ids, window ``max_length + 4``, pads with "!"
    tokenizer_3/      T5 tokenizer (a Unigram vocabulary of a few words and the ASCII characters:
                      tiny_flux.write_t5_tokenizer), only with T5
    scheduler/        FlowMatchEulerDiscreteScheduler(shift=3.0), SD3's
    vae/              AutoencoderKL, 16 latent channels, SD3's shift/scale, 2 levels (scale
                      factor 2), only when ``with_vae``
    fastdense.json    {"max_sequence_length": N}, only when ``max_sequence_length`` is given

The widths differ on purpose (CLIP 16 + 24 = 40 < T5 48, pooled 16 + 24 = 40): a swapped
concatenation, padding to the wrong width or a pooled vector from the wrong encoder changes
shapes or numbers. The second tokenizer's vocabulary and window differ from the first's, because
the pipeline tokenizes with each CLIP's own tokenizer but pads both to the FIRST one's window.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastdense.errors import FastdenseError

__all__ = [
    "TINY_SD3_JOINT_DIM",
    "TINY_SD3_POOLED",
    "TINY_SD3_WORDS",
    "build_tiny_sd3_pipeline",
]

TINY_SD3_HIDDEN = 16  # text_encoder (CLIP-L's 768)
TINY_SD3_HIDDEN_2 = 24  # text_encoder_2 (CLIP-G's 1280)
TINY_SD3_JOINT_DIM = 48  # T5's d_model and the transformer's joint_attention_dim (4096)
TINY_SD3_POOLED = TINY_SD3_HIDDEN + TINY_SD3_HIDDEN_2  # pooled_projection_dim (2048)
TINY_SD3_WORDS = ("a", "red", "green", "blue", "cat", "dog", "photo", "of", "the", "and", "on", "grass")
#: the transformer's positional table covers latents up to this many patches a side
_POS_EMBED_MAX = 16


def build_tiny_sd3_pipeline(
    root: str | Path,
    *,
    seed: int = 0,
    with_t5: bool = True,
    with_vae: bool = True,
    sample_size: int = 8,
    max_length: int = 16,
    max_sequence_length: int | None = None,
) -> Path:
    """Build a randomly initialised tiny SD3 pipeline and save it under ``root``; returns ``root``.

    ``sample_size``: the latent side (even: patch size 2; images are twice that with the VAE).
    ``max_length``: the first CLIP tokenizer's window (SD3: 77). ``with_t5=False``: no third text
    encoder (``[null, null]``, which SD3's pipeline supports: zeros instead of T5). Without a VAE the
    directory is a pixel-space RGB model for fastdense (3 channels, class ``FastdensePixelSD3Pipeline``).
    ``max_sequence_length``: written to ``fastdense.json`` for fastdense's encoder (the pipeline takes
    it as a call argument). The same ``seed`` gives the same weights.
    """
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 2 or sample_size % 2:
        raise FastdenseError(f"sample_size={sample_size!r} is not allowed; allowed: an even int >= 2")
    if sample_size > 2 * _POS_EMBED_MAX:
        raise FastdenseError(f"sample_size={sample_size!r} is not allowed; allowed: at most {2 * _POS_EMBED_MAX}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise FastdenseError(f"max_length={max_length!r} is not allowed; allowed: an int >= 4")
    if max_sequence_length is not None:
        from fastdense.models.sd3 import _check_max_sequence_length

        _check_max_sequence_length(max_sequence_length)

    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fastdense.models.tiny_flux import write_t5_tokenizer  # the one offline T5 tokenizer builder
    from fastdense.testing import tiny_vae, write_clip_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    channels = 16 if with_vae else 3
    tokenizer = write_clip_tokenizer(root / "tokenizer", words=TINY_SD3_WORDS, max_length=max_length)
    # the same words in the other order: other token ids (a swapped tokenizer shows)
    tokenizer_2 = write_clip_tokenizer(root / "tokenizer_2", words=TINY_SD3_WORDS[::-1], max_length=max_length + 4)
    tokenizer_2.pad_token = "!"  # as SD3's (and SDXL's) second tokenizer
    tokenizer_3 = write_t5_tokenizer(root / "tokenizer_3", TINY_SD3_WORDS) if with_t5 else None

    def clip_config(tok, hidden: int) -> CLIPTextConfig:
        vocab = tok.get_vocab()
        return CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=3,  # the penultimate layer is not the first
            num_attention_heads=2,
            max_position_embeddings=tok.model_max_length,
            projection_dim=hidden,
            hidden_act="gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=channels,
            out_channels=channels,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TINY_SD3_JOINT_DIM,
            caption_projection_dim=16,  # = heads · head dim
            pooled_projection_dim=TINY_SD3_POOLED,
            pos_embed_max_size=_POS_EMBED_MAX,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer, TINY_SD3_HIDDEN))
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, TINY_SD3_HIDDEN_2))
        text_encoder_3 = None
        if with_t5:
            torch.manual_seed(seed + 3)
            text_encoder_3 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer_3.get_vocab()),
                    d_model=TINY_SD3_JOINT_DIM,
                    d_kv=8,
                    d_ff=64,
                    num_layers=2,
                    num_heads=2,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=32,
                    dropout_rate=0.0,
                    pad_token_id=tokenizer_3.pad_token_id,
                    eos_token_id=tokenizer_3.eos_token_id,
                    decoder_start_token_id=tokenizer_3.pad_token_id,
                )
            )
        vae = None
        if with_vae:
            torch.manual_seed(seed + 4)
            vae = tiny_vae(channels, sample_size=sample_size * 2, block_out_channels=(8, 16), norm_num_groups=8,
                           use_quant_conv=False, use_post_quant_conv=False,  # as SD3's VAE
                           shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(str(root))
    if vae is None:
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = "FastdensePixelSD3Pipeline"  # not loadable by diffusers: no VAE to decode with
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if max_sequence_length is not None:
        (root / "fastdense.json").write_text(json.dumps({"max_sequence_length": max_sequence_length}) + "\n")
    return root
