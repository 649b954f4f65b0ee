"""Loading pipelines (local diffusers directory or hub id), LoRA adapters, prompt
embeddings and the tiny offline test pipeline.

Importing this package is cheap: torch / diffusers / transformers load inside the functions.
"""

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
    "PipelineParts",
    "PromptEncoder",
    "adapters_disabled",
    "build_tiny_pipeline",
    "has_adapters",
    "load_lora",
    "load_pipeline_parts",
]
