"""Loading pipelines (local diffusers directory or hub id), LoRA adapters, prompt
embeddings, the backbone seam (prompt encoding and the CFG model call) and the tiny offline
test pipeline.

Importing this package is cheap: torch / diffusers / transformers load inside the functions.
"""

from fastdense.models.backbone import Backbone, CFGBatch, UNetBackbone, cfg_enabled
from fastdense.models.loading import (
    PipelineParts,
    adapters_disabled,
    has_adapters,
    load_lora,
    load_pipeline_parts,
)
from fastdense.models.prompts import PromptEncoder
from fastdense.models.tiny import build_tiny_pipeline

__all__ = [
    "Backbone",
    "CFGBatch",
    "PipelineParts",
    "PromptEncoder",
    "UNetBackbone",
    "adapters_disabled",
    "build_tiny_pipeline",
    "cfg_enabled",
    "has_adapters",
    "load_lora",
    "load_pipeline_parts",
]
