"""fastdense.rewards: built-in rewards on images whose right score is known, weighted
sums, the registry, and the model adapters' contract with tiny stand-in models (no
weights are downloaded)."""

from __future__ import annotations

import io
import itertools
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fastdense.errors import FastdenseError
from fastdense.rewards import (
    AestheticProxy,
    BaseReward,
    Brightness,
    ClipPreprocess,
    HPSv2Reward,
    ImageRewardReward,
    JpegCompressibility,
    JpegIncompressibility,
    LaionAestheticReward,
    PickScoreReward,
    Reward,
    WeightedSum,
    available_rewards,
    get_reward,
    parse_reward_spec,
    register_reward,
    to_pil,
)
from fastdense.rewards import adapters as adapters_mod
from fastdense.rewards import registry as registry_mod
from fastdense.testing import clip_bpe, write_bpe_files
from fastdense.toy.colors import COLOR_NAMES, PALETTE, format_toy_prompt, parse_toy_prompt
from fastdense.toy.reward import ColorFidelity

ALL_NAMES = [
    "aesthetic_proxy",
    "brightness",
    "color_fidelity",
    "hpsv2",
    "imagereward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "laion_aesthetic",
    "pickscore",
]
WORDS = "a an the small big red green blue yellow magenta cyan white black circle square triangle on background"
PROMPTS = [
    "a red circle on a black background",
    "a small blue square on a white background",
    "a green triangle",
    "a big yellow square on a black background",
    "a cyan circle on a black background",
]


def toy_image(shape_rgb, bg_rgb, size: int = 32, lo: int = 8, hi: int = 24) -> torch.Tensor:
    img = torch.empty(3, size, size)
    img[:] = torch.tensor(bg_rgb, dtype=torch.float32)[:, None, None]
    img[:, lo:hi, lo:hi] = torch.tensor(shape_rgb, dtype=torch.float32)[:, None, None]
    return img


def rand_images(n: int, h: int = 40, w: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


# ------------------------------------------------------------------ palette, grammar


def test_palette_is_well_separated_and_in_range():
    assert len(PALETTE) == len(COLOR_NAMES) == 8
    assert set(COLOR_NAMES) >= {"red", "green", "blue", "yellow", "magenta", "cyan", "white", "black"}
    for rgb in PALETTE.values():
        assert len(rgb) == 3 and all(0.0 <= v <= 1.0 for v in rgb)
    for a, b in itertools.combinations(COLOR_NAMES, 2):
        assert math.dist(PALETTE[a], PALETTE[b]) >= 1.0 - 1e-9, (a, b)
    with pytest.raises(TypeError):
        PALETTE["pink"] = (1.0, 0.5, 0.5)  # read-only: one source of truth


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle on a black background", ("red", "black", "circle")),
        ("a small blue square on a white background", ("blue", "white", "square")),
        ("A Big GREEN triangle on the black background.", ("green", "black", "triangle")),
        ("yellow square on white", ("yellow", "white", "square")),
        ("a magenta circle", ("magenta", None, "circle")),
        ("cyan", ("cyan", None, None)),
        ("a red small circle", ("red", None, "circle")),
    ],
)
def test_parse_toy_prompt(prompt, expected):
    parsed = parse_toy_prompt(prompt)
    assert tuple(parsed) == expected
    shape_color, background_color, shape = parsed
    assert (parsed.shape_color, parsed.background_color, parsed.shape) == (shape_color, background_color, shape)


@pytest.mark.parametrize(
    "prompt",
    ["a cat on a mat", "a red blue circle", "a red circle on a table", "a red circle on a black white background", ""],
)
def test_parse_toy_prompt_rejects_non_toy_prompts(prompt):
    with pytest.raises(FastdenseError) as info:
        parse_toy_prompt(prompt)
    assert "\n" not in str(info.value)


def test_format_toy_prompt_round_trips():
    for color, bg, size in [("red", "black", None), ("blue", "white", "small"), ("green", None, "big")]:
        text = format_toy_prompt(color, "square", bg, size=size)
        assert tuple(parse_toy_prompt(text)) == (color, bg, "square")
    assert format_toy_prompt("red", "circle", "black") == "a red circle on a black background"
    with pytest.raises(FastdenseError, match="allowed"):
        format_toy_prompt("pink")


