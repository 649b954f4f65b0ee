"""The families' real-shape configs (gpu_check's random-weight denoisers) have the published
sizes, and every family's sampling step and training micro-batch run through the timing code
at tiny shapes (what a GPU run does at real ones)."""

import pytest
import torch

from fastdense.benchmarks.families import REAL_SHAPES, parameter_count, run_family_benchmarks


@pytest.mark.parametrize(
    ("family", "low", "high"),
    [
        ("sd", 859.5e6, 859.6e6),  # SD 1.5 UNet: 859.52 M
        ("sdxl", 2.567e9, 2.568e9),  # SDXL base UNet: 2.567 B
        ("sd3", 2.2e9, 2.6e9),  # SD3.5 Medium MMDiT-X: "2.5 B" with its embedders (Stability AI)
        ("flux", 11.9e9, 11.91e9),  # FLUX.1-dev transformer: 11.9 B
    ],
)
def test_real_shapes_have_the_published_sizes(family, low, high):
    assert low <= parameter_count(family) <= high


def test_every_family_times_a_step_and_a_microbatch(tmp_path):
    rows = run_family_benchmarks(torch.device("cpu"), dry_run=True, families=tuple(REAL_SHAPES), batch=2,
                                 repeats=1, workdir=tmp_path)
    assert [r.family for r in rows] == ["sd", "sdxl", "sd3", "flux"]
    for row in rows:
        assert row.sample_step_ms > 0 and row.train_microbatch_ms > 0 and row.batch == 2
        assert row.model == f"tiny {row.family} test pipeline"
