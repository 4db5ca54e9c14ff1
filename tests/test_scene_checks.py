"""The scene learning checks on real photographs (docs/results.md 10): the recipes that pin them, and the pieces
they need — split lists for pre-training and for the dense probe, the probe's denser readings (dilated backbone,
stage concatenation), O-KNN by supercategory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semssl.cli import main
from semssl.config import load_config, to_dict
from semssl.data.sources import build_source
from semssl.errors import ConfigError, DataError
from semssl.eval.dense import (
    DenseProbeConfig,
    SegmentationDataset,
    dilated_view,
    extract_maps,
    segmentation_source,
    stage_kinds,
    stage_map,
)
from semssl.models.backbones import BackboneModel, ResNetBackbone

DENSE = ("mocov2", "densecl", "dsc")
DENSE_RECIPE = "{}_resnet18-w32_1x32-1600it_stanford-background"
DENSE_SETS = {  # the dense check's two sets: recipe suffix -> (train list, image folder)
    "stanford-background": ("stanford-background/splits/train.txt", "stanford-background/images"),
    "msrc-v2": ("msrc-v2/train.txt", "msrc-v2/images"),
}
REGION = ("soco", "d3ssl")
REGION_RECIPE = "{}_resnet18-w32_1x32-450it_msrc-v2"


# ----------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("dataset", sorted(DENSE_SETS))
def test_dense_check_recipes_share_one_budget_and_differ_only_in_the_method(dataset: str) -> None:
    """docs/results.md 10: MoCo-v2, DenseCL and DSC on Stanford Background and on MSRC-v2, step for step the same
    run (and the same run on both sets, but for the training images)."""
    recipe = "{}_resnet18-w32_1x32-1600it_" + dataset
    cfgs = {m: to_dict(load_config(recipe.format(m))) for m in DENSE}
    train, images = DENSE_SETS[dataset]
    for m, cfg in cfgs.items():
        assert cfg["method"]["name"] == m and cfg["name"] == recipe.format(m)
        assert cfg["data"]["train"].endswith(train)
        assert cfg["data"]["train_root"].endswith(images)
        other = to_dict(load_config(DENSE_RECIPE.format(m)))
        assert {k: v for k, v in cfg["data"].items() if k not in ("train", "train_root")} == \
            {k: v for k, v in other["data"].items() if k not in ("train", "train_root")}
        assert cfg["method"] == other["method"] and cfg["optim"] == other["optim"]
        assert cfg["model"]["width"] == 32 and cfg["model"]["arch"] == "resnet18"
        assert cfg["trainer"]["max_steps"] == 1600 and cfg["trainer"]["num_threads"] == 1
        assert cfg["eval"]["enabled"] is False
    assert cfgs["dsc"]["method"]["semantic"] == "prototypes"
    first = cfgs["mocov2"]
    for cfg in cfgs.values():
        for section in ("data", "model", "optim", "eval"):
            assert cfg[section] == first[section], section
        assert {k: v for k, v in cfg["trainer"].items() if k != "run_name"} == \
            {k: v for k, v in first["trainer"].items() if k != "run_name"}


def test_region_check_recipes_share_one_budget() -> None:
    """docs/results.md 10: SoCo and D3SSL on MSRC-v2's training images, the same steps, data and optimiser."""
    cfgs = {m: to_dict(load_config(REGION_RECIPE.format(m))) for m in REGION}
    for m, cfg in cfgs.items():
        assert cfg["method"]["name"] == m
        assert cfg["data"]["train"].endswith("msrc-v2/instances_train.json") and cfg["data"]["proposals"] is True
        assert cfg["trainer"]["max_steps"] == 450 and cfg["model"]["width"] == 32
    assert cfgs["soco"]["optim"] == cfgs["d3ssl"]["optim"]
    assert cfgs["soco"]["data"]["batch_size"] == cfgs["d3ssl"]["data"]["batch_size"]
    assert cfgs["d3ssl"]["method"]["decoupling"] and cfgs["d3ssl"]["method"]["depositioning"]


