"""fastdense.evaluate: the one evaluation loop (prompt-major prompts × seeds, deterministic)."""

from __future__ import annotations

import math

import pytest
import torch

from fastdense.errors import FastdenseError
from fastdense.evaluate import Evaluation, evaluate
from fastdense.models.loading import load_pipeline_parts
from fastdense.rewards import BaseReward, Brightness
from fastdense.sampler import Sampler, decode


class _NanForCats(BaseReward):
    name = "nan_for_cats"

    def score_batch(self, images, prompts):
        return torch.tensor([math.nan if "cat" in p else 1.0 for p in prompts])


def test_evaluate_is_prompt_major_and_deterministic(pixel_dir):
    parts = load_pipeline_parts(pixel_dir)
    sampler = Sampler(parts, compile=False)
    prompts, seeds = ["a cat", "a dog"], [7, 9, 11]
    kwargs = dict(num_steps=3, guidance=2.0, eta=1.0)
    result = evaluate(sampler, parts, Brightness(), prompts, seeds, **kwargs)
    assert isinstance(result, Evaluation) and result.images.shape[0] == 6 and result.scores.dtype == torch.float64
    again = evaluate(sampler, parts, Brightness(), prompts, seeds, **kwargs)
    assert torch.equal(result.images, again.images) and torch.equal(result.scores, again.scores)
    # sample (i, j) is prompts[i] with seeds[j]: the same as sampling it alone (up to batch-size rounding)
    alone = decode(parts, sampler.sample(["a dog"], seed=[9], **kwargs).final_latents)
    assert torch.allclose(result.images[4], alone[0], atol=1e-5)
    assert not torch.allclose(result.images[1], alone[0], atol=1e-2)
    assert result.reward == pytest.approx(float(result.scores.mean()))
    partly = evaluate(sampler, parts, _NanForCats(), prompts, seeds, **kwargs)
    assert partly.reward == 1.0 and int(torch.isnan(partly.scores).sum()) == 3  # mean over the finite scores
    with pytest.raises(FastdenseError, match="at least one prompt and one seed"):
        evaluate(sampler, parts, Brightness(), prompts, [], **kwargs)


@pytest.mark.parametrize("vae", [False, True])
def test_evaluation_images_are_the_recorded_chains_final_images_bit_for_bit(pixel_dir, tiny_dir, vae):
    """Evaluation samples without recording the chain (two latent slots); the images are those of
    the recorded chain the trainer's rollouts use, to the bit (the run's held-out numbers rely on it)."""
    parts = load_pipeline_parts(tiny_dir if vae else pixel_dir)
    sampler = Sampler(parts, micro_batch=4, compile=False)
    prompts, seeds = ["a cat", "a red dog"], [3, 5, 8]
    kwargs = dict(num_steps=4, guidance=3.0, eta=1.0)
    result = evaluate(sampler, parts, Brightness(), prompts, seeds, **kwargs)
    recorded = sampler.sample([p for p in prompts for _ in seeds], seed=seeds * 2, **kwargs)
    assert recorded.latents.shape[1] == 5  # the whole chain
    images = decode(parts, recorded.final_latents)
    assert torch.equal(result.images, images.cpu())
    assert torch.equal(result.scores, Brightness()(images, [p for p in prompts for _ in seeds]).double())
