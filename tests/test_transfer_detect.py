"""semssl.transfer.detect: Faster / Mask R-CNN in the C4 and FPN layouts on a small ResNet-18, COCO evaluation,
frozen BN, bad input and exact resume, on the tiny built-in scenes (64 px, 8 train / 4 test images)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from semssl.checkpoints import safe_load
from semssl.data.sources import CocoSource
from semssl.errors import ConfigError, DataError
from semssl.models.backbones import ResNetBackbone
from semssl.transfer.common import BackboneSource, load_backbone
from semssl.transfer.detect import (
    RECIPES,
    DetectConfig,
    DetectionImages,
    _check,
    build_detector,
    coco_evaluate,
    detect,
    predict,
)

W16 = {"random_init": True, "arch": "resnet18", "width": 16}
FAST = {"batch_size": 2, "lr": 0.01, "warmup": 1, "min_size": 64, "max_size": 64, "progress": False}


def _scenes(tiny_synth: Path) -> tuple[str, str]:
    return (str(tiny_synth / "scenes" / "train" / "annotations.json"),
            str(tiny_synth / "scenes" / "test" / "annotations.json"))


@pytest.mark.parametrize("layout,task", [("c4", "box"), ("c4", "mask"), ("fpn", "box"), ("fpn", "mask")])
def test_layouts_and_tasks_train_and_evaluate(tiny_synth, tmp_path, layout, task):
    train, test = _scenes(tiny_synth)
    out = detect(BackboneSource(**W16), train, test, layout=layout, task=task, iterations=2, out_dir=tmp_path,
                 **FAST)
    result = out["model"]
    assert result["iterations"] == 2
    terms = {"loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    if task == "mask":
        terms.add("loss_mask")
    row = safe_load(tmp_path / "state.pt")["history"][-1]
    assert terms <= set(row) and all(math.isfinite(row[t]) and row[t] > 0 for t in terms)
    assert row["loss"] == pytest.approx(sum(row[t] for t in terms - {"loss"}), rel=1e-5)
    keys = ["box_ap", "box_ap50", "box_ap75"] + (["mask_ap", "mask_ap50", "mask_ap75"] if task == "mask" else [])
    for key in keys:
        assert 0.0 <= result[key] <= 100.0
    assert "mask_ap" in result if task == "mask" else "mask_ap" not in result
    assert result["test_images"] == 4
    assert json.loads((tmp_path / "result.json").read_text())["model"]["box_ap"] == result["box_ap"]


def test_c4_head_is_the_backbones_layer4_and_rpn_sees_stride_16(tmp_path):
    torch.manual_seed(3)
    reference = ResNetBackbone("resnet18", width=16)
    torch.save(reference.torchvision_state_dict(), tmp_path / "r18.pth")
    backbone, info = load_backbone(BackboneSource(checkpoint=str(tmp_path / "r18.pth")))
    assert (info["arch"], info["width"]) == ("resnet18", 16)
    model = build_detector(backbone, 4, layout="c4", task="mask", norm="bn", min_size=128, max_size=128)
    res5 = model.roi_heads.box_head.res5
    assert res5.layer4 is backbone.layer4 and model.roi_heads.mask_head is res5  # one res5, box and mask
    assert isinstance(res5.norm, nn.BatchNorm2d)  # MoCo's extra norm, on by default with a trainable norm
    expected = reference.layer4.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in res5.layer4.state_dict().items())
    assert model.roi_heads.box_predictor.cls_score.in_features == backbone.channels["layer4"] == 128
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    seen: dict[str, list] = {}
    model.backbone.register_forward_hook(lambda m, i, o: seen.update(image=list(i[0].shape), c4=list(o.shape)))
    model.rpn.head.register_forward_hook(lambda m, i, o: seen.update(rpn=[list(x.shape) for x in i[0]]))
    model.roi_heads.box_head.register_forward_hook(lambda m, i, o: seen.update(roi=list(i[0].shape)))
    model.eval()
    with torch.no_grad():
        model([torch.rand(3, 128, 128)])
    assert seen["image"][-2:] == [128, 128]
    assert seen["rpn"] == [[1, backbone.channels["layer3"], 8, 8]] == [seen["c4"]]  # one map, stride 16
    assert seen["roi"][1:] == [backbone.channels["layer3"], 14, 14]


def test_fpn_uses_the_backbones_stages():
    backbone = ResNetBackbone("resnet18", width=16)
    model = build_detector(backbone, 3, layout="fpn", task="box")
    assert model.backbone.body.layer4 is backbone.layer4
    assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == [16, 32, 64, 128]
    # the FPN's width follows the backbone's: 256 x 16 / 64 (fpn_width), and 256 at the standard width
    assert model.backbone.out_channels == 64 == model.rpn.head.conv[0][0].in_channels
    assert build_detector(ResNetBackbone("resnet18"), 3, layout="fpn").backbone.out_channels == 256
    assert build_detector(ResNetBackbone("resnet18", width=16), 3, fpn_channels=32).backbone.out_channels == 32
    # frozen BN: stem and layer1 frozen (FREEZE_AT 2), layer2..4 trained
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert not backbone.conv1.weight.requires_grad and backbone.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("layout", ["fpn", "c4"])
def test_small_input_stem_is_detected_at_a_quarter_scale(layout):
    """The 3x3/1 stem's maps are 4x denser per side: the detector resizes to a quarter of the recipe's sizes and
    scales the anchors with them, so its maps and anchors-per-object are the standard stem's (stem_input_scale)."""
    shapes: dict[str, list] = {}
    for name, small in (("standard", False), ("small", True)):
        backbone = ResNetBackbone("resnet18", width=16, small_input=small)
        model = build_detector(backbone, 3, layout=layout, task="box", min_size=128, max_size=192).eval()
        model.rpn.head.register_forward_hook(lambda m, i, o, n=name: shapes.update({n: [list(x.shape) for x in i[0]]}))
        with torch.no_grad():
            out = model([torch.rand(3, 96, 128)])
        assert out[0]["boxes"].shape[-1] == 4
        anchors = model.rpn.anchor_generator.sizes
        shapes[name + "_image"] = [model.transform.min_size, model.transform.max_size]
        shapes[name + "_anchors"] = anchors
    assert shapes["small"] == shapes["standard"]  # the same RPN maps
    assert shapes["standard_image"] == [(128,), 192] and shapes["small_image"] == [(32,), 48]
    first = shapes["standard_anchors"][0][0], shapes["small_anchors"][0][0]
    assert first == (32, 8)
    explicit = build_detector(ResNetBackbone("resnet18", width=16, small_input=True), 3, layout=layout,
                              min_size=128, max_size=192, input_scale=1.0)
    assert explicit.transform.min_size == (128,) and explicit.rpn.anchor_generator.sizes[0][0] == 32
    with pytest.raises(ConfigError, match="input_scale"):
        build_detector(ResNetBackbone("resnet18", width=16), 3, layout=layout, input_scale=-1.0)


