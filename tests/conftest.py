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
    from fastdense.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
