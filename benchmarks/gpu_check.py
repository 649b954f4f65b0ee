"""One-command GPU check (no network needed; a few minutes on one H100/H200):

    python benchmarks/gpu_check.py [--json gpu_check.json] [--md gpu_check.md] [--quick]
    fastdense bench gpu-check [same options]

1. device-to-device copy bandwidth (the roofline the kernels are held to);
2. Triton vs the float64 reference computed on the CPU from the same stored values (forward and
   backward of the log-ratio op, the DDIM step; several shapes and dtypes);
3. the kernel benchmark table (naive, torch eager, torch.compile, Triton) incl. N = 1024, the
   bandwidth model of this GPU beside it (fastdense.benchmarks.roofline) and the issue's targets:
   Triton fwd and bwd >= 80 % of copy bandwidth at N = 1024, Triton fwd+bwd >= 3x the naive
   formula at N = 128;
4. the sampler at SD1.5 shapes (random weights; needs diffusers) and the UNet FLOP/s and MFU it
   reaches (from the measured FLOPs of fastdense.benchmarks.scaling);
5. one training step at SD1.5 shapes with random weights (needs diffusers): UNet + LoRA of the
   sd15-multi preset, π_init reference pass, fused log-ratio, ListMLE, backward, AdamW; its
   FLOP/s and MFU (the scaling model's MFU assumption, measured);
6. every model family (SD 1.5, SDXL, SD3.5 Medium, FLUX.1-dev) at its published shapes with random
   weights (fastdense.benchmarks.families; needs diffusers): one sampling step through the family's
   backbone and fused step, one LoRA training micro-batch through the fused log-ratio op.

Writes one JSON and one markdown report. Exit code 1 when a correctness check fails.

``--dry-run`` builds and runs every case at small shapes on whatever device there is (on a machine
without CUDA: the CPU, Triton under its interpreter, TRITON_INTERPRET=1 set here before triton is
imported): what CI runs. Nothing beyond torch, triton and peft is required; parts that need
diffusers are skipped with a line in the report when it is not importable (README, "Benchmarks and
profiling", says how to carry its wheel to a bare GPU image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

if __name__ == "__main__" and not __package__:  # run as `python benchmarks/gpu_check.py`
    # Python put benchmarks/ first on sys.path, where our kernels.py would shadow Hugging Face's
    # `kernels` package (diffusers and transformers import it); fastdense.benchmarks is this folder anyway.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _here]

SD15_SHAPE = (4, 64, 64)
DRY_SHAPE = (4, 8, 8)
TINY_UNET = dict(  # the --dry-run stand-in for the SD1.5 UNet: same blocks, tiny widths
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
    block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gpu_check.json", help="JSON report (default gpu_check.json)")
    parser.add_argument("--md", default=None, help="markdown report (default: the JSON path with .md)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile kernel rows")
    parser.add_argument("--no-sampler", action="store_true", help="skip the sampler benchmark")
    parser.add_argument("--sampler-compile", action="store_true",
                        help="also time the torch.compile'd sampler (minutes of compilation)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--no-families", action="store_true",
                        help="skip the model families (SD1.5, SDXL, SD3.5, FLUX at real shapes)")
    parser.add_argument("--model", default=None, help="a100, h100 or h200 for the bandwidth model "
                        "(default: from the GPU's name; h100 in --dry-run without one)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every case at small shapes on this machine (CPU: Triton interpreted); for CI")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ correctness


def _log_ratio_run(impl, eps_c, eps_u, x, x_next, a, b, sig, ref_sq, w, idx, num_traj, upstream, eps_dtype, dtype,
                   device):
    """logits and both gradients; eps cast to ``eps_dtype``, states and scalars to ``dtype``, on ``device``."""
    from fastdense.kernels.log_ratio import log_ratio
    from fastdense.kernels.log_ratio_torch import log_ratio_reference

    eu = eps_u.detach().to(device, eps_dtype).requires_grad_(True)
    ec = eps_c.detach().to(device, eps_dtype).requires_grad_(True)
    args = (ec, eu, *(t.to(device, dtype) for t in (x, x_next, a, b, sig, ref_sq, w)), idx.to(device), num_traj)
    kw = dict(guidance=7.5, clip=float("inf"), reduction="mean")
    out = log_ratio_reference(*args, **kw) if impl == "reference" else log_ratio(*args, impl=impl, **kw)
    out.logits.backward(upstream.to(device, out.logits.dtype))
    return out.logits.double().cpu(), ec.grad.double().cpu(), eu.grad.double().cpu()


def correctness_cases(dry_run: bool):
    import torch

    if dry_run:
        return [(5, (4, 5, 7), torch.float32, 1e-5), (4, DRY_SHAPE, torch.bfloat16, 1e-3),
                (3, DRY_SHAPE, torch.float16, 1e-3)]
    return [(5, (4, 17, 19), torch.float32, 1e-5), (64, SD15_SHAPE, torch.float32, 1e-5),
            (64, SD15_SHAPE, torch.bfloat16, 1e-3), (33, SD15_SHAPE, torch.float16, 1e-3)]


def check_correctness(device, cases) -> list[dict]:
    """Triton on ``device`` against the float64 reference on the CPU, from the same stored values
    (model outputs already cast to their dtype)."""
    import torch

    from fastdense.kernels.ddim_step import ddim_step

    cpu = torch.device("cpu")
    results = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, shape, dtype, tol in cases:
        def rnd(*s, dt=torch.float32):
            return torch.randn(*s, generator=g).to(dtype=dt)

        eps_u, eps_c = rnd(n, *shape, dt=dtype), rnd(n, *shape, dt=dtype)
        x = rnd(n, *shape)
        bshape = (-1, *[1] * len(shape))
        a = 0.99 + 0.01 * torch.rand(n, generator=g)
        b = -0.1 * torch.rand(n, generator=g) - 0.01
        sig = 0.05 + 0.1 * torch.rand(n, generator=g)
        x_next = a.view(bshape) * x + sig.view(bshape) * rnd(n, *shape)
        num_traj = max(1, n // 3)
        idx = torch.arange(n) % num_traj
        w = torch.rand(n, generator=g) + 0.5
        ref_sq = (x_next - a.view(bshape) * x).square().flatten(1).sum(1) * 0.999
        upstream = rnd(num_traj)
        common = (eps_c, eps_u, x, x_next, a, b, sig, ref_sq, w, idx, num_traj, upstream)
        ref = _log_ratio_run("reference", *common, torch.float64, torch.float64, cpu)
        tri = _log_ratio_run("triton", *common, dtype, torch.float32, device)
        errs = [((t - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for t, r in zip(tri, ref, strict=True)]
        # the gradients are stored in the model dtype: rounding alone costs up to half its epsilon
        tol_grad = max(tol, torch.finfo(dtype).eps)
        results.append({"check": "log_ratio", "n": n, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                        "rel_err_logits": errs[0], "rel_err_grad_c": errs[1], "rel_err_grad_u": errs[2],
                        "tol": tol, "tol_grad": tol_grad,
                        "ok": errs[0] <= tol and errs[1] <= tol_grad and errs[2] <= tol_grad})

        buf = torch.full((n, 3, *shape), float("nan"), device=device)
        z = rnd(n, *shape)
        dev = [t.to(device) for t in (x, eps_c, eps_u, z, a, b, sig)]
        sq = ddim_step(dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6], 7.5, buf[:, 1], impl="triton")
        eps = eps_u.double() + 7.5 * (eps_c.double() - eps_u.double())
        mu = a.double().view(bshape) * x.double() + b.double().view(bshape) * eps
        want = mu + sig.double().view(bshape) * z.double()
        got = buf[:, 1].double().cpu()
        err = ((got - want).abs().max() / want.abs().max()).item()
        sq_ref = (got - mu).square().flatten(1).sum(1)
        sq_err = ((sq.double().cpu() - sq_ref).abs().max() / sq_ref.abs().max()).item()
        untouched = bool(torch.isnan(buf[:, 0]).all() and torch.isnan(buf[:, 2]).all())
        results.append({"check": "ddim_step", "n": n, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                        "rel_err_out": err, "rel_err_sq": sq_err, "tol": tol,
                        "ok": untouched and err <= tol and sq_err <= tol})
    return results


# ----------------------------------------------------------------------------- the UNet parts


def _sd15_cost():
    from fastdense.benchmarks.scaling import SD15

    return SD15


def unet_throughput(sampler_rows, spec) -> list[dict]:
    """UNet FLOP/s (and MFU: against the dense bf16 peak of ``spec``, which is also its fp16 peak) of
    the sampler rows at SD1.5 shapes, from the measured FLOPs: a trajectory of T steps runs T UNet
    calls of 2 rows (CFG), no LoRA (the sampler benchmark's model)."""
    bb = _sd15_cost()
    out = []
    for r in sampler_rows:
        flops = r["steps"] * 2 * bb.fwd_flops  # per trajectory
        tflops = flops / r["seconds_per_trajectory"] / 1e12
        out.append({"impl": r["impl"], "compiled": r["compiled"], "batch": r["batch"], "unet_tflops": tflops,
                    "mfu": tflops / spec.bf16_dense_tflops if spec is not None else None})
    return out


def train_step_check(device, dry_run: bool, spec, repeats: int = 3) -> dict:
    """One training step of the sd15-multi preset's shape at SD1.5 shapes (random weights), the way
    the trainer's micro-batch runs it, without the DeepSpeed engine: the π_init reference residual
    (adapters off, no grad), the policy UNet call on [x | x] with [uncond | cond], the fused log-ratio,
    ListMLE, backward, AdamW step. ``dry_run``: a tiny UNet of the same block types on this device."""
    import torch
    from diffusers import UNet2DConditionModel

    from fastdense.benchmarks.sampler import SD15_UNET, PeakMemory
    from fastdense.benchmarks.timing import sync
    from fastdense.config import build_config
    from fastdense.kernels.log_ratio import log_ratio, squared_residual
    from fastdense.lora import add_lora, trainable_parameters
    from fastdense.models.loading import adapters_disabled
    from fastdense.objective import listmle_loss

    cfg = build_config(preset="sd15-multi")
    groups, G = cfg.train.groups_per_step, cfg.objective.group_size
    k = cfg.objective.k
    n = groups * G * k
    rank = cfg.model.lora_rank if not dry_run else 4
    targets = list(cfg.model.lora_targets or ("to_q", "to_k", "to_v", "to_out.0"))
    unet_cfg = TINY_UNET if dry_run else SD15_UNET
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_cfg).to(device=device, dtype=dtype)
    add_lora(unet, rank, None, targets)  # in the UNet's dtype, as the DeepSpeed engine computes (bf16 on a GPU)
    params = trainable_parameters(unet)
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    size = unet_cfg["sample_size"]
    shape = (unet_cfg["in_channels"], size, size)
    dim = unet_cfg["cross_attention_dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g).to(device)
    a = (0.99 + 0.01 * torch.rand(n, generator=g)).to(device)
    b = (-0.05 - 0.05 * torch.rand(n, generator=g)).to(device)
    sigma = (0.05 + 0.1 * torch.rand(n, generator=g)).to(device)
    x_next = a.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * torch.randn(n, *shape, generator=g).to(device)
    cond = torch.randn(n, 77, dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, 77, dim, generator=g).to(device, dtype).expand(n, -1, -1)
    t = torch.randint(0, 1000, (n,), generator=g).to(device)
    weight = torch.full((n,), cfg.objective.beta / k, device=device)
    traj = torch.arange(n, device=device) // k
    ranking = torch.stack([torch.randperm(G, generator=g) for _ in range(groups)]).to(device)

    def unet_call(module):
        out = module(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([uncond, cond])).sample
        eps_u, eps_c = out.chunk(2)
        return eps_u, eps_c

    def step():
        with torch.no_grad(), adapters_disabled(unet):
            ru, rc = unet_call(unet)
            ref_sq = squared_residual(rc, ru, x, x_next, a, b, guidance=cfg.sampling.guidance)
        eps_u, eps_c = unet_call(unet)
        out = log_ratio(eps_c, eps_u, x, x_next, a, b, sigma, ref_sq, weight, traj, groups * G,
                        guidance=cfg.sampling.guidance, clip=cfg.objective.clip, reduction=cfg.objective.reduction)
        loss = listmle_loss(out.logits.reshape(groups, G), ranking)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step()]  # warm-up
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            losses.append(step())
            sync(device)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    row = {"items": n, "unet_rows": 2 * n, "lora_rank": rank, "dtype": str(dtype).replace("torch.", ""),
           "unet": "tiny (dry run)" if dry_run else "SD1.5 config, random weights", "step_s": seconds,
           "items_per_s": n / seconds, "peak_mem_mb": mem.peak_mb, "losses_finite": all(map(math.isfinite, losses)),
           "trainable_params": sum(p.numel() for p in params)}
    if not dry_run:
        bb = _sd15_cost()
        bwd, _ = bb.backward_flops(rank, tuple(targets))
        flops = 2 * n * (bb.fwd_flops + bb.lora_fwd_flops(rank, targets) + bwd) + 2 * n * bb.fwd_flops
        row["unet_tflops"] = flops / seconds / 1e12
        row["mfu"] = row["unet_tflops"] / spec.bf16_dense_tflops if spec is not None else None
    return row


