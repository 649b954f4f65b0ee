"""The family-blind plumbing: pipeline class → family, the training window over a step table,
the new config keys, and LoRAs refused across families. Each family's own equivalence with its
diffusers pipeline is tested in tests/test_family_<family>.py."""

import json
import shutil

import pytest
import torch

from fastdense.config import build_config
from fastdense.errors import FastdenseError
from fastdense.models.families import FAMILIES, backbone_class, family_of_pipeline
from fastdense.models.loading import load_pipeline_parts
from fastdense.schedule import make_step_table
from fastdense.training.trainer import train_steps

FLOW_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def test_every_family_names_its_pipelines_and_backbone():
    names = [f.name for f in FAMILIES]
    assert names == ["sd", "sdxl", "sd3", "flux"]
    assert family_of_pipeline("StableDiffusionPipeline").name == "sd"
    assert family_of_pipeline("StableDiffusionXLPipeline").name == "sdxl"
    assert family_of_pipeline("StableDiffusion3Pipeline").name == "sd3"
    assert family_of_pipeline("FluxPipeline").name == "flux"
    assert backbone_class("sd").family == "sd"


def test_unknown_pipeline_class_is_one_line_listing_the_supported(tiny_dir, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FastdenseError, match="KandinskyV22Pipeline.*not supported; supported: StableDiffusionPipeline"):
        load_pipeline_parts(model)
    out = tmp_path / "out"
    code, _, err = run_cli(["sample", "a cat", "--model", model, "--out", out, "--steps", "2"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "FluxPipeline" in err
    assert not out.exists()  # nothing written


def test_sd_parts_name_their_family(tiny_dir):
    parts = load_pipeline_parts(tiny_dir)
    assert parts.family == "sd" and parts.extra == {} and parts.denoiser is parts.unet


def test_resolution_sets_the_latent_size_or_is_refused(tiny_dir):
    parts = load_pipeline_parts(tiny_dir)
    factor = parts.vae_scale_factor
    bigger = load_pipeline_parts(tiny_dir, resolution=4 * factor * 2)
    assert bigger.latent_size == (8, 8)
    with pytest.raises(FastdenseError, match=f"resolution=13 is not allowed.*multiple of {factor}"):
        load_pipeline_parts(tiny_dir, resolution=13)


# ------------------------------------------------------------------------- training window


def test_cps_trains_on_every_step_but_its_last():
    table = make_step_table(FLOW_CONFIG, 6, sampler="cps", eta=0.7)
    assert float(table.sigma[-1]) == 0.0
    assert train_steps(table, None) == [0, 1, 2, 3, 4]
    assert train_steps(table, [1, 4]) == [1, 2, 3]
    with pytest.raises(FastdenseError, match=r"step_window=\[2, 6\] includes step 5, which has σ = 0"):
        train_steps(table, [2, 6])


def test_sde_and_ddim_train_on_the_whole_chain_by_default():
    sde = make_step_table(FLOW_CONFIG, 6, sampler="sde", eta=0.7)
    assert train_steps(sde, None) is None  # the plan's default: bit for bit today's
    assert train_steps(sde, [0, 6]) is None
    assert train_steps(sde, [0, 5]) == [0, 1, 2, 3, 4]
    with pytest.raises(FastdenseError, match=r"step_window=\[3, 9\] is outside the chain; allowed: 0 <= start"):
        train_steps(sde, [3, 9])


def test_a_chain_without_density_cannot_be_trained():
    ode = make_step_table(FLOW_CONFIG, 4, sampler="ode", eta=0.0)
    with pytest.raises(FastdenseError, match="has no density at any step.*noise level > 0"):
        train_steps(ode, None)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["sampling.sampler=ode"], "sampling.sampler"),
        (["sampling.sampler=euler"], "sampling.sampler"),
        (["objective.step_window=[3,3]"], "objective.step_window"),
        (["sampling.num_steps=10", "objective.step_window=[0,11]"], "objective.step_window"),
        (["objective.step_window=[1]"], "objective.step_window"),
        (["model.text_encoder_device=tpu"], "model.text_encoder_device"),
        (["model.resolution=0"], "model.resolution"),
        (["sampling.eta=0"], "sampling.eta"),
    ],
)
def test_new_config_keys_are_validated(overrides, key):
    with pytest.raises(FastdenseError, match=f"^{key}=.* is not allowed"):
        build_config("toy", overrides=overrides)


def test_flow_presets_resolve():
    sd35 = build_config("sd35-medium")
    assert sd35.sampling.sampler == "sde" and sd35.objective.step_window == [0, 9]
    flux = build_config("flux-dev")
    assert flux.model.text_encoder_device == "cpu" and flux.sampling.guidance == 3.5
    assert build_config("sd15-multi").model.path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# ------------------------------------------------------------------------- sampler kinds and LoRAs


