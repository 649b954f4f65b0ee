"""The backbone seam: one object per model family that owns "prompts → conditioning" and
"model output for (x, t, conditioning) with classifier-free guidance batching".

The sampler and the trainer both call the denoiser through it, so the model call exists once.
With CFG the model runs once on ``[uncond rows | cond rows]``: each half is ``rows`` long (n real
items, then padding that repeats the last real item, so a fixed batch reuses one compiled graph),
and the output splits into ``(eps_uncond, eps_cond)``; without CFG (guidance = 1) only the
conditional half runs and the first part of the pair is None. Combining the two with the
guidance weight is the fused kernels' job, not the backbone's.

Conditioning is ONE tensor per prompt ``[L, D]`` for every family, so the embedding cache, the
replay buffer and the CFG batching are family-blind: families with pooled embeddings (SDXL, SD3,
FLUX) pack the pooled vector as a last row (:func:`pack_conditioning`) and unpack it in their
model call. :class:`ConditionedBackbone` holds what all families share; :class:`UNetBackbone`
wraps the SD 1.x/2.x ``UNet2DConditionModel``; ``fastdense.models.families`` maps a pipeline class
(``model_index.json``) to its backbone (SDXL, SD3, FLUX live beside this module).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from fastdense.models.prompts import PromptEncoder

__all__ = [
    "Backbone",
    "CFGBatch",
    "ConditionedBackbone",
    "UNetBackbone",
    "cfg_enabled",
    "pack_conditioning",
    "unpack_conditioning",
]


def cfg_enabled(guidance: float) -> bool:
    """Whether ``guidance`` needs the unconditional branch: every value but 1 (also in [0, 1),
    where diffusers would skip CFG; ε̂ = ε_u + w·(ε_c − ε_u) holds for any w)."""
    return guidance != 1.0


@dataclass
class CFGBatch:
    """The model's input rows for ``n`` items in a batch of fixed size.

    ``context`` holds the conditioning rows: with CFG ``rows`` unconditional rows then ``rows``
    conditional ones, without CFG the conditional ones alone; rows ``n..rows`` of each half are
    padding (the last real item again). :meth:`load` writes latents into ``x`` the same way, so the
    conditioning is built once and ``x`` rewritten per step; padding rows of ``x`` keep whatever
    they held (zeros when allocated here), which cannot change the real rows' outputs.
    """

    context: Tensor  # [halves·rows, L, D] model dtype, contiguous
    n: int
    rows: int
    cfg: bool
    x: Tensor | None = None  # [halves·rows, C, H, W] model dtype; allocated by the first load() if None
    guidance: float | None = None  # the guidance weight, for models that take it as an input (FLUX)

    @property
    def halves(self) -> int:
        return 2 if self.cfg else 1

    def load(self, x: Tensor) -> None:
        """Write latents ``x [n, C, H, W]`` (any float dtype; cast to the model's) into each half."""
        import torch

        if x.dim() < 2 or x.shape[0] != self.n:
            raise FastdenseError(
                f"latents have shape {tuple(x.shape)}; expected {self.n} rows, one per conditioning row"
            )
        if self.x is None:
            alloc = torch.zeros if self.rows > self.n else torch.empty  # every row written below when no padding
            ctx = self.context
            self.x = alloc((self.halves * self.rows, *x.shape[1:]), dtype=ctx.dtype, device=ctx.device)
        elif tuple(self.x.shape[1:]) != tuple(x.shape[1:]):
            raise FastdenseError(
                f"latents have shape {tuple(x.shape)}; this batch's input rows are {tuple(self.x.shape)}"
            )
        self.x[: self.n].copy_(x)
        if self.cfg:
            self.x[self.rows : self.rows + self.n].copy_(x)

    def timesteps(self, t: Tensor) -> Tensor:
        """Timesteps for the model: a 0-dim ``t`` is shared by all rows; one per item ``[n]`` is
        padded like the items and repeated for each half."""
        import torch

        if t.dim() == 0:
            return t
        if t.dim() != 1 or t.shape[0] != self.n:
            raise FastdenseError(f"timesteps have shape {tuple(t.shape)}; expected () or ({self.n},)")
        if self.rows > self.n:
            t = torch.cat([t, t[-1:].expand(self.rows - self.n)])
        return torch.cat([t, t]) if self.cfg else t

    def split(self, out: Tensor) -> tuple[Tensor | None, Tensor]:
        """Model output rows → ``(eps_uncond or None, eps_cond)``, the real rows only (views)."""
        n, rows = self.n, self.rows
        return (out[:n], out[rows : rows + n]) if self.cfg else (None, out[:n])


def pack_conditioning(tokens: Tensor, pooled: Tensor) -> Tensor:
    """Token embeddings ``[n, L, D]`` and pooled embeddings ``[n, P]`` as ONE tensor ``[n, L+1, W]``
    (W = max(D, P), zero padded): the pooled vector is the last row.

    One tensor per prompt is what the embedding cache, the replay buffer and :class:`CFGBatch`
    carry, so families with pooled embeddings (SDXL, SD3, FLUX) need no other plumbing;
    :func:`unpack_conditioning` undoes it (views, no copy).
    """
    import torch

    if tokens.dim() != 3 or pooled.dim() != 2 or tokens.shape[0] != pooled.shape[0]:
        raise FastdenseError(
            f"cannot pack token embeddings {tuple(tokens.shape)} with pooled embeddings {tuple(pooled.shape)}; "
            "expected [n, L, D] and [n, P]"
        )
    n, length, dim = tokens.shape
    width = max(int(dim), int(pooled.shape[1]))
    out = torch.zeros((n, length + 1, width), dtype=tokens.dtype, device=tokens.device)
    out[:, :length, :dim] = tokens
    out[:, length, : pooled.shape[1]] = pooled.to(tokens.dtype)
    return out


def unpack_conditioning(context: Tensor, token_dim: int, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """``[n, L+1, W]`` from :func:`pack_conditioning` → (tokens ``[n, L, token_dim]``, pooled ``[n, pooled_dim]``)."""
    return context[:, :-1, :token_dim], context[:, -1, :pooled_dim]


class ConditionedBackbone(abc.ABC):
    """What every family shares: the prompt-embedding cache (``encoder``: anything with
    ``encode(prompts) -> [N, L, D]``, ``unconditional() -> [L, D]``, ``clear()`` and ``in``) and the
    CFG batching; a family defines :meth:`forward` (one model call on prepared rows) and its facts.

    ``denoiser`` holds the weights (its parameters fix the model dtype and device); ``module`` is
    what gets called by default (the denoiser itself, or ``torch.compile(denoiser)``).
    """

    #: short name used in configs, LoRA metadata and messages
    family: str = "?"
    #: a velocity-predicting flow-matching model (FlowMatchEulerDiscreteScheduler step tables)
    flow: bool = False
    #: guidance is an input of the model (FLUX.1-dev): no unconditional branch, ever
    guidance_distilled: bool = False
    #: the key prefix of its LoRA weights in diffusers' ``load_lora_weights`` format
    lora_prefix: str = "unet"
    #: LoRA targets when the config names none: the attention projections
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: latent sizes must be a multiple of this (a transformer's patch size)
    latent_multiple: int = 1
    #: widths of packed conditioning (families with a pooled vector set both; :meth:`unpacked`)
    token_dim: int = 0
    pooled_dim: int = 0

    @classmethod
    @abc.abstractmethod
    def from_parts(cls, parts, *, module: Any = None, encoder: Any = None) -> ConditionedBackbone:
        """The backbone of loaded ``PipelineParts`` of this family (``encoder``: an embedding cache
        to use instead of the family's own)."""

    @classmethod
    def latent_geometry(cls, denoiser) -> tuple[int, tuple[int, int]]:
        """(latent channels, default latent (H, W)) of a denoiser, from its config."""
        size = denoiser.config.sample_size
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return int(denoiser.config.in_channels), hw

    def __init__(self, denoiser, encoder, *, module: Any = None):
        param = next(denoiser.parameters())
        self.denoiser = denoiser
        self.encoder = encoder
        self.module = denoiser if module is None else module
        self.dtype: torch.dtype = param.dtype
        self.device: torch.device = param.device
        self._uncond: Tensor | None = None
        # (context, its version, tokens, pooled) of the last batch: its conditioning unpacked once
        self._unpacked: tuple[Tensor, int, Tensor, Tensor] | None = None

    # -- conditioning ----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Conditioning ``[N, L, D]`` in the model's dtype and device (cached per unique prompt)."""
        return self.encoder.encode(prompts).to(device=self.device, dtype=self.dtype)

    def unconditional(self) -> Tensor:
        """The empty prompt's conditioning ``[L, D]`` in the model's dtype and device (CFG's other half)."""
        if self._uncond is None or "" not in self.encoder:  # encoder.clear() drops it: encode again
            self._uncond = self.encoder.unconditional().to(device=self.device, dtype=self.dtype)
        return self._uncond

    def unpacked(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, pooled) of packed conditioning rows, contiguous as the pipelines pass them (a
        strided view rounds differently in bf16). Unpacked once per batch: the sampler calls the model
        T times on one batch; an in-place change of the context bumps its version and unpacks again."""
        cached = self._unpacked
        if cached is not None and cached[0] is context and cached[1] == context._version:
            return cached[2], cached[3]
        tokens, pooled = unpack_conditioning(context, self.token_dim, self.pooled_dim)
        tokens, pooled = tokens.contiguous(), pooled.contiguous()
        self._unpacked = (context, context._version, tokens, pooled)
        return tokens, pooled

    def uses_cfg(self, guidance: float) -> bool:
        """Whether sampling / training with ``guidance`` runs the unconditional branch."""
        return cfg_enabled(guidance) and not self.guidance_distilled

    def table_options(self, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """Keyword arguments for :func:`fastdense.schedule.make_step_table` that depend on the model
        and the latent shape (FLUX: the image sequence length that sets the shift)."""
        return {}

    # -- the model call ----------------------------------------------------------------------------
    def batch(
        self,
        cond: Tensor,
        *,
        cfg: bool,
        rows: int | None = None,
        x_rows: Tensor | None = None,
        guidance: float | None = None,
    ) -> CFGBatch:
        """The conditioning rows of ``cond [n, L, D]`` in a batch of ``rows`` (default n) per half.

        ``x_rows``: a workspace ``[halves·rows, C, H, W]`` in the model dtype to load latents into
        (reused across calls by the sampler); None allocates one on the first :meth:`CFGBatch.load`.
        ``guidance``: the guidance weight, for guidance-distilled models that take it as an input.
        """
        import torch

        if cond.dim() != 3 or cond.shape[0] < 1:
            raise FastdenseError(f"conditioning has shape {tuple(cond.shape)}; expected [n >= 1, L, D]")
        if cfg and self.guidance_distilled:
            raise FastdenseError(f"{self.family} is guidance-distilled: it runs no unconditional branch (cfg=False)")
        n = int(cond.shape[0])
        rows = n if rows is None else int(rows)
        if rows < n:
            raise FastdenseError(f"rows={rows} is not allowed for {n} items; allowed: rows >= {n}")
        halves = 2 if cfg else 1
        if x_rows is not None and (x_rows.shape[0] != halves * rows or x_rows.dtype != self.dtype):
            raise FastdenseError(
                f"x_rows has shape {tuple(x_rows.shape)} and dtype {x_rows.dtype}; "
                f"expected {halves * rows} rows of {self.dtype}"
            )
        context = torch.empty((halves * rows, *cond.shape[1:]), dtype=self.dtype, device=self.device)
        cond_half = context[(halves - 1) * rows :]
        cond_half[:n].copy_(cond)
        cond_half[n:].copy_(cond[-1:].expand(rows - n, -1, -1))
        if cfg:
            context[:rows].copy_(self.unconditional().unsqueeze(0).expand(rows, -1, -1))
        return CFGBatch(context=context, n=n, rows=rows, cfg=bool(cfg), x=x_rows, guidance=guidance)

    @abc.abstractmethod
    def forward(self, module: Any, x: Tensor, t: Tensor, batch: CFGBatch) -> Tensor:
        """One call of ``module`` on the loaded rows ``x`` at model timesteps ``t`` (``()`` or one per
        row) with ``batch.context``: the model output, shaped like ``x``."""

    def output(self, batch: CFGBatch, t: Tensor, *, module: Any = None) -> tuple[Tensor | None, Tensor]:
        """One model call on the loaded batch at timesteps ``t``: ``(out_uncond or None, out_cond)``."""
        if batch.x is None:
            raise FastdenseError("the batch holds no latents: call batch.load(x) before the model")
        module = self.module if module is None else module
        return batch.split(self.forward(module, batch.x, batch.timesteps(t), batch))

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        cond: Tensor,
        *,
        cfg: bool,
        rows: int | None = None,
        module: Any = None,
        guidance: float | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """Model output of items ``x [n, C, H, W]`` at timesteps ``t`` (``()`` or ``[n]``) with
        conditioning ``cond [n, L, D]``: :meth:`batch`, load, :meth:`output` in one call."""
        batch = self.batch(cond, cfg=cfg, rows=rows, guidance=guidance)
        batch.load(x)
        return self.output(batch, t, module=module)


class UNetBackbone(ConditionedBackbone):
    """An SD 1.x/2.x-style UNet (``unet(x, t, encoder_hidden_states=...)``) and its prompt encoder."""

    family = "sd"

    def __init__(self, unet, encoder: PromptEncoder, *, module: Any = None):
        super().__init__(unet, encoder, module=module)
        self.unet = unet

    @classmethod
    def from_parts(cls, parts, *, module: Any = None, encoder: Any = None) -> UNetBackbone:
        from fastdense.models.prompts import PromptEncoder

        return cls(parts.unet, encoder if encoder is not None else PromptEncoder.from_parts(parts), module=module)

    def forward(self, module: Any, x: Tensor, t: Tensor, batch: CFGBatch) -> Tensor:
        return module(x, t, encoder_hidden_states=batch.context, return_dict=False)[0]


#: What the sampler and the trainer need from a model family: the base class's interface.
Backbone = ConditionedBackbone
