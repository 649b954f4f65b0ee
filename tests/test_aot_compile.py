"""Every Triton specialisation the launchers can produce compiles for real GPUs (kernels/aot.py).

The rest of the suite runs the kernels under TRITON_INTERPRET=1, which accepts code the real
compiler rejects. These tests compile ahead of time for sm_80 and sm_90 with the ptxas shipped
in the triton wheel (no GPU needed), in a subprocess without TRITON_INTERPRET, started outside
the checkout with an empty PYTHONPATH and a fresh TRITON_CACHE_DIR (so it really compiles).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastdense.kernels import aot
from fastdense.kernels.dispatch import triton_available, triton_interpreted

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
]

ARCHS = ["sm_80", "sm_90"]


def _compile_in_subprocess(code: str, tmp_path):
    """Run ``code`` (which prints one JSON line last) with the real compiler; returns that JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH="", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_specialisation_compiles_for_sm80_and_sm90(tmp_path):
    jobs = max(1, min(4, os.cpu_count() or 1))
    t0 = time.perf_counter()
    out = _compile_in_subprocess(f"""
        import dataclasses, json
        from fastdense.kernels import aot
        specs = aot.enumerate_specs()
        results = aot.compile_all(specs, {ARCHS!r}, jobs={jobs})
        print(json.dumps({{"n": len(specs), "results": [dataclasses.asdict(r) for r in results]}}))
    """, tmp_path)
    wall = time.perf_counter() - t0
    results = [aot.Result(**r) for r in out["results"]]
    print(f"\n{out['n']} specialisations per arch, {len(results)} compiles, {wall:.1f} s wall ({jobs} jobs)")
    print(aot.summary(results))

    assert out["n"] > 100
    for arch in ARCHS:
        assert sum(r.arch == arch for r in results) == out["n"]
    failed = [f"{r.arch} {r.name}: {r.error.splitlines()[0] if r.error else ''}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    spilled = [f"{r.arch} {r.name}: {r.n_spills} spilled words" for r in results if r.n_spills]
    assert not spilled, "\n".join(spilled)
    # every kernel is covered, and the streaming kernels read every tensor with 16-byte vector loads
    # at the block size of D >= 1024 items with 16-divisible D and strides (as SD latents have them)
    names = {r.name.split("[")[0] for r in results}
    assert names == {"log_ratio_fwd", "log_ratio_logits", "log_ratio_bwd", "ddim_step_fwd"}
    expected = {(r.arch, r.name): _expected_v4_loads(r.name) for r in results}
    vec = {(r.arch, r.name): r.v4_loads for r in results if expected[r.arch, r.name] is not None}
    wrong = {key: (v, expected[key]) for key, v in vec.items() if v != expected[key]}
    assert not wrong, f"(ld.global.v4 instructions, expected): {wrong}"
    default = {"log_ratio_fwd[ec=bf16 x=fp32 acc=fp32 HAS_UNCOND BLOCK=1024 w4]",
               "log_ratio_bwd[ec=bf16 x=fp32 acc=fp32 HAS_UNCOND MEAN BLOCK=1024 BLOCK_R=1 w4 R=1]",
               "ddim_step_fwd[x=fp32 eps=bf16 acc=fp32 BLOCK_SIZE=1024 HAS_CFG w4 nodiv:n_items]",
               "log_ratio_fwd[ec=fp32 x=fp32 acc=fp32 HAS_UNCOND BLOCK=1024 w4]",
               "ddim_step_fwd[x=bf16 eps=bf16 acc=fp32 BLOCK_SIZE=1024 HAS_CFG w4 nodiv:n_items]"}
    checked = {name for _, name in vec}
    assert default <= checked and len(checked) >= 30, sorted(checked)
    print(f"{len(vec)} compiles of {len(checked)} fp32/bf16/fp16 specialisations at BLOCK 1024: "
          "every streamed tensor read with ld.global.v4")


_ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_NOT_DIVISIBLE = {"D", "CHUNK_LEN", "n_cols", "stride_ec", "stride_eu", "stride_x", "stride_xn", "x_row_stride",
                  "eps_c_row_stride", "eps_u_row_stride", "noise_row_stride"}


def _expected_v4_loads(name: str) -> int | None:
    """The ld.global.v4 count of a streaming kernel whose tensors are all read with 16-byte loads, for
    the fp32/bf16/fp16 specialisations at BLOCK 1024 (8 elements per thread: 2 v4 loads per fp32
    tensor, 1 per 16-bit one) with aligned items and 16-divisible D and strides; None for others."""
    kernel, _, rest = name.partition("[")
    parts = rest.rstrip("]").split()
    labels = dict(p.split("=", 1) for p in parts if "=" in p and "," not in p)
    undivided = {n for p in parts if p.startswith("nodiv:") for n in p[len("nodiv:"):].split(",")}
    if kernel in ("log_ratio_fwd", "log_ratio_bwd"):
        block, cfg = labels.get("BLOCK"), "HAS_UNCOND" in parts
        tensors = [labels["ec"]] * (1 + cfg) + [labels["x"]] * 2  # ε_c (ε_u), x, x'
    elif kernel == "ddim_step_fwd":
        block, cfg = labels.get("BLOCK_SIZE"), "HAS_CFG" in parts
        tensors = [labels["x"]] * 2 + [labels["eps"]] * (1 + cfg)  # x, z, ε_c (ε_u)
    else:
        return None
    dtypes = [*tensors, labels.get("out", "fp32"), labels["acc"]]
    if (block != "1024" or "w4" not in parts or "unaligned" in parts or undivided & _NOT_DIVISIBLE
            or labels["acc"] != "fp32" or any(t not in _ELEMENT_BYTES for t in dtypes)):
        return None
    elements = 1024 // (32 * 4)
    return sum(elements * _ELEMENT_BYTES[t] // 16 for t in tensors)


FP_FUSION_CHILD = """
import dataclasses, hashlib, json, warnings
warnings.simplefilter("always")
from fastdense.kernels import aot, ddim_step as dd, log_ratio as lr

launches = aot._log_ratio_launches(lr, "bf16", "fp32", True, True, 128, aot.SD15_D, 1)
launches.append(aot._ddim_launch(dd, "fp32", "bf16", True, 8, aot.SD15_D))
assert [launch.spec.fp_fusion for launch in launches] == [lr._FP_FUSION] * 3 + [dd._FP_FUSION]
ptx, warned = {}, {}
for kind in ("launch", "triton_default"):  # as the launchers compile, then without enable_fp_fusion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for launch in launches:
            spec = launch.spec if kind == "launch" else dataclasses.replace(launch.spec, fp_fusion=None)
            text = aot.compile_triton(spec, "sm_90").asm["ptx"]
            ptx[f"{launch.kernel}:{kind}"] = hashlib.sha256(text.encode()).hexdigest()
    warned[kind] = any("TRITON_DEFAULT_FP_FUSION" in str(w.message) for w in caught)
print(json.dumps({"ptx": ptx, "warned": warned}))
"""


def test_fp_fusion_is_set_by_the_launch_not_the_environment(tmp_path):
    """Every launch passes enable_fp_fusion, so the compiled PTX is the same whether
    TRITON_DEFAULT_FP_FUSION (read when triton compiles; its default flips in Triton 3.10) is
    unset, 0 or 1; and triton does not warn about it. Without the launch option the variable does
    change the PTX: the subprocesses really see it."""
    from fastdense.kernels import ddim_step as dd
    from fastdense.kernels import log_ratio as lr

    assert lr._FP_FUSION is True and dd._FP_FUSION is True  # today's results: fusion on, as Triton <= 3.9
    procs = {}
    for value in (None, "0", "1"):
        env = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION")}
        env.update(PYTHONPATH="", TRITON_CACHE_DIR=str(tmp_path / f"cache-{value}"))
        if value is not None:
            env["TRITON_DEFAULT_FP_FUSION"] = value
        work = tmp_path / f"cwd-{value}"
        work.mkdir()
        procs[value] = subprocess.Popen([sys.executable, "-c", FP_FUSION_CHILD], cwd=work, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for value, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        out[value] = json.loads(stdout.strip().splitlines()[-1])
    kernels = ("log_ratio_fwd", "log_ratio_logits", "log_ratio_bwd", "ddim_step_fwd")
    for kernel in kernels:
        launch = {value: o["ptx"][f"{kernel}:launch"] for value, o in out.items()}
        assert len(set(launch.values())) == 1, (kernel, launch)
        assert launch["1"] == out["1"]["ptx"][f"{kernel}:triton_default"]  # on == what Triton 3.9 did
    assert not any(o["warned"]["launch"] for o in out.values())
    # the control: without the launch option the environment decides (and triton warns when unset)
    default = {value: {k: o["ptx"][f"{k}:triton_default"] for k in kernels} for value, o in out.items()}
    assert default[None] == default["1"]
    assert default["0"]["log_ratio_fwd"] != default["1"]["log_ratio_fwd"]
    assert default["0"]["ddim_step_fwd"] != default["1"]["ddim_step_fwd"]
    assert out[None]["warned"]["triton_default"] and not out["1"]["warned"]["triton_default"]


BAD_MODULE = '''
import triton
import triton.language as tl


@triton.jit
def bad_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = 0  # an int32 loop-carried value that the loop re-assigns as fp32
    for start in range(0, n, BLOCK):
        acc += tl.sum(tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0), axis=0)
    tl.store(out_ptr, acc)


@triton.jit
def good_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = 0.0
    for start in range(0, n, BLOCK):
        acc += tl.sum(tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0), axis=0)
    tl.store(out_ptr, acc)
'''


@pytest.mark.skipif(not triton_interpreted(), reason="needs TRITON_INTERPRET=1 in the test process")
def test_catches_a_kernel_the_interpreter_accepts(tmp_path):
    import importlib.util

    path = tmp_path / "aot_bad_kernel.py"
    path.write_text(BAD_MODULE)
    spec = importlib.util.spec_from_file_location("aot_bad_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.arange(100, dtype=torch.float32)
    for kernel in (mod.bad_sum_kernel, mod.good_sum_kernel):  # the interpreter runs both, correctly
        out = torch.zeros(1)
        kernel[(1,)](x, out, 100, BLOCK=32)
        assert out.item() == 4950.0

    out = _compile_in_subprocess(f"""
        import dataclasses, json, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import aot_bad_kernel as m
        from fastdense.kernels import aot
        results = []
        for fn in (m.bad_sum_kernel, m.good_sum_kernel):
            spec = aot.specialise(fn, "", (aot.Ptr(torch.float32), aot.Ptr(torch.float32), 100), {{"BLOCK": 32}})
            results += [dataclasses.asdict(aot.compile_spec(spec, arch)) for arch in {ARCHS!r}]
        print(json.dumps(results))
    """, tmp_path)
    results = [aot.Result(**r) for r in out]
    bad, good = results[:2], results[2:]
    for r in bad:
        assert not r.ok and "Loop-carried variable acc has initial type int32" in r.error, r
    print("\n" + "\n".join(f"{r.arch} {r.name}: {r.error.splitlines()[-1]}" for r in bad))
    assert all(r.ok and r.n_spills == 0 for r in good), good