def test_a_flow_sampler_on_a_ddim_model_is_one_line(tiny_dir):
    from fastdense.sampler import Sampler

    sampler = Sampler(load_pipeline_parts(tiny_dir), compile=False)
    with pytest.raises(FastdenseError, match="sde") as err:
        sampler.sample(["a cat"], num_steps=2, guidance=2.0, sampler="sde")
    assert "\n" not in str(err.value)
    traj = sampler.sample(["a cat"], num_steps=2, guidance=2.0, sampler="ddim")
    assert traj.info["sampler"] == "ddim" and traj.info["family"] == "sd"


def test_a_lora_of_another_family_is_refused(tiny_dir, tmp_path):
    from fastdense.lora import LORA_INFO, load_lora, save_lora
    from fastdense.testing import random_lora

    lora = random_lora(tiny_dir, tmp_path / "lora")
    info = json.loads((lora / LORA_INFO).read_text()) if (lora / LORA_INFO).exists() else None
    assert info is None  # written without a family: loads anywhere it fits
    parts = load_pipeline_parts(tiny_dir)
    save_lora_dir = tmp_path / "sd_lora"
    load_lora(parts.unet, lora)
    save_lora(parts.unet, save_lora_dir, prefix="unet", family="sd")
    assert json.loads((save_lora_dir / LORA_INFO).read_text()) == {"family": "sd", "prefix": "unet"}

    fresh = load_pipeline_parts(tiny_dir)
    with pytest.raises(FastdenseError, match="trained on a 'sd' model; this model is 'sdxl'"):
        load_lora(fresh.unet, save_lora_dir, family="sdxl")
    # a transformer's LoRA (keys "transformer.") onto a UNet family
    from safetensors.torch import load_file, save_file

    state = load_file(str(save_lora_dir / "pytorch_lora_weights.safetensors"))
    moved = tmp_path / "moved"
    moved.mkdir()
    save_file({"transformer." + k.split(".", 1)[1]: v for k, v in state.items()},
              str(moved / "pytorch_lora_weights.safetensors"))
    with pytest.raises(FastdenseError, match="holds transformer layers; this model .'sd'. has a unet"):
        load_lora(fresh.unet, moved, family="sd")
    load_lora(fresh.unet, save_lora_dir, family="sd")  # its own family loads
    assert torch.equal(
        dict(fresh.unet.named_parameters())[next(n for n, _ in fresh.unet.named_parameters() if "lora_B" in n)],
        dict(parts.unet.named_parameters())[next(n for n, _ in parts.unet.named_parameters() if "lora_B" in n)],
    )


@pytest.mark.parametrize("shape", [(1024, 1024), (768, 1344), (16, 16)])
def test_reward_preprocessing_takes_any_resolution(shape):
    """Rewards see 1024² SDXL / SD3 / FLUX images as they see 512² ones: resized on the short side
    and centre-cropped to the reward model's input, then normalised."""
    from fastdense.rewards.adapters import CLIP_MEAN, CLIP_STD, ClipPreprocess

    grey = torch.full((2, 3, *shape), 0.5)
    out = ClipPreprocess.square(224)(grey)
    assert out.shape == (2, 3, 224, 224)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 100, 100], expected.float(), atol=1e-5, rtol=0)


