"""semssl.transfer.segment: FCN / DeepLab-v3 on semssl ResNet-18 and ResNet-50 backbones, the a-trous dilation,
folder-pair data with split lists, bad masks, resume and the command line, on tiny folders (48x40 px)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semssl.checkpoints import safe_load
from semssl.cli import main
from semssl.errors import CheckpointError, ConfigError, DataError
from semssl.models.backbones import ResNetBackbone
from semssl.transfer.common import BackboneSource
from semssl.transfer.segment import (
    RECIPES,
    SegmentConfig,
    _check,
    build_segmentation_model,
    dilate_backbone,
    segment,
    segmentation_data,
)

FAST = {"crop_size": 32, "test_size": 32, "batch_size": 2, "progress": False}


def _pairs(root: Path, n: int = 6, classes: int = 3, bad: dict[int, int] | None = None) -> tuple[Path, Path]:
    """``n`` images 48x40 with class-index masks: left half class i % classes, right half (i + 1) % classes, a
    strip of 255 (ignored); ``bad`` = {image index: value written into its mask}."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((40, 48), np.uint8)
        mask[:, :24], mask[:, 24:], mask[:4] = i % classes, (i + 1) % classes, 255
        if bad and i in bad:
            mask[10, 10] = bad[i]
        pixels = (rng.random((40, 48, 3)) * 60 + mask[..., None] % 255 * 60).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.jpg")
        Image.fromarray(mask).save(masks / f"img{i}.png")
    return images, masks


@pytest.mark.parametrize("arch,width", [("resnet18", 16), ("resnet50", 8)])
def test_the_model_builds_on_semssl_backbones_and_trains_two_steps(tmp_path, arch, width):
    images, masks = _pairs(tmp_path / "d")
    spec = f"{images}:{masks}"
    out = segment(BackboneSource(random_init=True, arch=arch, width=width), spec, spec, iterations=2,
                  ignore_index=255, out_dir=tmp_path / "out", **FAST)
    result = out["model"]
    assert out["num_classes"] == 3 and out["num_classes_from"].startswith("inferred")
    assert result["iterations"] == 2 and 0 <= result["miou"] <= 100 and 0 <= result["pixel_acc"] <= 100
    assert result["feature_stride"] == 8  # output stride 8 on the standard stem
    history = safe_load(tmp_path / "out" / "state.pt")["history"]
    assert history[-1]["iteration"] == 2 and {"loss", "loss_out", "loss_aux"} <= set(history[-1])
    row = history[-1]
    assert row["loss"] == pytest.approx(row["loss_out"] + 0.4 * row["loss_aux"], rel=1e-5)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["model"]["miou"] == result["miou"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilation_is_the_a_trous_equivalent_of_the_original(arch, output_stride):
    torch.manual_seed(0)
    plain = ResNetBackbone(arch, width=8).eval()
    dilated = dilate_backbone(copy.deepcopy(plain), output_stride).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x)["layer4"], dilated(x)["layer4"]
    step = 32 // output_stride
    assert b.shape[-1] == a.shape[-1] * step and dilated.strides["layer4"] == output_stride
    assert torch.allclose(b[..., ::step, ::step], a, rtol=1e-4, atol=1e-4)


def test_both_heads_give_logits_at_the_input_size():
    for head in ("fcn", "deeplabv3"):
        model = build_segmentation_model(ResNetBackbone("resnet18", width=8), 5, head, 16).eval()
        out = model(torch.randn(2, 3, 40, 48))
        assert out["out"].shape == (2, 5, 40, 48) and out["aux"].shape == (2, 5, 40, 48)
    model = build_segmentation_model(ResNetBackbone("resnet18", width=8), 5, aux=False)
    assert set(model(torch.randn(1, 3, 32, 32))) == {"out"}


def test_a_mask_value_above_the_class_count_names_the_file(tmp_path):
    images, masks = _pairs(tmp_path / "d", bad={3: 7})
    spec = f"{images}:{masks}"
    with pytest.raises(DataError, match=r"img3.*value 7.*num_classes is 3"):
        segment(BackboneSource(random_init=True, arch="resnet18", width=8), spec, spec, num_classes=3,
                iterations=1, **FAST)


def test_a_list_file_selects_images_and_names_those_without_a_mask(tmp_path, caplog):
    images, masks = _pairs(tmp_path / "d")
    (masks / "img5.png").unlink()  # an image without its mask
    listed = tmp_path / "train.txt"
    listed.write_text("img0\nimg2\nimg5\n")
    with caplog.at_level(logging.WARNING):
        data = segmentation_data(f"{images}:{masks}:{listed}", "train")
    assert len(data.source) == 2 and data.skipped["skipped_not_in_folder"] == 1
    assert data.name(1).endswith("img2.jpg")
    assert "img5" in caplog.text  # both the folder scan and the list name the image
    with pytest.raises(ConfigError, match="IMAGES_DIR:MASKS_DIR:LIST_FILE"):
        segmentation_data(f"{images}:{masks}:{listed}:x", "train")


def test_resume_continues_a_finished_run_and_compare_adds_the_random_row(tmp_path):
    images, masks = _pairs(tmp_path / "d")
    spec, src = f"{images}:{masks}", BackboneSource(random_init=True, arch="resnet18", width=8, seed=1)
    segment(src, spec, spec, iterations=2, out_dir=tmp_path / "o", **FAST)
    out = segment(src, spec, spec, iterations=3, out_dir=tmp_path / "o", resume=True, compare_random_init=True,
                  **FAST)
    assert out["model"]["resumed_from"] == 2 and out["model"]["iterations"] == 3
    assert out["random_init"]["iterations"] == 3 and (tmp_path / "o" / "random_init" / "state.pt").is_file()
    with pytest.raises(CheckpointError, match="another setting"):  # another run: refused, not mixed
        segment(src, spec, spec, iterations=3, lr=0.5, out_dir=tmp_path / "o", resume=True, **FAST)


def test_the_command_line_runs_segment(tmp_path):
    images, masks = _pairs(tmp_path / "d")
    spec = f"{images}:{masks}"
    code = main(["transfer", "segment", "--random-init", "--arch", "resnet18", "--width", "8", "--train", spec,
                 "--test", spec, "--iterations", "1", "--crop-size", "32", "--test-size", "32", "--batch-size", "2",
                 "--head", "deeplabv3", "--output-stride", "16", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["config"]["head"] == "deeplabv3" and result["model"]["feature_stride"] == 16


def test_recipes_are_valid_and_bad_settings_are_named():
    for name, fields_ in RECIPES.items():
        _check(SegmentConfig(**fields_))
    with pytest.raises(ConfigError, match="output_stride=4"):
        _check(SegmentConfig(output_stride=4))
    with pytest.raises(ConfigError, match="recipe: unknown 'nope'"):
        segment(BackboneSource(random_init=True), "a:b", "a:b", recipe="nope")
