"""Per-step (A, B, σ) tables of a DDIM sampling chain (DESIGN.md §1).

Every DDIM step is linear-Gaussian in the model output::

    x' = μ + σ·z,   μ = A·x + B·m   (m = ε̂ for ε-prediction, v̂ for v-prediction)

so a table of (A, B, σ) per generation step describes the scheduler completely.
:func:`step_table` builds that table from a diffusers scheduler (or its config),
taking the timesteps from diffusers' own ``DDIMScheduler.set_timesteps`` so that
``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` behave exactly as
in diffusers, and computing the coefficients in float64 from diffusers' own
``alphas_cumprod`` values.

Generation step ``t = 0`` is the first step, from pure noise; its train timestep
is ``timesteps[0]`` (the largest). ``prev = τ - num_train_timesteps // T`` as in
``DDIMScheduler.step``; a negative ``prev`` uses ``final_alpha_cumprod``.

Flow-matching backbones (SD3 / SD3.5, FLUX; DESIGN.md §1b): :func:`flow_step_table`
builds the same kind of table for diffusers' ``FlowMatchEulerDiscreteScheduler``
(sigmas s_0 > … > s_T = 0, velocity output v̂) and three samplers: the ODE
(diffusers' own step, no density), Flow-GRPO's SDE and the coefficients-preserving
step (CPS). :func:`make_step_table` is the one entry point that picks the family
from the scheduler config's ``_class_name``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastdense.errors import FastdenseError

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Samplers of a flow-matching chain (DESIGN.md §1b): Flow-GRPO's SDE, coefficients-preserving, ODE.
FLOW_SAMPLERS = ("sde", "cps", "ode")
SAMPLERS = ("ddim", *FLOW_SAMPLERS)
#: The one flow-matching scheduler whose step these tables describe.
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
#: Which diffusers pipeline's set_timesteps arguments :func:`flow_schedule_args` reproduces.
FLOW_STYLES = ("sd3", "flux")
#: Scheduler classes whose configs :func:`step_table` maps onto DDIM (any other class sharing the
#: beta-schedule keys is accepted too, as step_table always did).
DDIM_FAMILY = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
_BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")

__all__ = [
    "FLOW_SAMPLERS",
    "FLOW_STYLES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "StepTable",
    "flow_schedule_args",
    "flow_step_table",
    "make_step_table",
    "step_table",
]


@dataclass(frozen=True, eq=False, kw_only=True)
class StepTable:
    """(A, B, σ) for each generation step t = 0..T-1 (t = 0 is from pure noise).

    Per-step tensors have shape [T]; coefficient tensors are float64. DDIM tables
    (``sampler="ddim"``) carry the ᾱ columns and no ``sigmas``; flow tables carry
    ``sigmas`` and no ᾱ columns.
    """

    timesteps: Tensor  # [T] what the model is conditioned on: int64 τ (DDIM) or float32 σ·K (flow)
    coef_a: Tensor  # [T] float64, A
    coef_b: Tensor  # [T] float64, B
    sigma: Tensor  # [T] float64, σ (0 everywhere when eta = 0)
    prediction_type: str  # "epsilon" | "v_prediction" | "flow" (velocity)
    eta: float  # DDIM's η, or the flow sampler's noise level a (0 for the ODE)
    sampler: str = "ddim"  # one of SAMPLERS
    prev_timesteps: Tensor | None = None  # DDIM: [T] int64, τ - K // T (negative → final_alpha_cumprod)
    alpha_cumprod: Tensor | None = None  # DDIM: [T] float64, ᾱ[τ]
    alpha_cumprod_prev: Tensor | None = None  # DDIM: [T] float64, ᾱ[prev]
    sigmas: Tensor | None = None  # flow: [T+1] float64, s_0 … s_T = 0 (step t goes from s_t to s_{t+1})

    # -- basic facts -----------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def __len__(self) -> int:
        return self.num_steps

    @property
    def device(self) -> torch.device:
        return self.coef_a.device

    @property
    def has_density(self) -> bool:
        """True when every step has σ > 0, i.e. every stored transition has a likelihood."""
        return bool((self.sigma > 0).all())

    @property
    def density_steps(self) -> Tensor:
        """[n] int64 indices of the steps with σ > 0 (the ones a transition likelihood exists for)."""
        return (self.sigma > 0).nonzero().flatten()

    # -- lookups ---------------------------------------------------------------------------------

    def _check_step(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, int):
            raise FastdenseError(f"step t must be an int in [0, {self.num_steps}), got {t!r}")
        if not 0 <= t < self.num_steps:
            raise FastdenseError(f"step t={t} is out of range; allowed: 0 <= t < {self.num_steps}")
        return t

    def coefs(self, t: int) -> tuple[float, float, float]:
        """(A, B, σ) of generation step ``t`` as python floats."""
        t = self._check_step(t)
        return float(self.coef_a[t]), float(self.coef_b[t]), float(self.sigma[t])

    def timestep(self, t: int) -> int | float:
        """Timestep of generation step ``t`` (what the model is conditioned on): the int train
        timestep τ for DDIM, the float σ·num_train_timesteps for flow matching."""
        value = self.timesteps[self._check_step(t)]
        return float(value) if value.is_floating_point() else int(value)

    def coefs_at(self, steps: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-item (A, B, σ), each shaped like ``steps`` (int step indices), on ``steps.device``.

        ``dtype`` defaults to the table's float64.
        """
        if not isinstance(steps, Tensor) or steps.dtype not in (torch.int64, torch.int32):
            raise FastdenseError("steps must be an int64/int32 tensor of generation step indices")
        idx = steps.to(device=self.device, dtype=torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise FastdenseError(f"steps must lie in [0, {self.num_steps})")
        out = []
        for col in (self.coef_a, self.coef_b, self.sigma):
            v = col[idx]
            out.append(v.to(device=steps.device, dtype=dtype or v.dtype))
        return out[0], out[1], out[2]

    def x0_from_output(self, x: Tensor, output: Tensor, t: int | Tensor) -> Tensor:
        """Predicted clean latent x̂0 from the state ``x`` and model output at step ``t``.

        ``t`` is a generation step index (int) or a [B] tensor of indices, one per item
        (dim 0 of ``x``). Computed in at least float32; for pictures of the trajectory.
        Flow: x̂0 = x − s_t·v̂.
        """
        dtype = torch.promote_types(torch.promote_types(x.dtype, output.dtype), torch.float32)
        column = self.sigmas if self.prediction_type == "flow" else self.alpha_cumprod
        if isinstance(t, Tensor):
            idx = t.to(device=self.device, dtype=torch.int64)
            value = column[idx].to(device=x.device, dtype=dtype)
            value = value.reshape(value.shape + (1,) * (x.dim() - value.dim()))
        else:
            value = torch.tensor(float(column[self._check_step(t)]), dtype=dtype, device=x.device)
        xs, ms = x.to(dtype), output.to(dtype)
        if self.prediction_type == "flow":
            return xs - value * ms
        abar = value
        if self.prediction_type == "epsilon":
            return (xs - (1 - abar).sqrt() * ms) / abar.sqrt()
        return abar.sqrt() * xs - (1 - abar).sqrt() * ms

    def to(self, device: torch.device | str) -> StepTable:
        """The same table with its tensors on ``device``."""
        fields = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **fields)

    def __repr__(self) -> str:
        return (
            f"StepTable(sampler={self.sampler!r}, num_steps={self.num_steps}, "
            f"prediction_type={self.prediction_type!r}, eta={self.eta}, "
            f"timesteps={self.timesteps.tolist()})"
        )