def test_check_recipes_read_the_real_sets_when_present(monkeypatch) -> None:
    """With the data root at the shared copy (tests/conftest.py), the recipes' training sets are the train splits:
    572 Stanford Background photographs by id, 414 MSRC-v2 images of instances_train.json."""
    from semssl.data.root import data_root

    if not (data_root() / "stanford-background" / "splits").is_dir() or not (data_root() / "msrc-v2").is_dir():
        pytest.skip("stanford-background / msrc-v2 not under the data root (semssl data get ...)")
    cfg = load_config(DENSE_RECIPE.format("dsc"))
    source = build_source(cfg.data.train, root=cfg.data.train_root)
    assert len(source) == 572 and all(p.suffix == ".jpg" and p.is_file() for p in source.paths[:5])
    cfg = load_config(REGION_RECIPE.format("d3ssl"))
    assert len(build_source(cfg.data.train)) == 414
    cfg = load_config("dsc_resnet18-w32_1x32-1600it_msrc-v2")
    source = build_source(cfg.data.train, root=cfg.data.train_root)
    assert len(source) == 414 and all(p.suffix == ".jpg" and p.is_file() for p in source.paths[:5])


# ----------------------------------------------------------------------------------------- split lists
def _pairs(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), masks.mkdir()
    for i in range(n):
        Image.fromarray(np.full((12, 16, 3), 30 * i, np.uint8)).save(images / f"{i:03d}.jpg")
        Image.fromarray(np.full((12, 16), i % 3, np.uint8)).save(masks / f"{i:03d}.png")
    return images, masks


def test_file_list_of_ids_resolves_to_the_images_of_its_root(tmp_path: Path) -> None:
    images, _ = _pairs(tmp_path)
    (tmp_path / "splits").mkdir()
    listed = tmp_path / "splits" / "train.txt"
    listed.write_text("002\n000\n")
    source = build_source(listed, root=images)
    assert [p.name for p in source.paths] == ["002.jpg", "000.jpg"]
    assert source[0]["image"].getpixel((0, 0))[0] == pytest.approx(60, abs=2)
    with pytest.raises(DataError, match="none of the first"):  # without the root: ids beside the list
        build_source(listed)


def test_data_train_root_reaches_the_file_list_and_is_refused_by_a_folder(tmp_path: Path) -> None:
    from semssl.engine.data import build_train_dataset

    images, _ = _pairs(tmp_path)
    listed = tmp_path / "train.txt"
    listed.write_text("001\n003\n")
    cfg = load_config(None, [f"data.train={listed}", f"data.train_root={images}"])
    dataset = build_train_dataset(cfg, str(listed))
    assert [p.name for p in dataset.source.paths] == ["001.jpg", "003.jpg"]
    with pytest.raises(DataError, match="do not apply to a folder source"):
        build_train_dataset(cfg, str(images))


def test_split_list_selects_the_dense_pairs(tmp_path: Path) -> None:
    images, masks = _pairs(tmp_path)
    listed = tmp_path / "val.txt"
    listed.write_text("# val\n003\n001.jpg\nmissing\n")
    source = segmentation_source(f"{images}:{masks}:{listed}", "test")
    assert len(source) == 2 and source.skipped == {"skipped_no_mask": 0, "skipped_not_in_folder": 1}
    assert [Path(n).name for n in source.names] == ["001.jpg", "003.jpg"]
    assert int(source.load(1)[1][0, 0]) == 0 and int(source.load(0)[1][0, 0]) == 1  # 003 % 3, 001 % 3
    (tmp_path / "none.txt").write_text("zzz\n")
    with pytest.raises(DataError, match="names no image"):
        segmentation_source(f"{images}:{masks}:{tmp_path / 'none.txt'}", "test")
    with pytest.raises(ConfigError, match="LIST_FILE"):
        segmentation_source(f"{images}:{masks}:{listed}:x", "test")


