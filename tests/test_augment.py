"""Tests of semssl.data.augment: the recipe table, parity with torchvision's kernels, probabilities,
blur scaling, and the evaluation transform."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from semssl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    PhotometricRecipe,
    PhotometricTransform,
    RecipeError,
    blur_kernel_size,
    blur_sigma_range,
    build_recipe,
    denormalize,
    eval_transform,
    get_recipe,
    normalize,
)

# Values of docs/methods/dino.md §Augmentations (DINO), docs/methods/mocov2.md §Augmentations (aug-plus) and
# docs/methods/byol.md §Augmentations (BYOL, MSF weak view):
# name: (brightness, contrast, saturation, hue, jitter_p, grayscale_p, blur_p, solarize_p)
EXPECTED = {
    "mocov2": (0.4, 0.4, 0.4, 0.1, 0.8, 0.2, 0.5, 0.0),
    "mocov2_colour": (0.4, 0.4, 0.8, 0.5, 0.8, 0.5, 0.5, 0.0),  # the project's main-job recipe
    "byol_view1": (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 1.0, 0.0),
    "byol_view2": (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 0.1, 0.2),
    "dino_global1": (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 1.0, 0.0),
    "dino_global2": (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 0.1, 0.2),
    "dino_local": (0.4, 0.4, 0.2, 0.1, 0.8, 0.2, 0.5, 0.0),
    "weak": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "none": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}


def _noise(h: int = 24, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _params(jitter=None, grayscale=False, blur_sigma=None, solarize=False) -> dict:
    return dict(jitter=jitter, grayscale=grayscale, blur_sigma=blur_sigma, solarize=solarize)


def test_recipe_table_matches_methods_md() -> None:
    assert set(RECIPES) == set(EXPECTED)
    for name, values in EXPECTED.items():
        r = RECIPES[name]
        got = (*r.jitter, r.jitter_p, r.grayscale_p, r.blur_p, r.solarize_p)
        assert got == pytest.approx(values), name
        assert r.blur_sigma == (0.1, 2.0)
        assert r.source
    assert RECIPES["weak"].is_identity and RECIPES["none"].is_identity
    assert not RECIPES["mocov2"].is_identity


def test_unknown_recipe_lists_the_valid_ones() -> None:
    with pytest.raises(RecipeError, match="unknown augmentation recipe 'simclr'.*mocov2.*dino_local"):
        get_recipe("simclr")
    with pytest.raises(RecipeError, match="valid recipes"):
        build_recipe("byol", 64)
    with pytest.raises(RecipeError, match="positive int"):
        build_recipe("mocov2", 0)


def test_kernels_match_torchvision_float_kernels() -> None:
    x = _noise().float() / 255
    t = PhotometricTransform("dino_global1", 224)
    jitter = dict(
        fn_idx=torch.tensor([2, 0, 3, 1]),
        brightness_factor=1.3,
        contrast_factor=0.7,
        saturation_factor=1.15,
        hue_factor=-0.07,
    )
    out = t.transform(x, _params(jitter=jitter, blur_sigma=1.3, solarize=True))
    ref = F.adjust_saturation(x, 1.15)
    ref = F.adjust_brightness(ref, 1.3)
    ref = F.adjust_hue(ref, -0.07)
    ref = F.adjust_contrast(ref, 0.7)
    ref = F.gaussian_blur(ref, [t.kernel_size, t.kernel_size], [1.3, 1.3])
    ref = F.solarize(ref, 0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    gray = t.transform(x, _params(grayscale=True))
    torch.testing.assert_close(gray, F.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)


def test_uint8_in_uint8_out_float_in_float_out_and_batches() -> None:
    img = _noise()
    t = build_recipe("byol_view2", 24)
    torch.manual_seed(0)
    assert t(img).dtype == torch.uint8 and t(img).shape == img.shape
    assert t(img.float() / 255).dtype == torch.float32
    batch = torch.stack([img, _noise(seed=1)])
    assert t(batch).shape == batch.shape
    with pytest.raises(RecipeError, match=r"RGB tensor \[\.\.\., 3, H, W\]"):
        t(torch.zeros(1, 8, 8, dtype=torch.uint8))


def test_identity_recipes_never_change_pixels() -> None:
    img = _noise()
    for name in ("none", "weak"):
        t = build_recipe(name, 24)
        for _ in range(5):
            assert torch.equal(t(img), img)


def test_probability_one_always_applies_and_zero_never() -> None:
    img = _noise()
    always = PhotometricTransform(PhotometricRecipe(grayscale_p=1.0, solarize_p=1.0), 24)
    x = img.to(torch.int16)
    for _ in range(10):
        out = always(img)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grayscale applied
        assert int(out.max()) <= 127  # solarize applied: nothing at or above the threshold 128 survives
    solar = PhotometricTransform(PhotometricRecipe(solarize_p=1.0), 24)(img).to(torch.int16)
    torch.testing.assert_close(solar, torch.where(x >= 128, 255 - x, x))
    never = build_recipe("dino_global1", 24)  # solarize p 0
    assert not any(never.make_params([])["solarize"] for _ in range(200))
    blur_always = build_recipe("byol_view1", 24)  # blur p 1.0
    assert all(blur_always.make_params([])["blur_sigma"] is not None for _ in range(200))


@pytest.mark.parametrize("name", ["mocov2", "byol_view2", "dino_global2", "dino_local"])
def test_sampled_frequencies_match_probabilities(name: str) -> None:
    torch.manual_seed(1)
    t = build_recipe(name, 32)
    r = get_recipe(name)
    n = 600
    draws = [t.make_params([]) for _ in range(n)]
    freq = {
        "jitter": sum(d["jitter"] is not None for d in draws) / n,
        "grayscale": sum(d["grayscale"] for d in draws) / n,
        "blur": sum(d["blur_sigma"] is not None for d in draws) / n,
        "solarize": sum(d["solarize"] for d in draws) / n,
    }
    expected = {"jitter": r.jitter_p, "grayscale": r.grayscale_p, "blur": r.blur_p, "solarize": r.solarize_p}
    for key, p in expected.items():
        tol = 4 * math.sqrt(max(p * (1 - p), 1e-9) / n) + 1e-9  # 4 standard errors
        assert abs(freq[key] - p) <= tol, (name, key, freq[key], p)
    # jitter factors follow ColorJitter's ranges
    factors = [d["jitter"] for d in draws if d["jitter"] is not None]
    assert all(1 - r.brightness <= f["brightness_factor"] <= 1 + r.brightness for f in factors)
    assert all(-r.hue <= f["hue_factor"] <= r.hue for f in factors)


def test_blur_sigma_scales_with_size() -> None:
    assert blur_sigma_range((0.1, 2.0), 224, 224) == pytest.approx((0.1, 2.0))
    assert blur_sigma_range((0.1, 2.0), 64, 224) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))
    assert blur_sigma_range((0.1, 2.0), 64, None) == pytest.approx((0.1, 2.0))
    t224 = build_recipe("dino_global1", 224)
    t64 = build_recipe("dino_global1", 64)
    t64_abs = build_recipe("dino_global1", 64, blur_reference_size=None)
    assert t224.kernel_size == 13  # 2 * ceil(3 * 2.0) + 1
    assert t64.kernel_size == 2 * math.ceil(3 * 2.0 * 64 / 224) + 1 == 5
    assert t64_abs.kernel_size == 13 and t64_abs.sigma == pytest.approx((0.1, 2.0))
    torch.manual_seed(0)
    sigmas = [t64.make_params([])["blur_sigma"] for _ in range(300)]
    assert min(sigmas) >= t64.sigma[0] and max(sigmas) <= t64.sigma[1]
    # seed 0: the largest of the 300 draws is 0.991 x the top (uniform draws all below 0.9 x: p ~ 3e-15)
    assert max(sigmas) > 0.9 * t64.sigma[1]  # the whole scaled range is used
    assert blur_kernel_size(2.0, 4) == 7  # capped so reflection padding fits in a 4 px image


def test_blur_is_relative_to_image_size() -> None:
    """A step edge blurred at 224 px and at 64 px with the same relative sigma has the same profile."""
    def edge(size: int) -> torch.Tensor:
        img = torch.zeros(3, size, size)
        img[:, :, size // 2 :] = 1.0
        return img

    big = build_recipe("dino_global1", 224)
    small = build_recipe("dino_global1", 64)
    sigma_rel = 0.9  # fraction of the sampled range
    out_big = big.transform(edge(224), _params(blur_sigma=big.sigma[1] * sigma_rel))
    out_small = small.transform(edge(64), _params(blur_sigma=small.sigma[1] * sigma_rel))
    # the transition width (pixels between 10% and 90%) as a fraction of the image side
    def width(row: torch.Tensor) -> float:
        return float(((row > 0.1) & (row < 0.9)).sum()) / row.numel()

    assert width(out_big[0, 0]) == pytest.approx(width(out_small[0, 0]), abs=2 / 64)
    assert width(out_small[0, 0]) > 0


def test_eval_transform_size_and_normalisation() -> None:
    colour = (200, 100, 50)
    pil = Image.new("RGB", (90, 60), colour)
    out = eval_transform(32)(pil)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)
    # shorter side to round(size * ratio), then centre crop: a centred square of side 2/3 of the short side
    img = torch.zeros(3, 60, 90, dtype=torch.uint8)
    img[:, 10:50, 25:65] = 255  # 40 x 40 centred box = 2/3 of 60
    out = denormalize(eval_transform(30, resize_ratio=1.5)(img))
    assert out.shape == (3, 30, 30)
    # after resizing 60 -> 45 and cropping 30 the box covers 40 * 0.75 = 30 px, i.e. the whole crop
    assert float(out[:, 2:-2, 2:-2].min()) > 0.95
    with pytest.raises(RecipeError, match="interpolation"):
        eval_transform(32, interpolation="area")


def test_normalize_round_trip() -> None:
    img = _noise()
    out = normalize(img)
    assert out.dtype == torch.float32
    torch.testing.assert_close(denormalize(out), img.float() / 255, atol=1e-6, rtol=0)
    with pytest.raises(RecipeError, match="RGB tensor"):
        normalize(torch.zeros(4, 8, 8))
