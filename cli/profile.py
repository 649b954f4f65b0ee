"""``fastdense profile ...``: torch.profiler traces (Chrome trace JSON) of the hot paths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import (
    check_out_dir,
    device_option,
    dtype_option,
    out_option,
    parse_dtype,
    resolve_device,
)

app = typer.Typer(no_args_is_help=True)


@app.command("kernels")
def kernels(
    out: Annotated[Path, out_option("Directory for the Chrome trace JSON.")] = Path("profile-kernels"),
    device: Annotated[str, device_option()] = "auto",
    impl: Annotated[str, typer.Option(help="naive, torch, torch_compile, triton or auto.")] = "auto",
    n: Annotated[int, typer.Option(help="Items per call.")] = 32,
    dtype: Annotated[str, dtype_option("fp32, bf16 or fp16.")] = "fp32",
    steps: Annotated[int, typer.Option(help="Profiled forward+backward calls.")] = 5,
    top: Annotated[int, typer.Option(help="Rows of the top-ops table.")] = 15,
) -> None:
    """Profile forward+backward of the log-ratio op and print the top ops."""
    dev = resolve_device(device)
    if n < 1 or steps < 1 or top < 1:
        raise ValueError(f"--n {n}, --steps {steps}, --top {top}: each must be >= 1")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastdense.benchmarks.kernels import log_ratio_call, make_log_ratio_inputs
    from fastdense.kernels.dispatch import resolve_impl

    torch_dtype = parse_dtype(dtype)
    if impl != "naive":
        impl = resolve_impl(impl, dev)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)

    inp = make_log_ratio_inputs(n, torch_dtype, dev)
    inp.eps_u.requires_grad_(True)
    inp.eps_c.requires_grad_(True)
    call = log_ratio_call(impl, inp)
    upstream = torch.randn(inp.num_traj, device=dev)
    for _ in range(2):  # warm-up (and compilation) outside the trace
        call().backward(upstream)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            inp.eps_u.grad = inp.eps_c.grad = None
            call().backward(upstream)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    trace = out / f"log_ratio_{impl}_{dtype}_n{n}_{dev.type}.json"
    prof.export_chrome_trace(str(trace))
    sort_key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=top))
    print(f"trace: {trace}")
