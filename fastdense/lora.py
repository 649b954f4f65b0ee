"""Trainable parameters of the policy UNet: LoRA adapters (peft) or full fine-tuning.

``add_lora`` puts a peft LoRA adapter on the UNet's attention projections (the
config's ``lora_targets``: any linear or conv layer names; rank, alpha); rank 0 means
full fine-tuning of the UNet instead. ``save_lora`` writes the adapter as diffusers'
``save_lora_weights`` does (``pytorch_lora_weights.safetensors``, keys prefixed
``unet.``, the LoRA config as safetensors metadata), which
``StableDiffusionPipeline.load_lora_weights(dir)`` and
:func:`fastdense.models.loading.load_lora` both read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastdense.errors import FastdenseError

__all__ = ["LORA_ADAPTER", "add_lora", "lora_state_dict", "save_lora", "save_trainable", "trainable_parameters"]

LORA_ADAPTER = "default"


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
                f"model.lora_targets={list(targets)!r} do not fit this UNet ({msg}); "
                "allowed: names of its linear layers, e.g. to_q, to_k, to_v, to_out.0"
            ) from None
    if not any(p.requires_grad for p in unet.parameters()):
        raise FastdenseError(f"model.lora_targets={list(targets)!r} match no layer of this UNet")


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


def save_lora(unet, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA adapter in diffusers format into ``directory``; returns the weight file.

    ``state``: the adapter weights (default: read from ``unet``; pass them when the
    parameters live elsewhere, e.g. gathered from ZeRO-3 partitions).
    """
    # The pipeline's own saver (StableDiffusionPipeline inherits it), without importing the
    # pipeline module: that pulls in transformers' image processors and their torchvision warnings.
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(unet) if state is None else state
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(directory),
        unet_lora_layers=state,
        unet_lora_adapter_metadata=_lora_metadata(unet),
        safe_serialization=True,
    )
    return directory / "pytorch_lora_weights.safetensors"


def save_trainable(unet, directory: str | Path, *, lora: bool) -> Path:
    """The training output: the LoRA adapter (``lora=True``) or the whole UNet (``save_pretrained``)."""
    directory = Path(directory)
    if lora:
        return save_lora(unet, directory)
    unet.save_pretrained(str(directory))
    return directory