# ----------------------------------------------------------------------- base class


class _Const(BaseReward):
    name = "const"

    def __init__(self, value: float = 1.0, device="cpu", batch_size: int = 4):
        super().__init__(device, batch_size)
        self.value = value
        self.calls: list[int] = []

    def score_batch(self, images, prompts):
        self.calls.append(len(prompts))
        assert not torch.is_grad_enabled()
        return torch.full((images.shape[0],), self.value, dtype=torch.float64) + images.mean((1, 2, 3))


def test_base_reward_batches_under_no_grad_and_returns_cpu_float32():
    reward = _Const(batch_size=3)
    images = torch.rand(7, 3, 8, 8, requires_grad=True)
    out = reward(images, ["p"] * 7)
    assert reward.calls == [3, 3, 1]
    assert out.shape == (7,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    assert isinstance(reward, Reward)
    assert reward(torch.zeros(0, 3, 8, 8), []).shape == (0,)


def test_base_reward_validates_inputs():
    reward = _Const()
    with pytest.raises(FastdenseError, match="2 prompts"):
        reward(torch.rand(3, 3, 8, 8), ["a", "b"])
    with pytest.raises(FastdenseError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(3, 8, 8), ["a"] * 3)
    with pytest.raises(FastdenseError, match="float"):
        reward(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"])
    with pytest.raises(FastdenseError, match="list of prompts"):
        reward(torch.rand(1, 3, 8, 8), "a")
    with pytest.raises(FastdenseError, match="batch_size"):
        _Const(batch_size=0)


def test_to_pil_round_trips_at_8_bits():
    images = torch.rand(2, 3, 5, 7)
    pils = to_pil(images)
    assert len(pils) == 2 and pils[0].size == (7, 5) and pils[0].mode == "RGB"
    back = torch.from_numpy(np.stack([np.asarray(p) for p in pils])).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(back, images, atol=0.5 / 255 + 1e-6)
    assert len(to_pil(images[0])) == 1


# ------------------------------------------------------------------- color fidelity


def test_color_fidelity_known_scores():
    red = PALETTE["red"]
    images = torch.stack([toy_image(red, PALETTE["black"])] * 4)
    prompts = [
        "a red square on a black background",
        "a blue square on a black background",
        "a red square",  # background estimated from the border
        "a red square on a white background",  # wrong background: black pixels count as off-colour
    ]
    scores = ColorFidelity()(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores[0] > 0.99 and scores[2] > 0.99
    assert scores[1] < 0.01
    assert 0.2 < scores[3] < 0.3  # the shape is a quarter of the non-white pixels
    # pixel noise (as in sampled images) barely matters
    noisy = (images[:2] + 0.1 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    right, wrong = ColorFidelity()(noisy, prompts[:2]).tolist()
    assert right > 0.9 and wrong < 0.05


def test_color_fidelity_every_palette_pair():
    reward = ColorFidelity()
    pairs = [(s, b) for s in COLOR_NAMES for b in COLOR_NAMES if s != b]
    images = torch.stack([toy_image(PALETTE[s], PALETTE[b]) for s, b in pairs])
    right = reward(images, [format_toy_prompt(s, "square", b) for s, b in pairs])
    assert right.min() > 0.999
    wrong_color = [next(c for c in COLOR_NAMES if c not in (s, b)) for s, b in pairs]
    wrong = reward(images, [format_toy_prompt(w, "square", b) for w, (_, b) in zip(wrong_color, pairs, strict=True)])
    assert wrong.max() < 0.01


def test_color_fidelity_is_graded_and_bounded():
    reward = ColorFidelity()
    black = PALETTE["black"]
    # red -> orange -> yellow: the score falls steadily from 1 to 0
    shades = [(1.0, g, 0.0) for g in (0.0, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]
    images = torch.stack([toy_image(c, black) for c in shades])
    scores = reward(images, ["a red square on a black background"] * len(shades))
    assert torch.all(scores[:-1] > scores[1:])
    assert scores[0] > 0.99 and scores[-1] < 0.01 and 0.1 < scores[3] < 0.9
    # anti-aliased edges (the shape colour blended with the background) count as the shape colour
    edge = toy_image((0.5, 0.0, 0.0), black)
    edge[:, 10:22, 10:22] = torch.tensor(PALETTE["red"])[:, None, None]
    assert reward(edge[None], ["a red square on a black background"]).item() > 0.99
    # half the shape red, half blue
    half = toy_image(PALETTE["red"], black)
    half[:, 8:24, 16:24] = torch.tensor(PALETTE["blue"])[:, None, None]
    half_prompt = ["a red square on a black background"]
    assert abs(ColorFidelity(smooth=1)(half[None], half_prompt).item() - 0.5) < 0.01
    assert abs(reward(half[None], half_prompt).item() - 0.5) < 0.05  # the blur blends the seam
    noisy = rand_images(6, 32, 32)
    s = reward(noisy, ["a red circle on a black background"] * 6)
    assert torch.all((s >= 0) & (s <= 1))


def test_color_fidelity_no_foreground_and_tiny_shapes():
    reward = ColorFidelity()
    flat = torch.zeros(2, 3, 32, 32)
    assert reward(flat, ["a red circle on a black background", "a red circle"]).tolist() == [0.0, 0.0]
    big = toy_image(PALETTE["red"], PALETTE["black"])
    tiny = toy_image(PALETTE["red"], PALETTE["black"], lo=15, hi=17)  # 4 of 1024 pixels < min_area
    sharp = ColorFidelity(smooth=1)
    s_big, s_tiny = sharp(torch.stack([big, tiny]), ["a red square on a black background"] * 2).tolist()
    assert s_big > 0.99 and s_tiny == pytest.approx(4 / 1024 / sharp.min_area, abs=1e-3)


def test_color_fidelity_batching_determinism_and_errors():
    images = torch.stack([toy_image(PALETTE[c], PALETTE["black"]) for c in ("red", "blue", "cyan", "yellow")])
    images = (images + 0.1 * rand_images(4, 32, 32)).clamp(0, 1)
    prompts = PROMPTS[:4]
    a = ColorFidelity(batch_size=1)(images, prompts)
    b = ColorFidelity(batch_size=64)(images, prompts)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(b, ColorFidelity(batch_size=64)(images, prompts))
    assert torch.allclose(ColorFidelity()(images.double(), prompts), b)
    with pytest.raises(FastdenseError, match="palette colour"):
        ColorFidelity()(images[:1], ["a photo of a cat"])
    with pytest.raises(FastdenseError):
        ColorFidelity(temperature=0)


# ------------------------------------------------------------------------------ JPEG


def test_jpeg_rewards():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = rand_images(1, 64, 64)
    images = torch.cat([flat, noise])
    comp = JpegCompressibility()(images, ["x", "y"])
    incomp = JpegIncompressibility()(images, ["x", "y"])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    assert torch.equal(comp, -incomp)
    buf = io.BytesIO()
    to_pil(noise)[0].save(buf, format="JPEG", quality=95)
    assert incomp[1].item() == pytest.approx(len(buf.getvalue()) / 1000, rel=1e-6)
    assert torch.equal(JpegCompressibility(batch_size=1)(images, ["p", "q"]), comp)  # prompts ignored
    assert JpegCompressibility.needs_pil and JpegIncompressibility(quality=50).quality == 50


# ------------------------------------------------------------------ aesthetic proxy


def test_aesthetic_proxy_ranks_images():
    reward = AestheticProxy()
    grey = torch.full((3, 64, 64), 0.5)
    colourful = torch.zeros(3, 64, 64)
    for i, name in enumerate(["red", "yellow", "blue", "cyan", "magenta", "green", "white", "black"]):
        r, c = divmod(i, 4)
        colourful[:, r * 32 : (r + 1) * 32, c * 16 : (c + 1) * 16] = torch.tensor(PALETTE[name])[:, None, None]
    dull = 0.45 + 0.1 * colourful  # same layout, little colour and contrast
    noise = rand_images(1, 64, 64)[0]
    images = torch.stack([grey, colourful, dull, noise])
    s = reward(images, [""] * 4)
    assert s[0] == 0.0
    assert s[1] > s[2] > s[0]
    assert s[1] > s[3]
    assert torch.all((s >= 0) & (s < 1))
    f = reward.features(images)
    assert set(f) == {"colorfulness", "contrast", "sharpness", "noise"}
    assert f["noise"][3] > 0.1 > f["noise"][1]
    big = torch.nn.functional.interpolate(images[:3], scale_factor=8, mode="nearest")  # analysed at 256 px
    big = torch.cat([big, rand_images(1, 512, 512)])
    assert torch.equal(reward(big, [""] * 4).argsort(), s.argsort())
    with pytest.raises(FastdenseError):
        AestheticProxy(weights=(1.0, -1.0, 1.0))


# ----------------------------------------------------------------------- brightness


def test_brightness_is_the_mean_pixel_value():
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.25)])
    images[2, 0] = 1.0  # one channel at 1: (1 + 0.25 + 0.25) / 3
    s = Brightness(batch_size=2)(images, ["a", "b", "c"])
    assert torch.allclose(s, torch.tensor([0.0, 1.0, 0.5]))


# --------------------------------------------------------------------- weighted sum


def test_weighted_sum():
    images = torch.stack([toy_image(PALETTE["red"], PALETTE["black"]), rand_images(1, 32, 32)[0]])
    prompts = ["a red square on a black background", "a blue circle"]
    cf, ap = ColorFidelity(), AestheticProxy()
    total = WeightedSum([(cf, 1.0), (ap, 0.1)])
    expected = cf(images, prompts) + 0.1 * ap(images, prompts)
    assert torch.allclose(total(images, prompts), expected)
    assert total.name == "color_fidelity=1,aesthetic_proxy=0.1"
    assert isinstance(total, Reward)
    parts = WeightedSum([(cf, 1.0), (cf, -2.0)]).components(images, prompts)
    assert list(parts) == ["color_fidelity", "color_fidelity#2"]
    with pytest.raises(FastdenseError):
        WeightedSum([])
    with pytest.raises(FastdenseError, match="finite"):
        WeightedSum([(cf, float("nan"))])
    with pytest.raises(FastdenseError, match="not a reward"):
        WeightedSum([("color_fidelity", 1.0)])


# ------------------------------------------------------------------------- registry


def test_registry_names_and_kwargs():
    assert available_rewards() == ALL_NAMES
    for name, cls in [
        ("color_fidelity", ColorFidelity),
        ("jpeg_compressibility", JpegCompressibility),
        ("jpeg_incompressibility", JpegIncompressibility),
        ("aesthetic_proxy", AestheticProxy),
        ("brightness", Brightness),
    ]:
        reward = get_reward(name)
        assert type(reward) is cls and isinstance(reward, Reward) and reward.name == name
    reward = get_reward(" Color-Fidelity ", batch_size=3, temperature=0.1)
    assert isinstance(reward, ColorFidelity) and reward.batch_size == 3 and reward.temperature == 0.1
    with pytest.raises(FastdenseError, match="does not accept"):
        get_reward("color_fidelity", quality=3)


def test_registry_unknown_name_is_one_line_listing_names():
    with pytest.raises(FastdenseError) as info:
        get_reward("colour_fidelty")
    message = str(info.value)
    assert "\n" not in message and "colour_fidelty" in message
    assert all(name in message for name in ALL_NAMES) and "package.module:Class" in message
    assert isinstance(info.value, ValueError)


def test_registry_weighted_sum_spec():
    assert parse_reward_spec("color_fidelity=1.0, aesthetic_proxy=0.1") == [
        ("color_fidelity", 1.0),
        ("aesthetic_proxy", 0.1),
    ]
    assert parse_reward_spec("pickscore") == [("pickscore", None)]
    assert parse_reward_spec("a,b=-1e-2") == [("a", 1.0), ("b", -0.01)]
    reward = get_reward("color_fidelity=1.0,aesthetic_proxy=0.1", batch_size=2)
    assert isinstance(reward, WeightedSum) and reward.name == "color_fidelity=1,aesthetic_proxy=0.1"
    assert [r.batch_size for r, _ in reward.terms] == [2, 2]
    images = torch.stack([toy_image(PALETTE["red"], PALETTE["black"])] * 2)
    prompts = ["a red square on a black background", "a blue square"]
    expected = ColorFidelity()(images, prompts) + 0.1 * AestheticProxy()(images, prompts)
    assert torch.allclose(reward(images, prompts), expected)
    # a weight alone makes a one-term sum; per-term options; shared options go where accepted
    single = get_reward("jpeg_compressibility=0.5")
    assert isinstance(single, WeightedSum) and single.terms[0][1] == 0.5
    mixed = get_reward("color_fidelity,jpeg_incompressibility=2", jpeg_incompressibility={"quality": 80}, temperature=1)
    (cf, w1), (jpeg, w2) = mixed.terms
    assert (w1, w2) == (1.0, 2.0) and jpeg.quality == 80 and cf.temperature == 1.0
    with pytest.raises(FastdenseError, match="accepts the option"):
        get_reward("color_fidelity=1,aesthetic_proxy=1", quality=3)
    for bad in ["", "color_fidelity=abc", "color_fidelity=inf", "color_fidelity=1,,aesthetic_proxy=1", "=1"]:
        with pytest.raises(FastdenseError) as info:
            get_reward(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(FastdenseError, match="unknown reward 'nope'"):
        get_reward("color_fidelity=1,nope=2")


USER_MODULE = """
import torch
from fastdense.rewards import BaseReward


class MeanRed(BaseReward):
    name = "mean_red"

    def __init__(self, scale=1.0, device="cpu", batch_size=8):
        super().__init__(device, batch_size)
        self.scale = scale

    def score_batch(self, images, prompts):
        return self.scale * images[:, 0].mean((1, 2))


def not_a_reward():
    return 42


VALUE = 3
"""


def test_registry_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = torch.stack([toy_image(PALETTE["red"], PALETTE["black"]), torch.zeros(3, 32, 32)])
    reward = get_reward("my_user_rewards:MeanRed", scale=2.0)
    assert reward.name == "mean_red" and torch.allclose(reward(images, ["", ""]), torch.tensor([0.5, 0.0]))
    assert isinstance(get_reward("fastdense.toy.reward:ColorFidelity"), ColorFidelity)
    assert isinstance(get_reward("fastdense.rewards.builtin:ColorFidelity"), ColorFidelity)  # its old home
    total = get_reward("my_user_rewards:MeanRed=2,color_fidelity=1")
    assert total.name == "mean_red=2,color_fidelity=1"
    prompts = ["a red square on a black background"] * 2
    assert torch.allclose(total(images, prompts), torch.tensor([2 * 0.25 + 1.0, 0.0]), atol=1e-4)
    for spec, match in [
        ("no_such_module_xyz:Thing", "cannot import module 'no_such_module_xyz'"),
        ("my_user_rewards:Missing", "has no attribute 'Missing'"),
        ("my_user_rewards:not_a_reward", "not a Reward"),
        ("my_user_rewards:VALUE", "not a class or factory"),
        ("my_user_rewards:", "expected 'package.module:Class'"),
    ]:
        with pytest.raises(FastdenseError, match=match):
            get_reward(spec)


def test_register_reward(monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    register_reward("const", _Const)
    assert isinstance(get_reward("const", value=2.0), _Const)
    assert "const" in available_rewards()
    with pytest.raises(FastdenseError, match="already registered"):
        register_reward("const", _Const)


# ----------------------------------------------------------- tiny offline CLIP parts


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny CLIPModel + tokenizer + image processor, saved the
    way a local copy of a hub model is (save_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny_clip")
    # a tiny CLIP BPE vocabulary covering WORDS (built by hand, no download)
    tokenizer = CLIPTokenizer(*map(str, write_bpe_files(directory, *clip_bpe(words=WORDS.split()))))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=24,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(123)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_clip_dir)


def _emb(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_pixels(directory, images):
    """What the HF (PIL) image processor makes of the same images."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(directory)
    return processor(images=to_pil(images), return_tensors="pt")["pixel_values"]


def test_clip_preprocess_matches_hf_processor(tiny_clip_dir):
    pre = ClipPreprocess.from_config_file(tiny_clip_dir / "preprocessor_config.json", 224)
    assert pre.size == 32 and pre.crop == (32, 32)
    # already at size: only the crop geometry and the normalisation are at work
    wide = torch.rand(2, 3, 32, 48)
    quantised = (wide * 255).round() / 255
    assert torch.allclose(pre(quantised), _hf_pixels(tiny_clip_dir, wide), atol=1e-5)
    assert torch.equal(pre(quantised), pre(quantised[..., 8:40]))  # the centre crop
    # a real resize (short side 64 -> 32) of a smooth image: equal up to resampling
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 64), indexing="ij")
    smooth = torch.stack([xx, yy, 0.5 + 0.4 * torch.sin(6 * xx * yy)])[None]
    diff = (pre(smooth) - _hf_pixels(tiny_clip_dir, smooth)).abs()
    assert diff.max() < 0.08 and diff.mean() < 0.02  # 1/255 = 0.015 after normalisation
    mean = torch.tensor(pre.mean)[:, None, None]
    std = torch.tensor(pre.std)[:, None, None]
    flat = torch.full((1, 3, 50, 70), 0.25)
    assert pre(flat).shape == (1, 3, 32, 32) and torch.allclose(pre(flat)[0], (0.25 - mean) / std, atol=1e-5)


def _check_contract(make, images, prompts, prompt_dependent: bool):
    """Shapes, dtype, batch-size independence, determinism, prompt (in)dependence."""
    one, many = make(batch_size=1), make(batch_size=16)
    a, b = one(images, prompts), many(images, prompts)
    assert a.shape == (len(prompts),) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.all(torch.isfinite(a))
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(b, many(images, prompts))
    other = many(images, prompts[1:] + prompts[:1])
    assert (not torch.allclose(other, b, atol=1e-6)) == prompt_dependent
    return b


def test_pickscore_loads_from_path_and_scores(tiny_clip_dir, tiny_clip):
    model, tokenizer = tiny_clip
    images = rand_images(len(PROMPTS))
    scores = _check_contract(lambda **kw: PickScoreReward(tiny_clip_dir, **kw), images, PROMPTS, True)
    # by hand, with the HF processor: logit_scale.exp() * cosine
    tok = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        img = _emb(model.get_image_features(pixel_values=_hf_pixels(tiny_clip_dir, images)))
        txt = _emb(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(scores, expected, atol=0.05 * model.logit_scale.exp().item() / 14)
    injected = PickScoreReward(model=model, tokenizer=tokenizer)(images, PROMPTS)
    assert torch.allclose(injected, scores, atol=1e-5)


def test_pickscore_missing_weights(monkeypatch, tmp_path, tiny_clip_dir):
    monkeypatch.delenv("FASTDENSE_PICKSCORE_PATH", raising=False)
    monkeypatch.delenv("FASTDENSE_PICKSCORE_PROCESSOR_PATH", raising=False)
    with pytest.raises(FastdenseError, match="FASTDENSE_PICKSCORE_PATH") as info:
        get_reward("pickscore")
    assert "\n" not in str(info.value)
    with pytest.raises(FastdenseError, match="not found at"):
        PickScoreReward(tmp_path / "nowhere")
    with pytest.raises(FastdenseError, match="cannot load a CLIP model"):
        PickScoreReward(tmp_path)
    monkeypatch.setenv("FASTDENSE_PICKSCORE_PATH", str(tiny_clip_dir))
    assert isinstance(get_reward("pickscore", batch_size=2), PickScoreReward)


class _OpenClipLike(nn.Module):
    """The open_clip model API (encode_image / encode_text) around a tiny CLIPModel."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.visual = SimpleNamespace(image_size=(clip.config.vision_config.image_size,) * 2)

    def encode_image(self, pixels):
        return _emb(self.clip.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens):
        return _emb(self.clip.get_text_features(input_ids=tokens))


def _open_clip_tokenizer(tokenizer):
    return lambda texts: tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=24, return_tensors="pt"
    )["input_ids"]


def test_hpsv2_scores_cosine(tiny_clip):
    model, tokenizer = tiny_clip
    wrapped = _OpenClipLike(model)
    images = rand_images(len(PROMPTS))

    def make(**kw):
        return HPSv2Reward(
            model=wrapped, tokenizer=_open_clip_tokenizer(tokenizer), preprocess=ClipPreprocess.square(32), **kw
        )

    scores = _check_contract(make, images, PROMPTS, True)
    with torch.no_grad():
        img = wrapped.encode_image(ClipPreprocess.square(32)(images))
        txt = wrapped.encode_text(_open_clip_tokenizer(tokenizer)(PROMPTS))
    assert torch.allclose(scores, torch.nn.functional.cosine_similarity(img, txt), atol=1e-5)
    assert torch.all(scores.abs() <= 1 + 1e-6)


def test_hpsv2_missing_package_and_weights(monkeypatch, tmp_path, tiny_clip):
    monkeypatch.delenv("FASTDENSE_HPSV2_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(FastdenseError, match=r"pip install 'fastdense\[hpsv2\]'") as info:
        get_reward("hpsv2")
    assert "open-clip-torch" in str(info.value) and "\n" not in str(info.value)

    # with a stand-in open_clip: the weights are looked up, loaded and used
    model, tokenizer = tiny_clip
    fake = types.ModuleType("open_clip")
    fake.create_model = lambda arch, pretrained=None, precision="fp32", device="cpu": _OpenClipLike(
        type(model)(model.config)
    )
    fake.get_tokenizer = lambda arch: _open_clip_tokenizer(tokenizer)
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with pytest.raises(FastdenseError, match="FASTDENSE_HPSV2_PATH"):
        HPSv2Reward()
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in _OpenClipLike(model).state_dict().items()}}, ckpt)
    monkeypatch.setenv("FASTDENSE_HPSV2_PATH", str(ckpt))
    reward = get_reward("hpsv2")
    assert reward.preprocess == ClipPreprocess.square(32)
    direct = HPSv2Reward(model=_OpenClipLike(model), tokenizer=fake.get_tokenizer("x"), preprocess=reward.preprocess)
    images = rand_images(2)
    assert torch.allclose(reward(images, PROMPTS[:2]), direct(images, PROMPTS[:2]), atol=1e-6)
    torch.save({"state_dict": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(FastdenseError, match="not an ViT-H-14 HPS checkpoint"):
        HPSv2Reward(tmp_path / "bad.pt")


def test_laion_aesthetic(tiny_clip_dir, tiny_clip, tmp_path, monkeypatch):
    from fastdense.rewards.adapters import AestheticHead

    model, _ = tiny_clip
    head = AestheticHead(in_dim=16)
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), head_file)
    images = rand_images(len(PROMPTS))
    scores = _check_contract(
        lambda **kw: LaionAestheticReward(head_file, tiny_clip_dir, **kw), images, PROMPTS, prompt_dependent=False
    )
    with torch.no_grad():
        emb = _emb(model.get_image_features(pixel_values=ClipPreprocess.square(32)(images)))
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    # the v1 linear probe loads too
    linear = nn.Linear(16, 1)
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    assert isinstance(LaionAestheticReward(tmp_path / "linear.pth", tiny_clip_dir).head, nn.Linear)
    # errors
    monkeypatch.delenv("FASTDENSE_LAION_AESTHETIC_PATH", raising=False)
    monkeypatch.delenv("FASTDENSE_LAION_AESTHETIC_CLIP_PATH", raising=False)
    with pytest.raises(FastdenseError, match="FASTDENSE_LAION_AESTHETIC_PATH"):
        get_reward("laion_aesthetic")
    with pytest.raises(FastdenseError, match="FASTDENSE_LAION_AESTHETIC_CLIP_PATH"):
        LaionAestheticReward(head_file)
    torch.save({"foo": torch.zeros(2)}, tmp_path / "foo.pth")
    with pytest.raises(FastdenseError, match="neither the MLP head"):
        LaionAestheticReward(tmp_path / "foo.pth", tiny_clip_dir)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FastdenseError, match="cannot read"):
        LaionAestheticReward(tmp_path / "junk.pth", tiny_clip_dir)


# ------------------------------------------------------------------------ ImageReward


class _TinyTextEncoder(nn.Module):
    """BLIP text encoder API: token embeddings cross-attending to image embeddings."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        assert return_dict and encoder_attention_mask.shape == encoder_hidden_states.shape[:-1]
        h = self.emb(input_ids) * attention_mask[..., None]
        query = h.sum(1) / attention_mask.sum(1, keepdim=True)
        attn = torch.softmax(torch.einsum("bd,bnd->bn", query, encoder_hidden_states), dim=-1)
        context = torch.einsum("bn,bnd->bd", attn, encoder_hidden_states)
        out = h.clone()
        out[:, 0] = torch.tanh(self.proj(query + context))
        return SimpleNamespace(last_hidden_state=out)


class _TinyPatches(nn.Module):
    """BLIP visual encoder API: ``[B, 3, H, W]`` -> patch embeddings ``[B, N, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 8, 8)

    def forward(self, pixels):
        return self.conv(pixels).flatten(2).transpose(1, 2)


class _FakeImageReward(nn.Module):
    """The attributes of ImageReward.ImageReward that scoring uses."""

    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, tokenizer, dim: int = 16):
        super().__init__()
        self.blip = nn.Module()
        self.blip.tokenizer = tokenizer
        self.blip.visual_encoder = _TinyPatches(dim)
        self.blip.text_encoder = _TinyTextEncoder(len(tokenizer), dim)
        self.mlp = nn.Linear(dim, 1)

    @staticmethod
    def preprocess(pil):
        arr = torch.from_numpy(np.array(pil.resize((32, 32)))).permute(2, 0, 1).float() / 255
        mean = torch.tensor(adapters_mod.CLIP_MEAN)[:, None, None]
        std = torch.tensor(adapters_mod.CLIP_STD)[:, None, None]
        return (arr - mean) / std

    def score(self, prompt, pil):
        """ImageReward.score for one image, as the package writes it."""
        text = self.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        image_embeds = self.blip.visual_encoder(self.preprocess(pil)[None])
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        out = self.blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        return ((self.mlp(out.last_hidden_state[:, 0, :].float()) - self.mean) / self.std).item()


