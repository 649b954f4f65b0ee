"""Flow-matching (A, B, σ) tables (DESIGN.md §1b) against diffusers' FlowMatchEulerDiscreteScheduler.step
(ODE) and the published Flow-GRPO SDE / coefficients-preserving (CPS) updates, written out here in fp64;
make_step_table's dispatch and every refusal."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import is_scipy_available

from fastdense.errors import FastdenseError
from fastdense.schedule import (
    FLOW_SAMPLERS,
    SAMPLERS,
    StepTable,
    flow_schedule_args,
    flow_step_table,
    make_step_table,
    step_table,
)

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (SD3 medium's is the same), written out.
SD3_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json, written out.
FLUX_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# An SD1.5-style DDIM config (as in test_schedule.py).
DDIM_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pipeline_scheduler(config: dict, num_steps: int, style: str, image_seq_len: int):
    """The scheduler after the pipeline's own step 5 ("Prepare timesteps"), written out from
    StableDiffusion3Pipeline / FluxPipeline.__call__ with diffusers' own helpers."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    if style == "flux":
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(
            image_seq_len,
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
    else:
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(
                image_seq_len,
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(sched, num_steps, "cpu", sigmas=None, **kwargs)
    return sched


def _table(config: dict, num_steps: int, style: str, image_seq_len: int, sampler: str, noise_level: float = 0.7):
    args = flow_schedule_args(config, num_steps, image_seq_len=image_seq_len, style=style)
    return flow_step_table(config, num_steps, sampler=sampler, noise_level=noise_level, **args)


CASES = [
    pytest.param(SD3_CONFIG, "sd3", 4096, id="sd3"),
    pytest.param(FLUX_CONFIG, "flux", 4096, id="flux-1024px"),
    pytest.param(FLUX_CONFIG, "flux", 16, id="flux-tiny"),
    pytest.param({**SD3_CONFIG, "use_dynamic_shifting": True}, "sd3", 1024, id="sd3-dynamic"),
]


# --- ODE: diffusers' own step ---------------------------------------------------------------------


def _check_ode_against_diffusers(table: StepTable, sched: FlowMatchEulerDiscreteScheduler) -> None:
    assert table.sampler == "ode" and table.prediction_type == "flow" and table.eta == 0.0
    assert table.timesteps.dtype == torch.float32
    torch.testing.assert_close(table.timesteps, sched.timesteps, rtol=0, atol=0)
    assert table.sigmas.dtype == torch.float64 and table.sigmas.shape == (table.num_steps + 1,)
    assert table.sigmas.tolist() == sched.sigmas.tolist()
    assert not table.has_density and table.density_steps.numel() == 0
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t, tau in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        want = sched.step(v, tau, x).prev_sample
        a, b, sigma = table.coefs(t)
        assert table.timestep(t) == float(tau)
        got = a * x.double() + b * v.double()
        assert sigma == 0.0
        # diffusers' step is float32 throughout (≈1e-7), so also pin the coefficients themselves: A = 1 and
        # B = Δ of diffusers' own float32 sigmas, exactly
        assert a == 1.0 and b == float(sched.sigmas[t + 1]) - float(sched.sigmas[t]), t
        assert _rel(got, want.double()) <= 1e-6, t
        x = want  # follow diffusers' own chain


@pytest.mark.parametrize(("config", "style", "image_seq_len"), CASES)
@pytest.mark.parametrize("num_steps", [28, 10, 1])
def test_ode_matches_diffusers_step(config, style, image_seq_len, num_steps):
    table = _table(config, num_steps, style, image_seq_len, "ode")
    _check_ode_against_diffusers(table, _pipeline_scheduler(config, num_steps, style, image_seq_len))


@pytest.mark.parametrize(
    "change",
    [
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"shift_terminal": 0.02},
        {"time_shift_type": "linear", "use_dynamic_shifting": True},
        pytest.param(
            {"use_beta_sigmas": True},
            marks=pytest.mark.skipif(not is_scipy_available(), reason="beta sigmas need scipy"),
        ),
    ],
    ids=lambda c: ",".join(c),
)
def test_ode_sigma_options_follow_diffusers(change):
    config = {**SD3_CONFIG, **change}
    table = _table(config, 12, "sd3", 1024, "ode")
    _check_ode_against_diffusers(table, _pipeline_scheduler(config, 12, "sd3", 1024))


def test_schedule_args_are_the_pipelines():
    sd3 = flow_schedule_args(SD3_CONFIG, 28, image_seq_len=4096, style="sd3")
    assert sd3 == {"sigmas": None, "mu": None}  # SD3 / SD3.5 use the config's shift, no mu
    assert flow_schedule_args(SD3_CONFIG, 28, style="sd3") == sd3  # no image_seq_len needed then
    flux = flow_schedule_args(FLUX_CONFIG, 28, image_seq_len=4096, style="flux")
    np.testing.assert_array_equal(flux["sigmas"], np.linspace(1.0, 1 / 28, 28))
    assert flux["mu"] == pytest.approx(1.15, abs=1e-12)  # 4096 tokens: max_shift
    assert flow_schedule_args(FLUX_CONFIG, 28, image_seq_len=256, style="flux")["mu"] == pytest.approx(0.5)
    # a config without max_shift takes diffusers' default 1.15 (from the scheduler class) in both styles
    dyn = {k: v for k, v in FLUX_CONFIG.items() if k != "max_shift"}
    assert flow_schedule_args(dyn, 4, image_seq_len=4096, style="sd3")["mu"] == pytest.approx(1.15)
    # FluxPipeline drops its sigmas when the config asks for flow sigmas
    assert flow_schedule_args({**FLUX_CONFIG, "use_flow_sigmas": True}, 4, image_seq_len=64, style="flux")[
        "sigmas"
    ] is None


# --- SDE and CPS: the published updates in fp64 -----------------------------------------------------


def _published_sde(sigmas: torch.Tensor, i: int, x, v, z, a: float):
    """Flow-GRPO's sde_step_with_logprob (fp64): returns (x', mean, std of x')."""
    sigma, sigma_prev, sigma_max = sigmas[i], sigmas[i + 1], sigmas[1]
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * torch.sqrt(-1 * dt)
    return mean + std * z, mean, std


def _published_cps(sigmas: torch.Tensor, i: int, x, v, z, a: float):
    """The coefficients-preserving step (fp64): returns (x', mean, std of x')."""
    s, s_next = sigmas[i], sigmas[i + 1]
    std = s_next * math.sin(a * math.pi / 2)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - std**2) * x1_hat
    return mean + std * z, mean, std


