"""The dense (segmentation) probe: scores by hand, ignore index, trivially predictable vs random features, the
three input forms, and ``semssl eval dense`` end to end; the cluster-map figure of a tiny DSC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from semssl.cli import main
from semssl.errors import ConfigError, DataError
from semssl.eval.dense import (
    DenseProbeConfig,
    SegmentationDataset,
    class_index,
    confusion_matrix,
    dense_probe,
    folder_pair_segmentation,
    merge_classes,
    probe_maps,
    read_class_map,
    segmentation_scores,
    segmentation_source,
    upsampled_logits_at,
)


# ----------------------------------------------------------------------------------------- scores
def test_scores_by_hand_and_ignored_pixels() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, -1, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # the two ignored pixels are not counted
    res = segmentation_scores(conf)
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2
    assert res["dense_miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert res["dense_pixel_acc"] == pytest.approx(100 * 4 / 6)
    # a class in neither ground truth nor prediction does not count
    conf4 = torch.zeros(4, 4, dtype=torch.long)
    conf4[:3, :3] = conf
    assert segmentation_scores(conf4)["dense_miou"] == pytest.approx(res["dense_miou"])
    assert segmentation_scores(conf4)["per_class_iou"][3] is None


def test_class_index_renumbers_and_drops_the_ignore_value() -> None:
    train = torch.tensor([[0, 5], [255, 7]])
    test = torch.tensor([[5, 9], [255, 0]])
    values, tr, te = class_index(train, test, 255)
    assert values == [0, 5, 7, 9]
    assert tr.tolist() == [[0, 1], [-1, 2]] and te.tolist() == [[1, 3], [-1, 0]]
    values0, tr0, _ = class_index(train, test, 0)  # coco128: 0 = unlabeled
    assert values0 == [5, 7, 9, 255] and tr0[0, 0] == -1


def test_class_map_merges_before_renumbering_and_ignores_what_it_does_not_name(tmp_path, caplog) -> None:
    train = torch.tensor([[0, 5], [6, 7]])
    test = torch.tensor([[5, 9], [0, 6]])
    cmap = {5: 1, 6: 1, 7: 2}                       # 9 is not named: ignored like the ignore index 0
    assert merge_classes(test, cmap, 0).tolist() == [[1, 0], [0, 1]]
    values, tr, te = class_index(train, test, 0, cmap)
    assert values == [1, 2]
    assert tr.tolist() == [[-1, 0], [0, 1]] and te.tolist() == [[0, -1], [-1, 0]]
    assert any("[9]" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="ignore index 0"):
        merge_classes(test, {5: 0}, 0)
    # A COCO categories file merges by supercategory: 1 + the supercategory's index in name order.
    coco = tmp_path / "panoptic.json"
    coco.write_text(json.dumps({"categories": [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
        {"id": 3, "name": "car", "supercategory": "vehicle"}, {"id": 17, "name": "cat", "supercategory": "animal"}]}))
    assert read_class_map(str(coco)) == {1: 2, 2: 3, 3: 3, 17: 1}
    plain = tmp_path / "map.json"
    plain.write_text(json.dumps({"5": 1, "6": 1}))
    assert read_class_map(str(plain)) == {5: 1, 6: 1}
    plain.write_text(json.dumps({"five": 1}))
    with pytest.raises(DataError, match="integers"):
        read_class_map(str(plain))
    with pytest.raises(DataError, match="not found"):
        read_class_map(str(tmp_path / "missing.json"))


def test_sampled_upsampled_logits_equal_full_upsampling() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    full = F.interpolate(logits, size=(13, 17), mode="bilinear", align_corners=False)
    ys, xs = torch.randint(13, (2, 50)), torch.randint(17, (2, 50))
    ys[:, :4] = torch.tensor([0, 12, 0, 12])  # the borders
    xs[:, :4] = torch.tensor([0, 16, 16, 0])
    at = upsampled_logits_at(logits, ys, xs, (13, 17))
    expected = torch.stack([full[b][:, ys[b], xs[b]] for b in range(2)])
    torch.testing.assert_close(at, expected)


# ----------------------------------------------------------------------------------------- the probe
class Blocks(Dataset):
    """Images of 32x32 px in 4 bands of 8 px columns, each band of one of 4 classes (the mask); the class is
    written into the red channel (``class / 4``), so a model reading it back has features that name the class.
    (Bands, not checkerboard cells: at a corner of 3-4 differently labelled cells the bilinear upsampling of
    even perfect logits must err; along a band edge the nearer cell always wins.)"""

    def __init__(self, n: int, seed: int, ignore_block: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cells = torch.randint(0, 4, (n, 1, 4), generator=g).expand(n, 4, 4)
        self.ignore_block = ignore_block

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> dict:
        mask = self.cells[i].repeat_interleave(8, 0).repeat_interleave(8, 1)
        image = torch.zeros(3, 32, 32)
        image[0] = mask.float() / 4
        if self.ignore_block:  # a block whose pixels say class 0 in the image but are marked "ignore"
            image[0, :8, :8] = 0.0
            mask = mask.clone()
            mask[:8, :8] = 255
        return {"image": image, "mask": mask}


class ClassReader(torch.nn.Module):
    """A stub model whose features are the one-hot class of each 8x8 cell, read back from the image."""

    feature_kinds = ("layer4",)

    def features(self, images, branch=None, kind="layer4"):
        cls = (F.avg_pool2d(images[:, :1], 8) * 4).round().long()[:, 0]
        return F.one_hot(cls, 4).permute(0, 3, 1, 2).float()


class Noise(torch.nn.Module):
    feature_kinds = ("layer4",)

    def features(self, images, branch=None, kind="layer4"):
        g = torch.Generator().manual_seed(int(images.sum().abs() * 1000) % 1000)
        return torch.randn(images.shape[0], 16, 4, 4, generator=g)


CFG = DenseProbeConfig(epochs=60, lr=0.1, pixels_per_image=256, num_workers=0)


def test_trivially_predictable_features_give_a_near_perfect_miou_and_random_ones_a_low_one() -> None:
    train, test = Blocks(48, seed=0), Blocks(16, seed=1)
    good = dense_probe(ClassReader(), train, test, CFG)
    # measured 100.0 / 100.0
    assert good["dense_miou"] > 98 and good["dense_pixel_acc"] > 98
    assert good["num_classes"] == 4 and good["feature_shape"] == [4, 4, 4]
    bad = dense_probe(Noise(), train, test, CFG)
    # measured 15.5
    assert bad["dense_miou"] < 40


def test_ignore_index_pixels_are_neither_learned_nor_scored() -> None:
    train, test = Blocks(48, seed=0, ignore_block=True), Blocks(16, seed=1, ignore_block=True)
    res = dense_probe(ClassReader(), train, test, CFG)
    assert 255 not in res["class_values"] and res["num_classes"] == 4
    # measured 99.5
    assert res["dense_miou"] > 95  # the ignored block's features say class 0: scoring it would cost nothing here
    # ... but marked with a wrong class instead of 255, that block is scored and costs accuracy
    train2, test2 = Blocks(48, seed=0, ignore_block=True), Blocks(16, seed=1, ignore_block=True)
    wrong = DenseProbeConfig(**{**CFG.__dict__, "ignore_index": 254})
    res2 = dense_probe(ClassReader(), train2, test2, wrong)
    # measured: 6.2 points lower
    assert 255 in res2["class_values"] and res2["dense_pixel_acc"] < res["dense_pixel_acc"] - 3


def test_probe_on_precomputed_maps_is_deterministic() -> None:
    torch.manual_seed(0)
    feats = torch.randn(8, 5, 2, 2)
    masks = torch.randint(0, 3, (8, 16, 16))
    a = probe_maps(feats, masks, feats, masks, DenseProbeConfig(epochs=3, num_workers=0))
    b = probe_maps(feats, masks, feats, masks, DenseProbeConfig(epochs=3, num_workers=0))
    assert a["dense_miou"] == b["dense_miou"]


# ----------------------------------------------------------------------------------------- inputs
def test_coco_semantic_masks_equal_the_generators_semantic_pngs(tiny_synth: Path) -> None:
    json_path = tiny_synth / "scenes" / "train" / "annotations.json"
    source = segmentation_source(str(json_path), "train")
    images = json.loads(json_path.read_text())["images"]
    by_id = sorted(images, key=lambda r: r["id"])
    for i in range(len(source)):
        image, mask = source.load(i)
        expected = np.asarray(Image.open(tiny_synth / "scenes" / "train" / "semantic" /
                                         Path(by_id[i]["file_name"]).with_suffix(".png").name))
        assert mask.shape == (image.height, image.width)
        assert np.array_equal(mask, expected.astype(np.int64))


def test_synthetic_alias_and_folder_pairs(tiny_synth: Path, tiny_cfg, tmp_path: Path) -> None:
    test = segmentation_source("synthetic:scenes", "test", tiny_cfg)
    assert len(test) == 4 and "test" in test.location
    assert len(segmentation_source("synthetic:scenes:train", "test", tiny_cfg)) == 8
    with pytest.raises(ConfigError, match="synthetic:scenes"):
        segmentation_source("synthetic:objects", "train", tiny_cfg)
    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir(), masks.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(images / f"{i}.jpg")
    for i in range(2):
        Image.fromarray(np.full((20, 30), i + 1, np.uint8)).save(masks / f"{i}.png")
    pairs = segmentation_source(f"{images}:{masks}", "train")
    assert len(pairs) == 2 and pairs.skipped == {"skipped_no_mask": 1}
    item = SegmentationDataset(pairs, 16)[1]
    assert item["image"].shape == (3, 16, 16) and item["mask"].unique().tolist() == [2]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "2.png")
    with pytest.raises(DataError, match="is 10x10 but its image"):
        folder_pair_segmentation(str(images), str(masks)).load(2)
    with pytest.raises(ConfigError, match="IMAGES_DIR:MASKS_DIR"):
        segmentation_source(str(images), "train")


def test_cli_eval_dense_with_baselines(tiny_synth: Path, tmp_path: Path) -> None:
    from semssl.models.backbones import ResNetBackbone

    torch.manual_seed(0)
    ckpt = tmp_path / "r18.pth"
    torch.save(ResNetBackbone("resnet18").torchvision_state_dict(), ckpt)
    out = tmp_path / "dense.json"
    scenes = tiny_synth / "scenes"
    assert main(["eval", "dense", "--checkpoint", str(ckpt), "--train", str(scenes / "train" / "annotations.json"),
                 "--test", str(scenes / "test" / "annotations.json"), "--size", "64", "--epochs", "2",
                 "--workers", "0", "--baselines", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"trained", "random_init", "random_init_bn", "pixels", "model", "protocol"}
    for name in ("trained", "random_init", "random_init_bn", "pixels"):
        assert 0 <= res[name]["dense_miou"] <= 100 and 0 <= res[name]["dense_pixel_acc"] <= 100
    assert res["trained"]["feature_shape"] == [512, 2, 2] and res["pixels"]["feature_shape"] == [3, 2, 2]
    # the checkpoint is a random ResNet-18 with seed 0: the same network as the random-init baseline
    assert res["trained"]["dense_miou"] == pytest.approx(res["random_init"]["dense_miou"])
    assert main(["eval", "dense", "--checkpoint", str(ckpt), "--train", "x", "--test", "y", "--stage",
                 "pooled"]) == 2


# ----------------------------------------------------------------------------------------- cluster maps
def test_cluster_figure_of_a_tiny_dsc(tiny_synth: Path, tmp_path: Path) -> None:
    from semssl.config import DEFAULT_RECIPE, load_config, to_dict
    from semssl.methods import build_method
    from semssl.viz.clusters import cluster_maps, load_images

    cfg = load_config(DEFAULT_RECIPE, ["method.name=dsc", "method.semantic=kmeans", "model.arch=resnet18",
                                       "model.width=64", "model.small_input=false", "method.queue_size=16",
                                       "method.num_clusters=5", "model.bn_splits=2"])
    torch.manual_seed(0)
    method = build_method(cfg)
    ckpt = tmp_path / "dsc.ckpt"
    torch.save({"semssl_config": to_dict(cfg), "state_dict": {f"method.{k}": v for k, v in
                                                              method.state_dict().items()}}, ckpt)
    png = tmp_path / "clusters.png"
    scenes = tiny_synth / "scenes" / "train" / "images"
    assert main(["viz", "clusters", "--checkpoint", str(ckpt), "--images", str(scenes), "--n", "3",
                 "--size", "64", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    images = load_images([str(scenes)], 3, 64)
    own, what = cluster_maps(method, images)
    assert own.shape == (3, 2, 2) and own.max() < 5 and "k-means centroids" in what
    on_the_fly, what = cluster_maps(method, images, k=3, stage="layer4")  # any model: k-means of its maps
    assert on_the_fly.shape == (3, 2, 2) and on_the_fly.max() < 3 and "k-means (k=3)" in what
    from semssl.viz.clusters import (
        during_training,  # trainer.figures: [{name: clusters}]
    )

    during_training(method.eval(), cfg, {"train": str(scenes)}, tmp_path / "during.png", n=2, size=64)
    assert (tmp_path / "during.png").read_bytes()[:4] == b"\x89PNG"
