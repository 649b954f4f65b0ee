"""The training log-ratio op: every implementation against the float64 reference.

Triton runs under its interpreter (TRITON_INTERPRET=1, set in conftest.py) with small
blocks, so that several chunks, partial blocks and several item blocks are exercised; its
outputs are NaN-poisoned before every run so that an unwritten element fails the test.
``torch_compile`` is exercised by one opt-in test (compiling costs ~30 s on CPU): set
FASTDENSE_TEST_COMPILE=1 to run it.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdense.kernels.log_ratio as lr_mod
from fastdense.kernels.dispatch import triton_available, triton_interpreted
from fastdense.kernels.log_ratio import log_ratio, squared_residual
from fastdense.kernels.log_ratio_torch import (
    log_ratio_naive,
    log_ratio_reference,
    squared_residual_reference,
)

needs_triton = pytest.mark.skipif(
    not (triton_available() and triton_interpreted()), reason="needs triton with TRITON_INTERPRET=1"
)
TRITON = pytest.param("triton", marks=[needs_triton, pytest.mark.triton])

# Max error relative to the largest reference magnitude, per eps dtype. Logits / ratios are
# accumulated in fp32 from the stored values whatever the input dtype; gradients are rounded
# to the eps dtype.
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}


# ---------------------------------------------------------------------------
# Helpers


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every Triton output starts as NaN (catches unwritten elements)."""
    monkeypatch.setattr(lr_mod, "_empty", _nan_empty)


@pytest.fixture
def small_blocks(monkeypatch, poisoned):
    """Blocks of 32, chunks of 64 elements, item blocks of 4: D and N straddle every boundary."""
    monkeypatch.setattr(lr_mod, "_launch_config", lambda n, d: (32, 64, math.ceil(d / 64)))
    monkeypatch.setattr(lr_mod, "_BLOCK_N", 4)


