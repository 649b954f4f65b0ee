"""(A, B, σ) tables against diffusers' own DDIMScheduler.step."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

from fastdense.errors import FastdenseError
from fastdense.schedule import StepTable, step_table

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM config), written out.
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# SD2-style v-prediction DDIM config.
V_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "timestep_spacing": "leading",
}


def _fp64_ddim(config: dict, num_steps: int) -> DDIMScheduler:
    """diffusers' DDIMScheduler with its ᾱ upcast to float64, so that step() runs fully in fp64.

    (Stock step() computes its coefficients from float32 ᾱ: ~1e-4 relative error.)
    """
    sched = DDIMScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    sched.set_timesteps(num_steps)
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.to(torch.float64)
    return sched


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check_against_diffusers(config: dict, num_steps: int, eta: float) -> StepTable:
    table = step_table(config, num_steps, eta=eta)
    sched = _fp64_ddim(config, num_steps)
    assert table.num_steps == len(table) == num_steps
    torch.testing.assert_close(table.timesteps, sched.timesteps.to(torch.int64), rtol=0, atol=0)
    g = torch.Generator().manual_seed(1234)
    for t in range(num_steps):
        x, m, z = (torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=g) for _ in range(3))
        a, b, sigma = table.coefs(t)
        tau = table.timestep(t)
        # μ: step with zero noise; the full sample: step with noise z.
        mu_ref = sched.step(m, tau, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
        x_ref = sched.step(m, tau, x, eta=eta, variance_noise=z).prev_sample
        mu = a * x + b * m
        assert _rel(mu, mu_ref) < 1e-6, (t, tau)
        assert _rel(mu + sigma * z, x_ref) < 1e-6, (t, tau)
        torch.testing.assert_close(mu + sigma * z, x_ref, rtol=1e-6, atol=1e-9)
        if eta > 0:
            sigma_ref = (x_ref - mu_ref).norm() / z.norm()
            assert abs(sigma - float(sigma_ref)) <= 1e-6 * float(sigma_ref), (t, tau)
        else:
            assert sigma == 0.0
        # tensor columns agree with the float accessors
        assert float(table.coef_a[t]) == a and float(table.coef_b[t]) == b and float(table.sigma[t]) == sigma
    return table


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("config", [SD15_CONFIG, V_CONFIG], ids=["sd15_eps", "v_pred"])
@pytest.mark.parametrize("num_steps", [50, 7])
def test_matches_diffusers_eta1(config, spacing, num_steps):
    table = _check_against_diffusers({**config, "timestep_spacing": spacing}, num_steps, eta=1.0)
    assert table.has_density
    assert table.prediction_type == config.get("prediction_type", "epsilon")
    assert (table.timesteps[:-1] > table.timesteps[1:]).all()  # descending: t = 0 is from pure noise


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("config", [SD15_CONFIG, V_CONFIG], ids=["sd15_eps", "v_pred"])
def test_matches_diffusers_eta0(config, spacing):
    table = _check_against_diffusers({**config, "timestep_spacing": spacing}, 10, eta=0.0)
    assert not table.has_density


def test_intermediate_eta_and_one_step():
    _check_against_diffusers(SD15_CONFIG, 12, eta=0.5)
    _check_against_diffusers({**V_CONFIG, "timestep_spacing": "trailing"}, 1, eta=1.0)
    _check_against_diffusers(SD15_CONFIG, 1, eta=1.0)


def test_sd15_known_values():
    table = step_table(SD15_CONFIG, 50)
    assert table.timesteps[0] == 981 and table.timesteps[-1] == 1
    assert table.prev_timesteps[-1] == -19
    # last step lands on final_alpha_cumprod = ᾱ[0] (set_alpha_to_one=False)
    sched = DDIMScheduler.from_config({k: v for k, v in SD15_CONFIG.items() if not k.startswith("_")})
    assert float(table.alpha_cumprod_prev[-1]) == float(sched.alphas_cumprod[0])
    for col in (table.timesteps, table.prev_timesteps):
        assert col.dtype == torch.int64
    for col in (table.alpha_cumprod, table.alpha_cumprod_prev, table.coef_a, table.coef_b, table.sigma):
        assert col.dtype == torch.float64 and col.shape == (50,)


def test_stock_fp32_diffusers_close():
    """Against the unmodified (float32-coefficient) scheduler the agreement is ~1e-4."""
    table = step_table(SD15_CONFIG, 50)
    sched = PNDMScheduler.from_config(SD15_CONFIG)  # instances are accepted too
    assert step_table(sched, 50).timesteps.tolist() == table.timesteps.tolist()
    ddim = DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x, m, z = (torch.randn(3, 64, dtype=torch.float64, generator=g) for _ in range(3))
    for t in (0, 25, 49):
        a, b, s = table.coefs(t)
        ref = ddim.step(m, table.timestep(t), x, eta=1.0, variance_noise=z).prev_sample
        assert _rel(a * x + b * m + s * z, ref) < 1e-3


def test_ddpm_config_uses_ddim_spacing():
    ddpm = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    # DDPM has no set_alpha_to_one: DDIM's default (True) gives σ = 0 on the last step.
    with pytest.raises(FastdenseError, match="set_alpha_to_one=False"):
        step_table(ddpm, 20)
    cfg = {**ddpm.config, "set_alpha_to_one": False}
    table = _check_against_diffusers(dict(cfg), 20, eta=1.0)
    assert table.timesteps.tolist() == list(range(951, 0, -50))


def test_euler_instance_maps_like_diffusers():
    """Euler's own defaults (timestep_spacing='linspace', ...) are not carried over, as in diffusers."""
    # the original SD1.5 file has no timestep_spacing key: Euler fills in its default, linspace
    euler = EulerDiscreteScheduler.from_config({k: v for k, v in SD15_CONFIG.items() if k != "timestep_spacing"})
    assert euler.config.timestep_spacing == "linspace"
    table = step_table(euler, 50)
    ddim = DDIMScheduler.from_config(euler.config)
    ddim.set_timesteps(50)
    assert table.timesteps.tolist() == ddim.timesteps.tolist() == step_table(SD15_CONFIG, 50).timesteps.tolist()
    # a spacing the Euler config really sets is kept
    euler = EulerDiscreteScheduler.from_config({**SD15_CONFIG, "timestep_spacing": "trailing"})
    assert step_table(euler, 50).timesteps[0] == 999


