"""Loading the parts of a text-to-image pipeline that fastdense needs.

``load_pipeline_parts`` reads a local directory in diffusers layout (what
``save_pretrained`` writes: ``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, optionally ``vae/``) or a hub id where the hub is
reachable. Component classes come from ``model_index.json``; classes outside
diffusers / transformers (custom code) load only with ``trust_remote_code=True``.
A missing or malformed directory is a one-line ``FastdenseError`` naming the part.

The pipeline class (``model_index.json``'s ``_class_name``) names the model family
(:mod:`fastdense.models.families`: SD 1.x/2.x, SDXL, SD3, FLUX); an unknown class is a one-line
error listing the supported ones, and each family's own components are loaded (second and third
text encoders, a transformer instead of a UNet).

``lora=DIR`` puts a LoRA adapter onto the denoiser with :func:`fastdense.lora.load_lora`
(``load_lora``, ``has_adapters`` and ``adapters_disabled`` are re-exported here).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError
from fastdense.lora import LORA_WEIGHT_NAMES, adapters_disabled, has_adapters, load_lora  # noqa: F401 (re-exports)

if TYPE_CHECKING:
    import torch

REQUIRED_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")  # of the SD family (see families.py)
TRUSTED_LIBRARIES = ("diffusers", "transformers")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*_config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",
    "unet/diffusion_pytorch_model*.safetensors*",
    "transformer/diffusion_pytorch_model*.safetensors*",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model*.safetensors*",
    "text_encoder_3/model*.safetensors*",
]


@dataclass
class PipelineParts:
    """What the sampler, trainer and evaluator need from a text-to-image pipeline.

    ``unet`` is the denoiser whatever the family (a UNet, or SD3's / FLUX's transformer; also
    :attr:`denoiser`). ``vae`` is None for pixel-space models (the decoder is the identity and
    ``vae_scale_factor`` is 1). ``scheduler_config`` is the scheduler's config dict
    as saved (any scheduler class); ``make_scheduler()`` gives the DDIM scheduler
    that fastdense samples SD-family models with, built from it. ``family`` names the model
    family (:mod:`fastdense.models.families`); ``extra`` holds its other components by their
    ``model_index.json`` names (``tokenizer_2``, ``text_encoder_2``, ...; None when absent).
    """

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any | None
    scheduler_config: dict[str, Any]
    vae_scale_factor: int
    latent_channels: int
    latent_size: tuple[int, int]
    model_path: Path | None = None
    dtype: Any = None
    device: Any = None
    lora_paths: list[Path] = field(default_factory=list)
    family: str = "sd"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> Any:
        """The model that is denoised through (``unet``: a UNet or a transformer)."""
        return self.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        return (self.latent_channels, *self.latent_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of a decoded image."""
        return (self.latent_size[0] * self.vae_scale_factor, self.latent_size[1] * self.vae_scale_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))

    def make_scheduler(self):
        """A ``DDIMScheduler`` from the saved scheduler config (SD ships PNDM: same schedule)."""
        from diffusers import DDIMScheduler

        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        return DDIMScheduler.from_config(config)


# ---------------------------------------------------------------------------
# Directory checks


