"""A tiny FLUX.1-shaped pipeline for tests and CPU runs, built offline by hand (nothing is downloaded).

:func:`build_tiny_flux_pipeline` writes a real ``FluxPipeline`` (``save_pretrained``), so the same
directory loads with ``FluxPipeline.from_pretrained`` and with fastdense's ``load_pipeline_parts``,
the code path a user's FLUX.1 directory takes::

    model_index.json
    transformer/     FluxTransformer2DModel (1 double + 1 single block, 2 heads of 16; guidance embeds)
    text_encoder/    CLIPTextModel (hidden 32: the pooled projection input)
    tokenizer/       CLIPTokenizer (16 tokens)
    text_encoder_2/  T5EncoderModel (d_model 48: the token embeddings)
    tokenizer_2/     T5 tokenizer (Unigram, built with ``tokenizers``; :func:`write_t5_tokenizer`)
    vae/             AutoencoderKL (scale factor 2; FLUX-style shift and scaling factors)
    scheduler/       FlowMatchEulerDiscreteScheduler with FLUX.1-dev's dynamic shifting

Latents have ``latent_channels`` channels (FLUX.1: 16); the transformer sees them packed in 2×2
patches, ``in_channels = 4 · latent_channels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fastdense.errors import FastdenseError

__all__ = ["T5_SPECIAL_TOKENS", "TINY_T5_WORDS", "build_tiny_flux_pipeline", "write_t5_tokenizer"]

#: T5's special tokens with the ids every T5 checkpoint gives them (pad 0, eos 1, unk 2)
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
#: words the tiny T5 tokenizer knows whole (anything else is spelt out in characters)
TINY_T5_WORDS = ("a", "an", "the", "of", "and", "on", "in", "photo", "red", "green", "blue", "cat", "dog", "car")
TINY_CLIP_WORDS = ("a", "the", "of", "photo", "red", "green", "blue", "cat", "dog", "car")
TINY_T5_DIM = 48
TINY_CLIP_DIM = 32
TINY_CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length default


def write_t5_tokenizer(directory: str | Path, words: Sequence[str] = TINY_T5_WORDS, *,
                       max_length: int = T5_MAX_LENGTH):
    """A small T5 (SentencePiece-Unigram) tokenizer saved in ``directory``; returns it loaded back.

    Vocabulary: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5, the word-start marker ``▁``, each of
    ``words`` as one piece ``▁word``, then every printable ASCII character (so any ASCII prompt
    tokenizes, spelt out where no word fits); no sentinel ``<extra_id_*>`` tokens. Encoding appends
    ``</s>`` like T5. Built with the ``tokenizers`` library through transformers' T5 tokenizer class
    (``T5TokenizerFast`` is that class in transformers 5), then ``save_pretrained`` and loaded again,
    so the directory holds what the installed transformers writes for a T5 tokenizer.
    """
    from transformers import T5TokenizerFast

    if max_length < 2:
        raise FastdenseError(f"max_length={max_length} is not allowed; allowed: >= 2")
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in T5_SPECIAL_TOKENS]
    pieces.append(("▁", -2.0))
    seen = {token for token, _ in pieces}
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise FastdenseError(f"T5 tokenizer word {word!r} is not allowed; allowed: non-empty, no spaces")
        if "▁" + word not in seen:
            seen.add("▁" + word)
            pieces.append(("▁" + word, -1.0))  # a known word scores above its spelling
    for code in range(33, 127):
        if chr(code) not in seen:
            seen.add(chr(code))
            pieces.append((chr(code), -5.0))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


def build_tiny_flux_pipeline(
    root: str | Path,
    *,
    seed: int = 0,
    latent_channels: int = 4,
    guidance_embeds: bool = True,
) -> Path:
    """Build a randomly initialised tiny FLUX.1 pipeline and save it under ``root``; returns ``root``.

    ``guidance_embeds=True`` is FLUX.1-dev's shape (the guidance weight is a model input), False
    FLUX.1-schnell's (its scheduler has no dynamic shifting either, shift 1). The VAE's scale factor
    is 2, so an image of ``h`` pixels has latents of ``2·(h // 4)`` and ``(h/4)²`` image tokens. The
    same ``seed`` gives the same weights.
    """
    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
        raise FastdenseError(f"latent_channels={latent_channels!r} is not allowed; allowed: an int >= 1")

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fastdense.testing import tiny_vae, write_clip_tokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # the tokenizers are written first: the text encoders' vocabulary sizes and special ids come from them
    clip_tokenizer = write_clip_tokenizer(root / "tokenizer", words=TINY_CLIP_WORDS, max_length=TINY_CLIP_MAX_LENGTH)
    t5_tokenizer = write_t5_tokenizer(root / "tokenizer_2")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2×2 packed latents
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_T5_DIM,
            pooled_projection_dim=TINY_CLIP_DIM,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        torch.manual_seed(seed + 1)
        eos = clip_tokenizer.convert_tokens_to_ids(clip_tokenizer.eos_token)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=TINY_CLIP_DIM,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_CLIP_MAX_LENGTH,
                bos_token_id=clip_tokenizer.convert_tokens_to_ids(clip_tokenizer.bos_token),
                eos_token_id=eos,
                pad_token_id=eos,
                projection_dim=TINY_CLIP_DIM,
            )
        )
        torch.manual_seed(seed + 2)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=TINY_T5_DIM,
                d_kv=12,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
                is_encoder_decoder=False,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed + 3)
        vae = tiny_vae(latent_channels, sample_size=32, use_quant_conv=False,  # FLUX's VAE has neither
                       use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's values
    if guidance_embeds:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
            base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(str(root))
    return root