def make_case(n, shape, *, r=1, cfg=True, eps_dtype=torch.float32, state_dtype=torch.float32, num_traj=3,
              guidance=7.5, scalar_floats=False, empty_last=False, seed=0):
    """Random inputs shaped like a batch of stored DDIM transitions (never zeros).

    x' was sampled from a reference policy; the trained policy's outputs differ from it by a
    perturbation, so the ratios vary in size and sign across items. ``ref_sq`` is the fp32
    cache computed in float64 from the stored values.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    bshape = (n, *([1] * len(shape)))
    a = 0.9 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    b = -0.05 - 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    sigma = 0.05 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    eps_u_ref, eps_c_ref = rnd(n, *shape), rnd(n, *shape)
    x = rnd(n, *shape)

    def eps_hat(c, u):
        return c if not cfg else u + guidance * (c - u)

    x_next = a.view(bshape) * x + b.view(bshape) * eps_hat(eps_c_ref, eps_u_ref) + sigma.view(bshape) * rnd(n, *shape)
    x, x_next = x.to(state_dtype), x_next.to(state_dtype)
    scale = 0.3 * (0.2 + torch.rand(bshape, generator=g, dtype=torch.float64))
    eps_c = (eps_c_ref + scale * rnd(n, *shape)).to(eps_dtype)
    eps_u = (eps_u_ref + scale * rnd(n, *shape)).to(eps_dtype)

    def sq(c, u):
        c, u = c.to(eps_dtype).double(), u.to(eps_dtype).double()
        rr = x_next.double() - a.view(bshape) * x.double() - b.view(bshape) * eps_hat(c, u)
        return rr.square().flatten(1).sum(1)

    cols = [sq(eps_c_ref, eps_u_ref)]
    if r > 1:
        cols.append(sq(eps_c_ref + 0.5 * scale * rnd(n, *shape), eps_u_ref + 0.5 * scale * rnd(n, *shape)))
    ref_sq = (torch.stack(cols, 1) if r > 1 else cols[0]).float()
    weight = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    traj = torch.randint(0, num_traj - 1 if empty_last else num_traj, (n,), generator=g)
    case = dict(
        eps_cond=eps_c, eps_uncond=eps_u if cfg else None, x=x, x_next=x_next,
        coef_a=a.float(), coef_b=b.float(), sigma=sigma.float(), ref_sq=ref_sq, weight=weight.float(),
        traj_index=traj, num_traj=num_traj, guidance=guidance if cfg else 1.0,
    )
    if scalar_floats:  # python numbers for the scalars (the per_item path)
        case.update(coef_a=0.95, sigma=0.1, weight=2.5)
    return case


def to64(case):
    out = dict(case)
    for k, v in case.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = v.detach().double()
    return out


def run(case, impl, *, clip=math.inf, reduction="mean", upstream=None):
    """(logits, ratio, grad_c, grad_u) of one forward + backward; eps are fresh leaves."""
    case = dict(case)
    case["eps_cond"] = case["eps_cond"].detach().clone().requires_grad_(True)
    if case["eps_uncond"] is not None:
        case["eps_uncond"] = case["eps_uncond"].detach().clone().requires_grad_(True)
    kw = dict(clip=clip, reduction=reduction)
    out = log_ratio(**case, impl=impl, **kw)
    if upstream is None:
        upstream = torch.randn(case["num_traj"], generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    out.logits.backward(upstream.to(out.logits.dtype))
    gu = case["eps_uncond"].grad if case["eps_uncond"] is not None else None
    return out.logits.detach(), out.ratio, case["eps_cond"].grad, gu


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def pick_clip(ratio):
    """A clip value in a wide gap of |ℓ| such that some items are fully clipped and some are not."""
    ratio = ratio.reshape(ratio.shape[0], -1).abs()
    vals = ratio.flatten().sort().values
    best, best_gap = None, 0.0
    for lo, hi in zip(vals[:-1].tolist(), vals[1:].tolist(), strict=True):
        c = 0.5 * (lo + hi)
        fully = (ratio > c).all(1)
        if fully.any() and (~fully).any() and (hi - lo) / c > best_gap:
            best, best_gap = c, (hi - lo) / c
    assert best is not None and best_gap > 1e-3, "test data has no usable clip gap"
    return float(torch.tensor(best, dtype=torch.float32))  # exact in fp32: the kernels take c in fp32


# ---------------------------------------------------------------------------
# Agreement with the float64 reference

CASES = {
    # name: (n, shape, make_case kwargs, reduction)
    "cfg-r1-mean-fp32": (7, (3, 5, 7), dict(r=1), "mean"),
    "nocfg-r2-sum-fp32": (5, (2, 13, 11), dict(r=2, cfg=False, num_traj=4, empty_last=True), "sum"),
    "cfg-r2-mean-bf16eps-fp32states": (6, (4, 8, 8), dict(r=2, eps_dtype=torch.bfloat16, guidance=1.5), "mean"),
    "cfg-r1-sum-fp16": (3, (37,), dict(eps_dtype=torch.float16, state_dtype=torch.float16, num_traj=2), "sum"),
    "cfg-r2-mean-bf16-floats": (
        9, (3, 7, 7), dict(r=2, eps_dtype=torch.bfloat16, state_dtype=torch.bfloat16, scalar_floats=True), "mean"),
}


@pytest.mark.parametrize("clipped", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
def test_matches_float64_reference(impl, name, clipped, small_blocks):
    n, shape, kw, reduction = CASES[name]
    case = make_case(n, shape, **kw)
    eps_dtype = case["eps_cond"].dtype
    ref_unclipped = log_ratio_reference(**to64(case), reduction=reduction).ratio
    clip = pick_clip(ref_unclipped) if clipped else math.inf

    want = run(to64(case), "reference", clip=clip, reduction=reduction)
    got = run(case, impl, clip=clip, reduction=reduction)
    logits, ratio, gc, gu = got

    assert logits.dtype == torch.float32 and logits.shape == (case["num_traj"],)
    assert ratio.dtype == torch.float32 and ratio.shape == case["ref_sq"].shape and not ratio.requires_grad
    assert gc.dtype == eps_dtype and gc.shape == case["eps_cond"].shape
    for t in (logits, ratio, gc) + ((gu,) if gu is not None else ()):
        assert torch.isfinite(t).all(), "unwritten (NaN-poisoned) or non-finite element"
    assert rel_err(ratio, want[1]) <= VALUE_TOL[eps_dtype]
    assert rel_err(logits, want[0]) <= VALUE_TOL[eps_dtype]
    assert rel_err(gc, want[2]) <= GRAD_TOL[eps_dtype]
    if case["eps_uncond"] is None:
        assert gu is None
    else:
        assert gu.dtype == eps_dtype
        assert rel_err(gu, want[3]) <= GRAD_TOL[eps_dtype]

    # trajectories without items get an exact 0
    empty = torch.ones(case["num_traj"], dtype=torch.bool)
    empty[case["traj_index"]] = False
    assert (logits[empty] == 0).all()
    assert empty.any() or not kw.get("empty_last")

    if clipped:
        fully = (want[1].reshape(n, -1).abs() > clip).all(1)
        assert fully.any() and (~fully).any()
        assert (gc[fully] == 0).all()
        assert (gc[~fully].flatten(1) != 0).any(1).all()
        if gu is not None:
            assert (gu[fully] == 0).all()


@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
def test_clip_boundary_is_strict(impl, small_blocks):
    """At ℓ = ±c exactly the value is ±c and the gradient is zero: the mask is 1[−c < ℓ < c]."""
    case = make_case(6, (3, 5, 7), num_traj=2)
    pol = [case[k].double() for k in ("eps_cond", "eps_uncond", "x", "x_next", "coef_a", "coef_b")]
    sq = squared_residual_reference(*pol, guidance=case["guidance"])
    case["ref_sq"] = (sq * torch.tensor([1.02, 0.97, 1.05, 0.99, 1.01, 0.95], dtype=torch.float64)).float()
    ratio = run(case, impl)[1]
    assert (ratio > 0).any() and (ratio < 0).any()
    for k in (int(ratio.argmax()), int(ratio.argmin())):
        c = ratio[k].abs().item()  # exactly the fp32 value this implementation computes
        logits, ratio2, gc, gu = run(case, impl, clip=c)
        assert torch.equal(ratio2, ratio)
        assert (gc[k] == 0).all() and (gu[k] == 0).all()
        inside = ratio.abs() < c
        assert inside.any()
        assert (gc[inside].flatten(1) != 0).any(1).all()
        assert (gc[~inside] == 0).all()


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_strided_items_and_one_sided_grad(impl, small_blocks):
    """Items may have any dim-0 stride (slices of a bigger buffer); only eps_cond needs grad."""
    case = make_case(5, (3, 5, 7), r=2)
    clip = pick_clip(log_ratio_reference(**to64(case)).ratio)
    strided = dict(case)
    for k in ("eps_cond", "eps_uncond", "x", "x_next"):
        buf = torch.randn(5, 3, *case[k].shape[1:], dtype=case[k].dtype)
        buf[:, 1] = case[k]
        strided[k] = buf[:, 1]
        assert not strided[k].is_contiguous()
    dense = run(case, impl, clip=clip)
    ec = strided["eps_cond"].clone().requires_grad_(True)
    out = log_ratio(**{**strided, "eps_cond": ec}, clip=clip, impl=impl)
    out.logits.backward(torch.randn(case["num_traj"], generator=torch.Generator().manual_seed(123),
                                    dtype=torch.float64).float())
    assert torch.equal(out.logits.detach(), dense[0])
    assert torch.equal(out.ratio, dense[1])
    assert torch.equal(ec.grad, dense[2])


@needs_triton
@pytest.mark.triton
def test_ref_sq_column_matches_vector(small_blocks):
    case = make_case(6, (2, 9), r=1)
    col = dict(case, ref_sq=case["ref_sq"][:, None])
    a, b = run(case, "triton", clip=0.05), run(col, "triton", clip=0.05)
    assert b[1].shape == (6, 1) and a[1].shape == (6,)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1][:, 0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_deterministic(impl, small_blocks):
    case = make_case(7, (3, 5, 7), r=2, eps_dtype=torch.bfloat16)
    clip = pick_clip(log_ratio_reference(**to64(case)).ratio)
    first, second = run(case, impl, clip=clip), run(case, impl, clip=clip)
    for u, v in zip(first, second, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_squared_residual(impl, poisoned):
    case = make_case(5, (4, 9, 9), eps_dtype=torch.bfloat16)
    args = [case[k] for k in ("eps_cond", "eps_uncond", "x", "x_next", "coef_a", "coef_b")]
    ec = args[0].clone().requires_grad_(True)
    got = squared_residual(ec, *args[1:], guidance=case["guidance"], impl=impl)
    want = squared_residual_reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args],
                                      guidance=case["guidance"])
    assert got.shape == (5,) and got.dtype == torch.float32 and not got.requires_grad
    assert rel_err(got, want) < 1e-6
    no_cfg = squared_residual(args[0], None, *args[2:], impl=impl)
    want = squared_residual_reference(args[0].double(), None, *[a.double() for a in args[2:]])
    assert rel_err(no_cfg, want) < 1e-6


# ---------------------------------------------------------------------------
# fp64 gradcheck


def _gradcheck_case():
    case = to64(make_case(3, (2, 7), r=2, guidance=1.5, num_traj=2, seed=3))
    clip = pick_clip(log_ratio_reference(**case).ratio)
    return case, clip


def _gradcheck(impl, fast_mode):
    case, clip = _gradcheck_case()

    def fn(eps_c, eps_u):
        return log_ratio(**{**case, "eps_cond": eps_c, "eps_uncond": eps_u}, clip=clip, impl=impl).logits

    inputs = (case["eps_cond"].clone().requires_grad_(True), case["eps_uncond"].clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast_mode)


def test_gradcheck_torch():
    _gradcheck("torch", fast_mode=False)


@needs_triton
@pytest.mark.triton
def test_gradcheck_triton(monkeypatch, poisoned):
    monkeypatch.setattr(lr_mod, "_launch_config", lambda n, d: (4, 8, math.ceil(d / 8)))
    monkeypatch.setattr(lr_mod, "_BLOCK_N", 2)
    _gradcheck("triton", fast_mode=True)


# ---------------------------------------------------------------------------
# Low-precision accuracy: fused op vs the naive formula


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_bf16_accuracy_vs_naive(impl, poisoned):
    """bf16 outputs and bf16-stored states: our ratio stays within 1e-3 of float64 (from the same
    stored values); the naive difference of two bf16 log-probs misses by far more."""
    n, shape, w = 8, (4, 32, 32), 7.5
    g = torch.Generator().manual_seed(7)
    bshape = (n, 1, 1, 1)
    a = 0.99 + 0.01 * torch.rand(n, generator=g)
    b = -0.05 - 0.05 * torch.rand(n, generator=g)
    sigma = 0.05 + 0.1 * torch.rand(n, generator=g)
    ref_u, ref_c = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    x = torch.randn(n, *shape, generator=g)
    x_next = a.view(bshape) * x + b.view(bshape) * (ref_u + w * (ref_c - ref_u)) + sigma.view(bshape) * torch.randn(
        n, *shape, generator=g)
    bf = torch.bfloat16
    x, x_next, ref_u, ref_c = (t.to(bf) for t in (x, x_next, ref_u, ref_c))
    eps_u = (ref_u.float() + 0.05 * torch.randn(n, *shape, generator=g)).to(bf)
    eps_c = (ref_c.float() + 0.05 * torch.randn(n, *shape, generator=g)).to(bf)
    weight, traj, num_traj = torch.ones(n), torch.arange(n) % 4, 4

    ref_sq = squared_residual(ref_c, ref_u, x, x_next, a, b, guidance=w, impl=impl)
    ours = log_ratio(eps_c, eps_u, x, x_next, a, b, sigma, ref_sq, weight, traj, num_traj, guidance=w,
                     impl=impl).ratio

    d64 = [t.double() for t in (ref_c, ref_u, eps_c, eps_u, x, x_next, a, b, sigma)]
    ref_sq64 = squared_residual_reference(d64[0], d64[1], *d64[4:8], guidance=w)
    truth = log_ratio_reference(d64[2], d64[3], *d64[4:8], d64[8], ref_sq64, weight.double(), traj, num_traj,
                                guidance=w).ratio
    naive = log_ratio_naive(eps_c, eps_u, ref_c, ref_u, x, x_next, a, b, sigma, weight, traj, num_traj,
                            guidance=w, return_ratio=True).ratio
    err_ours, err_naive = rel_err(ours, truth), rel_err(naive, truth)
    print(f"\nbf16 ratio error vs float64 ({impl}): ours {err_ours:.2e}, naive {err_naive:.2e}, "
          f"naive/ours {err_naive / max(err_ours, 1e-30):.0f}x; |ratio| max {truth.abs().max().item():.3g}")
    assert err_ours <= 1e-3
    assert err_naive > 10 * err_ours


def test_naive_matches_reference_in_fp32():
    """The baseline computes the same function (so the benchmark compares like with like)."""
    case = make_case(6, (3, 5, 7), num_traj=2)
    g = torch.Generator().manual_seed(5)
    ref_c = case["eps_cond"] + 0.1 * torch.randn(case["eps_cond"].shape, generator=g)
    ref_u = case["eps_uncond"] + 0.1 * torch.randn(case["eps_cond"].shape, generator=g)
    scal = [case[k] for k in ("coef_a", "coef_b", "sigma")]
    ref_sq = squared_residual_reference(ref_c.double(), ref_u.double(), case["x"].double(),
                                        case["x_next"].double(), *[s.double() for s in scal[:2]], guidance=7.5)
    c64 = to64({**case, "ref_sq": ref_sq})
    for reduction in ("mean", "sum"):
        want = log_ratio_reference(**c64, clip=0.5, reduction=reduction)
        got = log_ratio_naive(case["eps_cond"], case["eps_uncond"], ref_c, ref_u, case["x"], case["x_next"], *scal,
                              case["weight"], case["traj_index"], 2, guidance=7.5, clip=0.5, reduction=reduction,
                              return_ratio=True)
        assert rel_err(got.ratio, want.ratio) < 1e-3
        logits_only = log_ratio_naive(case["eps_cond"], case["eps_uncond"], ref_c, ref_u, case["x"],
                                      case["x_next"], *scal, case["weight"], case["traj_index"], 2, guidance=7.5,
                                      clip=0.5, reduction=reduction)
        assert torch.equal(logits_only, got.logits)


# ---------------------------------------------------------------------------
# Non-finite inputs


@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
def test_non_finite_inputs_stay_in_their_trajectory(impl, small_blocks):
    case = make_case(6, (3, 5, 7), r=2)
    case["traj_index"] = torch.tensor([0, 1, 2, 0, 1, 2])
    clip = pick_clip(log_ratio_reference(**to64(case)).ratio)
    case["eps_cond"] = case["eps_cond"].clone()
    case["eps_cond"][1, 0, 2, 3] = float("nan")  # item 1 -> trajectory 1
    case["x"] = case["x"].clone()
    case["x"][5, 2, 1, 1] = float("inf")  # item 5 -> trajectory 2
    logits, ratio, gc, gu = run(case, impl, clip=clip)
    assert torch.isnan(logits[1]) and torch.isinf(logits[2])
    assert torch.isfinite(logits[0])
    assert torch.isnan(ratio[1]).all() and torch.isinf(ratio[5]).all()
    clean = torch.tensor([0, 2, 3, 4])
    assert torch.isfinite(ratio[clean]).all()
    for grad in (gc, gu):
        assert not torch.isfinite(grad[1]).all() and not torch.isfinite(grad[5]).all()
        assert torch.isfinite(grad[clean]).all()
    want = run(to64(case), "reference", clip=clip)
    assert rel_err(logits[0], want[0][0]) < 2e-5
    assert rel_err(ratio[clean], want[1][clean]) < 2e-5
    assert rel_err(gc[clean], want[2][clean]) < 2e-5 and rel_err(gu[clean], want[3][clean]) < 2e-5
    assert torch.equal(torch.isfinite(gc), torch.isfinite(want[2]))


# ---------------------------------------------------------------------------
# Bad inputs


def _bad(case, **changes):
    return {**case, **changes}


BAD_INPUTS = {
    "eps_uncond shape": (lambda c: _bad(c, eps_uncond=c["eps_uncond"][:, :1]), "eps_uncond"),
    "eps_uncond dtype": (lambda c: _bad(c, eps_uncond=c["eps_uncond"].double()), "eps_uncond"),
    "eps_cond int": (lambda c: _bad(c, eps_cond=c["eps_cond"].long()), "eps_cond"),
    "x shape": (lambda c: _bad(c, x=c["x"][:3]), "x"),
    "x_next dtype": (lambda c: _bad(c, x_next=c["x_next"].half()), "x_next"),
    "x device": (lambda c: _bad(c, x=c["x"].to("meta")), "x"),
    "eps_cond not item-contiguous": (lambda c: _bad(c, eps_cond=c["eps_cond"].transpose(1, 2)), "eps_cond"),
    "x_next not item-contiguous": (lambda c: _bad(c, x_next=c["x_next"].transpose(2, 3)), "x_next"),
    "sigma zero": (lambda c: _bad(c, sigma=torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1])), "sigma"),
    "sigma negative float": (lambda c: _bad(c, sigma=-0.1), "sigma"),
    "sigma nan": (lambda c: _bad(c, sigma=torch.full((5,), float("nan"))), "sigma"),
    "sigma shape": (lambda c: _bad(c, sigma=torch.ones(4)), "sigma"),
    "coef_a shape": (lambda c: _bad(c, coef_a=torch.ones(5, 1)), "coef_a"),
    "weight type": (lambda c: _bad(c, weight="2"), "weight"),
    "clip zero": (lambda c: _bad(c, clip=0.0), "clip"),
    "clip negative": (lambda c: _bad(c, clip=-1e-4), "clip"),
    "clip nan": (lambda c: _bad(c, clip=float("nan")), "clip"),
    "reduction": (lambda c: _bad(c, reduction="max"), "reduction"),
    "num_traj zero": (lambda c: _bad(c, num_traj=0), "num_traj"),
    "num_traj float": (lambda c: _bad(c, num_traj=2.5), "num_traj"),
    "traj_index too big": (lambda c: _bad(c, traj_index=torch.tensor([0, 1, 3, 0, 1])), "traj_index"),
    "traj_index negative": (lambda c: _bad(c, traj_index=torch.tensor([0, -1, 2, 0, 1])), "traj_index"),
    "traj_index int32": (lambda c: _bad(c, traj_index=c["traj_index"].int()), "traj_index"),
    "traj_index shape": (lambda c: _bad(c, traj_index=c["traj_index"][:4]), "traj_index"),
    "ref_sq shape": (lambda c: _bad(c, ref_sq=torch.ones(6)), "ref_sq"),
    "ref_sq 3d": (lambda c: _bad(c, ref_sq=torch.ones(5, 2, 1)), "ref_sq"),
    "ref_sq int": (lambda c: _bad(c, ref_sq=torch.ones(5, dtype=torch.long)), "ref_sq"),
    "guidance inf": (lambda c: _bad(c, guidance=float("inf")), "guidance"),
    "guidance nan": (lambda c: _bad(c, guidance=float("nan")), "guidance"),
    "impl": (lambda c: _bad(c, impl="cuda"), "impl"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_bad_inputs_raise(name, impl):
    if impl == "triton" and not (triton_available() and triton_interpreted()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    case = make_case(5, (2, 4, 4), num_traj=3)
    case["traj_index"] = torch.tensor([0, 1, 2, 0, 1])
    mutate, arg = BAD_INPUTS[name]
    kwargs = {"clip": 0.1, "reduction": "mean", "impl": impl, **mutate(case)}
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        log_ratio(**kwargs)


def test_squared_residual_bad_inputs():
    case = make_case(3, (2, 4))
    with pytest.raises(ValueError, match="x_next"):
        squared_residual(case["eps_cond"], case["eps_uncond"], case["x"], case["x_next"][:2], 1.0, -0.1)
    with pytest.raises(ValueError, match="guidance"):
        squared_residual(case["eps_cond"], case["eps_uncond"], case["x"], case["x_next"], 1.0, -0.1,
                         guidance=float("nan"))


# ---------------------------------------------------------------------------
# torch.compile (one small case: compiling costs ~30 s cold on CPU)


@pytest.mark.slow
def test_torch_compile_matches_reference():
    case = make_case(5, (3, 5, 7), r=2)
    clip = pick_clip(log_ratio_reference(**to64(case)).ratio)
    want = run(to64(case), "reference", clip=clip)
    got = run(case, "torch_compile", clip=clip)
    again = run(case, "torch_compile", clip=clip)
    for u, v, tol in zip(got, want, (2e-5, 2e-5, 2e-5, 2e-5), strict=True):
        assert rel_err(u, v) <= tol
    for u, v in zip(got, again, strict=True):
        assert torch.equal(u, v)