def _gt_outputs(source: CocoSource) -> list[dict[str, torch.Tensor]]:
    outs = []
    for i in range(len(source)):
        s = source[i]
        n = len(s["boxes"])
        outs.append({"boxes": s["boxes"], "labels": s["box_labels"] + 1, "scores": torch.ones(n),
                     "masks": s["masks"][:, None].float()})
    return outs


class _Replay(nn.Module):
    """A stand-in detector returning given outputs in order (the evaluation's conversion under test)."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs, self.position = outputs, 0

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = self.outputs[self.position:self.position + len(images)]
        self.position += len(images)
        return out


def test_coco_evaluation_perfect_and_empty(tiny_synth):
    _, test = _scenes(tiny_synth)
    data = json.loads(Path(test).read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    source = CocoSource(test, load_masks=False)
    boxes, masks, ids = predict(_Replay(_gt_outputs(CocoSource(test))), source, cat_ids, masks=True, batch_size=3,
                                progress=False)
    assert sorted(ids) == sorted(img["id"] for img in data["images"]) and len(boxes) == len(data["annotations"])
    box, segm = coco_evaluate(test, boxes, "bbox"), coco_evaluate(test, masks, "segm")
    assert (box["ap"], box["ap50"], box["ap75"]) == pytest.approx((100.0, 100.0, 100.0))
    assert (segm["ap"], segm["ap50"], segm["ap75"]) == pytest.approx((100.0, 100.0, 100.0))
    assert coco_evaluate(test, [], "bbox")["ap"] == 0.0 and coco_evaluate(test, [], "segm")["ap50"] == 0.0
    wrong = [{**r, "category_id": cat_ids[(cat_ids.index(r["category_id"]) + 1) % len(cat_ids)]} for r in boxes]
    assert coco_evaluate(test, wrong, "bbox")["ap"] == 0.0
    # a hand-made file: non-contiguous category ids, no 'area' / 'iscrowd' / annotation ids, one image without objects
    gt = {"images": [{"id": 1, "width": 40, "height": 30}, {"id": 2, "width": 40, "height": 30}],
          "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
          "annotations": [{"image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 12]},
                          {"image_id": 1, "category_id": 7, "bbox": [20, 5, 15, 20]}]}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    assert coco_evaluate(gt, perfect)["ap"] == pytest.approx(100.0)
    half = [perfect[0], {**perfect[1], "bbox": [0, 0, 5, 5]}]
    assert coco_evaluate(gt, half)["ap"] == pytest.approx(50.0)
    assert coco_evaluate(gt, [])["ap"] == 0.0


def _one_step(model: nn.Module, tiny_synth: Path) -> None:
    train, _ = _scenes(tiny_synth)
    items = [DetectionImages(CocoSource(train, load_masks=False), [0, 1], masks=False)[i] for i in range(2)]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.train()
    losses = model([img for img, _ in items], [{k: t[k] for k in ("boxes", "labels")} for _, t in items])
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


def test_frozen_batchnorm_is_not_updated(tiny_synth):
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", width=16)
    for m in backbone.modules():  # non-trivial statistics, so a frozen BN is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model = build_detector(backbone, 4, layout="fpn", task="box", norm="frozen", min_size=64, max_size=64)
    frozen = {f"{name}.{k}": v.clone() for name, m in model.backbone.named_modules()
              if isinstance(m, FrozenBatchNorm2d) for k, v in m.named_buffers()}
    assert len(frozen) == 4 * 20 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    stem, top = backbone.conv1.weight.clone(), backbone.layer4[1].conv2.weight.clone()
    _one_step(model, tiny_synth)
    after = dict(model.backbone.named_buffers())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert torch.equal(backbone.conv1.weight, stem) and not torch.equal(backbone.layer4[1].conv2.weight, top)
    # the contrast: trainable BN does move its statistics in the same step
    bn_model = build_detector(ResNetBackbone("resnet18", width=16), 4, "fpn", "box", "bn", 64, 64)
    layer4_bn = bn_model.backbone.body.layer4[1].bn2
    before = layer4_bn.running_mean.clone()
    _one_step(bn_model, tiny_synth)
    assert not torch.equal(layer4_bn.running_mean, before)


def test_syncbn_on_one_process_falls_back_to_batchnorm(caplog):
    with caplog.at_level(logging.INFO, logger="semssl.transfer"):
        model = build_detector(ResNetBackbone("resnet18", width=16), 2, "c4", "box", "syncbn", 64, 64)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert any(type(m) is nn.BatchNorm2d for m in model.modules()) and "one process" in caplog.text
    model.train()
    losses = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
                                              "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())


def _write(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_bad_json_is_a_clear_data_error(tiny_synth, tmp_path):
    train, test = _scenes(tiny_synth)
    data = json.loads(Path(train).read_text())
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "images").symlink_to(Path(train).parent / "images")
    unknown = json.loads(json.dumps(data))
    unknown["annotations"][3]["category_id"] = 99
    bad = _write(folder / "bad_unknown_category.json", unknown)
    with pytest.raises(DataError, match=r"bad_unknown_category\.json.*category_id 99"):
        detect(BackboneSource(**W16), bad, test, iterations=1, **FAST)
    empty = {**data, "annotations": []}
    bad = _write(folder / "bad_no_annotations.json", empty)
    with pytest.raises(DataError, match=r"bad_no_annotations\.json.*none of its 8 images has an annotation"):
        detect(BackboneSource(**W16), bad, test, iterations=1, **FAST)
    bad = _write(folder / "bad_no_categories.json", {**empty, "categories": []})
    with pytest.raises(DataError, match=r"bad_no_categories\.json.*no categories"):
        detect(BackboneSource(**W16), bad, test, iterations=1, **FAST)
    other = json.loads(Path(test).read_text())
    other["categories"][0]["name"] = "hexagon"
    (tmp_path / "images").symlink_to(Path(test).parent / "images")
    bad = _write(tmp_path / "bad_renamed.json", other)
    with pytest.raises(DataError, match=r"bad_renamed\.json.*category id 1 is 'hexagon'"):
        detect(BackboneSource(**W16), train, bad, iterations=1, **FAST)


def test_resume_equals_an_uninterrupted_run(tiny_synth, tmp_path):
    train, test = _scenes(tiny_synth)
    # a multi-scale min size and trainable BN: the global RNG (size draw, RPN / RoI sampling) and BN statistics
    kw = {**FAST, "min_size": (64, 96), "max_size": 96, "norm": "bn", "layout": "fpn", "task": "box"}
    detect(BackboneSource(**W16), train, test, iterations=2, out_dir=tmp_path / "a", **kw)
    resumed = detect(BackboneSource(**W16), train, test, iterations=3, out_dir=tmp_path / "a", resume=True, **kw)
    detect(BackboneSource(**W16), train, test, iterations=3, out_dir=tmp_path / "b", **kw)
    a, b = (safe_load(tmp_path / d / "state.pt") for d in ("a", "b"))
    assert resumed["model"]["iterations"] == 3 and a["iteration"] == b["iteration"] == 3
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert differ == []
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_recipes_are_valid():
    for name, fields in RECIPES.items():
        cfg = DetectConfig(**fields)
        _check(cfg)
        assert cfg.iterations >= 1, name
    voc = DetectConfig(**RECIPES["voc0712_c4"])
    assert (voc.layout, voc.task, voc.norm, voc.iterations, voc.batch_size) == ("c4", "box", "syncbn", 24000, 16)
    assert [round(m * voc.iterations) for m in voc.milestones] == [18000, 22000] and voc.min_size[-1] == 800
    coco = DetectConfig(**RECIPES["coco_1x_c4"])
    assert [round(m * coco.iterations) for m in coco.milestones] == [60000, 80000] and coco.task == "mask"