@pytest.mark.parametrize(("config", "style", "image_seq_len"), CASES)
@pytest.mark.parametrize(("sampler", "published"), [("sde", _published_sde), ("cps", _published_cps)])
@pytest.mark.parametrize(("num_steps", "noise_level"), [(10, 0.7), (40, 1.0), (3, 0.3), (1, 0.7)])
def test_stochastic_tables_match_published_updates(config, style, image_seq_len, sampler, published, num_steps,
                                                   noise_level):
    table = _table(config, num_steps, style, image_seq_len, sampler, noise_level)
    assert table.sampler == sampler and table.eta == noise_level and table.prediction_type == "flow"
    sched = _pipeline_scheduler(config, num_steps, style, image_seq_len)
    sigmas = sched.sigmas.to(torch.float64)  # diffusers' float32 values
    assert table.sigmas.tolist() == sigmas.tolist()
    g = torch.Generator().manual_seed(3)
    for t in range(num_steps):
        x, v, z = (torch.randn(2, 16, 8, dtype=torch.float64, generator=g) for _ in range(3))
        want, want_mean, want_std = published(sigmas, t, x, v, z, noise_level)
        a, b, sigma = table.coefs(t)
        assert _rel(a * x + b * v, want_mean) <= 1e-12, t
        assert _rel(a * x + b * v + sigma * z, want) <= 1e-12, t
        assert abs(sigma - float(want_std)) <= 1e-12 * max(float(want_std), 1e-300) or sigma == float(want_std) == 0
    if sampler == "sde":
        assert table.has_density
        assert table.density_steps.tolist() == list(range(num_steps))
    else:  # CPS's last step lands on s' = 0: no noise, no density
        assert float(table.sigma[-1]) == 0.0 and bool((table.sigma[:-1] > 0).all())
        assert not table.has_density
        assert table.density_steps.tolist() == list(range(num_steps - 1))