def write_model_index(root: Path, *, with_vae: bool) -> None:
    """The ``model_index.json`` of an SD-layout directory we write (tiny test pipelines, toy models).
    Without a VAE it is not loadable by StableDiffusionPipeline; fastdense loads it as pixel-space."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline" if with_vae else "FastdensePixelPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"] if with_vae else [None, None],
    }
    (Path(root) / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; a one-line FastdenseError starting with ``what`` when it is missing or bad."""
    if not path.is_file():
        raise FastdenseError(f"{what}: {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FastdenseError(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FastdenseError(f"{what}: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _component_entry(index: dict[str, Any], name: str, root: Path) -> tuple[str, str] | None:
    entry = index.get(name)
    if entry is None:
        return None
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
        raise FastdenseError(f"{root / 'model_index.json'}: entry {name!r} must be [library, class], got {entry!r}")
    if entry[0] is None or entry[1] is None:
        return None
    return str(entry[0]), str(entry[1])


def _config_file(root: Path, name: str) -> Path:
    if name == "scheduler":
        return root / name / "scheduler_config.json"
    if name.startswith("tokenizer"):
        return root / name / "tokenizer_config.json"
    return root / name / "config.json"


def check_pipeline_dir(root: Path) -> dict[str, Any]:
    """Validate a diffusers-layout directory of a supported family; returns its ``model_index.json``."""
    from fastdense.models.families import family_of_pipeline

    if not root.exists():
        raise FastdenseError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise FastdenseError(f"model {root} is not a directory (expected a diffusers pipeline directory)")
    index = read_json_object(root / "model_index.json", "not a diffusers pipeline directory")
    family = family_of_pipeline(index.get("_class_name"), f"model {root}: model_index.json")
    for name in family.components:
        entry = _component_entry(index, name, root)
        if entry is None:
            if name in family.required:
                raise FastdenseError(f"model {root}: model_index.json names no {name!r} component")
            continue
        if not (root / name).is_dir():
            raise FastdenseError(f"model {root}: the {name}/ directory is missing")
        if name.startswith("tokenizer"):
            if not any((root / name / f).is_file() for f in ("tokenizer_config.json", "vocab.json", "tokenizer.json")):
                raise FastdenseError(f"model {root}: tokenizer/ holds no tokenizer files")
            continue
        read_json_object(_config_file(root, name), f"model {root}: bad {name} config")
    return index


def _resolve_model(model: str | Path, *, revision: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if isinstance(model, Path) or not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FastdenseError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as err:  # network, auth, offline mode, unknown repo
        msg = " ".join(str(err).split())[:300]
        raise FastdenseError(
            f"model {text!r} is not a local directory and could not be fetched from the hub ({msg})"
        ) from None
    return Path(local)


def _component_class(library: str, class_name: str, name: str, trust_remote_code: bool):
    if library not in TRUSTED_LIBRARIES and not trust_remote_code:
        raise FastdenseError(
            f"component {name!r} is {library}.{class_name}, outside diffusers/transformers; "
            "pass trust_remote_code=True (--trust-remote-code) if you trust this model's code"
        )
    try:
        module = importlib.import_module(library)
        return getattr(module, class_name)
    except (ImportError, AttributeError) as err:
        raise FastdenseError(f"component {name!r}: cannot import {library}.{class_name} ({err})") from None


def _load_component(cls, root: Path, name: str, **kwargs):
    try:
        return cls.from_pretrained(str(root / name), **kwargs)
    except FastdenseError:
        raise
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise FastdenseError(f"model {root}: cannot load {name}/ ({type(err).__name__}: {msg})") from None


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No per-file "Loading weights" bars from transformers / diffusers while we load (restored after)."""
    toggles = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "is_progress_bar_enabled") and mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            toggles.append(mod)
    try:
        yield
    finally:
        for mod in toggles:
            mod.enable_progress_bar()


def _load_modules(
    root: Path, index: dict[str, Any], names: tuple[str, ...], *, dtype, device, text_encoder_device,
    trust_remote_code: bool,
) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name in names:
        entry = _component_entry(index, name, root)
        if entry is None or name == "scheduler":
            parts[name] = None
            continue
        cls = _component_class(*entry, name, trust_remote_code)
        kwargs: dict[str, Any] = {"local_files_only": True} if entry[0] in TRUSTED_LIBRARIES else {}
        if name.startswith("tokenizer"):
            parts[name] = _load_component(cls, root, name, **kwargs)
            continue
        where = text_encoder_device if name.startswith("text_encoder") else device
        if entry[0] == "diffusers":
            kwargs["torch_dtype"] = dtype  # diffusers keeps its fp32-only modules when loading, not on .to()
        module = _load_component(cls, root, name, **kwargs)
        if entry[0] == "diffusers":
            module.to(device=where)
        else:
            module.to(device=where, dtype=dtype)
        module.eval()
        module.requires_grad_(False)
        parts[name] = module
    return parts


def load_pipeline_parts(
    model: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    lora: str | Path | None = None,
    text_encoder_device: torch.device | str | None = None,
    resolution: int | None = None,
) -> PipelineParts:
    """Load the family's tokenizers, text encoders, denoiser (UNet or transformer), VAE (or None)
    and scheduler config.

    All modules are put in eval mode with frozen parameters (adapters added later
    are trainable as usual), on ``device`` in ``dtype`` (fp32 by default); the text encoders on
    ``text_encoder_device`` (default ``device``; e.g. "cpu" to keep a large T5 off the GPU: prompts
    are encoded once and cached). ``resolution``: the image size in pixels (default: the model's
    own, from its config). ``lora`` loads a LoRA adapter onto the denoiser (see ``load_lora``).
    """
    import torch

    from fastdense.models.families import backbone_class, family_of_pipeline

    dtype = torch.float32 if dtype is None else dtype
    device = torch.device(device)
    text_encoder_device = device if text_encoder_device is None else torch.device(text_encoder_device)
    root = _resolve_model(model, revision=revision)
    index = check_pipeline_dir(root)
    family = family_of_pipeline(index.get("_class_name"))

    with _quiet_progress_bars():
        parts = _load_modules(root, index, family.components, dtype=dtype, device=device,
                              text_encoder_device=text_encoder_device, trust_remote_code=trust_remote_code)

    scheduler_config = read_json_object(
        root / "scheduler" / "scheduler_config.json", f"model {root}: bad scheduler config"
    )
    denoiser = parts[family.denoiser]
    vae = parts["vae"]
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    channels, latent_size = backbone_class(family).latent_geometry(denoiser)
    if resolution is not None:
        latent_size = _latent_size_for(resolution, vae_scale_factor, backbone_class(family).latent_multiple)
    common = ("tokenizer", "text_encoder", "unet", "transformer", "vae", "scheduler")
    result = PipelineParts(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        unet=denoiser,
        vae=vae,
        scheduler_config=dict(scheduler_config),
        vae_scale_factor=vae_scale_factor,
        latent_channels=channels,
        latent_size=latent_size,
        model_path=root,
        dtype=dtype,
        device=device,
        family=family.name,
        extra={name: parts.get(name) for name in family.components if name not in common},
    )
    if lora is not None:
        load_lora(result.unet, lora, family=family.name)
        result.lora_paths.append(Path(lora))
    return result


def _latent_size_for(resolution: int, vae_scale_factor: int, multiple: int) -> tuple[int, int]:
    """Latent (H, W) of a square ``resolution``-pixel image; it must divide into whole latents
    (and into the family's patches: ``multiple`` latent pixels)."""
    step = vae_scale_factor * multiple
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < step or resolution % step:
        raise FastdenseError(
            f"resolution={resolution!r} is not allowed for this model; allowed: a positive multiple of {step} pixels"
        )
    size = resolution // vae_scale_factor
    return (size, size)
