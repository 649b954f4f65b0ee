"""Adapters for learned reward models: ImageReward, HPSv2, PickScore, LAION aesthetic.

Nothing is downloaded: each adapter loads from a local path (constructor argument or
environment variable) and fails at construction with a one-line
:class:`~fastdense.errors.FastdenseError` naming the package to install or the
weights to provide. Loading (``load_*`` functions) is separate from scoring: every
adapter also accepts already-built components (``model=``, ``tokenizer=``, ...),
which is how tests inject tiny stand-ins.

- ``imagereward``: package ``image-reward`` (``pip install 'fastdense[imagereward]'``);
  ``path`` = ``ImageReward.pt`` or a directory holding it and ``med_config.json``
  (env ``FASTDENSE_IMAGEREWARD_PATH``); plus the ``bert-base-uncased`` tokenizer in
  the Hugging Face cache (the package loads it by name).
- ``hpsv2``: package ``open-clip-torch`` (``pip install 'fastdense[hpsv2]'``);
  ``path`` = ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``
  (env ``FASTDENSE_HPSV2_PATH``).
- ``pickscore``: transformers only; ``path`` = a ``save_pretrained`` directory of
  ``yuvalkirstain/PickScore_v1`` (env ``FASTDENSE_PICKSCORE_PATH``) holding, or with
  ``processor_path`` (env ``FASTDENSE_PICKSCORE_PROCESSOR_PATH``) pointing to, the
  tokenizer and ``preprocessor_config.json`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- ``laion_aesthetic``: transformers only; ``path`` = the MLP head
  ``sac+logos+ava1-l14-linearMSE.pth`` (env ``FASTDENSE_LAION_AESTHETIC_PATH``; the v1
  linear probe also loads), ``clip_path`` = a directory of
  ``openai/clip-vit-large-patch14`` (env ``FASTDENSE_LAION_AESTHETIC_CLIP_PATH``).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdense.errors import FastdenseError, one_line
from fastdense.rewards.base import BaseReward

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AestheticHead",
    "ClipPreprocess",
    "HPSv2Reward",
    "ImageRewardReward",
    "LaionAestheticReward",
    "PickScoreReward",
    "load_aesthetic_head",
    "load_hpsv2",
    "load_imagereward",
    "load_laion_aesthetic",
    "load_pickscore",
]

#: OpenAI CLIP normalisation (also used by open_clip's ViT-H-14, HPSv2, BLIP/ImageReward).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- helpers


def _require(module: str, *, reward: str, package: str, extra: str | None) -> Any:
    how = f"pip install 'fastdense[{extra}]'" if extra else f"pip install {package}"
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing is None or missing.split(".")[0] == module.split(".")[0]:
            raise FastdenseError(f"the {reward} reward needs the '{package}' package: {how}") from None
        raise FastdenseError(
            f"the {reward} reward: the installed '{package}' package failed to import ({one_line(exc)}); "
            f"reinstall it with {how} in an environment with versions it supports"
        ) from None


def _resolve_path(path: str | os.PathLike | None, env_var: str, *, reward: str, what: str) -> Path:
    if path is None or str(path) == "":
        path = os.environ.get(env_var) or None
    if path is None:
        raise FastdenseError(f"the {reward} reward needs {what}: pass path=... or set {env_var}")
    p = Path(path).expanduser()
    if not p.exists():
        raise FastdenseError(f"the {reward} reward: {what} not found at {p} (pass path=... or set {env_var})")
    return p


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise FastdenseError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _features(out: Any) -> Tensor:
    """Embedding from ``get_*_features``: a tensor (transformers 4) or an output whose
    ``pooler_output`` holds the projected embedding (transformers 5)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out[0]