def test_noise_level_zero_limits_are_the_ode():
    """Both stochastic samplers tend to diffusers' Euler step as the noise level goes to 0."""
    ode = flow_step_table(SD3_CONFIG, 10, sampler="ode")
    for sampler in ("sde", "cps"):
        tiny = flow_step_table(SD3_CONFIG, 10, sampler=sampler, noise_level=1e-9)
        torch.testing.assert_close(tiny.coef_a, ode.coef_a, rtol=0, atol=1e-12)
        torch.testing.assert_close(tiny.coef_b, ode.coef_b, rtol=0, atol=1e-12)


# --- the table object -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", FLOW_SAMPLERS)
def test_flow_x0_from_output(sampler):
    table = flow_step_table(SD3_CONFIG, 10, sampler=sampler)
    s = table.sigmas[4]
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    x = (1 - s) * x0 + s * noise  # rectified flow: x_s = (1 - s)·x0 + s·ε, velocity v = ε − x0
    v = noise - x0
    torch.testing.assert_close(table.x0_from_output(x, v, 4), x0)
    torch.testing.assert_close(table.x0_from_output(x, v, torch.tensor([4, 4])), x0)
    # per-item steps: item 1 at another step gives another (wrong) answer
    other = table.x0_from_output(x, v, torch.tensor([4, 7]))
    torch.testing.assert_close(other[0], x0[0])
    assert not torch.allclose(other[1], x0[1])


def test_flow_table_fields_and_repr():
    table = make_step_table(SD3_CONFIG, 6, sampler="cps", eta=0.5)
    assert table.prev_timesteps is None and table.alpha_cumprod is None and table.alpha_cumprod_prev is None
    for col in (table.coef_a, table.coef_b, table.sigma):
        assert col.dtype == torch.float64 and col.shape == (6,)
    assert isinstance(table.timestep(0), float) and table.timestep(0) == 1000.0
    assert "sampler='cps'" in repr(table) and "eta=0.5" in repr(table)
    moved = table.to("cpu")
    assert moved.sampler == "cps" and moved.sigmas.tolist() == table.sigmas.tolist()
    a, _, sigma = table.coefs_at(torch.tensor([0, 5]), dtype=torch.float32)
    assert a.dtype == torch.float32 and float(sigma[1]) == 0.0


def test_ddim_tables_keep_their_fields():
    table = step_table(DDIM_CONFIG, 10)
    assert table.sampler == "ddim" and table.sigmas is None
    assert "sampler='ddim'" in repr(table)
    assert isinstance(table.timestep(0), int)
    assert table.density_steps.tolist() == list(range(10))
    assert step_table(DDIM_CONFIG, 10, eta=0.0).density_steps.numel() == 0


# --- make_step_table ------------------------------------------------------------------------------


def test_make_step_table_flow_dispatch():
    assert SAMPLERS == ("ddim", "sde", "cps", "ode") and FLOW_SAMPLERS == ("sde", "cps", "ode")
    default = make_step_table(SD3_CONFIG, 10, eta=0.7)
    assert default.sampler == "sde" and default.eta == 0.7
    ref = flow_step_table(SD3_CONFIG, 10, sampler="sde", noise_level=0.7)
    for name in ("timesteps", "sigmas", "coef_a", "coef_b", "sigma"):
        assert torch.equal(getattr(default, name), getattr(ref, name)), name
    # eta = 0 is the ODE whatever stochastic sampler was asked for; "ode" ignores eta
    for sampler in (None, "sde", "cps", "ode"):
        table = make_step_table(SD3_CONFIG, 10, sampler=sampler, eta=0.0)
        assert table.sampler == "ode" and table.eta == 0.0 and not bool(table.sigma.any())
    assert make_step_table(SD3_CONFIG, 10, sampler="ode", eta=0.7).sampler == "ode"
    # FLUX: style and image_seq_len give the pipeline's sigmas and mu
    flux = make_step_table(FLUX_CONFIG, 28, sampler="cps", eta=0.9, image_seq_len=1024, style="flux")
    want = _table(FLUX_CONFIG, 28, "flux", 1024, "cps", 0.9)
    assert flux.sigmas.tolist() == want.sigmas.tolist() and torch.equal(flux.coef_b, want.coef_b)
    # an instance works as well as its config
    inst = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert make_step_table(inst, 10, eta=0.7).sigmas.tolist() == default.sigmas.tolist()