# ---------------------------------------------------------------------------------------------------


def _config_of(scheduler_or_config: Any) -> dict:
    if isinstance(scheduler_or_config, Mapping):
        cfg = scheduler_or_config
    elif isinstance(getattr(scheduler_or_config, "config", None), Mapping):
        cfg = scheduler_or_config.config
    else:
        raise FastdenseError(
            "scheduler_or_config must be a diffusers scheduler or its config (a dict / FrozenDict), "
            f"got {type(scheduler_or_config).__name__}"
        )
    return dict(cfg)


def _ddim_init_keys() -> set[str]:
    from diffusers import DDIMScheduler

    return {k for k in inspect.signature(DDIMScheduler.__init__).parameters if k != "self"}


def step_table(scheduler_or_config: Any, num_steps: int, eta: float = 1.0) -> StepTable:
    """The (A, B, σ) table of a ``num_steps``-step DDIM chain with noise scale ``eta``.

    ``scheduler_or_config``: a diffusers scheduler instance or its config, of
    DDIMScheduler, DDPMScheduler, or any scheduler that shares the beta-schedule keys
    (PNDM / Euler configs of SD1.5, ...). It is mapped through
    ``DDIMScheduler.from_config`` (keys DDIM does not know are dropped; keys it needs
    but the config lacks, or that the other class only filled from its own defaults,
    take DDIM's defaults, as diffusers does). ``eta = 1`` is the stochastic chain
    used for training; ``eta = 0`` is deterministic DDIM (no density).

    Raises :class:`~fastdense.errors.FastdenseError` for configs whose steps are not
    linear-Gaussian (``clip_sample``, ``thresholding``, ``prediction_type="sample"``)
    and for steps without density (σ = 0) when ``eta > 0``.
    """
    from diffusers import DDIMScheduler

    cfg = _config_of(scheduler_or_config)
    name = cfg.get("_class_name", type(scheduler_or_config).__name__)
    # As diffusers' from_config does: keys that another scheduler class filled in from *its* defaults
    # (``_use_default_values``) are dropped, so DDIM's defaults apply to them; keys DDIM does not know
    # are dropped too (silently: they are the other scheduler's business).
    used_defaults = set(cfg.get("_use_default_values", ()))
    keys = _ddim_init_keys()
    ddim_cfg = {k: v for k, v in cfg.items() if k in keys and k not in used_defaults}
    try:
        sched = DDIMScheduler.from_config(ddim_cfg)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise FastdenseError(f"{name} config cannot be used as a DDIM schedule: {err}") from err
    eff = sched.config  # effective config, DDIM defaults included

    # --- refuse what is not linear-Gaussian ---------------------------------------------------
    pred = eff.prediction_type
    if pred not in PREDICTION_TYPES:
        raise FastdenseError(
            f"prediction_type={pred!r} is not supported; allowed: 'epsilon' or 'v_prediction' "
            "(a 'sample'-predicting model would need a different step parametrisation)"
        )
    if eff.clip_sample:
        where = "" if "clip_sample" in ddim_cfg else " (the config has no clip_sample key; DDIM's default is True)"
        raise FastdenseError(
            f"clip_sample=True{where} clamps x̂0, so the DDIM step is not linear-Gaussian in the model output "
            "and its likelihood would be wrong; set clip_sample=False in the scheduler config, e.g. "
            "step_table({**scheduler.config, 'clip_sample': False}, ...)"
        )
    if eff.thresholding:
        raise FastdenseError(
            "thresholding=True (dynamic thresholding of x̂0) makes the DDIM step non-linear in the model "
            "output; set thresholding=False in the scheduler config"
        )

    # --- arguments ------------------------------------------------------------------------------
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise FastdenseError(f"num_steps must be an int, got {num_steps!r}")
    n_train = int(eff.num_train_timesteps)
    if not 1 <= num_steps <= n_train:
        raise FastdenseError(
            f"num_steps={num_steps} is out of range; allowed: 1 <= num_steps <= num_train_timesteps ({n_train})"
        )
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise FastdenseError(f"eta={eta!r} is not allowed; use a finite eta >= 0 (1.0 for training, 0.0 for DDIM)")
    eta = float(eta)

    # --- timesteps exactly as diffusers makes them -------------------------------------------------
    try:
        sched.set_timesteps(num_steps)
    except ValueError as err:
        raise FastdenseError(f"{name} config cannot be used as a DDIM schedule: {err}") from err
    timesteps = sched.timesteps.to(torch.int64).cpu()
    if timesteps.shape[0] != num_steps or bool((timesteps < 0).any()):
        raise FastdenseError(
            f"diffusers' {sched.config.timestep_spacing!r} spacing gives {timesteps.shape[0]} timesteps "
            f"{timesteps.tolist()[-3:]}… for num_steps={num_steps} (a floating-point edge case); "
            "choose another num_steps or timestep_spacing"
        )
    prev = timesteps - n_train // num_steps

    alphas = sched.alphas_cumprod.to(torch.float64).cpu()
    final = float(sched.final_alpha_cumprod)
    abar = alphas[timesteps]
    abar_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.full_like(abar, final))

    # --- DESIGN §1, in float64 --------------------------------------------------------------------
    var = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    sigma2 = eta**2 * var
    sigma = sigma2.clamp(min=0).sqrt()
    radicand = 1 - abar_prev - sigma2
    bad = radicand < -1e-12
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise FastdenseError(
            f"eta={eta} makes σ² exceed 1 - ᾱ_prev at step t={t} (τ={int(timesteps[t])}); use eta <= 1"
        )
    c = radicand.clamp(min=0).sqrt()
    sa, sa_prev, sb = abar.sqrt(), abar_prev.sqrt(), (1 - abar).sqrt()
    if pred == "epsilon":
        coef_a = sa_prev / sa
        coef_b = c - sa_prev * sb / sa
    else:
        coef_a = sa_prev * sa + c * sb
        coef_b = c * sa - sa_prev * sb

    for col, label in ((coef_a, "A"), (coef_b, "B"), (sigma, "σ")):
        if not bool(torch.isfinite(col).all()):
            t = int((~torch.isfinite(col)).nonzero()[0])
            hint = (
                " (ᾱ[τ] = 0, e.g. rescale_betas_zero_snr=True: ε-prediction is undefined there; "
                "use a v_prediction model)"
                if float(abar[t]) == 0.0
                else ""
            )
            raise FastdenseError(f"coefficient {label} is not finite at step t={t} (τ={int(timesteps[t])}){hint}")

    if eta > 0:
        zero = sigma <= 0
        if bool(zero.any()):
            t = int(zero.nonzero()[0])
            tau, pv = int(timesteps[t]), int(prev[t])
            if tau == 0:
                why = (
                    "the last step starts at τ=0, which adds no noise (ᾱ[prev] is ᾱ[0] or 1); "
                    f"timestep_spacing={sched.config.timestep_spacing!r} with "
                    f"steps_offset={sched.config.steps_offset} puts τ=0 in the schedule: use "
                    "timestep_spacing='leading' with steps_offset=1 (SD1.5's config) or 'trailing'"
                )
            elif pv < 0 and final == 1.0:
                why = (
                    "set_alpha_to_one=True makes final_alpha_cumprod = 1 there; "
                    "set set_alpha_to_one=False in the scheduler config (SD1.5's own config does)"
                )
            else:
                why = "ᾱ[τ] equals ᾱ[prev] there; choose another num_steps or timestep_spacing"
            raise FastdenseError(
                f"step t={t} (τ={tau}, prev={pv}) has σ = 0, so its transition has no density: {why}; "
                "or use eta=0 for deterministic sampling without likelihoods"
            )

    return StepTable(
        timesteps=timesteps,
        prev_timesteps=prev,
        alpha_cumprod=abar,
        alpha_cumprod_prev=abar_prev,
        coef_a=coef_a,
        coef_b=coef_b,
        sigma=sigma,
        prediction_type=pred,
        eta=eta,
    )


