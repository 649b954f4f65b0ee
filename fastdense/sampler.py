"""The sampling loop: DDIM (SD, SDXL) or flow-matching (SD3, FLUX) steps with classifier-free
guidance, recorded in place.

One call of :meth:`Sampler.sample` allocates its records once —
``latents [B, T+1, C, H, W]``, squared residuals ``[B, T]`` (fp32), optionally x̂0
pictures and the reference policy's squared residuals — and every step writes
the new latent straight into ``latents[:, t+1]`` with the fused ``ddim_step`` op,
which also returns ``‖x'_stored − μ‖²`` (log π_old of the stored transition, up to
constants: DESIGN.md §1).

Every step of every sampler is linear-Gaussian in the model output (DESIGN.md §1, §1b), so one
(A, B, σ) table (:func:`fastdense.schedule.make_step_table`) and the same fused step serve all
families. Per step and micro-batch the denoiser runs once through the family's backbone
(:mod:`fastdense.models.families`): on ``[x | x]`` with ``[uncond | cond]`` conditioning
(guidance ≠ 1), or once on ``x`` (guidance = 1, or a guidance-distilled model such as FLUX.1-dev,
which takes the guidance weight as an input).
Each sample ``i`` owns a generator (``seed + i``) that draws its initial noise and
then one noise tensor per step, in the order diffusers' ``StableDiffusionPipeline``
with a list of generators draws them, so sample ``i`` does not depend on the batch
it was drawn in, and a trajectory can be replayed by diffusers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fastdense.errors import FastdenseError
from fastdense.models.backbone import UNetBackbone
from fastdense.models.loading import PipelineParts, adapters_disabled, has_adapters
from fastdense.models.prompts import PromptEncoder
from fastdense.schedule import StepTable, make_step_table

ATTENTION_CHOICES = ("default", "sdpa", "xformers")
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["ATTENTION_CHOICES", "Sampler", "Trajectories", "decode", "make_generators", "sample"]


@dataclass
class Trajectories:
    """Sampled trajectories, recorded in place (DESIGN.md §1 conventions).

    Sample ``i`` went ``latents[i, 0]`` (initial noise) → … → ``latents[i, T]`` (the
    final latent); step ``t`` maps ``latents[:, t]`` to ``latents[:, t+1]`` at train
    timestep ``timesteps[t]`` with coefficients ``coef_a[t], coef_b[t], sigma[t]``.

    ``sq_residual[i, t] = ‖latents[i, t+1] − μ_policy‖²`` computed from the stored
    tensors in fp32 (log π_old without constants). ``ref_sq_residual`` is the same for
    the reference policy (the base model with adapters off); when the sampling policy
    is the reference it is ``sq_residual`` itself (same tensor).
    """

    latents: Tensor  # [B, T+1, C, H, W], storage dtype
    sq_residual: Tensor  # [B, T] fp32
    timesteps: Tensor  # [T] model timesteps, descending (DDIM: int64 train timesteps; flow: float32 σ·1000)
    coef_a: Tensor  # [T] float64
    coef_b: Tensor  # [T] float64
    sigma: Tensor  # [T] float64
    prompts: list[str]  # [B] prompt of each sample
    prompt_ids: Tensor  # [B] int64 index into unique_prompts
    unique_prompts: list[str]
    guidance: float
    eta: float  # DDIM's η, or a flow sampler's noise level
    prediction_type: str  # "epsilon" | "v_prediction" | "flow"
    step_table: StepTable
    seeds: Tensor | None = None  # [B] int64 generator seed of each sample (None: caller's generators)
    ref_sq_residual: Tensor | None = None  # [B, T] fp32
    x0: Tensor | None = None  # [B, S, C, H, W] predicted x̂0 at x0_steps, storage dtype
    x0_steps: tuple[int, ...] = ()
    policy_has_adapters: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.latents.shape[1]) - 1

    @property
    def latent_dim(self) -> int:
        """D = C·H·W."""
        return int(math.prod(self.latents.shape[2:]))

    @property
    def old_sq(self) -> Tensor:
        """Alias of ``sq_residual`` (the buffer's name: residuals of π_old, the sampling policy)."""
        return self.sq_residual

    @property
    def ref_sq(self) -> Tensor | None:
        """Alias of ``ref_sq_residual`` (the buffer's name)."""
        return self.ref_sq_residual

    @property
    def final_latents(self) -> Tensor:
        """``latents[:, T]`` (a view): what is decoded into the images."""
        return self.latents[:, -1]

    def log_prob(self, reduction: str = "sum", *, ref: bool = False) -> Tensor:
        """log π(x'|x) per stored transition ``[B, T]`` in float64 (DESIGN.md §1).

        ``sum`` is the true density, ``mean`` divides by D. ``ref=True`` uses the
        reference policy's residuals.
        """
        sq = self.ref_sq_residual if ref else self.sq_residual
        if sq is None:
            raise FastdenseError("these trajectories hold no reference residuals (sample with ref_residual=True)")
        if reduction not in ("sum", "mean"):
            raise FastdenseError(f"reduction={reduction!r} is not allowed; allowed: sum, mean")
        if not bool((self.sigma > 0).all()):
            raise FastdenseError("a step with sigma = 0 (eta = 0) has no density")
        var = (self.sigma.to(sq.device) ** 2)[None, :]
        d = self.latent_dim
        lp = -sq.double() / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
        return lp / d if reduction == "mean" else lp

    def to(self, device: torch.device | str) -> Trajectories:
        """Tensors moved to ``device`` (the step table stays where it is)."""
        moved = {}
        for name in ("latents", "sq_residual", "prompt_ids", "ref_sq_residual", "x0"):
            value = getattr(self, name)
            moved[name] = value.to(device) if value is not None else None
        if self.ref_sq_residual is self.sq_residual and self.sq_residual is not None:
            moved["ref_sq_residual"] = moved["sq_residual"]
        return replace(self, **moved)


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample, seeded with ``seeds[i]``."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=torch.device(device))
        g.manual_seed(int(s))
        gens.append(g)
    return gens


@contextlib.contextmanager
def _eval_mode(module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _randn_into(dest: Tensor, generator: torch.Generator) -> None:
    """Standard normal fp32 noise from ``generator`` into ``dest`` (drawn on the generator's device)."""
    if generator.device == dest.device:
        torch.randn(dest.shape, generator=generator, dtype=dest.dtype, device=dest.device, out=dest)
    else:
        dest.copy_(torch.randn(dest.shape, generator=generator, dtype=dest.dtype, device=generator.device))


def _check_guidance(guidance: float) -> float:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise FastdenseError(f"guidance={guidance!r} is not allowed; allowed: a finite number >= 0")
    if not math.isfinite(guidance) or guidance < 0:
        raise FastdenseError(f"guidance={guidance} is not allowed; allowed: a finite number >= 0")
    return float(guidance)


def default_compile(device: torch.device) -> bool:
    """torch.compile the UNet by default on CUDA only."""
    return device.type == "cuda"


class Sampler:
    """Holds the UNet (maybe compiled) and the prompt-embedding cache in a backbone, and step tables.

    Build it from ``PipelineParts`` (``Sampler(parts)``) or from the pieces
    (``Sampler(unet=..., encoder=..., scheduler_config=...)``). ``micro_batch``: a
    fixed UNet batch (samples per UNet call; the last micro-batch is padded), so the
    compiled graph is reused across calls and a sample's numbers do not depend on
    the batch size; None runs the whole batch as one micro-batch. ``compile``: wrap the
    UNet in ``torch.compile(**compile_options)`` (default: on CUDA only; timesteps are
    passed as tensors, so the step loop reuses one graph). ``attention``: ``default``
    (the model's processors, SDPA in recent diffusers), ``sdpa`` or ``xformers`` (CUDA).
    """

    def __init__(
        self,
        parts: PipelineParts | None = None,
        *,
        unet=None,
        encoder: PromptEncoder | None = None,
        scheduler_config: dict | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        micro_batch: int | None = None,
        compile: bool | None = None,
        attention: str = "default",
        kernel_impl: str = "auto",
        compile_options: dict[str, Any] | None = None,
    ):
        if parts is not None:
            unet = unet if unet is not None else parts.unet
            scheduler_config = scheduler_config if scheduler_config is not None else parts.scheduler_config
            latent_shape = latent_shape if latent_shape is not None else parts.latent_shape
        if unet is None or (encoder is None and parts is None) or scheduler_config is None:
            raise FastdenseError("Sampler needs parts, or unet + encoder + scheduler_config")
        if latent_shape is None:
            channels, hw = UNetBackbone.latent_geometry(unet)
            latent_shape = (channels, *hw)
        if micro_batch is not None and (isinstance(micro_batch, bool) or int(micro_batch) < 1):
            raise FastdenseError(f"micro_batch={micro_batch} is not allowed; allowed: an int >= 1 or None")
        if attention not in ATTENTION_CHOICES:
            raise FastdenseError(f"attention={attention!r} is not allowed; allowed: {', '.join(ATTENTION_CHOICES)}")

        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.micro_batch = None if micro_batch is None else int(micro_batch)
        self.kernel_impl = kernel_impl
        param = next(unet.parameters())
        self.device = param.device
        self.model_dtype = param.dtype
        self.compile = default_compile(self.device) if compile is None else bool(compile)
        self.attention = attention
        self._set_attention(attention)
        options = {"dynamic": False, **(compile_options or {})}
        self._model = torch.compile(unet, **options) if self.compile else unet
        # the one CFG model call: the family's backbone (SD when built from the pieces)
        if parts is not None:
            from fastdense.models.families import backbone_for

            self.backbone = backbone_for(parts, module=self._model, encoder=encoder)
        else:
            self.backbone = UNetBackbone(unet, encoder, module=self._model)
        self.encoder = self.backbone.encoder
        self._tables: dict[tuple, StepTable] = {}

    # -- set-up ---------------------------------------------------------------------------------

    def _set_attention(self, attention: str) -> None:
        if attention == "default":
            return
        if attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            self.unet.set_attn_processor(AttnProcessor2_0())
            return
        if self.device.type != "cuda":
            raise FastdenseError(f"attention='xformers' needs a CUDA device; the UNet is on {self.device}")
        if importlib.util.find_spec("xformers") is None:
            raise FastdenseError("attention='xformers' needs the xformers package (pip install xformers)")
        try:
            self.unet.enable_xformers_memory_efficient_attention()
        except Exception as err:
            raise FastdenseError(f"xformers attention could not be enabled: {' '.join(str(err).split())}") from None

    def table(self, num_steps: int, eta: float = 1.0, sampler: str | None = None) -> StepTable:
        """The (cached) step table of a ``num_steps`` chain with noise scale ``eta`` (DDIM's η, a
        flow sampler's noise level) for ``sampler`` (None: the scheduler's own kind, DDIM or SDE)."""
        key = (type(num_steps), num_steps, eta, sampler)  # make_step_table validates them (True == 1 as a key)
        if key not in self._tables:
            options = self.backbone.table_options(self.latent_shape)
            self._tables[key] = make_step_table(
                self.scheduler_config, num_steps, sampler=sampler, eta=eta, **options
            )
        return self._tables[key]

    # -- sampling ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        num_steps: int,
        guidance: float,
        eta: float = 1.0,
        sampler: str | None = None,
        seed: int | Sequence[int] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        latent_dtype: torch.dtype = torch.float32,
        record_x0_steps: Sequence[int] = (),
        ref_residual: bool = False,
        progress: Callable[[int], None] | None = None,
        generator_device: torch.device | str | None = None,
        record: bool = True,
    ) -> Trajectories:
        """Sample one trajectory per prompt (repeat a prompt for several images).

        ``sampler``: "ddim" (SD, SDXL), or "sde" / "cps" / "ode" (flow-matching models; ``eta`` is
        then the noise level, and "ode" is deterministic); None takes the scheduler's own kind.
        ``seed``: an int (sample i uses ``seed + i``; default 0) or one seed per sample; or pass
        ``generators`` (one per sample, used for the initial noise then one draw per
        step). ``guidance = 1`` runs without the unconditional branch; any other value
        (also in [0, 1), where diffusers would skip CFG) applies ε̂ = ε_u + w·(ε_c − ε_u).
        ``record_x0_steps``: generation steps whose x̂0 prediction is kept. ``ref_residual``: also record the
        reference policy's squared residual (one extra no-grad UNet pass per step with
        the LoRA adapters off; free when the UNet has no adapters). ``progress(n)`` is
        called after each step of each micro-batch with the micro-batch's sample count.
        ``generator_device``: where the seeded generators live (default: the UNet's device;
        ``"cpu"`` gives the same noise on every device). Noise is drawn in fp32.
        ``record=False``: keep only two latent slots (ping-pong) instead of the whole chain, for
        plain image generation; ``latents`` is then ``[B, 2, C, H, W]`` with the final latent last,
        and the per-step residuals are still returned (they cost nothing extra in the fused step).
        """
        if isinstance(prompts, str):
            raise FastdenseError("prompts must be a list of strings, not one string")
        prompts = list(prompts)
        if not prompts:
            raise FastdenseError("no prompts: give at least one")
        guidance = _check_guidance(guidance)
        if latent_dtype not in LATENT_DTYPES:
            raise FastdenseError(f"latent_dtype={latent_dtype} is not allowed; allowed: {LATENT_DTYPES}")
        table = self.table(num_steps, eta, sampler)
        T = table.num_steps
        B = len(prompts)
        steps_x0 = tuple(int(s) for s in record_x0_steps)
        for s in steps_x0:
            if not 0 <= s < T:
                raise FastdenseError(f"record_x0_steps has step {s}; allowed: 0 <= step < {T}")

        # Generators: one per sample.
        seeds_tensor = None
        if generators is not None:
            if seed is not None:
                raise FastdenseError("give seed or generators, not both")
            gens = list(generators)
            if len(gens) != B:
                raise FastdenseError(f"got {len(gens)} generators for {B} prompts; give one per sample")
        else:
            if seed is None:
                seed = 0
            if isinstance(seed, int) and not isinstance(seed, bool):
                seeds = [seed + i for i in range(B)]
            else:
                seeds = [int(s) for s in seed]
                if len(seeds) != B:
                    raise FastdenseError(f"got {len(seeds)} seeds for {B} prompts; give an int or one per sample")
            seeds_tensor = torch.tensor(seeds, dtype=torch.int64)
            gens = make_generators(seeds, self.device if generator_device is None else generator_device)

        cfg = self.backbone.uses_cfg(guidance)
        policy_adapters = has_adapters(self.unet)
        extra_ref_pass = ref_residual and policy_adapters

        # Prompt embeddings: once per unique prompt (cached across calls).
        unique = list(dict.fromkeys(prompts))
        prompt_ids = torch.tensor([unique.index(p) for p in prompts], dtype=torch.int64)
        cond = self.backbone.encode(unique)  # [U, L, D] (the empty prompt's: at the first CFG batch)

        # Records, allocated once.
        dev = self.device
        C, H, W = self.latent_shape
        num_slots = T + 1 if record else 2
        # without recording, start in the slot that makes the final latent land in slot 1 (= -1)
        slot_offset = 0 if record else (T + 1) % 2
        latents = torch.empty((B, num_slots, C, H, W), dtype=latent_dtype, device=dev)
        sq = torch.empty((B, T), dtype=torch.float32, device=dev)
        ref_sq = torch.empty((B, T), dtype=torch.float32, device=dev) if extra_ref_pass else None
        x0 = torch.empty((B, len(steps_x0), C, H, W), dtype=latent_dtype, device=dev) if steps_x0 else None
        x0_slot = {s: k for k, s in enumerate(steps_x0)}

        timesteps = table.timesteps.to(dev)
        coef_a = table.coef_a.tolist()
        coef_b = table.coef_b.tolist()
        sigma = table.sigma.tolist()

        # Workspaces of one micro-batch, reused by every step (and the UNet input by every micro-batch).
        mb = self.micro_batch or B
        rows = 2 * mb if cfg else mb
        model_in = torch.zeros((rows, C, H, W), dtype=self.model_dtype, device=dev)
        noise = torch.empty((mb, C, H, W), dtype=torch.float32, device=dev)

        from fastdense.kernels.ddim_step import ddim_step

        if extra_ref_pass:
            from fastdense.kernels.log_ratio import squared_residual

        with _eval_mode(self.unet):  # no dropout while sampling (restored afterwards)
            for start in range(0, B, mb):
                stop = min(start + mb, B)
                n = stop - start
                ids = prompt_ids[start:stop].to(dev)
                # a fixed UNet batch of mb rows per half, padded with the last sample (graph reuse)
                batch = self.backbone.batch(cond[ids], cfg=cfg, rows=mb, x_rows=model_in, guidance=guidance)
                g_mb = gens[start:stop]

                for j, g in enumerate(g_mb):  # initial noise, as diffusers' prepare_latents draws it
                    _randn_into(noise[j], g)
                latents[start:stop, slot_offset % num_slots].copy_(noise[:n])

                for t in range(T):
                    x = latents[start:stop, (t + slot_offset) % num_slots]
                    x_next = latents[start:stop, (t + 1 + slot_offset) % num_slots]
                    batch.load(x)
                    tt = timesteps[t]
                    eps_u, eps_c = self.backbone.output(batch, tt)
                    for j, g in enumerate(g_mb):
                        _randn_into(noise[j], g)
                    sq[start:stop, t] = ddim_step(
                        x,
                        eps_c,
                        eps_u,
                        noise[:n],
                        coef_a[t],
                        coef_b[t],
                        sigma[t],
                        guidance,
                        out=x_next,
                        impl=self.kernel_impl,
                    )
                    if t in x0_slot:
                        eps_hat = eps_c.float()
                        if eps_u is not None:
                            eps_hat = eps_u.float() + guidance * (eps_hat - eps_u.float())
                        x0[start:stop, x0_slot[t]] = table.x0_from_output(x, eps_hat, t).to(latent_dtype)
                    if extra_ref_pass:
                        with adapters_disabled(self.unet):
                            ru, rc = self.backbone.output(batch, tt)
                        ref_sq[start:stop, t] = squared_residual(
                            rc, ru, x, x_next, coef_a[t], coef_b[t], guidance=guidance, impl=self.kernel_impl
                        )
                    if progress is not None:
                        progress(n)

        if ref_residual and not policy_adapters:
            ref_sq = sq  # the sampling policy is the reference: the same residual, no cost

        return Trajectories(
            latents=latents,
            sq_residual=sq,
            timesteps=table.timesteps.clone(),
            coef_a=table.coef_a.clone(),
            coef_b=table.coef_b.clone(),
            sigma=table.sigma.clone(),
            prompts=prompts,
            prompt_ids=prompt_ids,
            unique_prompts=unique,
            guidance=guidance,
            eta=float(eta),
            prediction_type=table.prediction_type,
            step_table=table,
            seeds=seeds_tensor,
            ref_sq_residual=ref_sq,
            x0=x0,
            x0_steps=steps_x0,
            policy_has_adapters=policy_adapters,
            info={"micro_batch": mb, "compiled": self.compile, "attention": self.attention, "recorded": record,
                  "sampler": getattr(table, "sampler", "ddim"), "family": self.backbone.family},
        )


def sample(
    parts: PipelineParts,
    prompts: Sequence[str],
    *,
    micro_batch: int | None = None,
    compile: bool | None = None,
    attention: str = "default",
    **kwargs,
) -> Trajectories:
    """One-shot ``Sampler(parts, ...).sample(prompts, **kwargs)`` (build a ``Sampler`` to reuse
    its compiled UNet and embedding cache across calls)."""
    return Sampler(parts, micro_batch=micro_batch, compile=compile, attention=attention).sample(prompts, **kwargs)


@torch.no_grad()
def decode(parts_or_vae, latents: Tensor, *, batch_size: int = 8, scaling_factor: float | None = None) -> Tensor:
    """Final latents ``[B, C, h, w]`` → images ``[B, 3, H, W]`` fp32 in [0, 1].

    With a VAE (``PipelineParts`` or an ``AutoencoderKL``): ``vae.decode(latents /
    scaling_factor + shift_factor)`` in batches of ``batch_size``. Pixel-space models
    (``parts.vae is None``, or ``parts_or_vae=None``): the decoder is the identity on
    ``[-1, 1]`` images with 3 (or 1) channels. Both map ``[-1, 1]`` to ``[0, 1]``.
    """
    vae = parts_or_vae.vae if isinstance(parts_or_vae, PipelineParts) else parts_or_vae
    if latents.dim() != 4:
        raise FastdenseError(f"latents must be [B, C, H, W], got shape {tuple(latents.shape)}")
    if batch_size < 1:
        raise FastdenseError(f"batch_size={batch_size} is not allowed; allowed: >= 1")
    if vae is None:
        if latents.shape[1] == 1:
            images = latents.float().expand(-1, 3, -1, -1)
        elif latents.shape[1] == 3:
            images = latents.float()
        else:
            raise FastdenseError(
                f"a pixel-space model's samples need 1 or 3 channels to be shown as images, got {latents.shape[1]}"
            )
        return (images / 2 + 0.5).clamp(0, 1)
    scale = float(scaling_factor if scaling_factor is not None else getattr(vae.config, "scaling_factor", 1.0))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    outs = []
    for start in range(0, latents.shape[0], batch_size):
        chunk = latents[start : start + batch_size].to(device=param.device, dtype=param.dtype)
        image = vae.decode(chunk / scale + shift, return_dict=False)[0]
        outs.append((image.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(outs)