def _load_state_dict(path: Path, *, reward: str) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files: say which file
        raise FastdenseError(f"the {reward} reward cannot read {path}: {one_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FastdenseError(f"the {reward} reward: {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


# --------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ClipPreprocess:
    """CLIP-style preprocessing on tensors, as ``CLIPImageProcessor`` / open_clip do it:
    resize so the short side is ``size`` (bicubic, antialiased), centre-crop to
    ``crop = (height, width)``, normalise with ``mean`` / ``std``.

    Input ``[B, 3, H, W]`` in [0, 1]; output float32 on the input's device. Works on
    tensors (no PIL round trip), so it differs from the PIL pipelines only by
    resampling rounding.
    """

    size: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.crop[0] > self.size or self.crop[1] > self.size:
            raise FastdenseError(f"CLIP preprocessing: crop {self.crop} larger than resize {self.size}")

    @classmethod
    def square(cls, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> ClipPreprocess:
        return cls(int(size), (int(size), int(size)), tuple(mean), tuple(std))

    @classmethod
    def from_config_file(cls, path: Path, default_size: int) -> ClipPreprocess:
        """From a ``preprocessor_config.json`` (HF image processor), else the defaults."""
        if not path.is_file():
            return cls.square(default_size)
        cfg = json.loads(path.read_text())
        size = cfg.get("size", default_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", default_size), size.get("width", default_size))
        crop = cfg.get("crop_size", size) if cfg.get("do_center_crop", True) else size
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        return cls(
            int(size),
            (int(crop[0]), int(crop[1])),
            tuple(cfg.get("image_mean", CLIP_MEAN)),
            tuple(cfg.get("image_std", CLIP_STD)),
        )

    def __call__(self, images: Tensor) -> Tensor:
        images = images.float()
        h, w = images.shape[-2:]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)
        new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
        if (new_h, new_w) != (h, w):
            images = F.interpolate(
                images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
        ch, cw = self.crop
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        images = images[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=images.device)[:, None, None]
        std = torch.tensor(self.std, device=images.device)[:, None, None]
        return (images - mean) / std


def _clip_image_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    vision = getattr(cfg, "vision_config", None)
    return int(getattr(vision, "image_size", 224))


def _load_clip(path: Path, *, reward: str) -> nn.Module:
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FastdenseError(f"the {reward} reward cannot load a CLIP model from {path}: {one_line(exc)}") from None


def _load_tokenizer(path: Path, *, reward: str, hint: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise FastdenseError(
            f"the {reward} reward cannot load a tokenizer from {path} ({hint}): {one_line(exc)}"
        ) from None


# ------------------------------------------------------------------------ PickScore


def load_pickscore(
    path: str | os.PathLike | None = None, processor_path: str | os.PathLike | None = None
) -> tuple[nn.Module, Any, ClipPreprocess]:
    """``(CLIPModel, tokenizer, preprocess)`` from local directories (see module doc)."""
    _require("transformers", reward="pickscore", package="transformers", extra=None)
    model_dir = _resolve_path(
        path,
        PickScoreReward.env_var,
        reward="pickscore",
        what="a local copy of yuvalkirstain/PickScore_v1 (a CLIPModel directory)",
    )
    proc = processor_path or os.environ.get(PickScoreReward.processor_env_var) or model_dir
    proc_dir = _resolve_path(
        proc,
        PickScoreReward.processor_env_var,
        reward="pickscore",
        what="the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    )
    model = _load_clip(model_dir, reward="pickscore")
    tokenizer = _load_tokenizer(
        proc_dir,
        reward="pickscore",
        hint="save the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor there or set "
        + PickScoreReward.processor_env_var,
    )
    preprocess = ClipPreprocess.from_config_file(proc_dir / "preprocessor_config.json", _clip_image_size(model))
    return model, tokenizer, preprocess


class PickScoreReward(BaseReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image_emb, text_emb)``
    of a CLIP ViT-H/14 fine-tuned on Pick-a-Pic. Typical values are around 20."""

    name = "pickscore"
    env_var = "FASTDENSE_PICKSCORE_PATH"
    processor_env_var = "FASTDENSE_PICKSCORE_PROCESSOR_PATH"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        processor_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        dtype: torch.dtype | str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        preprocess: ClipPreprocess | None = None,
    ):
        super().__init__(device, batch_size)
        if model is None:
            model, tokenizer, loaded = load_pickscore(path, processor_path)
            preprocess = preprocess or loaded
        elif tokenizer is None:
            raise FastdenseError("PickScoreReward(model=...) also needs tokenizer=...")
        self.model = _prepare(model, self.device, _dtype(dtype))
        self.tokenizer = tokenizer
        self.preprocess = preprocess or ClipPreprocess.square(_clip_image_size(model))
        max_pos = int(getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77))
        self.max_length = min(int(getattr(tokenizer, "model_max_length", max_pos) or max_pos), max_pos)

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(_param_dtype(self.model))
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        image_emb = _features(self.model.get_image_features(pixel_values=pixels))
        text_emb = _features(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
        )
        image_emb = F.normalize(image_emb.float(), dim=-1)
        text_emb = F.normalize(text_emb.float(), dim=-1)
        return self.model.logit_scale.float().exp() * (image_emb * text_emb).sum(-1)


# -------------------------------------------------------------------------- HPSv2


def load_hpsv2(path: str | os.PathLike | None = None, arch: str = "ViT-H-14") -> tuple[nn.Module, Any, ClipPreprocess]:
    """``(open_clip model, tokenizer, preprocess)`` from an HPS v2 / v2.1 checkpoint."""
    open_clip = _require("open_clip", reward="hpsv2", package="open-clip-torch", extra="hpsv2")
    file = _resolve_path(
        path,
        HPSv2Reward.env_var,
        reward="hpsv2",
        what="the HPS v2 checkpoint (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt)",
    )
    try:
        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    except RuntimeError as exc:
        raise FastdenseError(f"the hpsv2 reward: open_clip cannot build {arch!r}: {one_line(exc)}") from None
    try:
        model.load_state_dict(_load_state_dict(file, reward="hpsv2"))
    except RuntimeError as exc:
        raise FastdenseError(f"the hpsv2 reward: {file} is not an {arch} HPS checkpoint: {one_line(exc)}") from None
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model, open_clip.get_tokenizer(arch), ClipPreprocess.square(int(size))


class HPSv2Reward(BaseReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine similarity of the
    image and prompt embeddings of an open_clip ViT-H/14 fine-tuned on HPD v2
    (the ``hpsv2`` package's score). Typical values are 0.2-0.35."""

    name = "hpsv2"
    env_var = "FASTDENSE_HPSV2_PATH"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        arch: str = "ViT-H-14",
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        dtype: torch.dtype | str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        preprocess: ClipPreprocess | None = None,
    ):
        super().__init__(device, batch_size)
        if model is None:
            model, tokenizer, loaded = load_hpsv2(path, arch)
            preprocess = preprocess or loaded
        elif tokenizer is None:
            raise FastdenseError("HPSv2Reward(model=...) also needs tokenizer=...")
        self.model = _prepare(model, self.device, _dtype(dtype))
        self.tokenizer = tokenizer
        self.preprocess = preprocess or ClipPreprocess.square(224)

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(_param_dtype(self.model))
        tokens = self.tokenizer(prompts).to(self.device)
        image_emb = F.normalize(_features(self.model.encode_image(pixels)).float(), dim=-1)
        text_emb = F.normalize(_features(self.model.encode_text(tokens)).float(), dim=-1)
        return (image_emb * text_emb).sum(-1)


# ------------------------------------------------------------------ LAION aesthetic


class AestheticHead(nn.Module):
    """The MLP of LAION's improved aesthetic predictor (v2); its state-dict keys
    (``layers.0`` ... ``layers.7``) match the released ``.pth`` files."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def load_aesthetic_head(path: str | os.PathLike) -> nn.Module:
    """The v2 MLP (``layers.*`` keys) or the v1 linear probe (``weight``/``bias``)."""
    state = _load_state_dict(Path(path), reward="laion_aesthetic")
    if "layers.0.weight" in state:
        head: nn.Module = AestheticHead(int(state["layers.0.weight"].shape[1]))
    elif set(state) == {"weight", "bias"} and state["weight"].shape[0] == 1:
        head = nn.Linear(int(state["weight"].shape[1]), 1)
    else:
        raise FastdenseError(
            f"the laion_aesthetic reward: {path} is neither the MLP head (layers.* keys) nor a linear probe"
        )
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise FastdenseError(f"the laion_aesthetic reward: bad head weights in {path}: {one_line(exc)}") from None
    return head


def load_laion_aesthetic(
    path: str | os.PathLike | None = None, clip_path: str | os.PathLike | None = None
) -> tuple[nn.Module, nn.Module, ClipPreprocess]:
    """``(CLIPModel, head, preprocess)`` from local files (see module doc)."""
    _require("transformers", reward="laion_aesthetic", package="transformers", extra=None)
    head_file = _resolve_path(
        path,
        LaionAestheticReward.env_var,
        reward="laion_aesthetic",
        what="the aesthetic MLP head (sac+logos+ava1-l14-linearMSE.pth)",
    )
    clip_dir = _resolve_path(
        clip_path,
        LaionAestheticReward.clip_env_var,
        reward="laion_aesthetic",
        what="a local copy of openai/clip-vit-large-patch14 (pass clip_path=...)",
    )
    head = load_aesthetic_head(head_file)
    model = _load_clip(clip_dir, reward="laion_aesthetic")
    preprocess = ClipPreprocess.from_config_file(clip_dir / "preprocessor_config.json", _clip_image_size(model))
    return model, head, preprocess


class LaionAestheticReward(BaseReward):
    """LAION aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image
    embedding, predicting a 1-10 rating. Prompts are ignored."""

    name = "laion_aesthetic"
    env_var = "FASTDENSE_LAION_AESTHETIC_PATH"
    clip_env_var = "FASTDENSE_LAION_AESTHETIC_CLIP_PATH"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        clip_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        dtype: torch.dtype | str | None = None,
        *,
        model: nn.Module | None = None,
        head: nn.Module | None = None,
        preprocess: ClipPreprocess | None = None,
    ):
        super().__init__(device, batch_size)
        if model is None:
            model, head, loaded = load_laion_aesthetic(path, clip_path)
            preprocess = preprocess or loaded
        elif head is None:
            raise FastdenseError("LaionAestheticReward(model=...) also needs head=...")
        self.model = _prepare(model, self.device, _dtype(dtype))
        self.head = head.to(self.device, torch.float32).eval().requires_grad_(False)
        self.preprocess = preprocess or ClipPreprocess.square(_clip_image_size(model))

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = self.preprocess(images).to(_param_dtype(self.model))
        emb = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        return self.head(emb).squeeze(-1)


# --------------------------------------------------------------------- ImageReward


def load_imagereward(path: str | os.PathLike | None = None, med_config: str | os.PathLike | None = None) -> nn.Module:
    """The ``ImageReward`` package's model from a local checkpoint (see module doc)."""
    rm = _require("ImageReward", reward="imagereward", package="image-reward", extra="imagereward")
    p = _resolve_path(
        path,
        ImageRewardReward.env_var,
        reward="imagereward",
        what="ImageReward.pt (or a directory holding it and med_config.json)",
    )
    ckpt = p / "ImageReward.pt" if p.is_dir() else p
    med = Path(med_config) if med_config else ckpt.parent / "med_config.json"
    for f, what in ((ckpt, "ImageReward.pt"), (med, "med_config.json")):
        if not f.is_file():
            raise FastdenseError(
                f"the imagereward reward: {what} not found at {f} "
                f"(download both from THUDM/ImageReward; set {ImageRewardReward.env_var})"
            )
    try:
        return rm.load(str(ckpt), device="cpu", med_config=str(med))
    except OSError as exc:
        raise FastdenseError(
            "the imagereward reward needs the bert-base-uncased tokenizer in the Hugging Face cache "
            f"(fetch it once online with transformers.BertTokenizer.from_pretrained): {one_line(exc)}"
        ) from None


class ImageRewardReward(BaseReward):
    """ImageReward (Xu et al. 2023): BLIP image-text features -> MLP, standardised
    with the released mean/std (the package's ``ImageReward.score``), batched over
    pairs with different prompts. Takes PIL images (its own preprocessing)."""

    name = "imagereward"
    needs_pil = True
    env_var = "FASTDENSE_IMAGEREWARD_PATH"
    max_length = 35  # as ImageReward.score tokenises

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        med_config: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        dtype: torch.dtype | str | None = None,
        *,
        model: nn.Module | None = None,
    ):
        super().__init__(device, batch_size)
        if model is None:
            model = load_imagereward(path, med_config)
        self.model = _prepare(model, self.device, _dtype(dtype))
        self.model.mlp.float()  # the package runs its head in float32
        if hasattr(self.model, "device"):
            self.model.device = self.device  # the package's own methods read it

    def score_batch(self, images: list, prompts: list[str]) -> Tensor:
        m = self.model
        pixels = torch.stack([m.preprocess(im) for im in images]).to(self.device, _param_dtype(m.blip))
        text = m.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        image_embeds = m.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(
            text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        features = out.last_hidden_state[:, 0, :].float()
        return ((m.mlp(features) - float(m.mean)) / float(m.std)).squeeze(-1)