def test_model_defaults_file_keeps_prompt_sources_and_model_options_apart(tmp_path):
    """fastdense.json names default prompts and may carry model options (SD3's T5 length): the
    prompt reader takes its keys and leaves the rest; bad prompt sources are still refused."""
    from fastdense.data import model_prompt_defaults

    (tmp_path / "fastdense.json").write_text(json.dumps(
        {"train_prompts": "fastdense.toy.world:train_prompts", "max_sequence_length": 0}))
    assert model_prompt_defaults(tmp_path) == {"train_prompts": "fastdense.toy.world:train_prompts"}
    (tmp_path / "fastdense.json").write_text(json.dumps({"eval_prompts": 3}))
    with pytest.raises(FastdenseError, match="prompt sources"):
        model_prompt_defaults(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_trained_flow_lora_loads_in_the_pipeline(family, tmp_path):
    """One round of `train()` on the family's tiny model (its SDE chain, default LoRA targets): the
    LoRA it writes loads with the diffusers pipeline's load_lora_weights, and the pipeline's
    transformer then gives what fastdense's does with the same LoRA (through the same backbone call)."""
    import diffusers

    from fastdense.benchmarks.sampler import build_tiny_family
    from fastdense.models.families import backbone_for, family_named
    from fastdense.rewards import Brightness
    from fastdense.train import train

    model = build_tiny_family(family, tmp_path / "model")
    cfg = build_config(overrides=[
        f"model.path={model}", "model.lora_rank=4", "sampling.num_steps=3", "sampling.guidance=2.0",
        "sampling.eta=0.7", "sampling.rollouts_per_prompt=2", "objective.group_size=2", "objective.k=2",
        "objective.clip=inf", "train.rounds=1", "train.updates_per_round=1", "train.prompts_per_round=1",
        "train.groups_per_step=1", "optim.lr=0.05", "data.prompts=[a red cat, the dog]",
        "data.eval_prompts=[a red cat]", "data.eval_seeds=[1]",
    ])
    result = train(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    assert result.steps == 1 and result.skipped_updates == 0
    assert json.loads((result.output / "fastdense_lora.json").read_text()) == {"family": family,
                                                                              "prefix": "transformer"}
    parts = load_pipeline_parts(model, lora=result.output)
    backbone = backbone_for(parts)
    index = json.loads((model / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(model))
    x = torch.randn((2, *parts.latent_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor(700.0)
    cond = backbone.encode(["a red cat", "the dog"])
    cfg_on = backbone.uses_cfg(2.0)
    base = backbone(x, t, cond, cfg=cfg_on, guidance=2.0, module=pipe.transformer)
    pipe.load_lora_weights(str(result.output))
    theirs = backbone(x, t, cond, cfg=cfg_on, guidance=2.0, module=pipe.transformer)
    ours = backbone(x, t, cond, cfg=cfg_on, guidance=2.0)
    assert family_named(family).denoiser == "transformer"
    for o, th, b in zip(ours, theirs, base, strict=True):
        if o is None:
            assert th is None and b is None
            continue
        torch.testing.assert_close(th, o, rtol=1e-6, atol=1e-7)
        assert (th - b).abs().max() > 0  # training moved the LoRA off zero


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from fastdense.models.tiny_sd3 import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "model", with_t5=False)


def _train_argv(model, out, *sets):
    base = [f"model.path={model}", "sampling.num_steps=4", "sampling.rollouts_per_prompt=2",
            "objective.group_size=2", "objective.step_window=null", "data.prompts=[a cat]",
            "reward.name=aesthetic_proxy", "model.resolution=null", "optim.precision=fp32", "run.device=cpu"]
    # the sd35-medium preset: a flow model's settings (the default toy preset targets an SD UNet's layers)
    return ["train", "--preset", "sd35-medium", "--out", out, *[a for s in (*base, *sets) for a in ("--set", s)]]


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["sampling.eta=0"], "sampling.eta=0"),
        (["sampling.sampler=ode"], "sampling.sampler='ode'"),
        (["objective.step_window=[2,9]"], "objective.step_window=[2, 9]"),
        (["sampling.sampler=ddim"], "ddim"),
    ],
)
def test_bad_flow_training_input_is_one_line_and_writes_nothing(sd3_dir, tmp_path, run_cli, sets, needle):
    out = tmp_path / "run"
    code, _, err = run_cli(_train_argv(sd3_dir, out, *sets))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not out.exists()


def test_a_scheduler_that_is_not_linear_gaussian_is_refused(sd3_dir, tmp_path, run_cli):
    model = tmp_path / "model"
    shutil.copytree(sd3_dir, model)
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "stochastic_sampling": True}))
    out = tmp_path / "run"
    code, _, err = run_cli(_train_argv(model, out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "stochastic_sampling" in err, err
    assert not out.exists()


def test_a_lora_of_another_family_is_one_line_in_the_cli(sd3_dir, tiny_dir, tmp_path, run_cli):
    from fastdense.lora import load_lora, save_lora
    from fastdense.testing import random_lora

    parts = load_pipeline_parts(tiny_dir)
    load_lora(parts.unet, random_lora(tiny_dir, tmp_path / "raw"))
    save_lora(parts.unet, tmp_path / "sd_lora", family="sd")
    out = tmp_path / "out"
    code, _, err = run_cli(["sample", "a cat", "--model", sd3_dir, "--lora", tmp_path / "sd_lora", "--out", out,
                            "--steps", "2"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained on a 'sd' model" in err, err
    assert not out.exists()


@pytest.mark.slow
def test_full_fine_tuning_of_a_transformer_writes_it_under_its_own_name(sd3_dir, tmp_path):
    """model.lora_rank = 0 on a flow model: every transformer weight trains (the π_init reference is a
    frozen copy), and the run writes the transformer as transformer/, loadable by diffusers."""
    from diffusers import SD3Transformer2DModel

    from fastdense.rewards import Brightness
    from fastdense.train import train

    cfg = build_config(overrides=[
        f"model.path={sd3_dir}", "model.lora_rank=0", "sampling.num_steps=3", "sampling.guidance=2.0",
        "sampling.eta=0.7", "sampling.rollouts_per_prompt=2", "objective.group_size=2", "objective.k=2",
        "objective.clip=inf", "train.rounds=1", "train.updates_per_round=1", "train.prompts_per_round=1",
        "train.groups_per_step=1", "optim.lr=0.01", "optim.zero_stage=0", "data.prompts=[a red cat, the dog]",
        "data.eval_prompts=[a red cat]", "data.eval_seeds=[1]",
    ])
    result = train(cfg, tmp_path / "run", reward=Brightness(), progress=False)
    assert result.steps == 1 and result.skipped_updates == 0 and result.output.name == "transformer"
    trained = SD3Transformer2DModel.from_pretrained(str(result.output))
    base = SD3Transformer2DModel.from_pretrained(str(sd3_dir / "transformer"))
    pairs = zip(trained.named_parameters(), base.parameters(), strict=True)
    moved = [name for (name, p), q in pairs if not torch.equal(p, q)]
    assert moved  # full fine-tuning changed base weights