# ------------------------------------------------------------------------------------ report


def _fmt(v, col: str = "", spec=".3g"):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return ("yes" if v else "**NO**") if col == "ok" else ("yes" if v else "no")
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _md_table(rows: list[dict], cols: list[str], empty: str | None = "(none)") -> list[str]:
    if not rows:
        return [empty, ""] if empty is not None else []
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |" for r in rows]
    return out + [""]


def markdown_report(report: dict) -> str:
    lines = [f"# fastdense GPU check ({'dry run, ' if report['dry_run'] else ''}{report['date']})", ""]
    env = report["env"]
    lines += [f"Device: {report['device']} ({env.get('gpu', 'none')}); torch {env.get('torch')}, triton "
              f"{env.get('triton')}, diffusers {env.get('diffusers')}, peft {env.get('peft')}, deepspeed "
              f"{env.get('deepspeed')}. Triton mode: {report['triton_mode']}. Wall time {report['wall_s']:.0f} s.", ""]
    if report["dry_run"]:
        lines += ["Dry run: every case at small shapes; times are not GPU figures.", ""]
    lines += ["## Copy bandwidth", "", f"{_fmt(report.get('copy_bandwidth_gbps'))} GB/s "
              "(device-to-device copy, read + write bytes)", ""]
    lines += ["## Correctness (Triton vs float64 reference)", ""]
    lines += _md_table(report.get("correctness", []), ["check", "n", "shape", "dtype", "rel_err_logits",
                                                       "rel_err_grad_c", "rel_err_grad_u", "rel_err_out",
                                                       "rel_err_sq", "tol", "tol_grad", "ok"])
    lines += ["## Kernels", ""]
    lines += _md_table(report.get("kernels", []), ["op", "impl", "dtype", "n", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                                   "gbps", "speedup_vs_naive", "launches_fwd", "launches_bwd"])
    lines += [f"## Bandwidth model ({report.get('model_gpu')})", ""]
    lines += report.get("model_notes", [])
    lines += [""] + _md_table(report.get("model", []), ["op", "dir", "dtype", "n", "impl", "min_bytes", "bytes_us",
                                                        "latency_us", "model_us", "measured_us", "of_model",
                                                        "of_copy"])
    lines += ["## Targets", ""]
    lines += _md_table(report.get("targets", []), ["target", "value", "model", "ok"])
    lines += ["## Sampler", ""]
    lines += _md_table(report.get("sampler", []), ["impl", "compiled", "batch", "steps", "seconds_per_trajectory",
                                                   "total_s", "peak_mem_mb", "record_overhead",
                                                   "speedup_vs_diffusers_eager", "model"])
    lines += _md_table(report.get("unet_throughput", []), ["impl", "compiled", "batch", "unet_tflops",
                                                           "mfu"], empty=None)
    lines += ["## Training step", ""]
    train = report.get("train_step")
    lines += _md_table([train] if train else [], ["unet", "items", "unet_rows", "lora_rank", "dtype", "step_s",
                                                  "items_per_s", "peak_mem_mb", "unet_tflops", "mfu",
                                                  "losses_finite"])
    lines += ["## Model families (a sampling step and a LoRA training micro-batch)", ""]
    lines += _md_table(report.get("families", []), ["family", "model", "latent", "batch", "sample_step_ms",
                                                    "train_microbatch_ms", "peak_mem_mb"])
    lines += ["## Skipped", ""]
    lines += [f"- {s}" for s in report["skipped"]] or ["(nothing)"]
    lines += ["", "## Failures", ""]
    lines += [f"- {s}" for s in report["failures"]] or ["(none)"]
    return "\n".join(lines) + "\n"


