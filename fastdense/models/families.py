"""Model families: which pipeline classes (``model_index.json``'s ``_class_name``) fastdense
supports, the components each needs, and the backbone that wraps them.

The loader (:func:`fastdense.models.loading.load_pipeline_parts`) reads a directory's pipeline
class, looks its family up here and loads that family's components; the sampler and the trainer
then build the family's backbone (:func:`backbone_for`). Backbone classes are imported lazily
(``"module:Class"``), so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fastdense.errors import FastdenseError

__all__ = ["FAMILIES", "Family", "backbone_class", "backbone_for", "family_of_pipeline", "family_named"]


@dataclass(frozen=True)
class Family:
    """One model family: its name, the pipeline classes that name it, its components and backbone."""

    name: str
    pipeline_classes: tuple[str, ...]
    denoiser: str  # the model_index.json component that is denoised through: "unet" | "transformer"
    required: tuple[str, ...]  # components that must be present
    optional: tuple[str, ...]  # components that may be [null, null] (vae: pixel space; T5 of SD3)
    backbone: str  # "module:Class" of its ConditionedBackbone subclass
    description: str

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="sd",
        pipeline_classes=("StableDiffusionPipeline", "FastdensePixelPipeline"),
        denoiser="unet",
        required=("tokenizer", "text_encoder", "unet", "scheduler"),
        optional=("vae",),
        backbone="fastdense.models.backbone:UNetBackbone",
        description="Stable Diffusion 1.x / 2.x (UNet, one CLIP text encoder, DDIM)",
    ),
    Family(
        name="sdxl",
        pipeline_classes=("StableDiffusionXLPipeline",),
        denoiser="unet",
        required=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "scheduler"),
        optional=("vae",),
        backbone="fastdense.models.sdxl:SDXLBackbone",
        description="SDXL (UNet, two CLIP text encoders, pooled embeddings and time ids, DDIM)",
    ),
    Family(
        name="sd3",
        pipeline_classes=("StableDiffusion3Pipeline", "FastdensePixelSD3Pipeline"),
        denoiser="transformer",
        required=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "scheduler"),
        optional=("tokenizer_3", "text_encoder_3", "vae"),
        backbone="fastdense.models.sd3:SD3Backbone",
        description="SD3 / SD3.5 (MMDiT, CLIP-L + CLIP-G + T5, flow matching)",
    ),
    Family(
        name="flux",
        pipeline_classes=("FluxPipeline",),
        denoiser="transformer",
        required=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "scheduler"),
        optional=("vae",),
        backbone="fastdense.models.flux:FluxBackbone",
        description="FLUX.1 (guidance-distilled transformer, CLIP-L + T5, packed latents, flow matching)",
    ),
)


def supported_pipelines() -> list[str]:
    return [c for f in FAMILIES for c in f.pipeline_classes]


def family_of_pipeline(class_name: str | None, where: str = "model_index.json") -> Family:
    """The family of a pipeline class; a one-line error listing the supported ones otherwise."""
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    raise FastdenseError(
        f"{where}: pipeline class {class_name!r} is not supported; supported: {', '.join(supported_pipelines())}"
    )


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise FastdenseError(f"backbone {name!r} is not known; allowed: {', '.join(f.name for f in FAMILIES)}")


def backbone_class(family: Family | str) -> type:
    """The backbone class of a family (imported on first use)."""
    family = family_named(family) if isinstance(family, str) else family
    module_name, _, attr = family.backbone.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def backbone_for(parts: Any, *, module: Any = None, encoder: Any = None):
    """The backbone of loaded ``PipelineParts``: its family's class built from the parts.

    ``module``: the callable denoiser (e.g. ``torch.compile(parts.unet)``); ``encoder``: an
    embedding cache to use instead of the family's default one.
    """
    return backbone_class(parts.family).from_parts(parts, module=module, encoder=encoder)
