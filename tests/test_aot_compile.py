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
    # every kernel is covered, and the default shapes (aligned, D = 16384) load with vector instructions
    names = {r.name.split("[")[0] for r in results}
    assert names == {"log_ratio_fwd", "log_ratio_logits", "log_ratio_bwd", "ddim_step_fwd"}
    default = {"log_ratio_fwd[ec=bf16 x=fp32 acc=fp32 HAS_UNCOND BLOCK=1024 w4]",
               "log_ratio_bwd[ec=bf16 x=fp32 acc=fp32 HAS_UNCOND MEAN BLOCK=1024 BLOCK_R=1 w4 R=1]",
               "ddim_step_fwd[x=fp32 eps=bf16 acc=fp32 BLOCK_SIZE=1024 HAS_CFG w4 nodiv:n_items]"}
    vec = {(r.arch, r.name): r.vector_loads for r in results if r.name in default}
    assert len(vec) == len(default) * len(ARCHS) and all(v > 1 for v in vec.values()), vec


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
