"""Text embeddings, computed once per unique prompt and cached.

Matches ``StableDiffusionPipeline.encode_prompt`` (no clip skip, no LoRA on the text
encoder): tokens padded to ``tokenizer.model_max_length``, truncated, the attention
mask passed only when the encoder's config asks for it, the last hidden state in
the encoder's dtype. The unconditional embedding is the one of ``""``.

A prompt longer than that window loses its tail, as in diffusers; the encoder says so
once per prompt, as one ``warning: ...`` line on the ``fastdense.models.prompts``
logger (with no logging configured Python prints it on stderr as it is).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EmbeddingCache(abc.ABC):
    """Cache of conditioning tensors ``[L, D]`` keyed by prompt string; a family's encoder subclasses
    it and defines :meth:`_run` (prompts → ``[n, L, D]``: one tensor per prompt, pooled embeddings
    packed in as :func:`fastdense.models.backbone.pack_conditioning` does).

    ``encode(prompts)`` runs the text encoder(s) once, batched, on the prompts not seen before
    (``batch_size`` at a time). ``calls`` counts encoder forward passes and ``encoded`` the prompts
    actually encoded, so callers and tests can see the cache work. ``device``: where the text
    encoders run (may differ from the denoiser's: offloaded encoders); ``dtype``: the cached dtype.
    """

    def __init__(self, *, device, dtype, batch_size: int = 64):
        import torch

        if batch_size < 1:
            raise FastdenseError(f"batch_size={batch_size} is not allowed; allowed: >= 1")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self._cache: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()  # prompts already reported as truncated (kept across clear())
        self.calls = 0
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def clear(self) -> None:
        self._cache.clear()

    def _warn_truncated(self, tokenizer, prompts: list[str], max_length: int, limit_name: str) -> None:
        """One warning per prompt whose tokens do not fit ``tokenizer``'s window of ``max_length``."""
        # verbose=False: no "Token indices sequence length is longer ..." from transformers on top
        ids = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
        specials = tokenizer.num_special_tokens_to_add()
        keep = max(max_length - specials, 0)
        for prompt, content in zip(prompts, ids, strict=True):
            total = len(content) + specials
            if total <= max_length or prompt in self._warned:
                continue
            self._warned.add(prompt)
            dropped = tokenizer.decode(content[keep:]).strip()
            logger.warning(
                "warning: prompt %r is %d tokens; the text encoder reads the first %d (%s), "
                "the rest (%r) is ignored",
                _clip(prompt), total, max_length, limit_name, _clip(dropped, 60),
            )

    @abc.abstractmethod
    def _run(self, prompts: list[str]) -> torch.Tensor:
        """Encode ``prompts`` (none cached yet): ``[n, L, D]`` in the cache's dtype and device."""

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Conditioning ``[len(prompts), L, D]`` (a new tensor; cached rows are not aliased)."""
        import torch

        if isinstance(prompts, str):
            raise FastdenseError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise FastdenseError(f"prompts must be strings, got {type(p).__name__}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            emb = self._run(chunk)
            self.calls += 1
            self.encoded += len(chunk)
            for p, e in zip(chunk, emb, strict=True):
                self._cache[p] = e
        if not prompts:
            raise FastdenseError("no prompts to encode")
        return torch.stack([self._cache[p] for p in prompts])

    def unconditional(self) -> torch.Tensor:
        """The conditioning ``[L, D]`` of the empty prompt (CFG's unconditional branch)."""
        return self.encode([""])[0]


class PromptEncoder(EmbeddingCache):
    """One CLIP text encoder (SD 1.x/2.x): its last hidden state ``[L, D]`` per prompt."""

    def __init__(self, tokenizer, text_encoder, *, device=None, batch_size: int = 64, max_length: int | None = None):
        param = next(text_encoder.parameters())
        super().__init__(device=device if device is not None else param.device, dtype=param.dtype,
                         batch_size=batch_size)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(max_length or tokenizer.model_max_length)
        self._limit_name = "max_length" if max_length else "model_max_length"

    @classmethod
    def from_parts(cls, parts, **kwargs) -> PromptEncoder:
        return cls(parts.tokenizer, parts.text_encoder, **kwargs)

    def _run(self, prompts: list[str]) -> torch.Tensor:
        import torch

        self._warn_truncated(self.tokenizer, prompts, self.max_length, self._limit_name)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        with torch.no_grad():
            out = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)
        return out[0].to(dtype=self.dtype, device=self.device)