def _importable(name: str) -> str | None:
    """None when ``name`` imports, else the one-line reason."""
    try:
        __import__(name)
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check needs a CUDA device (torch.cuda.is_available() is False); --dry-run runs it on the CPU",
              file=sys.stderr)
        return 2
    if not cuda:  # Triton's interpreter must be on before triton is first imported
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_check --dry-run: triton was imported before TRITON_INTERPRET=1 could be set; run it in a "
                  "fresh process", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    dry = args.dry_run
    from fastdense.benchmarks.roofline import Assumptions, attach_measured, gpu_key_of, gpu_spec, model_rows
    from fastdense.benchmarks.roofline import model_targets as roofline_targets
    from fastdense.env import collect_env

    md_path = args.md or (os.path.splitext(args.json)[0] + ".md")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "dry_run": dry, "device": device.type, "skipped": [],
                    "failures": [], "env": collect_env(),
                    "triton_mode": "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"}
    key = args.model or (gpu_key_of(torch.cuda.get_device_name(device)) if cuda else None) or (
        "h100" if dry else None)
    spec = gpu_spec(key, what="--model") if key else None
    report["model_gpu"] = spec.name if spec else None

    def section(name, fn):
        print(f"[{time.time() - t0:6.1f} s] {name}", flush=True)
        try:
            return fn()
        except Exception as err:  # one broken part must not lose the rest of the report
            msg = f"{name}: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
            report["failures"].append(msg)
            traceback.print_exc()
            return None

    from fastdense.benchmarks.timing import copy_bandwidth_gbps

    bw = section("copy bandwidth", lambda: copy_bandwidth_gbps(device, nbytes=(1 << 22) if dry else (1 << 30),
                                                                repeats=3 if dry else 20))
    report["copy_bandwidth_gbps"] = bw

    checks = section("correctness", lambda: check_correctness(device, correctness_cases(dry))) or []
    report["correctness"] = checks
    for c in checks:
        print("correctness", c)
        if not c["ok"]:
            report["failures"].append(f"correctness {c['check']} n={c['n']} {c['dtype']}: over tolerance {c['tol']}")

    from fastdense.benchmarks.kernels import run_kernel_benchmarks

    impls = ["naive", "torch"] + ([] if args.no_compile or dry else ["torch_compile"]) + ["triton"]
    if dry and not args.no_compile:
        report["skipped"].append("torch_compile kernel rows: not in --dry-run (minutes of compilation on a CPU)")
    ns = (2,) if dry else ((128, 1024) if args.quick else (8, 32, 128, 1024))
    shape = DRY_SHAPE if dry else SD15_SHAPE
    rows = section("kernels", lambda: run_kernel_benchmarks(
        device, ns=ns, dtypes=("fp32", "bf16"), impls=impls, repeats=1 if dry else (10 if args.quick else 30),
        warmup=1 if dry else 2, shape=shape, progress=lambda m: print("bench", m, flush=True))) or []
    report["kernels"] = [r.as_dict() for r in rows]

    # the bandwidth model of this GPU, with the measured times beside it
    a = Assumptions()
    d = math.prod(shape)
    mrows = model_rows(spec, ns, ("fp32", "bf16"), d=d, assumptions=a) if spec else []
    if rows and not dry:
        measured = {}
        for r in rows:
            for direction, ms in (("fwd", r.fwd_ms), ("bwd", r.bwd_ms), ("fwd+bwd", r.fwd_bwd_ms)):
                if ms is not None:
                    measured[(r.op, direction, r.dtype, r.n, r.impl)] = ms
        attach_measured(mrows, measured, bw)
    report["model"] = [r.as_dict() for r in mrows]
    report["model_notes"] = [f"assumption: {x}" for x in a.describe()]
    if dry:
        report["model_notes"].append(f"dry run: the model of {spec.name if spec else '-'} at the dry-run shapes "
                                     f"(D = {d}), no measured columns (CPU times are not GPU figures)")
    report["model_targets"] = roofline_targets(mrows)

    targets = []
    for r in rows:
        if dry or bw is None:
            break
        if r.op == "log_ratio" and r.impl == "triton" and r.n == 1024:
            for direction, gbps in (("fwd", r.fwd_gbps), ("bwd", r.bwd_gbps)):
                mt = next((t for t in report["model_targets"] if t["target"].startswith(
                    f"log_ratio {direction} {r.dtype} N=1024")), {})
                targets.append({"target": f"triton {direction} >= 0.8 copy bw ({r.dtype}, n=1024)",
                                "value": gbps / bw, "model": mt.get("model"), "ok": gbps >= 0.8 * bw})
        if r.op == "log_ratio" and r.impl == "triton" and r.n == 128:
            mt = next((t for t in report["model_targets"] if t["target"].startswith(
                f"log_ratio fwd+bwd {r.dtype} N=128")), {})
            targets.append({"target": f"triton fwd+bwd >= 3x naive ({r.dtype}, n=128)",
                            "value": r.speedup_vs_naive, "model": mt.get("model"),
                            "ok": (r.speedup_vs_naive or 0) >= 3})
    if dry:
        report["skipped"].append("targets: measured at N = 128 and 1024 on a GPU only")
    report["targets"] = targets
    for t in targets:
        print("target", t)

    no_diffusers = _importable("diffusers")
    if args.no_sampler:
        report["skipped"].append("sampler: --no-sampler")
    elif no_diffusers:
        report["skipped"].append(f"sampler: diffusers is not importable ({no_diffusers}); carry its wheel "
                                 "(README, Benchmarks and profiling)")
    else:
        from fastdense.benchmarks.sampler import run_sampler_benchmarks

        sampler = section("sampler", lambda: run_sampler_benchmarks(
            device, gpu_shapes=not dry, batch=2 if dry else 8, steps=2 if dry else 50, repeats=1 if dry else 3,
            compile_modes=(False, True) if args.sampler_compile else (False,),
            progress=lambda m: print("sampler", m, flush=True)))
        if sampler is not None:
            report["sampler"] = [r.as_dict() for r in sampler]
            if not dry:
                report["unet_throughput"] = unet_throughput(report["sampler"], spec)
        if not args.sampler_compile:
            report["skipped"].append("sampler, torch.compile'd: add --sampler-compile")

    if args.no_train:
        report["skipped"].append("training step: --no-train")
    elif no_diffusers:
        report["skipped"].append(f"training step: diffusers is not importable ({no_diffusers}); carry its wheel "
                                 "(README, Benchmarks and profiling)")
    else:
        report["train_step"] = section("training step", lambda: train_step_check(device, dry, spec,
                                                                               repeats=1 if dry else 3))
        if report["train_step"] is not None and not report["train_step"]["losses_finite"]:
            report["failures"].append("training step: non-finite loss")
    if args.no_families:
        report["skipped"].append("model families: --no-families")
    elif no_diffusers:
        report["skipped"].append(f"model families: diffusers is not importable ({no_diffusers})")
    else:
        import tempfile

        from fastdense.benchmarks.families import run_family_benchmarks

        with tempfile.TemporaryDirectory() as tmp:
            families = section("model families", lambda: run_family_benchmarks(
                device, dry_run=dry, batch=2 if dry else 4, repeats=1 if dry else 3, workdir=tmp,
                progress=lambda m: print(m, flush=True)))
        report["families"] = [r.as_dict() for r in families or []]
    no_ds = _importable("deepspeed")
    report["skipped"].append("the DeepSpeed engine: not used (the training step runs plain AdamW)"
                             + (f"; deepspeed is not importable ({no_ds})" if no_ds else ""))

    report["wall_s"] = time.time() - t0
    for path in {args.json, md_path}:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1, default=str)
    with open(md_path, "w") as fh:
        fh.write(markdown_report(report))
    print(f"wrote {args.json} and {md_path} in {report['wall_s']:.0f} s"
          + (f"; {len(report['failures'])} failure(s)" if report["failures"] else ""))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
