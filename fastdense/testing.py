"""Stand-in models for tests and CPU benchmarks, built offline by hand (nothing is downloaded).

- :func:`clip_bpe` / :func:`write_clip_tokenizer`: a byte-level CLIP BPE tokenizer from a word
  list and merges (the toy world's tokenizer is built with it too, :mod:`fastdense.toy.model`);
- :func:`build_tiny_pipeline`: a tiny Stable-Diffusion-shaped pipeline in diffusers layout, which
  loads through exactly the code path a user's Stable Diffusion directory takes
  (``load_pipeline_parts``; also ``StableDiffusionPipeline.from_pretrained`` when it has a VAE).

Layout written by :func:`build_tiny_pipeline` into ``dir``::

    model_index.json
    unet/            UNet2DConditionModel (2 levels, 32/64 channels)
    text_encoder/    CLIPTextModel (hidden 32, 2 layers)
    tokenizer/       CLIPTokenizer (vocab.json, merges.txt, ...)
    scheduler/       DDIMScheduler, SD1.5 schedule (scaled_linear 0.00085..0.012, steps_offset 1)
    vae/             AutoencoderKL (2 levels: scale factor 2), only when ``with_vae``
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fastdense.errors import FastdenseError

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_HIDDEN",
    "TINY_MAX_LENGTH",
    "build_tiny_pipeline",
    "clip_bpe",
    "random_lora",
    "tiny_vocab_and_merges",
    "write_bpe_files",
    "write_clip_tokenizer",
]

#: Token sequence length of the tiny tokenizer (SD uses 77; 16 keeps the model tiny).
TINY_MAX_LENGTH = 16
TINY_HIDDEN = 32
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

# A few merges so that common words are more than a string of characters.
_MERGES = [
    ("c", "a"),
    ("ca", "t</w>"),
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("o", "n</w>"),
    ("a", "t</w>"),
    ("e", "r"),
    ("r", "e"),
    ("o", "r"),
    ("e", "d</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("r", "ed</w>"),
]


def clip_bpe(words: Sequence[str] = (), merges: Sequence[tuple[str, str]] = ()
             ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary and its merges: the two specials, printable ASCII (plain
    and end-of-word), the tokens of ``merges`` (in order), then merges that make every word of
    ``words`` one token.

    Those merges build each word left to right; a word that an earlier merge splits differently
    gets extra merges for the pieces it was split into, until every word is a single token
    (checked against the real tokenizer). The same inputs give the same vocabulary, ids included.
    """
    vocab: dict[str, int] = {}
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    def merge(left: str, right: str) -> None:
        if (left, right) not in seen:
            seen.add((left, right))
            out.append((left, right))
        add(left + right)

    def chain(pieces: list[str]) -> None:
        left = pieces[0]
        for piece in pieces[1:]:
            merge(left, piece)
            left = left + piece

    for token in SPECIAL_TOKENS:
        add(token)
    for code in range(33, 127):  # ByteLevel maps printable ASCII to itself
        add(chr(code))
    for code in range(33, 127):
        add(chr(code) + "</w>")
    for left, right in merges:
        merge(left, right)
    for word in words:
        chain([*word[:-1], word[-1] + "</w>"])
    if not words:
        return vocab, out

    from transformers import CLIPTokenizer

    for _ in range(len(words) + 1):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(out), model_max_length=16)
        split = [pieces for pieces in (tokenizer.tokenize(w) for w in words) if len(pieces) > 1]
        if not split:
            return vocab, out
        for pieces in split:
            chain(pieces)
    raise RuntimeError(f"could not make every word of {list(words)} a single token")  # pragma: no cover


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The tiny pipeline's vocabulary: :func:`clip_bpe` with a few merges of common English
    words; merges as ``"left right"`` lines."""
    vocab, merges = clip_bpe(merges=_MERGES)
    return vocab, [f"{left} {right}" for left, right in merges]


def write_bpe_files(directory: str | Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]]
                    ) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` (the classic CLIP tokenizer files) in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n")
    merges_file.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_file, merges_file


def write_clip_tokenizer(directory: str | Path, words: Sequence[str] = (), merges: Sequence[tuple[str, str]] = (),
                         max_length: int = TINY_MAX_LENGTH):
    """A :func:`clip_bpe` tokenizer saved in ``directory`` the way a hub tokenizer directory is
    (vocab.json, merges.txt, tokenizer_config.json, then ``save_pretrained``); returns it loaded."""
    directory = Path(directory)
    write_bpe_files(directory, *clip_bpe(words, merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    from transformers import CLIPTokenizer

    # Loaded from the hand-written files (as any SD tokenizer directory is) and saved
    # again so the directory also holds whatever the installed transformers writes.
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def tiny_vae(latent_channels: int, *, sample_size: int, block_out_channels: tuple[int, int] = (32, 32),
             norm_num_groups: int = 32, **family):
    """The tiny test pipelines' AutoencoderKL: two levels (scale factor 2), one layer per block;
    ``family``: the family's own keys (shift / scaling factors, no quant convs). Seed before calling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        **family,
    )


def build_tiny_pipeline(
    dir: str | Path,
    *,
    sample_size: int = 8,
    in_channels: int = 4,
    with_vae: bool = True,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Build a randomly initialised tiny SD-style pipeline and save it under ``dir``.

    ``sample_size`` is the latent side (the image side is ``sample_size * 2`` with a
    VAE, ``sample_size`` without). ``with_vae=False`` gives a pixel-space model (the
    decoder is the identity; use ``in_channels=3`` to decode it to RGB). The same
    ``seed`` gives the same weights. Returns the directory.
    """
    if sample_size < 4 or sample_size % 2:
        raise FastdenseError(f"sample_size={sample_size} is not allowed; allowed: an even number >= 4")
    if in_channels < 1:
        raise FastdenseError(f"in_channels={in_channels} is not allowed; allowed: >= 1")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise FastdenseError(f"prediction_type={prediction_type!r} is not allowed; allowed: epsilon, v_prediction")

    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    vocab, _ = tiny_vocab_and_merges()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_HIDDEN,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=TINY_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_MAX_LENGTH,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
                projection_dim=TINY_HIDDEN,
            )
        )
        vae = None
        if with_vae:
            torch.manual_seed(seed + 2)
            vae = tiny_vae(in_channels, sample_size=sample_size * 2)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )

    unet.save_pretrained(str(root / "unet"))
    text_encoder.save_pretrained(str(root / "text_encoder"))
    write_clip_tokenizer(root / "tokenizer", merges=_MERGES)
    scheduler.save_pretrained(str(root / "scheduler"))
    if vae is not None:
        vae.save_pretrained(str(root / "vae"))

    from fastdense.models.loading import write_model_index

    write_model_index(root, with_vae=vae is not None)
    return root


def random_lora(model_dir: str | Path, out: str | Path, *, seed: int = 0, rank: int = 4,
                targets: Sequence[str] = ("to_q", "to_v", "conv_out")) -> Path:
    """A LoRA for the UNet of ``model_dir`` whose B matrices are random (peft starts them at zero),
    so the adapted model differs from the base; saved to ``out`` in diffusers format."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from fastdense.lora import save_lora

    unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(targets)))
    save_lora(unet, out)
    return Path(out)