def test_make_step_table_ddim_is_step_table():
    for sampler in (None, "ddim"):
        for eta in (1.0, 0.0):
            got = make_step_table(DDIM_CONFIG, 20, sampler=sampler, eta=eta, image_seq_len=4096)
            want = step_table(DDIM_CONFIG, 20, eta=eta)
            for name in ("timesteps", "prev_timesteps", "alpha_cumprod", "alpha_cumprod_prev", "coef_a", "coef_b",
                         "sigma"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
            assert got.sampler == "ddim" and got.eta == eta
    # other DDIM-family classes (and unnamed configs with a beta schedule) go through step_table, as before
    pndm = {**DDIM_CONFIG, "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    assert make_step_table(pndm, 20).timesteps.tolist() == step_table(pndm, 20).timesteps.tolist()
    unnamed = {k: v for k, v in DDIM_CONFIG.items() if k != "_class_name"}
    assert make_step_table(unnamed, 20).timesteps.tolist() == step_table(DDIM_CONFIG, 20).timesteps.tolist()
    exotic = {**DDIM_CONFIG, "_class_name": "SomeNewBetaScheduler"}
    assert make_step_table(exotic, 20).timesteps.tolist() == step_table(DDIM_CONFIG, 20).timesteps.tolist()
    # step_table's own refusals still apply
    with pytest.raises(FastdenseError, match="clip_sample=False"):
        make_step_table({**DDIM_CONFIG, "clip_sample": True}, 20)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sampler="heun"), r"sampler='heun' is not a flow-matching sampler; allowed: 'sde', 'cps', 'ode'"),
        (dict(sampler="ddim"), r"sampler='ddim' is not a flow-matching sampler.*step_table"),
        (dict(sampler="sde", noise_level=0.0), r"noise_level=0.0 .*use sampler='ode' for deterministic sampling"),
        (dict(sampler="cps", noise_level=-0.2), r"noise_level=-0.2 .*use sampler='ode'"),
        (dict(sampler="sde", noise_level=float("nan")), r"noise_level=nan .*finite"),
        (dict(sampler="cps", noise_level=float("inf")), r"noise_level=inf .*finite"),
        (dict(sampler="sde", noise_level=True), r"noise_level=True"),
        (dict(sampler="cps", noise_level=1.2), r"noise_level=1.2 .*sampler='cps'.*\(0, 1\]"),
        (dict(num_steps=0), r"num_steps=0 .*num_steps >= 1"),
        (dict(num_steps=2.0), r"num_steps must be an int, got 2.0"),
        (dict(num_steps=3, sigmas=[1.0, 0.5]), r"set_timesteps\(3\) failed"),
    ],
)
def test_flow_refusals(kwargs, match):
    num_steps = kwargs.pop("num_steps", 10)
    with pytest.raises(FastdenseError, match=match):
        flow_step_table(SD3_CONFIG, num_steps, **kwargs)


@pytest.mark.parametrize("key", ["stochastic_sampling", "invert_sigmas"])
def test_refuses_steps_that_are_not_the_euler_step(key):
    for sampler in FLOW_SAMPLERS:
        with pytest.raises(FastdenseError, match=rf"{key}=True .*not linear-Gaussian in the form fastdense computes"):
            flow_step_table({**SD3_CONFIG, key: True}, 10, sampler=sampler)
    with pytest.raises(FastdenseError, match=key):
        make_step_table({**SD3_CONFIG, key: True}, 10)