@pytest.fixture(scope="module")
def fake_imagereward(tmp_path_factory):
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS.split())]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(7)
    return _FakeImageReward(BertTokenizer(str(directory / "vocab.txt")))


def test_imagereward_scores_like_the_package(fake_imagereward):
    images = rand_images(len(PROMPTS))
    scores = _check_contract(
        lambda **kw: ImageRewardReward(model=fake_imagereward, **kw), images, PROMPTS, prompt_dependent=True
    )
    with torch.no_grad():
        expected = [fake_imagereward.score(p, im) for p, im in zip(PROMPTS, to_pil(images), strict=True)]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    assert ImageRewardReward.needs_pil


def test_imagereward_missing_package_and_weights(monkeypatch, tmp_path, fake_imagereward):
    monkeypatch.delenv("FASTDENSE_IMAGEREWARD_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(FastdenseError, match=r"pip install 'fastdense\[imagereward\]'") as info:
        get_reward("imagereward")
    assert "image-reward" in str(info.value) and "\n" not in str(info.value)
    # installed but broken (e.g. built against another transformers): say so, not "install it"
    package = tmp_path / "broken" / "ImageReward"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from transformers import no_such_symbol_xyz\n")
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "ImageReward")
    with pytest.raises(FastdenseError, match="failed to import .*no_such_symbol_xyz"):
        ImageRewardReward()

    loaded = {}
    fake = types.ModuleType("ImageReward")

    def load(name, device="cpu", med_config=None):
        loaded.update(name=name, med_config=med_config)
        return fake_imagereward

    fake.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    with pytest.raises(FastdenseError, match="FASTDENSE_IMAGEREWARD_PATH"):
        ImageRewardReward()
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    with pytest.raises(FastdenseError, match="med_config.json not found"):
        ImageRewardReward(tmp_path)
    (tmp_path / "med_config.json").write_text("{}")
    monkeypatch.setenv("FASTDENSE_IMAGEREWARD_PATH", str(tmp_path))
    reward = get_reward("imagereward", batch_size=2)
    assert isinstance(reward, ImageRewardReward) and reward.model is fake_imagereward
    assert loaded == {"name": str(tmp_path / "ImageReward.pt"), "med_config": str(tmp_path / "med_config.json")}


def _const_without_batch_size(value: float = 1.0):
    """A factory that takes no batch_size (the reward still has the attribute)."""
    return _Const(value=value)


def test_reward_accepts_reads_the_factory_signature(monkeypatch):
    from fastdense.rewards import reward_accepts

    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))
    register_reward("const", _Const)
    register_reward("const_nobs", _const_without_batch_size)
    assert reward_accepts("const", "batch_size") and reward_accepts("const", "value")
    assert not reward_accepts("const_nobs", "batch_size")
    assert reward_accepts("const_nobs=1.0,const=0.5", "batch_size")  # one term takes it: get_reward passes it
    assert not reward_accepts("const_nobs=1.0", "batch_size")
    with pytest.raises(FastdenseError, match="unknown reward"):
        reward_accepts("no_such_reward", "batch_size")