def test_frozen_dict_config_and_to():
    sched = DDIMScheduler.from_config({k: v for k, v in V_CONFIG.items() if not k.startswith("_")})
    table = step_table(sched.config, 5)
    moved = table.to("cpu")
    assert isinstance(moved, StepTable) and moved.num_steps == 5 and moved.device.type == "cpu"
    a, b, s = table.coefs_at(torch.tensor([0, 4, 4]), dtype=torch.float32)
    assert a.dtype == torch.float32 and a.shape == (3,)
    assert float(b[1]) == pytest.approx(table.coefs(4)[1], rel=1e-6)
    with pytest.raises(FastdenseError, match="out of range"):
        table.coefs(5)


@pytest.mark.parametrize("config", [SD15_CONFIG, V_CONFIG], ids=["eps", "v"])
def test_x0_from_output(config):
    table = step_table(config, 10)
    abar = table.alpha_cumprod[3]
    x0 = torch.randn(2, 3, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = eps if table.prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(table.x0_from_output(x, out, 3), x0)
    torch.testing.assert_close(table.x0_from_output(x, out, torch.tensor([3, 3])), x0)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "num_steps", "eta", "match"),
    [
        ({"clip_sample": True}, 50, 1.0, "clip_sample=False"),
        ({"thresholding": True}, 50, 1.0, "thresholding=False"),
        ({"prediction_type": "sample"}, 50, 1.0, "prediction_type='sample'"),
        ({"prediction_type": "flow"}, 50, 1.0, "allowed: 'epsilon' or 'v_prediction'"),
        ({}, 0, 1.0, "1 <= num_steps <= num_train_timesteps"),
        ({}, 1001, 1.0, "1 <= num_steps <= num_train_timesteps"),
        ({}, 50, -0.1, "eta >= 0"),
        ({}, 50, float("nan"), "eta >= 0"),
        ({}, 50, 1.5, "eta <= 1"),
        ({"set_alpha_to_one": True}, 50, 1.0, "set set_alpha_to_one=False"),
        ({"timestep_spacing": "linspace"}, 50, 1.0, "timestep_spacing='leading' with steps_offset=1"),
        ({"steps_offset": 0}, 50, 1.0, "steps_offset=1"),
        ({"timestep_spacing": "quadratic"}, 50, 1.0, "cannot be used as a DDIM schedule"),
    ],
)
def test_refusals(change, num_steps, eta, match):
    with pytest.raises(FastdenseError, match=match):
        step_table({**SD15_CONFIG, **change}, num_steps, eta=eta)


def test_refusals_misc():
    with pytest.raises(FastdenseError, match="no clip_sample key"):
        step_table({k: v for k, v in SD15_CONFIG.items() if k != "clip_sample"}, 10)
    with pytest.raises(FastdenseError, match="diffusers scheduler or its config"):
        step_table(42, 10)
    with pytest.raises(FastdenseError, match="num_steps must be an int"):
        step_table(SD15_CONFIG, 10.0)
    # σ = 0 is fine for deterministic sampling
    assert not step_table({**SD15_CONFIG, "set_alpha_to_one": True}, 50, eta=0.0).has_density
    # trailing spacing's floating-point edge case in diffusers (61 steps give 62 timesteps)
    with pytest.raises(FastdenseError, match="another num_steps"):
        step_table({**SD15_CONFIG, "timestep_spacing": "trailing"}, 61)
    # zero terminal SNR: ε-prediction is undefined at ᾱ = 0, v-prediction is fine
    zsnr = {**V_CONFIG, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(FastdenseError, match="v_prediction"):
        step_table({**zsnr, "prediction_type": "epsilon"}, 10, eta=0.0)
    _check_against_diffusers(zsnr, 10, eta=1.0)