# ----------------------------------------------------------------------------------------- denser readings
def test_stage_concatenation_upsamples_to_the_finest_map() -> None:
    torch.manual_seed(0)
    model = BackboneModel(ResNetBackbone("resnet18", width=16).eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = stage_map(model, x, "layer3+layer4")
        l3, l4 = model.features(x, kind="layer3"), model.features(x, kind="layer4")
    assert both.shape == (2, l3.shape[1] + l4.shape[1], 4, 4)
    assert torch.equal(both[:, : l3.shape[1]], l3)
    corner = torch.nn.functional.interpolate(l4, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(both[:, l3.shape[1]:], corner)
    assert stage_kinds("layer4") == ["layer4"]
    with pytest.raises(ConfigError, match="distinct kinds"):
        stage_kinds("layer4+layer4")


def test_dilated_view_reads_the_same_weights_densely_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = BackboneModel(ResNetBackbone("resnet18", width=16).eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model.features(x, kind="layer4")
        dense16 = dilated_view(model, 16).eval().features(x, kind="layer4")
        dense8 = dilated_view(model, 8).eval().features(x, kind="layer4")
        again = model.features(x, kind="layer4")
    assert plain.shape[-2:] == (2, 2) and dense16.shape[-2:] == (4, 4) and dense8.shape[-2:] == (8, 8)
    assert torch.equal(plain, again)  # the original is not dilated
    # a trous: the dilated map sub-sampled by the stride removed is the original map
    assert torch.allclose(dense16[..., ::2, ::2], plain, atol=1e-5)
    assert torch.allclose(dense8[..., ::4, ::4], plain, atol=1e-5)
    assert dilated_view(model, 0) is model


def test_cli_eval_dense_output_stride_and_concatenation(tmp_path: Path) -> None:
    images, masks = _pairs(tmp_path, 6)
    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    torch.save(ResNetBackbone("resnet18", width=16).torchvision_state_dict(), ckpt)
    out = tmp_path / "dense.json"
    pairs = f"{images}:{masks}"
    assert main(["eval", "dense", "--checkpoint", str(ckpt), "--train", pairs, "--test", pairs, "--size", "64",
                 "--epochs", "1", "--workers", "0", "--stage", "layer3+layer4", "--output-stride", "8",
                 "--baselines", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # width 16: layer3 64 + layer4 128 channels, at output stride 8 of 64 px: 8x8; pixels on the same grid
    assert res["trained"]["feature_shape"] == [192, 8, 8] and res["random_init"]["feature_shape"] == [192, 8, 8]
    assert res["pixels"]["feature_shape"] == [3, 8, 8]
    assert res["protocol"]["output_stride"] == 8 and res["protocol"]["stage"] == "layer3+layer4"
    assert main(["eval", "dense", "--checkpoint", str(ckpt), "--train", pairs, "--test", pairs,
                 "--stage", "layer4+pooled"]) == 2


def test_extract_maps_of_a_concatenation(tmp_path: Path) -> None:
    images, masks = _pairs(tmp_path, 3)
    data = SegmentationDataset(segmentation_source(f"{images}:{masks}", "train"), 32)
    model = BackboneModel(ResNetBackbone("resnet18", width=16).eval())
    maps, got_masks = extract_maps(model, data, "layer2+layer4")
    assert maps.shape == (3, 32 + 128, 4, 4) and got_masks.shape == (3, 32, 32)
    assert DenseProbeConfig().output_stride == 0


# ----------------------------------------------------------------------------------------- O-KNN by group
def test_oknn_by_supercategory_scores_each_group_of_queries_against_the_whole_memory() -> None:
    from semssl.eval.objects import ObjectsConfig, by_group, oknn

    # memory: classes 0, 1 (thing) and 2 (stuff); queries: two things (one right, one wrong) and one stuff
    memory = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([[1.0, 0.1, 0], [0.9, 0.2, 0], [0, 0, 1.0]])
    q_labels = torch.tensor([0, 1, 2])
    groups = ["thing", "thing", "stuff"]
    out = by_group(memory, labels, queries, q_labels, groups, ObjectsConfig(k=1), "oknn")
    assert out["oknn_thing_top1"] == pytest.approx(50.0) and out["oknn_stuff_top1"] == pytest.approx(100.0)
    assert out["n_queries_thing"] == 2 and out["n_queries_stuff"] == 1
    assert oknn(memory, labels, queries, q_labels, k=1)["oknn_top1"] == pytest.approx(200 / 3)


def test_supercategories_in_label_order(tmp_path: Path) -> None:
    from semssl.eval.objects import open_coco, supercategories

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 20}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100,
                            "iscrowd": 0}],
           "categories": [{"id": 7, "name": "grass", "supercategory": "stuff"},
                          {"id": 2, "name": "cow", "supercategory": "thing"}, {"id": 9, "name": "x"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(ann))
    assert supercategories(open_coco(path)) == ["thing", "stuff", ""]
