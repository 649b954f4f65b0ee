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

__all__ = ["PREDICTION_TYPES", "StepTable", "step_table"]


@dataclass(frozen=True, eq=False)
class StepTable:
    """(A, B, σ) for each generation step t = 0..T-1 (t = 0 is from pure noise).

    All tensors have shape [T]; coefficient tensors are float64.
    """

    timesteps: Tensor  # [T] int64, train timestep τ of step t (descending)
    prev_timesteps: Tensor  # [T] int64, τ - K // T (negative → final_alpha_cumprod)
    alpha_cumprod: Tensor  # [T] float64, ᾱ[τ]
    alpha_cumprod_prev: Tensor  # [T] float64, ᾱ[prev]
    coef_a: Tensor  # [T] float64, A
    coef_b: Tensor  # [T] float64, B
    sigma: Tensor  # [T] float64, σ (0 everywhere when eta = 0)
    prediction_type: str  # "epsilon" | "v_prediction"
    eta: float

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

    def timestep(self, t: int) -> int:
        """Train timestep τ of generation step ``t`` (what the UNet is conditioned on)."""
        return int(self.timesteps[self._check_step(t)])

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
        """
        dtype = torch.promote_types(torch.promote_types(x.dtype, output.dtype), torch.float32)
        if isinstance(t, Tensor):
            idx = t.to(device=self.device, dtype=torch.int64)
            abar = self.alpha_cumprod[idx].to(device=x.device, dtype=dtype)
            abar = abar.reshape(abar.shape + (1,) * (x.dim() - abar.dim()))
        else:
            abar = torch.tensor(float(self.alpha_cumprod[self._check_step(t)]), dtype=dtype, device=x.device)
        xs, ms = x.to(dtype), output.to(dtype)
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
            f"StepTable(num_steps={self.num_steps}, prediction_type={self.prediction_type!r}, eta={self.eta}, "
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
