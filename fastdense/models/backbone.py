"""The backbone seam: one object per model family that owns "prompts → conditioning" and
"model output for (x, t, conditioning) with classifier-free guidance batching".

The sampler and the trainer both call the denoiser through it, so the model call exists once.
With CFG the model runs once on ``[uncond rows | cond rows]``: each half is ``rows`` long (n real
items, then padding that repeats the last real item, so a fixed batch reuses one compiled graph),
and the output splits into ``(eps_uncond, eps_cond)``; without CFG (guidance = 1) only the
conditional half runs and the first part of the pair is None. Combining the two with the
guidance weight is the fused kernels' job, not the backbone's.

:class:`UNetBackbone` wraps the SD-style ``UNet2DConditionModel`` (one text-embedding tensor per
item). Other families (SDXL's pooled embeddings and time ids, SD3 / FLUX transformers) implement
the :class:`Backbone` protocol with their own conditioning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fastdense.errors import FastdenseError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from fastdense.models.prompts import PromptEncoder

__all__ = ["Backbone", "CFGBatch", "UNetBackbone", "cfg_enabled"]


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


class Backbone(Protocol):
    """What the sampler and the trainer need from a model family.

    ``module`` is the callable denoiser used by default (maybe torch.compile'd); every call takes
    ``module=`` to run another one with the same weights layout (the DeepSpeed engine, a frozen
    reference copy). Conditioning comes back in the model's dtype on its device.
    """

    module: Any
    dtype: torch.dtype
    device: torch.device

    def encode(self, prompts: Sequence[str]) -> Tensor: ...

    def unconditional(self) -> Tensor: ...

    def batch(self, cond: Tensor, *, cfg: bool, rows: int | None = None, x_rows: Tensor | None = None) -> CFGBatch: ...

    def output(self, batch: CFGBatch, t: Tensor, *, module: Any = None) -> tuple[Tensor | None, Tensor]: ...

    def __call__(
        self, x: Tensor, t: Tensor, cond: Tensor, *, cfg: bool, rows: int | None = None, module: Any = None
    ) -> tuple[Tensor | None, Tensor]: ...


class UNetBackbone:
    """An SD-style UNet (``unet(x, t, encoder_hidden_states=...)``) and its prompt encoder.

    ``unet`` holds the weights (its parameters fix the model dtype and device); ``module`` is what
    gets called by default (the UNet itself, or ``torch.compile(unet)``).
    """

    def __init__(self, unet, encoder: PromptEncoder, *, module: Any = None):
        param = next(unet.parameters())
        self.unet = unet
        self.encoder = encoder
        self.module = unet if module is None else module
        self.dtype: torch.dtype = param.dtype
        self.device: torch.device = param.device
        self._uncond: Tensor | None = None

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings ``[N, L, D]`` in the model's dtype and device (cached per unique prompt)."""
        return self.encoder.encode(prompts).to(device=self.device, dtype=self.dtype)

    def unconditional(self) -> Tensor:
        """The empty prompt's embedding ``[L, D]`` in the model's dtype and device (CFG's other half)."""
        if self._uncond is None or "" not in self.encoder:  # encoder.clear() drops it: encode again
            self._uncond = self.encoder.unconditional().to(device=self.device, dtype=self.dtype)
        return self._uncond

    def batch(self, cond: Tensor, *, cfg: bool, rows: int | None = None, x_rows: Tensor | None = None) -> CFGBatch:
        """The conditioning rows of ``cond [n, L, D]`` in a batch of ``rows`` (default n) per half.

        ``x_rows``: a workspace ``[halves·rows, C, H, W]`` in the model dtype to load latents into
        (reused across calls by the sampler); None allocates one on the first :meth:`CFGBatch.load`.
        """
        import torch

        if cond.dim() != 3 or cond.shape[0] < 1:
            raise FastdenseError(f"conditioning has shape {tuple(cond.shape)}; expected [n >= 1, L, D]")
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
        return CFGBatch(context=context, n=n, rows=rows, cfg=bool(cfg), x=x_rows)

    def output(self, batch: CFGBatch, t: Tensor, *, module: Any = None) -> tuple[Tensor | None, Tensor]:
        """One model call on the loaded batch at timesteps ``t``: ``(eps_uncond or None, eps_cond)``."""
        if batch.x is None:
            raise FastdenseError("the batch holds no latents: call batch.load(x) before the model")
        module = self.module if module is None else module
        out = module(batch.x, batch.timesteps(t), encoder_hidden_states=batch.context, return_dict=False)[0]
        return batch.split(out)

    def __call__(
        self, x: Tensor, t: Tensor, cond: Tensor, *, cfg: bool, rows: int | None = None, module: Any = None
    ) -> tuple[Tensor | None, Tensor]:
        """Model output of items ``x [n, C, H, W]`` at timesteps ``t`` (``()`` or ``[n]``) with
        conditioning ``cond [n, L, D]``: :meth:`batch`, load, :meth:`output` in one call."""
        batch = self.batch(cond, cfg=cfg, rows=rows)
        batch.load(x)
        return self.output(batch, t, module=module)
