"""Fused DDIM sampling step: every implementation against a float64 ground truth."""

import math

import pytest
import torch

from fastdense.kernels.ddim_step import ddim_step, ddim_step_triton
from fastdense.kernels.dispatch import resolve_impl

IMPLS = ["reference", "torch", "triton"]
F64 = torch.float64

# (eps dtype, out dtype); x and noise are float32.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
]
SHAPES = [(2, 4, 5, 7), (3, 3, 11, 13), (1, 1)]  # D = 140, 429, 1: none a multiple of a block


def _tol(dtype: torch.dtype) -> dict:
    # bf16: the Triton interpreter truncates on the cast (the GPU rounds to nearest), so allow 1 ulp.
    return {
        torch.float64: {"rtol": 1e-12, "atol": 1e-12},
        torch.float32: {"rtol": 2e-6, "atol": 1e-5},
        torch.float16: {"rtol": 2**-10, "atol": 1e-5},
        torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    }[dtype]


def _inputs(shape, eps_dtype=torch.float32, x_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(x_dtype)
    eps_c = torch.randn(shape, generator=g).to(eps_dtype)
    eps_u = (eps_c.double() + 0.3 * torch.randn(shape, generator=g, dtype=F64)).to(eps_dtype)
    noise = torch.randn(shape, generator=g).to(x_dtype)
    return x, eps_c, eps_u, noise


def _expected(x, eps_c, eps_u, noise, a, b, s, w):
    """μ and x' in float64 from the inputs as given."""
    n = x.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    a, b, s = (torch.as_tensor(c, dtype=F64).expand(n).reshape(view) for c in (a, b, s))
    eps = eps_c.double() if eps_u is None else eps_u.double() + w * (eps_c.double() - eps_u.double())
    mu = a * x.double() + b * eps
    return mu, mu + s * noise.double()


def _sq(t):
    return t.reshape(t.shape[0], -1).square().sum(1)


def _trajectory_buffer(shape, steps, dtype, slot):
    """A [B, steps+1, *S] buffer of random values with the target slot NaN-poisoned."""
    buf = torch.randn((shape[0], steps + 1) + tuple(shape[1:])).to(dtype)
    buf[:, slot] = float("nan")
    return buf


# --- correctness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("eps_dtype", "out_dtype"), DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
def test_against_fp64(impl, shape, eps_dtype, out_dtype, cfg):
    x, eps_c, eps_u, noise = _inputs(shape, eps_dtype)
    eps_u = eps_u if cfg else None
    n = shape[0]
    a = torch.linspace(0.8, 1.1, n)  # per-item coefficients, as for mixed-step batches
    b = -0.3
    s = torch.linspace(0.05, 0.4, n)
    w = 7.5
    buf = _trajectory_buffer(shape, steps=4, dtype=out_dtype, slot=2)
    before = buf.clone()
    out = buf[:, 2]  # strided view: dim-0 stride is 5·D
    assert out.stride(0) != out[0].numel() or n == 1

    res = ddim_step(x, eps_c, eps_u, noise, a, b, s, w, out, impl=impl)

    mu, x_new = _expected(x, eps_c, eps_u, noise, a, b, s, w)
    assert res.dtype == torch.float32 and res.shape == (n,)
    assert torch.isfinite(buf[:, 2]).all(), "unwritten elements in the target slot"
    torch.testing.assert_close(buf[:, 2].double(), x_new, **_tol(out_dtype))
    other = [k for k in range(5) if k != 2]
    assert torch.equal(buf[:, other], before[:, other]), "other trajectory slots were touched"
    # the residual is that of the value as stored (after the cast to out.dtype)
    torch.testing.assert_close(res.double(), _sq(buf[:, 2].double() - mu), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
def test_fp64_inputs_compute_in_fp64(impl, cfg):
    x, eps_c, eps_u, noise = (t.double() for t in _inputs((3, 2, 9, 7)))
    eps_u = eps_u if cfg else None
    a, b, s, w = 0.9871234567891, -0.31234567891, 0.123456789012, 3.3
    out = torch.full_like(x, float("nan"))
    res = ddim_step(x, eps_c, eps_u, noise, torch.tensor(a, dtype=F64), b, s, w, out, impl=impl)
    mu, x_new = _expected(x, eps_c, eps_u, noise, a, b, s, w)
    assert res.dtype == F64
    torch.testing.assert_close(out, x_new, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res, _sq(out - mu), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_residual_is_of_the_stored_value(impl):
    """Small σ with a bf16 destination: the cast error dominates, and it must be in the residual."""
    x, eps_c, eps_u, noise = _inputs((2, 4, 8, 8))
    a, b, s, w = 0.99, -0.2, 1e-3, 7.5
    out = torch.empty_like(x, dtype=torch.bfloat16)
    res = ddim_step(x, eps_c, eps_u, noise, a, b, s, w, out, impl=impl).double()
    mu, _ = _expected(x, eps_c, eps_u, noise, a, b, s, w)
    stored = _sq(out.double() - mu)
    naive = s**2 * _sq(noise.double())
    torch.testing.assert_close(res, stored, rtol=1e-4, atol=1e-9)
    assert ((res - naive).abs() > 0.5 * naive).all()  # the check can tell the two apart


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_sigma_zero_deterministic(impl, out_dtype):
    x, eps_c, eps_u, noise = _inputs((2, 3, 5, 5))
    out = torch.empty_like(x, dtype=out_dtype)
    res = ddim_step(x, eps_c, eps_u, noise, 0.95, -0.1, 0.0, 5.0, out, impl=impl)
    mu, _ = _expected(x, eps_c, eps_u, noise, 0.95, -0.1, 0.0, 5.0)
    torch.testing.assert_close(out.double(), mu, **_tol(out_dtype))
    if out_dtype == torch.float32:
        assert (res == 0).all()  # stored value is μ itself
    else:
        assert (res > 0).all()
        torch.testing.assert_close(res.double(), _sq(out.double() - mu), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_triton_multi_chunk(block_size):
    """Several chunks per item (D = 429 is a multiple of none of the blocks)."""
    x, eps_c, eps_u, noise = _inputs((3, 3, 11, 13), eps_dtype=torch.bfloat16)
    n = x.shape[0]
    coefs = [torch.tensor([0.9, 1.0, 1.1]), torch.tensor([-0.3, -0.2, -0.1]), torch.tensor([0.1, 0.2, 0.3])]
    buf = _trajectory_buffer(x.shape, steps=3, dtype=torch.float32, slot=1)
    res = ddim_step_triton(x, eps_c, eps_u, noise, *coefs, 7.5, buf[:, 1], block_size=block_size)
    ref_out = torch.empty_like(x)
    ref = ddim_step(x, eps_c, eps_u, noise, *coefs, 7.5, ref_out, impl="reference")
    assert res.shape == (n,)
    torch.testing.assert_close(buf[:, 1], ref_out, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(res, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_out_is_x(impl):
    x, eps_c, eps_u, noise = _inputs((2, 4, 6, 6))
    expect_out = torch.empty_like(x)
    expect = ddim_step(x, eps_c, eps_u, noise, 0.9, -0.3, 0.2, 7.5, expect_out, impl=impl)
    res = ddim_step(x, eps_c, eps_u, noise, 0.9, -0.3, 0.2, 7.5, x, impl=impl)
    assert torch.equal(x, expect_out) and torch.equal(res, expect)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_cfg_ignores_guidance(impl):
    x, eps_c, _, noise = _inputs((2, 3, 4, 4))
    out1, out2 = torch.empty_like(x), torch.empty_like(x)
    r1 = ddim_step(x, eps_c, None, noise, 0.9, -0.3, 0.2, 1.0, out1, impl=impl)
    r2 = ddim_step(x, eps_c, None, noise, 0.9, -0.3, 0.2, 7.5, out2, impl=impl)
    assert torch.equal(out1, out2) and torch.equal(r1, r2)


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_bitwise(impl):
    x, eps_c, eps_u, noise = _inputs((3, 4, 9, 9), eps_dtype=torch.bfloat16)
    outs, ress = [], []
    for _ in range(2):
        out = torch.empty_like(x, dtype=torch.bfloat16)
        ress.append(ddim_step(x, eps_c, eps_u, noise, 0.9, -0.3, 0.2, 7.5, out, impl=impl))
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(ress[0], ress[1])


def test_impls_agree_and_auto_is_triton_under_interpreter():
    assert resolve_impl("auto", "cpu") == "triton"  # conftest turns the interpreter on
    x, eps_c, eps_u, noise = _inputs((2, 4, 8, 8), eps_dtype=torch.float16)
    results = {}
    for impl in ["auto", *IMPLS]:
        out = torch.empty_like(x)
        results[impl] = (ddim_step(x, eps_c, eps_u, noise, 0.9, -0.3, 0.2, 7.5, out, impl=impl), out)
    for impl in IMPLS:
        torch.testing.assert_close(results[impl][1], results["reference"][1], rtol=2e-6, atol=1e-5)
        torch.testing.assert_close(results[impl][0], results["reference"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["auto"][1], results["triton"][1])


def test_step_table_coefficients_end_to_end():
    """With a real table: x' = μ + σz, and the residual is σ²‖z‖² for an fp32 destination."""
    from fastdense.schedule import step_table

    table = step_table(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        },
        10,
    )
    x, eps_c, eps_u, noise = _inputs((2, 4, 8, 8))
    for t in (0, 9):
        a, b, s = table.coefs(t)
        out = torch.empty_like(x)
        res = ddim_step(x, eps_c, eps_u, noise, a, b, s, 7.5, out)
        torch.testing.assert_close(res.double(), s**2 * _sq(noise.double()), rtol=1e-4, atol=1e-8)
        # per-item tensors straight from the (float64) table
        steps = torch.tensor([t, t])
        out2 = torch.empty_like(x)
        res2 = ddim_step(x, eps_c, eps_u, noise, *table.coefs_at(steps), 7.5, out2)
        torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res2, res, rtol=1e-5, atol=1e-8)


def test_empty_batch():
    x = torch.empty(0, 4, 2, 2)
    res = ddim_step(x, x, None, x, 1.0, 0.0, 1.0, 1.0, torch.empty_like(x))
    assert res.shape == (0,)


@pytest.mark.slow
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_torch_compile_matches_reference(out_dtype):
    """Compiled path: written through the view, residual of the *stored* (rounded) value.

    Small σ so that the cast error dominates the residual: without ``emulate_precision_casts``
    Inductor folds the round trip and this fails.
    """
    x, eps_c, eps_u, noise = _inputs((2, 4, 8, 8), eps_dtype=torch.bfloat16)
    buf = _trajectory_buffer(x.shape, steps=2, dtype=out_dtype, slot=1)
    before = buf.clone()
    args = (x, eps_c, eps_u, noise, 0.9, -0.3, 1e-3, 7.5)
    res = ddim_step(*args, buf[:, 1], impl="torch_compile")
    ref_out = torch.empty_like(x, dtype=out_dtype)
    ref = ddim_step(*args, ref_out, impl="reference")
    torch.testing.assert_close(buf[:, 1], ref_out, **_tol(out_dtype))
    mu, _ = _expected(*args)
    torch.testing.assert_close(res.double(), _sq(buf[:, 1].double() - mu), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res, ref, rtol=1e-3, atol=1e-9)
    assert torch.equal(buf[:, [0, 2]], before[:, [0, 2]])


# --- bad inputs ----------------------------------------------------------------------------------


def _good(shape=(2, 3, 4, 4)):
    x, eps_c, eps_u, noise = _inputs(shape)
    return {
        "x": x,
        "eps_cond": eps_c,
        "eps_uncond": eps_u,
        "noise": noise,
        "coef_a": 0.9,
        "coef_b": -0.3,
        "sigma": 0.2,
        "guidance": 7.5,
        "out": torch.empty_like(x),
    }


def _bad_cases():
    def transposed(t):
        return t.transpose(2, 3)

    buf = torch.zeros(2 * 48 + 1)
    cases = [
        ("x", lambda k: [1.0], "x must be a torch.Tensor"),
        ("x", lambda k: torch.zeros(2), "at least one sample dim"),
        ("eps_cond", lambda k: torch.zeros(2, 3, 4, 5), "eps_cond has shape"),
        ("eps_uncond", lambda k: torch.zeros(2, 3, 4, 4, device="meta"), "eps_uncond is on meta"),
        ("noise", lambda k: torch.zeros(2, 3, 4, 4, dtype=torch.int32), "noise has dtype torch.int32"),
        ("out", lambda k: torch.zeros(2, 3, 4, 4, dtype=torch.int64), "out has dtype"),
        ("out", lambda k: transposed(torch.zeros(2, 3, 4, 4)), "each item t\\[i\\] must be contiguous"),
        ("eps_cond", lambda k: transposed(k["eps_cond"].clone()), "each item"),
        ("out", lambda k: torch.zeros(48).expand(2, 48).view(2, 3, 4, 4), "items overlap each other"),
        ("sigma", lambda k: -0.1, "sigma=-0.1 must be >= 0"),
        ("sigma", lambda k: torch.tensor([0.1, -0.1]), "sigma has negative entries"),
        ("sigma", lambda k: torch.tensor([0.1, 0.2, 0.3]), "sigma has shape"),
        ("coef_a", lambda k: float("inf"), "coef_a=inf must be finite"),
        ("coef_b", lambda k: torch.tensor([1.0, float("nan")]), "coef_b has non-finite"),
        ("coef_b", lambda k: "0.3", "coef_b must be a real number"),
        ("coef_a", lambda k: torch.tensor([1, 2]), "coef_a has dtype torch.int64"),
        ("guidance", lambda k: True, "guidance must be a python number"),
        ("guidance", lambda k: torch.tensor(7.5), "guidance must be a python number"),
        ("guidance", lambda k: float("nan"), "guidance=nan must be finite"),
        ("impl", lambda k: "cuda_magic", "impl='cuda_magic' is not an implementation"),
    ]
    # out partially overlapping an input: shifted by one element in the same storage
    cases.append(
        (
            "out",
            lambda k: (k.__setitem__("x", buf[:96].view(2, 3, 4, 4)), buf[1:97].view(2, 3, 4, 4))[1],
            "out partially overlaps x",
        )
    )
    return cases


@pytest.mark.parametrize(("arg", "make", "match"), _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs(arg, make, match):
    kwargs = _good()
    kwargs[arg] = make(kwargs)
    with pytest.raises(ValueError, match=match):
        ddim_step(**kwargs)


def test_interleaved_trajectory_slots_are_not_overlap():
    """x = buf[:, t], out = buf[:, t + 1]: byte spans interleave but no element is shared."""
    shape = (4, 3, 4, 4)
    buf = torch.randn((shape[0], 3) + shape[1:])
    k = _good(shape)
    k["x"], k["out"] = buf[:, 0], buf[:, 1]
    ddim_step(**k)
    # and a view that does share elements with x is refused
    k["out"] = buf.view(shape[0], -1)[:, 8 : 8 + 48].view(shape)
    k["x"] = buf.view(shape[0], -1)[:, :48].view(shape)
    with pytest.raises(ValueError, match="partially overlaps x"):
        ddim_step(**k)
    assert math.isfinite(float(buf.sum()))