def test_refuses_bad_sigmas_and_missing_mu():
    with pytest.raises(FastdenseError, match=r"needs? mu|pass mu=.*flow_schedule_args"):
        flow_step_table(FLUX_CONFIG, 10)
    plain = {**SD3_CONFIG, "shift": 1.0}
    with pytest.raises(FastdenseError, match=r"sigmas must fall strictly .* step t=0"):
        flow_step_table(plain, 3, sigmas=[0.5, 0.7, 0.2])
    with pytest.raises(FastdenseError, match=r"s_0 <= 1"):
        flow_step_table(plain, 2, sigmas=[1.5, 0.5])
    with pytest.raises(FastdenseError, match=r"flow step tables need a FlowMatchEulerDiscreteScheduler config, "
                                             r"got DDIMScheduler"):
        flow_step_table(DDIM_CONFIG, 10)
    with pytest.raises(FastdenseError, match="diffusers scheduler or its config"):
        flow_step_table(3.0, 10)


@pytest.mark.skipif(is_scipy_available(), reason="scipy is installed")
def test_beta_sigmas_without_scipy_is_one_line():
    with pytest.raises(FastdenseError, match="scipy"):
        flow_step_table({**SD3_CONFIG, "use_beta_sigmas": True}, 10)


def test_schedule_args_refusals():
    with pytest.raises(FastdenseError, match=r"style='sdxl' is not allowed; allowed: 'sd3', 'flux'"):
        flow_schedule_args(SD3_CONFIG, 10, image_seq_len=16, style="sdxl")
    with pytest.raises(FastdenseError, match=r"image_seq_len=None .*FluxPipeline"):
        flow_schedule_args(FLUX_CONFIG, 10, style="flux")
    with pytest.raises(FastdenseError, match=r"image_seq_len=0 .*use_dynamic_shifting=True"):
        flow_schedule_args(FLUX_CONFIG, 10, image_seq_len=0, style="sd3")
    with pytest.raises(FastdenseError, match=r"image_seq_len=None .*use_dynamic_shifting=True"):
        make_step_table(FLUX_CONFIG, 10)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        ({"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0}, {},
         r"scheduler FlowMatchHeunDiscreteScheduler is not supported; supported: FlowMatchEulerDiscreteScheduler"),
        ({"_class_name": "FlowMatchLCMScheduler", "shift": 3.0}, {}, r"FlowMatchLCMScheduler is not supported"),
        ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "prediction_type": "flow_prediction",
          "beta_schedule": "linear"}, {}, r"use_flow_sigmas=True is not supported"),
        ({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002}, {},
         r"EDMEulerScheduler has no beta schedule .* supported: FlowMatchEulerDiscreteScheduler"),
        ({"shift": 3.0}, {}, r"config without _class_name\) has no beta schedule"),
        (SD3_CONFIG, {"sampler": "ddim"}, r"sampler='ddim' does not apply to a FlowMatchEulerDiscreteScheduler"),
        (SD3_CONFIG, {"sampler": "euler"}, r"sampler='euler' is not allowed; allowed: 'ddim', 'sde', 'cps', 'ode'"),
        (SD3_CONFIG, {"style": "sdxl"}, r"style='sdxl' is not allowed"),
        (SD3_CONFIG, {"eta": -0.5}, r"noise_level=-0.5 .*use sampler='ode'"),
        (DDIM_CONFIG, {"sampler": "sde"}, r"sampler='sde' needs a FlowMatchEulerDiscreteScheduler config, "
                                          r"got DDIMScheduler; allowed for this config: 'ddim'"),
        (DDIM_CONFIG, {"style": "flux"}, r"style='flux' applies to FlowMatchEulerDiscreteScheduler configs only"),
    ],
)
def test_make_step_table_refusals(config, kwargs, match):
    with pytest.raises(FastdenseError, match=match) as info:
        make_step_table(config, 10, **kwargs)
    assert "\n" not in str(info.value)
