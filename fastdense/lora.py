"""LoRA on the policy UNet (peft): adding, saving, loading, switching off; or full fine-tuning.

``add_lora`` puts a peft LoRA adapter on the UNet's attention projections (the
config's ``lora_targets``: any linear or conv layer names; rank, alpha); rank 0 means
full fine-tuning of the UNet instead. ``save_lora`` writes the adapter as diffusers'
``save_lora_weights`` does (``pytorch_lora_weights.safetensors``, keys prefixed
``unet.``, the LoRA config as safetensors metadata), which
``StableDiffusionPipeline.load_lora_weights(dir)`` and :func:`load_lora` both read.
``load_lora`` also reads peft's ``adapter_config.json`` + ``adapter_model.safetensors``.
``has_adapters`` / ``adapters_disabled``: whether adapters are on, and the base model for a
while (the reference policy). ``fastdense.models`` and ``fastdense.models.loading`` re-export
``load_lora``, ``has_adapters`` and ``adapters_disabled``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError

if TYPE_CHECKING:  # importing this module stays cheap (fastdense.models re-exports from it)
    import torch

__all__ = [
    "LORA_ADAPTER",
    "LORA_WEIGHT_NAMES",
    "adapters_disabled",
    "add_lora",
    "has_adapters",
    "load_lora",
    "lora_state_dict",
    "save_lora",
    "trainable_parameters",
]

LORA_ADAPTER = "default"
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
#: written next to a saved LoRA: the model family it was trained on (checked when it is loaded)
LORA_INFO = "fastdense_lora.json"
LORA_PREFIXES = ("unet", "transformer")


def add_lora(unet, rank: int, alpha: float | None, targets: list[str], *, seed: int = 0) -> None:
    """LoRA on ``targets`` (rank > 0; B = 0 so the policy starts as the base model), or full fine-tuning (rank 0).

    The base weights stay frozen with LoRA; with rank 0 every UNet parameter trains.
    ``seed`` fixes the random initialisation of the A matrices.
    """
    if rank < 0:
        raise FastdenseError(f"model.lora_rank={rank} is not allowed; it must be >= 0 (0 = full fine-tuning)")
    if rank == 0:
        unet.requires_grad_(True)
        return
    import torch
    from peft import LoraConfig

    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else rank),
        target_modules=list(targets),
        init_lora_weights=True,  # A: Kaiming-uniform, B: zeros
        lora_dropout=0.0,
    )
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=LORA_ADAPTER)
        except ValueError as err:
            msg = " ".join(str(err).split())[:200]
            raise FastdenseError(
                f"model.lora_targets={list(targets)!r} do not fit this model ({msg}); "
                "allowed: names of its linear layers, e.g. to_q, to_k, to_v, to_out.0 (null: the family's default)"
            ) from None
    if not any(p.requires_grad for p in unet.parameters()):
        raise FastdenseError(f"model.lora_targets={list(targets)!r} match no layer of this model")


def trainable_parameters(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft key names (``...to_q.lora_A.weight``), on the CPU.

    Kept in peft naming: diffusers' loader reads it as is, while its ``lora.down`` conversion
    renames only some layer kinds (conv targets such as ``conv_out`` keep peft names, and a
    mixed file silently loads in part).
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=LORA_ADAPTER)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _lora_metadata(unet) -> dict[str, Any]:
    config = unet.peft_config[LORA_ADAPTER].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora(
    unet,
    directory: str | Path,
    state: dict[str, torch.Tensor] | None = None,
    *,
    prefix: str = "unet",
    family: str | None = None,
) -> Path:
    """Write the LoRA adapter in diffusers format into ``directory``; returns the weight file.

    ``state``: the adapter weights (default: read from ``unet``; pass them when the
    parameters live elsewhere, e.g. gathered from ZeRO-3 partitions). ``prefix``: the denoiser's
    key prefix in diffusers' format ("unet" for SD / SDXL, "transformer" for SD3 / FLUX: what
    the pipeline's ``load_lora_weights`` reads). ``family``: the model family, recorded in
    ``fastdense_lora.json`` so that loading it onto another family is refused in one line.
    """
    import json

    # The pipelines' own savers, without importing the pipeline modules: those pull in
    # transformers' image processors and their torchvision warnings.
    from diffusers.loaders import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin

    if prefix not in LORA_PREFIXES:
        raise FastdenseError(f"prefix={prefix!r} is not allowed; allowed: {', '.join(LORA_PREFIXES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(unet) if state is None else state
    if prefix == "unet":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(directory), unet_lora_layers=state, unet_lora_adapter_metadata=_lora_metadata(unet),
            safe_serialization=True,
        )
    else:  # SD3 and FLUX write the same "transformer." layout
        SD3LoraLoaderMixin.save_lora_weights(
            str(directory), transformer_lora_layers=state, transformer_lora_adapter_metadata=_lora_metadata(unet),
            safe_serialization=True,
        )
    if family is not None:
        (directory / LORA_INFO).write_text(json.dumps({"family": family, "prefix": prefix}, indent=2) + "\n")
    return directory / "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------
# Loading adapters and switching them off


def _peft_layers(module) -> Iterator[Any]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no adapters possible
        return iter(())
    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def has_adapters(unet) -> bool:
    """True when ``unet`` carries peft adapter layers that are switched on."""
    return any(not layer.disable_adapters for layer in _peft_layers(unet))


@contextlib.contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """Run the base model: every peft adapter layer of ``unet`` off, restored afterwards."""
    layers = [layer for layer in _peft_layers(unet) if not layer.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def load_lora(unet, lora: str | Path, *, adapter_name: str = LORA_ADAPTER, family: str | None = None) -> str:
    """Load a LoRA adapter directory onto ``unet`` (a diffusers UNet or transformer); returns the
    adapter name.

    Accepted layouts: diffusers (``pytorch_lora_weights.safetensors``, keys optionally
    prefixed ``unet.`` or ``transformer.``, as ``save_lora_weights`` / ``save_lora_adapter``
    write), or peft (``adapter_config.json`` + ``adapter_model.safetensors``). ``family``: the
    model's family; a LoRA that ``fastdense_lora.json`` says was trained on another family, or
    whose keys name the other kind of denoiser, is refused in one line.
    """
    path = Path(lora).expanduser()
    if not path.exists():
        raise FastdenseError(f"LoRA directory {path} does not exist")
    if path.is_file():
        weight_file = path
        path = path.parent
    else:
        found = [path / n for n in LORA_WEIGHT_NAMES if (path / n).is_file()]
        if not found:
            found = sorted(path.glob("*.safetensors"))
        if not found:
            raise FastdenseError(
                f"LoRA directory {path} holds no LoRA weights (expected {' or '.join(LORA_WEIGHT_NAMES)})"
            )
        weight_file = found[0]
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise FastdenseError(f"the UNet already has an adapter named {adapter_name!r}")

    from safetensors.torch import load_file

    from fastdense.models.loading import read_json_object  # here: models.loading imports this module

    try:
        state = load_file(str(weight_file))
    except Exception as err:  # OSError or safetensors' own error (its name differs across versions)
        raise FastdenseError(f"LoRA weights {weight_file} cannot be read ({err})") from None

    _check_lora_family(weight_file, state, family, read_json_object)
    config_path = weight_file.parent / "adapter_config.json"
    if config_path.is_file():
        _load_peft_format(unet, state, read_json_object(config_path, "bad LoRA config"), adapter_name, weight_file)
        return adapter_name

    if any(k.startswith("unet.") for k in state):
        prefix = "unet"
    elif any(k.startswith("transformer.") for k in state):
        prefix = "transformer"
    elif any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in state):
        raise FastdenseError(f"LoRA weights {weight_file} hold no UNet layers (only text encoder layers)")
    else:
        prefix = None
    try:
        unet.load_lora_adapter(
            str(weight_file.parent),
            weight_name=weight_file.name,
            prefix=prefix,
            adapter_name=adapter_name,
            local_files_only=True,
        )
    except FastdenseError:
        raise
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise FastdenseError(
            f"LoRA weights {weight_file} do not fit this model ({type(err).__name__}: {msg})"
        ) from None
    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        raise FastdenseError(f"LoRA weights {weight_file} hold no layers of this model")
    return adapter_name


def _check_lora_family(weight_file: Path, state: dict, family: str | None, read_json_object) -> None:
    """A LoRA of another model family is a one-line error (before peft tries to fit it)."""
    if family is None:
        return
    from fastdense.models.families import family_named

    info_path = weight_file.parent / LORA_INFO
    if info_path.is_file():
        trained_on = read_json_object(info_path, "bad LoRA info").get("family")
        if trained_on is not None and trained_on != family:
            raise FastdenseError(
                f"LoRA {weight_file.parent} was trained on a {trained_on!r} model; this model is {family!r}"
            )
    denoiser = family_named(family).denoiser
    other = "transformer" if denoiser == "unet" else "unet"
    if any(k.startswith(other + ".") for k in state):
        raise FastdenseError(
            f"LoRA {weight_file.parent} holds {other} layers; this model ({family!r}) has a {denoiser}"
        )


def _load_peft_format(unet, state: dict, config: dict, adapter_name: str, weight_file: Path) -> None:
    from peft import LoraConfig, set_peft_model_state_dict

    allowed = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in allowed and k not in ("base_model_name_or_path", "revision")}
    try:
        lora_config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise FastdenseError(f"bad LoRA config next to {weight_file} ({err})") from None
    prefixes = ("base_model.model.", "unet.", "transformer.")
    cleaned = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p) :]
                break
        cleaned[key] = value
    try:
        unet.add_adapter(lora_config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(unet, cleaned, adapter_name=adapter_name)
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise FastdenseError(
            f"LoRA weights {weight_file} do not fit this model ({type(err).__name__}: {msg})"
        ) from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora" in k]
    if unexpected:
        raise FastdenseError(
            f"LoRA weights {weight_file} hold {len(unexpected)} keys this model lacks, e.g. {unexpected[0]}"
        )
