"""``fastdense sample``: generate images (and optionally x̂0 trajectory pictures).

Writes one PNG per image (``PPP_II.png``: prompt PPP, image II), ``grid.png`` (a row
per prompt) and ``samples.json`` (file, prompt, seed of each image) into ``--out``.
With ``--trajectory`` also ``PPP_II_trajectory.png``: the decoded x̂0 prediction at
the chosen steps, then the final image, columns headed ``step t`` / ``final``, small images
scaled up (:func:`fastdense.pictures.trajectory_figure`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from fastdense.cli._options import (
    check_out_dir,
    device_option,
    dtype_option,
    library_warnings,
    out_option,
    parse_dtype,
    progress_bar,
    resolve_device,
    seed_option,
)
from fastdense.errors import FastdenseError


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """Prompts from the arguments, then from the file (a prompt source: :mod:`fastdense.data`)."""
    from fastdense.data import read_prompt_source

    result: list[str] = []
    for p in prompts or []:
        if not p.strip():
            raise FastdenseError("empty prompt given; every prompt needs some text")
        result.append(p)
    if prompts_file is not None:
        result.extend(read_prompt_source(str(prompts_file), "--prompts-file"))
    if not result:
        raise FastdenseError("no prompts: give prompts as arguments or --prompts-file FILE")
    return result


def parse_steps(spec: str | None, num_steps: int, default_count: int = 5) -> list[int]:
    """``--trajectory-steps``: comma-separated step indices; default evenly spaced over the chain."""
    if spec is None or not spec.strip():
        count = min(default_count, num_steps)
        if count == 1:
            return [0]
        return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})
    steps = []
    for part in spec.split(","):
        try:
            s = int(part.strip())
        except ValueError:
            raise FastdenseError(f"--trajectory-steps {spec!r}: {part.strip()!r} is not an integer") from None
        if not 0 <= s < num_steps:
            raise FastdenseError(f"--trajectory-steps: step {s} is out of range; allowed: 0..{num_steps - 1}")
        steps.append(s)
    return sorted(set(steps))


def check_args(*, steps: int, guidance: float, num_images: int, eta: float, micro_batch: int) -> None:
    if steps < 1:
        raise FastdenseError(f"--steps {steps} is not allowed; allowed: >= 1")
    if not math.isfinite(guidance) or guidance < 0:
        raise FastdenseError(f"--guidance {guidance} is not allowed; allowed: a finite number >= 0")
    if num_images < 1:
        raise FastdenseError(f"--num-images {num_images} is not allowed; allowed: >= 1")
    if not math.isfinite(eta) or eta < 0:
        raise FastdenseError(f"--eta {eta} is not allowed; allowed: a finite number >= 0 (1 for training)")
    if micro_batch < 1:
        raise FastdenseError(f"--micro-batch {micro_batch} is not allowed; allowed: >= 1")


def check_sampler(kind: str | None) -> None:
    from fastdense.config import SAMPLERS  # torch-free: flags are checked before torch loads

    if kind is not None and kind not in SAMPLERS:
        raise FastdenseError(f"--sampler {kind} is not allowed; allowed: {', '.join(SAMPLERS)}")


def sample(
    prompts: Annotated[
        list[str] | None, typer.Argument(help="Prompts (or use --prompts-file).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="A file with one prompt per line (or JSON, or module:attr).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A diffusers pipeline directory (or hub id); default: the shipped toy model."),
    ] = None,
    lora: Annotated[Path | None, typer.Option("--lora", help="A LoRA adapter directory to sample with.")] = None,
    out: Annotated[Path, out_option("Output directory.")] = Path("out/samples"),
    num_images: Annotated[int, typer.Option("--num-images", help="Images per prompt.")] = 1,
    steps: Annotated[int | None, typer.Option("--steps", help="DDIM steps (default 50; toy model 20).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="CFG scale, 1 = none (default 7.5; toy model 3).")
    ] = None,
    eta: Annotated[
        float | None,
        typer.Option("--eta", help="DDIM eta, or a flow sampler's noise level (default 1; a toy model's own)."),
    ] = None,
    sampler_kind: Annotated[
        str | None,
        typer.Option("--sampler", help="ddim (SD, SDXL); ode, sde or cps (SD3, FLUX); default: the scheduler's own."),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Image size in pixels (default: the model's own).")
    ] = None,
    seed: Annotated[int, seed_option("Image k uses seed + k (reproducible).")] = 0,
    trajectory: Annotated[
        bool, typer.Option("--trajectory", help="Also write a picture of x̂0 at chosen steps per image.")
    ] = False,
    trajectory_steps: Annotated[
        str | None, typer.Option("--trajectory-steps", help="Comma-separated steps for --trajectory (default: 5).")
    ] = None,
    device: Annotated[str, device_option()] = "auto",
    dtype: Annotated[str, dtype_option("Model dtype: fp32, bf16 or fp16.")] = "fp32",
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Images per UNet call.")] = 8,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the UNet (default: on CUDA only).")
    ] = None,
    attention: Annotated[str, typer.Option("--attention", help="default, sdpa or xformers (CUDA).")] = "default",
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow model components with custom code.")
    ] = False,
) -> None:
    """Generate images (DDIM, or a flow-matching sampler) with classifier-free guidance; writes PNGs and a grid."""
    from fastdense.toy import is_toy_model, sampling_defaults, shipped_model_dir

    if model is None:
        model = str(shipped_model_dir())
    if is_toy_model(model):  # a toy model (SD or flow), with its own sampling defaults
        toy = sampling_defaults(model)
        steps = toy.steps if steps is None else steps
        guidance = toy.guidance if guidance is None else guidance
        eta = toy.eta if eta is None else eta
        sampler_kind = toy.sampler if sampler_kind is None else sampler_kind
    eta = 1.0 if eta is None else eta
    steps = 50 if steps is None else steps
    guidance = 7.5 if guidance is None else guidance
    check_args(steps=steps, guidance=guidance, num_images=num_images, eta=eta, micro_batch=micro_batch)
    check_sampler(sampler_kind)
    prompt_list = read_prompts(prompts, prompts_file)
    torch_dtype = parse_dtype(dtype)
    if lora is not None and not lora.exists():
        raise FastdenseError(f"--lora {lora} does not exist")
    traj_steps = parse_steps(trajectory_steps, steps) if trajectory else []
    check_out_dir(out)

    import torch
    from rich.console import Console

    from fastdense.images import image_grid, to_pil
    from fastdense.models.loading import load_pipeline_parts
    from fastdense.pictures import save_png, trajectory_figure, wrap
    from fastdense.sampler import Sampler, decode

    console = Console(stderr=True)
    dev = resolve_device(device)
    parts = load_pipeline_parts(model, dtype=torch_dtype, device=dev, trust_remote_code=trust_remote_code, lora=lora,
                                resolution=resolution)

    all_prompts = [p for p in prompt_list for _ in range(num_images)]
    total = len(all_prompts)
    sampler = Sampler(parts, micro_batch=min(micro_batch, total), compile=compile, attention=attention)
    with library_warnings(console), progress_bar("sampling", console=console, transient=True) as bar:
        task = bar.add_task("sampling", total=total * steps)
        traj = sampler.sample(
            all_prompts,
            num_steps=steps,
            guidance=guidance,
            eta=eta,
            sampler=sampler_kind,
            seed=seed,
            record_x0_steps=traj_steps,
            progress=lambda n: bar.advance(task, n),
            record=False,  # images only: two latent slots instead of the whole chain
        )
    images = decode(parts, traj.final_latents)

    out.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(total):
        p_idx, i_idx = divmod(k, num_images)
        name = f"{p_idx:03d}_{i_idx:02d}"
        to_pil(images[k]).save(out / f"{name}.png")
        record = {"file": f"{name}.png", "prompt": all_prompts[k], "seed": seed + k}
        if trajectory:
            x0 = traj.x0[k]  # [S, C, h, w]
            pics = torch.cat([decode(parts, x0), images[k : k + 1]])
            title = f"{wrap(all_prompts[k], 40, 2)}\nseed {seed + k}: x̂0 at each step, then the image"
            save_png(trajectory_figure([list(pics)], traj_steps, title=title), out / f"{name}_trajectory.png")
            record["trajectory"] = f"{name}_trajectory.png"
            record["trajectory_steps"] = traj_steps
        records.append(record)
    image_grid(images, len(prompt_list), num_images, pad=2).save(out / "grid.png")
    meta = {
        "model": str(model),
        "lora": str(lora) if lora is not None else None,
        "steps": steps,
        "guidance": guidance,
        "eta": eta,
        "sampler": traj.info["sampler"],
        "seed": seed,
        "images": records,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=2) + "\n")
    console.print(f"wrote {total} images, grid.png and samples.json to {out}")