# --- flow matching (DESIGN.md §1b) ------------------------------------------------------------------


def _class_name_of(scheduler_or_config: Any, cfg: dict) -> str | None:
    """The scheduler class: an instance's own type, else the config's ``_class_name`` (None if absent)."""
    if not isinstance(scheduler_or_config, Mapping):
        return type(scheduler_or_config).__name__
    name = cfg.get("_class_name")
    return str(name) if name is not None else None


def _check_num_steps(num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise FastdenseError(f"num_steps must be an int, got {num_steps!r}")
    if num_steps < 1:
        raise FastdenseError(f"num_steps={num_steps} is out of range; allowed: num_steps >= 1")
    return num_steps


def _flow_scheduler(scheduler_or_config: Any) -> Any:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` for the config, refusing configs whose step differs
    from ``x' = x + Δ·v̂`` (the step the flow tables are built around)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = _config_of(scheduler_or_config)
    name = _class_name_of(scheduler_or_config, cfg)
    if name is not None and name != FLOW_SCHEDULER:
        raise FastdenseError(f"flow step tables need a {FLOW_SCHEDULER} config, got {name}")
    try:
        sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    except (ValueError, TypeError, ImportError) as err:
        raise FastdenseError(f"{FLOW_SCHEDULER} config cannot be used: {err}") from err
    for key, why in (
        ("stochastic_sampling", "its step re-noises x̂0 with fresh noise of scale s'"),
        ("invert_sigmas", "its sigmas run upwards from 0 to 1"),
    ):
        if sched.config.get(key):
            raise FastdenseError(
                f"{key}={sched.config[key]!r} in the {FLOW_SCHEDULER} config: {why}, which is not linear-Gaussian "
                f"in the form fastdense computes; set {key}=False (fastdense's samplers add their own noise)"
            )
    return sched


def flow_schedule_args(
    scheduler_or_config: Any, num_steps: int, *, image_seq_len: int | None = None, style: str = "sd3"
) -> dict[str, Any]:
    """The ``sigmas`` / ``mu`` that diffusers' pipeline of ``style`` passes to ``set_timesteps``.

    - ``"sd3"`` (``StableDiffusion3Pipeline``): no sigmas; ``mu`` from ``image_seq_len`` only when the
      config has ``use_dynamic_shifting`` (SD3 / SD3.5 configs do not: their ``shift`` applies).
    - ``"flux"`` (``FluxPipeline``): ``sigmas = linspace(1, 1/T, T)`` (None when the config sets
      ``use_flow_sigmas``) and always ``mu = calculate_shift(image_seq_len, …)``.

    ``image_seq_len`` is the number of image tokens the transformer sees: (H/p)·(W/p) latent patches
    (FLUX: packed 2×2, i.e. ``latents.shape[1]`` of the packed latents). Returns
    ``{"sigmas": ..., "mu": ...}`` for :func:`flow_step_table`.
    """
    import numpy as np

    if style not in FLOW_STYLES:
        raise FastdenseError(f"style={style!r} is not allowed; allowed: {', '.join(map(repr, FLOW_STYLES))}")
    num_steps = _check_num_steps(num_steps)
    sched_config = _flow_scheduler(scheduler_or_config).config
    needs_mu = style == "flux" or bool(sched_config.get("use_dynamic_shifting", None))
    sigmas = None
    if style == "flux":
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if hasattr(sched_config, "use_flow_sigmas") and sched_config.use_flow_sigmas:
            sigmas = None
    if not needs_mu:
        return {"sigmas": sigmas, "mu": None}
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        why = "FluxPipeline always shifts by it" if style == "flux" else "the config has use_dynamic_shifting=True"
        raise FastdenseError(
            f"image_seq_len={image_seq_len!r} is not allowed; a positive int (the number of image tokens) "
            f"is needed: {why}"
        )
    # diffusers' own formula (the SD3 pipeline's is a copy of FLUX's); the two pipelines differ only in
    # the max_shift fallback for a config without the key
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    try:
        mu = calculate_shift(
            image_seq_len,
            sched_config.get("base_image_seq_len", 256),
            sched_config.get("max_image_seq_len", 4096),
            sched_config.get("base_shift", 0.5),
            sched_config.get("max_shift", 1.15 if style == "flux" else 1.16),
        )
    except (TypeError, ZeroDivisionError) as err:
        raise FastdenseError(f"the {FLOW_SCHEDULER} config's shift keys cannot give mu: {err}") from err
    return {"sigmas": sigmas, "mu": float(mu)}


def _check_noise_level(sampler: str, noise_level: Any) -> float:
    if sampler == "ode":
        return 0.0
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not math.isfinite(noise_level):
        raise FastdenseError(f"noise_level={noise_level!r} is not allowed for sampler={sampler!r}; use a finite float")
    if noise_level <= 0:
        raise FastdenseError(
            f"noise_level={noise_level!r} is not allowed for sampler={sampler!r}; it must be > 0 "
            "(use sampler='ode' for deterministic sampling)"
        )
    if sampler == "cps" and noise_level > 1:
        raise FastdenseError(
            f"noise_level={noise_level!r} is not allowed for sampler='cps'; it must be in (0, 1] "
            "(σ = s'·sin(aπ/2) must not exceed s')"
        )
    return float(noise_level)


def flow_step_table(
    scheduler_or_config: Any,
    num_steps: int,
    *,
    sampler: str = "sde",
    noise_level: float = 0.7,
    sigmas: Any = None,
    mu: float | None = None,
) -> StepTable:
    """The (A, B, σ) table of a ``num_steps``-step flow-matching chain (DESIGN.md §1b).

    ``scheduler_or_config``: a diffusers ``FlowMatchEulerDiscreteScheduler`` or its config. Timesteps and
    sigmas come from diffusers' own ``set_timesteps(num_steps, sigmas=sigmas, mu=mu)``, so shift, dynamic
    shifting, ``shift_terminal`` and karras / exponential / beta sigmas behave as in diffusers; pass the
    pipeline's ``sigmas`` / ``mu`` with ``**flow_schedule_args(...)``.

    ``sampler``: ``"ode"`` (diffusers' step x' = x + Δ·v̂, σ = 0: no density, for evaluation),
    ``"sde"`` (Flow-GRPO's SDE with noise level a = ``noise_level``) or ``"cps"``
    (coefficients-preserving, a in (0, 1]; its last step has σ = 0). The table's ``eta`` is the noise
    level (0 for the ODE); ``timesteps`` are diffusers' float32 σ·num_train_timesteps.
    """
    if sampler not in FLOW_SAMPLERS:
        hint = " ('ddim' tables come from step_table / make_step_table with a DDIM-family config)"
        raise FastdenseError(
            f"sampler={sampler!r} is not a flow-matching sampler; allowed: {', '.join(map(repr, FLOW_SAMPLERS))}"
            + (hint if sampler == "ddim" else "")
        )
    num_steps = _check_num_steps(num_steps)
    noise_level = _check_noise_level(sampler, noise_level)
    sched = _flow_scheduler(scheduler_or_config)
    try:
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    except ValueError as err:
        hint = (
            "; pass mu=..., e.g. **flow_schedule_args(config, num_steps, image_seq_len=..., style=...)"
            if mu is None and sched.config.use_dynamic_shifting
            else ""
        )
        raise FastdenseError(f"{FLOW_SCHEDULER}.set_timesteps({num_steps}) failed: {err}{hint}") from err
    except (TypeError, ImportError) as err:
        raise FastdenseError(f"{FLOW_SCHEDULER}.set_timesteps({num_steps}) failed: {err}") from err
    timesteps = sched.timesteps.to(torch.float32).cpu()
    # float32 values exactly as diffusers' step reads them, held in float64 for the coefficients
    sig = sched.sigmas.cpu().to(torch.float32).to(torch.float64)
    if timesteps.shape != (num_steps,) or sig.shape != (num_steps + 1,):
        raise FastdenseError(
            f"diffusers gave {timesteps.shape[0]} timesteps and {sig.shape[0]} sigmas for num_steps={num_steps}; "
            f"expected {num_steps} and {num_steps + 1}"
        )
    s, s_next = sig[:-1], sig[1:]
    bad = ~torch.isfinite(s) | (s > 1) | (s_next >= s)
    if bool(bad.any()):
        t = int(bad.nonzero()[0])
        raise FastdenseError(
            f"sigmas must fall strictly from s_0 <= 1 to s_T = 0; step t={t} goes from s={float(s[t])!r} "
            f"to s'={float(s_next[t])!r} (check the sigmas / shift / mu given)"
        )

    delta = s_next - s  # Δ < 0
    if sampler == "ode":
        coef_a, coef_b, sigma = torch.ones_like(s), delta.clone(), torch.zeros_like(s)
    elif sampler == "sde":
        # Flow-GRPO: s̃ = s, except that s = 1 (pure noise) uses s_1 so that g stays finite
        s_tilde = torch.where(s == 1, sig[1], s)
        g = noise_level * (s / (1 - s_tilde)).sqrt()
        coef_a = 1 + g**2 * delta / (2 * s)
        coef_b = (1 + g**2 * (1 - s) / (2 * s)) * delta
        sigma = g * (-delta).sqrt()
    else:  # cps
        sigma = s_next * math.sin(noise_level * math.pi / 2)
        c = (s_next**2 - sigma**2).clamp(min=0).sqrt()
        coef_a = (1 - s_next) + c
        coef_b = -s * (1 - s_next) + (1 - s) * c

    for col, label in ((coef_a, "A"), (coef_b, "B"), (sigma, "σ")):
        if not bool(torch.isfinite(col).all()):
            t = int((~torch.isfinite(col)).nonzero()[0])
            raise FastdenseError(f"coefficient {label} is not finite at step t={t} (s={float(s[t])!r})")
    return StepTable(
        timesteps=timesteps,
        coef_a=coef_a,
        coef_b=coef_b,
        sigma=sigma,
        prediction_type="flow",
        eta=noise_level,
        sampler=sampler,
        sigmas=sig,
    )


def make_step_table(
    scheduler_config: Any,
    num_steps: int,
    *,
    sampler: str | None = None,
    eta: float = 1.0,
    image_seq_len: int | None = None,
    style: str | None = None,
) -> StepTable:
    """The step table for a scheduler config (or instance), whichever family it is.

    - ``FlowMatchEulerDiscreteScheduler``: :func:`flow_step_table` with ``sampler`` (default ``"sde"``) and
      noise level ``eta``; ``eta = 0`` or ``sampler="ode"`` gives the ODE. ``style`` (``"sd3"``, the
      default, or ``"flux"``) and ``image_seq_len`` choose the pipeline's sigmas / mu
      (:func:`flow_schedule_args`).
    - DDIM-family configs (DDIM, DDPM, PNDM, Euler, LMS, DPM-Solver, … or any other class with the
      beta-schedule keys): :func:`step_table` with ``eta``; ``sampler`` must be None or ``"ddim"``.

    Other flow-matching schedulers (Heun, LCM, …) are refused: their steps are not the Euler step
    these tables describe.
    """
    cfg = _config_of(scheduler_config)
    name = _class_name_of(scheduler_config, cfg)
    if sampler is not None and sampler not in SAMPLERS:
        raise FastdenseError(f"sampler={sampler!r} is not allowed; allowed: {', '.join(map(repr, SAMPLERS))}")
    supported = f"{FLOW_SCHEDULER} (samplers {', '.join(FLOW_SAMPLERS)}) or a DDIM-family scheduler ('ddim')"

    if name == FLOW_SCHEDULER:
        if sampler == "ddim":
            raise FastdenseError(
                f"sampler='ddim' does not apply to a {FLOW_SCHEDULER} config; allowed: "
                f"{', '.join(map(repr, FLOW_SAMPLERS))}"
            )
        if style is not None and style not in FLOW_STYLES:
            raise FastdenseError(f"style={style!r} is not allowed; allowed: {', '.join(map(repr, FLOW_STYLES))}")
        flow_sampler = sampler or "sde"
        if flow_sampler != "ode" and isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta == 0:
            flow_sampler = "ode"  # noise level 0 is the ODE for both stochastic samplers
        args = flow_schedule_args(scheduler_config, num_steps, image_seq_len=image_seq_len, style=style or "sd3")
        return flow_step_table(scheduler_config, num_steps, sampler=flow_sampler, noise_level=eta, **args)

    if name is not None and "FlowMatch" in name:
        raise FastdenseError(f"scheduler {name} is not supported; supported: {supported}")
    if cfg.get("use_flow_sigmas"):
        raise FastdenseError(
            f"scheduler {name or '(no _class_name)'} with use_flow_sigmas=True is not supported; supported: {supported}"
        )
    if name is None or name not in DDIM_FAMILY:
        has_betas = any(key in cfg for key in _BETA_KEYS)
        if not has_betas:
            raise FastdenseError(
                f"scheduler {name or '(config without _class_name)'} has no beta schedule (keys "
                f"{', '.join(_BETA_KEYS)}) and is not supported; supported: {supported}"
            )
    if sampler not in (None, "ddim"):
        raise FastdenseError(
            f"sampler={sampler!r} needs a {FLOW_SCHEDULER} config, got {name or 'a DDIM-family config'}; "
            "allowed for this config: 'ddim'"
        )
    if style is not None:
        raise FastdenseError(
            f"style={style!r} applies to {FLOW_SCHEDULER} configs only; got {name or 'a DDIM-family config'}"
        )
    return step_table(scheduler_config, num_steps, eta=eta)
