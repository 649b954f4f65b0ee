"""Loading the parts of a text-to-image pipeline that fastdense needs.

``load_pipeline_parts`` reads a local directory in diffusers layout (what
``save_pretrained`` writes: ``model_index.json``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, optionally ``vae/``) or a hub id where the hub is
reachable. Component classes come from ``model_index.json``; classes outside
diffusers / transformers (custom code) load only with ``trust_remote_code=True``.
A missing or malformed directory is a one-line ``FastdenseError`` naming the part.

``lora=DIR`` puts a LoRA adapter onto the UNet with :func:`fastdense.lora.load_lora`
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

REQUIRED_PARTS = ("unet", "text_encoder", "tokenizer", "scheduler")
TRUSTED_LIBRARIES = ("diffusers", "transformers")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*_config.json",
    "scheduler/*.json",
    "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]


@dataclass
class PipelineParts:
    """What the sampler, trainer and evaluator need from a text-to-image pipeline.

    ``vae`` is None for pixel-space models (the decoder is the identity and
    ``vae_scale_factor`` is 1). ``scheduler_config`` is the scheduler's config dict
    as saved (any scheduler class); ``make_scheduler()`` gives the DDIM scheduler
    that fastdense samples with, built from it.
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
    if name == "tokenizer":
        return root / name / "tokenizer_config.json"
    return root / name / "config.json"


def check_pipeline_dir(root: Path) -> dict[str, Any]:
    """Validate a diffusers-layout directory; returns its ``model_index.json``."""
    if not root.exists():
        raise FastdenseError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise FastdenseError(f"model {root} is not a directory (expected a diffusers pipeline directory)")
    index = read_json_object(root / "model_index.json", "not a diffusers pipeline directory")
    for name in (*REQUIRED_PARTS, "vae"):
        entry = _component_entry(index, name, root)
        if entry is None:
            if name in REQUIRED_PARTS:
                raise FastdenseError(f"model {root}: model_index.json names no {name!r} component")
            continue
        if not (root / name).is_dir():
            raise FastdenseError(f"model {root}: the {name}/ directory is missing")
        if name == "tokenizer":
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


def _load_modules(root: Path, index: dict[str, Any], *, dtype, device, trust_remote_code: bool) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name in ("tokenizer", "text_encoder", "unet", "vae"):
        entry = _component_entry(index, name, root)
        if entry is None:
            parts[name] = None
            continue
        cls = _component_class(*entry, name, trust_remote_code)
        kwargs: dict[str, Any] = {"local_files_only": True} if entry[0] in TRUSTED_LIBRARIES else {}
        if name == "tokenizer":
            parts[name] = _load_component(cls, root, name, **kwargs)
            continue
        if entry[0] == "diffusers":
            kwargs["torch_dtype"] = dtype  # diffusers keeps its fp32-only modules when loading, not on .to()
        module = _load_component(cls, root, name, **kwargs)
        if entry[0] == "diffusers":
            module.to(device=device)
        else:
            module.to(device=device, dtype=dtype)
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
) -> PipelineParts:
    """Load tokenizer, text encoder, UNet, VAE (or None) and scheduler config.

    All modules are put in eval mode with frozen parameters (adapters added later
    are trainable as usual), on ``device`` in ``dtype`` (fp32 by default). ``lora``
    loads a LoRA adapter onto the UNet (see ``load_lora``).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    device = torch.device(device)
    root = _resolve_model(model, revision=revision)
    index = check_pipeline_dir(root)

    with _quiet_progress_bars():
        parts = _load_modules(root, index, dtype=dtype, device=device, trust_remote_code=trust_remote_code)

    scheduler_config = read_json_object(
        root / "scheduler" / "scheduler_config.json", f"model {root}: bad scheduler config"
    )
    unet = parts["unet"]
    vae = parts["vae"]
    size = unet.config.sample_size
    latent_size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    result = PipelineParts(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        unet=unet,
        vae=vae,
        scheduler_config=dict(scheduler_config),
        vae_scale_factor=vae_scale_factor,
        latent_channels=int(unet.config.in_channels),
        latent_size=latent_size,
        model_path=root,
        dtype=dtype,
        device=device,
    )
    if lora is not None:
        load_lora(result.unet, lora)
        result.lora_paths.append(Path(lora))
    return result
