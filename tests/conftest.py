"""Test set-up: the Triton interpreter must be on before anything imports triton.

diffusers and peft import triton too, so this runs first, at collection.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny shapes: one intra-op thread is fastest, and far faster on a shared, busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-layout pipeline saved to disk (one per test module)."""
    from fastdense.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory):
    """A tiny pixel-space RGB model (4×4 images): fast, and its samples depend on prompt and seed."""
    from fastdense.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pixel") / "model", with_vae=False, in_channels=3,
                               sample_size=4)


@pytest.fixture(scope="session")
def grey_dir(tmp_path_factory):
    """A tiny pixel-space v-prediction model (1 channel, 4x4) whose output layer starts at zero:
    v̂ = 0 makes samples mid-grey noise (no saturation), so brightness is a smooth reward the
    policy controls; LoRA on ``conv_out`` can move it. The trainer tests' model."""
    from diffusers import UNet2DConditionModel

    from fastdense.testing import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path_factory.mktemp("grey") / "model", with_vae=False, in_channels=1,
                               sample_size=4, prediction_type="v_prediction")
    unet = UNet2DConditionModel.from_pretrained(str(path / "unet"))
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    unet.save_pretrained(str(path / "unet"))
    return path


@pytest.fixture
def run_cli(capsys):
    """The fastdense CLI in this process: ``run_cli(argv) -> (exit code, stdout, stderr)``."""
    from fastdense.cli.main import main

    def run(argv) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
