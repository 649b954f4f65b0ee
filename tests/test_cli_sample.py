"""``fastdense sample``: files written, and bad arguments as one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastdense.cli.main import main

REPO = Path(__file__).resolve().parents[1]
FASTDENSE = Path(sys.executable).parent / "fastdense"


def _run(argv, capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_writes_images_grid_and_trajectories(tiny_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    code, _, err = _run(
        ["sample", "a red cat", "the dog", "--model", str(tiny_dir), "--num-images", "2", "--steps", "3",
         "--guidance", "3", "--seed", "11", "--out", str(out), "--trajectory", "--device", "cpu",
         "--micro-batch", "3"],
        capsys,
    )
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["grid.png", "samples.json"]
        + [f"{p:03d}_{i:02d}.png" for p in range(2) for i in range(2)]
        + [f"{p:03d}_{i:02d}_trajectory.png" for p in range(2) for i in range(2)]
    )
    assert Image.open(out / "000_01.png").size == (16, 16)
    assert Image.open(out / "grid.png").size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    # 3 steps -> x̂0 at steps 0, 1, 2, then the final image: 16 px tiles scaled up to 128 px, with a
    # header per column ("step t", "final") and a title above them (the raw strip was 74 x 20)
    trajectory = Image.open(out / "001_00_trajectory.png")
    assert trajectory.mode == "RGB" and trajectory.width > 4 * 128 and trajectory.height > 128 + 3 * 14
    meta = json.loads((out / "samples.json").read_text())
    assert [r["prompt"] for r in meta["images"]] == ["a red cat", "a red cat", "the dog", "the dog"]
    assert [r["seed"] for r in meta["images"]] == [11, 12, 13, 14]
    assert meta["images"][0]["trajectory_steps"] == [0, 1, 2]

    # the same seed gives the same pictures; image k does not depend on the batch it was in
    again = tmp_path / "again"
    code, _, err = _run(
        ["sample", "the dog", "--model", str(tiny_dir), "--steps", "3", "--guidance", "3", "--seed", "13",
         "--out", str(again), "--device", "cpu", "--micro-batch", "3"],
        capsys,
    )
    assert code == 0, err
    a = torch.tensor(list(Image.open(out / "001_00.png").getdata()))
    b = torch.tensor(list(Image.open(again / "000_00.png").getdata()))
    assert (a - b).abs().max() <= 1


def test_prompts_file(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  the dog  \n")
    out = tmp_path / "o"
    code, _, err = _run(
        ["sample", "--prompts-file", str(prompts), "--model", str(tiny_dir), "--steps", "1", "--guidance", "1",
         "--out", str(out), "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    meta = json.loads((out / "samples.json").read_text())
    assert [r["prompt"] for r in meta["images"]] == ["a cat", "the dog"]
    assert Image.open(out / "grid.png").size == (16 + 2 * 2, 2 * 16 + 3 * 2)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--steps", "0"], "--steps"),
        (["--guidance", "-1"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--num-images", "0"], "--num-images"),
        (["--eta", "-0.5"], "--eta"),
        (["--device", "tpu"], "--device"),
        (["--model", "{missing}"], "does not exist"),
        (["--prompts-file", "{missing}"], "--prompts-file"),
        (["--lora", "{missing}"], "--lora"),
        (["--trajectory", "--trajectory-steps", "0,9"], "out of range"),
        (["--steps", "many"], "--steps"),  # typer's own usage error
    ],
)
def test_bad_arguments_are_one_line_errors(tiny_dir, tmp_path, capsys, args, match):
    args = [a.replace("{missing}", str(tmp_path / "missing")) for a in args]
    base = ["sample", "a cat", "--out", str(tmp_path / "o"), "--steps", "2", "--device", "cpu"]
    if "--model" not in args:
        base += ["--model", str(tiny_dir)]
    code, _, err = _run(base + args, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and match in lines[-1]
    assert not (tmp_path / "o").exists()


def test_default_model_is_the_shipped_toy_model(tmp_path, capsys):
    code, _, err = _run(["sample", "a red circle on a black background", "--num-images", "2",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert meta["model"].endswith("weights") and meta["steps"] == 20 and meta["guidance"] == 3.0
    assert len(list((tmp_path / "o").glob("*_*.png"))) == 2 and (tmp_path / "o" / "grid.png").is_file()


def test_missing_model_and_prompts(tmp_path, capsys):
    code, _, err = _run(["sample", "--model", str(tmp_path)], capsys)
    assert code == 2 and "no prompts" in err
    code, _, err = _run(["sample", "  ", "--model", str(tmp_path)], capsys)
    assert code == 2 and "empty prompt" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    code, _, err = _run(["sample", "--prompts-file", str(empty), "--model", str(tmp_path)], capsys)
    assert code == 2 and "holds no prompts" in err
    code, _, err = _run(["sample", "a cat", "--model", str(tmp_path)], capsys)  # not a pipeline directory
    assert code == 2 and "model_index.json" in err and len(err.strip().splitlines()) == 1


def test_console_script_errors_without_traceback(tmp_path):
    if not FASTDENSE.exists():
        pytest.skip("the fastdense console script is not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTDENSE_DEBUG", None)
    proc = subprocess.run(
        [str(FASTDENSE), "sample", "a cat", "--model", str(tmp_path / "nope"), "--steps", "0"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "--steps" in proc.stderr
    proc = subprocess.run(
        [str(FASTDENSE), "sample", "a cat", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_sample_with_lora(tiny_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    lora = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(lora, unet_lora_layers=get_peft_model_state_dict(unet))
    outs = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(lora)])):
        outs[name] = tmp_path / name
        code, _, err = _run(
            ["sample", "a cat", "--model", str(tiny_dir), "--steps", "2", "--guidance", "2", "--out",
             str(outs[name]), "--device", "cpu", *extra],
            capsys,
        )
        assert code == 0, err
    meta = json.loads((outs["lora"] / "samples.json").read_text())
    assert meta["lora"] == str(lora)
    a = torch.tensor(list(Image.open(outs["base"] / "000_00.png").getdata()))
    b = torch.tensor(list(Image.open(outs["lora"] / "000_00.png").getdata()))
    assert not torch.equal(a, b)
    empty = tmp_path / "empty_lora"
    empty.mkdir()
    code, _, err = _run(["sample", "a cat", "--model", str(tiny_dir), "--lora", str(empty), "--device", "cpu",
                         "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "holds no LoRA weights" in err and "Traceback" not in err
