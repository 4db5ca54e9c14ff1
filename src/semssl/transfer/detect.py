"""``semssl transfer detect``: Faster R-CNN and Mask R-CNN fine-tuned on a pre-trained backbone, in the papers'
two layouts (R50-C4 and R50-FPN), evaluated with pycocotools (COCO AP, AP50, AP75 for boxes and masks).

The protocol of MoCo / DenseCL / SCD / SoCo / D3SSL (docs/methods/transfer.md), on any checkpoint
(:mod:`semssl.transfer.common`), built from torchvision's public detection classes.

Layouts (:func:`build_detector`)
    ``c4`` (Detectron2's R50-C4, which torchvision does not build): the body is the stem and ``layer1..layer3`` (one
    map at stride 16 with ``channels["layer3"]`` channels); the RPN runs on it with one anchor level of sizes
    32..512 and aspect ratios 0.5, 1, 2 (Detectron2's C4 defaults) and its top-k settings (12000 / 2000 proposals
    before / after NMS in training, 6000 / 1000 at test: Detectron2's defaults, MoCo's config); RoIs are aligned
    14x14 on C4 and run through ``res5`` = the backbone's own ``layer4`` (first block stride 2 -> 7x7) and
    average-pooled into ``FastRCNNPredictor``. Mask R-CNN C4 shares that ``res5`` module between the box and mask
    branches (as Detectron2's ``Res5ROIHeads``): its mask branch is the same 14x14 RoIAlign, ``res5`` and
    ``MaskRCNNPredictor`` (2x deconvolution -> 14x14 masks). ``extra_norm`` appends a BatchNorm to ``res5``
    (MoCo's ``Res5ROIHeadsExtraNorm``, used by the MoCo, DenseCL and SoCo configs); default: on for C4 with a
    trainable norm, as those configs.
    ``fpn``: torchvision's ``BackboneWithFPN`` over ``layer1..layer4`` (in-channels from ``.channels``, 256
    out-channels, ``LastLevelMaxPool``) with torchvision's default FPN RPN and RoI heads (R50-FPN for the papers,
    R18-FPN for small runs).
    Decision: torchvision's ``MultiScaleRoIAlign`` calls ``roi_align`` with ``aligned=False``; Detectron2's
    ``ROIAlignV2`` is ``aligned=True`` (a half-pixel shift of the sampling grid). The torchvision class is used as
    it is (the brief's building blocks); the difference is a fraction of an AP point in Detectron2's ablation.
    Decision: the FPN heads are torchvision's (TwoMLPHead box head, 4-conv mask head, no norm). MoCo / DenseCL's
    ``R_50_FPN`` configs use a 4conv1fc box head and SyncBN in the FPN and the heads; not reproduced.

Norm and frozen stages
    ``norm``: ``frozen`` (torchvision's ``FrozenBatchNorm2d`` everywhere in the backbone: Detectron2's default and
    the sane one at 1-2 images per device), ``bn`` (trainable BatchNorm, statistics of the per-device batch) or
    ``syncbn`` (the papers' configs). Decision: ``nn.SyncBatchNorm`` is only swapped in when
    ``torch.distributed`` is initialised with more than one process; in one process torch's SyncBatchNorm falls
    back to ``F.batch_norm`` anyway (torch 2.x) and, once a process group exists, raises on CPU tensors, so a
    single process keeps plain BatchNorm (identical statistics) and logs that it did.
    ``trainable_stages`` (torchvision's ``trainable_backbone_layers``): how many of ``layer4, layer3, layer2,
    layer1, stem`` train, from the top (5 = all; for C4, ``layer4`` is the box head). Frozen stages get no gradient
    and their BatchNorms become FrozenBatchNorm2d (as Detectron2's ``freeze``). Decision: the default follows the
    papers per norm: with ``frozen`` BN, 3 (Detectron2's FREEZE_AT=2: stem and res2 frozen, also torchvision's
    default); with ``bn`` / ``syncbn``, 5 (MoCo's C4 config: FREEZE_AT=0, everything trains with SyncBN, which is
    also what lets the random-init comparison learn its stem).

Data
    ``train`` / ``test``: COCO-format JSON files read through :class:`~semssl.data.sources.CocoSource` (masks
    decoded when ``task == "mask"``), or ``synthetic:scenes`` (the built-in scenes; ``synthetic:scenes:train|test``
    names a split). The categories are the train JSON's, sorted by id (label ``i + 1`` = the ``i``-th id; 0 is
    torchvision's background); the test JSON's categories must be among them (same id, same name). Images
    without annotations are skipped in training (counted in the result; Detectron2's
    FILTER_EMPTY_ANNOTATIONS) and kept for evaluation. A JSON without categories, an annotation with an unlisted
    category, a training set without annotations or a mask task on a file without segmentations is a DataError
    naming the file and the value. ``train_images`` / ``test_images`` give the images folder where CocoSource's
    search does not find it (coco128's ``instances_val2017_boxes.json``).
    The transform is torchvision's ``GeneralizedRCNNTransform`` (resize to ``min_size`` -- one drawn per image
    from a tuple in training, the last one at test -- capped by ``max_size``; ImageNet mean / std), plus a random
    horizontal flip of image, boxes and masks in training.

Training
    :func:`~semssl.transfer.common.train_iterations` over :func:`~semssl.transfer.common.batches_from`; the loss
    is the sum of torchvision's loss dict (each term logged). SGD, momentum 0.9, ``lr``, ``weight_decay`` (1e-4;
    SoCo / D3SSL fine-tune with 2.5e-5, docs/methods/soco.md §Evaluation); Decision: no weight decay on norm
    parameters
    (Detectron2's WEIGHT_DECAY_NORM = 0). Linear warm-up over ``warmup`` iterations (from ``lr / warmup``, not
    Detectron2's ``lr / 1000``), then x0.1 at each of ``milestones`` (fractions of the run).
    Resumable from ``<out_dir>/state.pt``. Decision: the run's length is not part of the resume identity, so a
    finished run can be extended (``resume=True`` with more ``iterations``); the milestones are fractions and move
    with the length. Decision (exact resume): the data pipeline never touches the global torch RNG (the
    DataLoader's seed draw is undone), the flip of iteration ``i`` is drawn from its own generator seeded by
    ``(seed, i)``, and the global RNG -- saved and restored by the loop -- is left to the model (the min-size draw
    and the RPN / RoI samplers), so a resumed run's weights equal an uninterrupted run's.

Evaluation
    The model in eval mode on every test image; detections go to COCO results (xywh boxes in the image's own
    pixels, scores, the JSON's category ids; masks thresholded at 0.5 and RLE-encoded); ``COCOeval`` "bbox" (and
    "segm", from results without their box so that the mask area is used, as Detectron2 does) over the evaluated
    images; AP, AP50, AP75 in percent. No detection gives 0. pycocotools' prints go to the debug log. Decision:
    no precise-BN pass before testing (MoCo's TEST.PRECISE_BN): a ``bn`` / ``syncbn`` model tests with its
    running statistics. The VOC recipe is scored with COCO's AP on a COCO-format VOC07 test JSON, not with
    Detectron2's VOC evaluator (11-point AP at IoU 0.5:0.95): close, not digit for digit the papers' number.

Recipes (:data:`RECIPES`): the papers' settings and two small ones that finish on this 2-core CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from semssl.errors import ConfigError, DataError
from semssl.transfer.common import (
    BackboneSource,
    _progress,
    as_dict,
    batches_from,
    frozen_batchnorm,
    load_backbone,
    lr_schedule,
    random_like,
    report,
    source_name,
    train_iterations,
)

log = logging.getLogger("semssl.transfer")

__all__ = ["RECIPES", "DetectConfig", "build_detector", "coco_evaluate", "detect"]

LAYOUTS = ("c4", "fpn")
TASKS = ("box", "mask")
NORMS = ("frozen", "syncbn", "bn")
#: the stages ``trainable_stages`` counts, from the top (torchvision's ``trainable_backbone_layers`` order)
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "stem")
C4_ANCHOR_SIZES = (32, 64, 128, 256, 512)
C4_ASPECT_RATIOS = (0.5, 1.0, 2.0)
# torchvision's FPN anchors: one size per level (P2..P6), the same three aspect ratios
FPN_ANCHOR_SIZES = (32, 64, 128, 256, 512)
#: Detectron2's RPN top-k defaults (MoCo's C4 config): before / after NMS, training / test
C4_RPN_TOPK = {"rpn_pre_nms_top_n_train": 12000, "rpn_post_nms_top_n_train": 2000,
               "rpn_pre_nms_top_n_test": 6000, "rpn_post_nms_top_n_test": 1000}


@dataclass(frozen=True)
class DetectConfig:
    """The detection fine-tuning setting (module docstring); ``milestones`` are fractions of the run.
    ``trainable_stages`` / ``extra_norm`` None: the default for the norm and layout (module docstring)."""

    layout: str = "fpn"
    task: str = "box"
    norm: str = "frozen"
    iterations: int = 1000
    batch_size: int = 4
    lr: float = 0.02
    weight_decay: float = 1e-4
    warmup: int = 100
    milestones: tuple[float, ...] = (0.75, 0.92)
    min_size: int | tuple[int, ...] = 256
    max_size: int = 512
    trainable_stages: Optional[int] = None
    extra_norm: Optional[bool] = None
    roi_batch_size: int = 512
    test_proposals: Optional[int] = None
    input_scale: Optional[float] = None
    fpn_channels: Optional[int] = None
    train: Optional[str] = None
    test: Optional[str] = None
    train_images: Optional[str] = None
    test_images: Optional[str] = None


# Decision: a recipe holds settings only, never data paths (``train`` / ``test`` are always given, as for
# ``semssl transfer segment``); each recipe's header names the data it was made for. The papers' recipes are GPU
# scale; the small ones have a length measured to fit this project's 2-core CPU. Explicit arguments override any
# field.
RECIPES: dict[str, dict[str, Any]] = {
    # MoCo's detectron2 config pascal_voc_R_50_C4_24k (Base-RCNN-C4-BN; also DenseCL's and SCD's VOC protocol,
    # docs/methods/scd.md §Evaluation, docs/methods/densecl.md §Evaluation): Faster R-CNN R50-C4, VOC07+12
    # trainval -> VOC07 test (COCO-format JSONs of them),
    # batch 16, lr 0.02, 24k iterations, steps 18k / 22k, warm-up 100, train min size 480..800 step 32, test 800,
    # max 1333, SyncBN (naiveSyncBN) with FREEZE_AT 0 (everything trains) and Res5ROIHeadsExtraNorm, wd 1e-4.
    # Not done: TEST.PRECISE_BN. For SoCo / D3SSL pass weight_decay=2.5e-5.
    "voc0712_c4": {"layout": "c4", "task": "box", "norm": "syncbn", "iterations": 24000, "batch_size": 16,
                   "lr": 0.02, "weight_decay": 1e-4, "warmup": 100, "milestones": (18000 / 24000, 22000 / 24000),
                   "min_size": tuple(range(480, 801, 32)), "max_size": 1333, "trainable_stages": 5,
                   "extra_norm": True},
    # Mask R-CNN R50-C4 1x on COCO train2017 -> val2017 (SoCo / D3SSL's protocol, SCD's COCO table; MoCo's
    # coco_R_50_C4 config at the 1x length): 90k iterations, steps 60k / 80k, batch 16, lr 0.02, warm-up 1000
    # (Detectron2's default), train min size 640..800 step 32, test 800, max 1333, SyncBN, extra norm, all stages
    # trained. SoCo / D3SSL: weight_decay=2.5e-5 (docs/methods/soco.md §Evaluation).
    "coco_1x_c4": {"layout": "c4", "task": "mask", "norm": "syncbn", "iterations": 90000, "batch_size": 16,
                   "lr": 0.02, "weight_decay": 1e-4, "warmup": 1000, "milestones": (60000 / 90000, 80000 / 90000),
                   "min_size": tuple(range(640, 801, 32)), "max_size": 1333, "trainable_stages": 5,
                   "extra_norm": True},
    # Mask R-CNN R50-FPN 1x on COCO (MoCo / DenseCL / SCD App. B): as coco_1x_c4 with the FPN layout and
    # torchvision's FPN heads (the papers' 4conv1fc SyncBN head is not reproduced; module docstring).
    "coco_1x_fpn": {"layout": "fpn", "task": "mask", "norm": "syncbn", "iterations": 90000, "batch_size": 16,
                    "lr": 0.02, "weight_decay": 1e-4, "warmup": 1000, "milestones": (60000 / 90000, 80000 / 90000),
                    "min_size": tuple(range(640, 801, 32)), "max_size": 1333, "trainable_stages": 5},
    # Small: Faster R-CNN R18-FPN (boxes) on MSRC-v2 ($SEMSSL_DATA_DIR/msrc-v2: 414 train / 177 test photographs of
    # 320x213 or 320x240, 23 thing and stuff classes, one box per segment), at the images' own size (min 224,
    # max 320), batch 4, lr 0.02 x 4 / 16 = 0.005 (the linear scaling rule from the papers' 0.02 at 16), frozen
    # BN with stem and layer1 frozen, warm-up 50, steps at 75 % / 92 %.
    #   --train $SEMSSL_DATA_DIR/msrc-v2/instances_train.json --test $SEMSSL_DATA_DIR/msrc-v2/instances_test.json
    # Measured (2026-12-07, docs/results.md section 9, one thread, one other run beside it): 300 iterations in
    # 127-188 s on the width-16 small-input backbones (a quarter of these sizes, stem_input_scale; FPN width 64,
    # fpn_width) and 329-372 s on the width-32 standard-stem ones, evaluation 10-28 s.
    "msrc-v2_small": {"layout": "fpn", "task": "box", "norm": "frozen", "iterations": 300, "batch_size": 4,
                      "lr": 0.005, "weight_decay": 1e-4, "warmup": 50, "milestones": (0.75, 0.92),
                      "min_size": 224, "max_size": 320, "roi_batch_size": 128, "test_proposals": 300},
    # Small: Faster R-CNN R18-FPN (boxes) on coco128 ($SEMSSL_DATA_DIR/coco128): train = the 128 train2017 images of
    # the original JSON (126 with annotations, 80 categories; images found by CocoSource in images/train2017),
    # test = the 128 val2017 images of the boxes-only JSON (its images folder, images/val2017, is not one
    # CocoSource's search tries: given as test_images).
    #   --train $SEMSSL_DATA_DIR/coco128/coco_json_train2017/instances_train2017.json
    #   --test $SEMSSL_DATA_DIR/coco128/coco_json_val2017/instances_val2017_boxes.json
    #   --test-images $SEMSSL_DATA_DIR/coco128/images/val2017
    # Time: not measured yet.
    "coco128_small": {"layout": "fpn", "task": "box", "norm": "frozen", "iterations": 300, "batch_size": 4,
                      "lr": 0.005, "weight_decay": 1e-4, "warmup": 50, "milestones": (0.75, 0.92),
                      "min_size": 256, "max_size": 384, "roi_batch_size": 128, "test_proposals": 300},
}


# --------------------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------------------
class C4Body(nn.Module):
    """The stem and ``layer1..layer3`` of a :class:`~semssl.models.backbones.ResNetBackbone` (the same module
    objects, under torchvision's names): one map at the backbone's ``layer3`` stride (16 with the standard stem)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(backbone, name))
        self.out_channels = int(backbone.channels["layer3"])

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown '{value}' ({', '.join(map(str, choices))})")


def default_trainable_stages(norm: str) -> int:
    """The papers' default per norm (module docstring): 3 with frozen BN, 5 (all) with a trainable norm."""
    return 3 if norm == "frozen" else 5


def _freeze_stages(backbone: nn.Module, stages: Sequence[str]) -> None:
    """No gradient for ``stages`` of ``backbone``, their BatchNorms made FrozenBatchNorm2d (in place)."""
    for name in stages:
        if name == "stem":
            holder = nn.Module()
            holder.bn1 = backbone.bn1
            frozen_batchnorm(holder)
            backbone.bn1 = holder.bn1
            modules: list[nn.Module] = [backbone.conv1, backbone.bn1]
        else:
            frozen_batchnorm(getattr(backbone, name))
            modules = [getattr(backbone, name)]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)


def _sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with SyncBatchNorm when there are several processes to synchronise; else as it is (logged)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("norm=syncbn: one process (torch.distributed is not initialised with several), so SyncBatchNorm would "
             "compute the statistics of plain BatchNorm; using nn.BatchNorm2d")
    return model


def build_detector(backbone: nn.Module, num_classes: int, layout: str = "fpn", task: str = "box",
                   norm: str = "frozen", min_size: int | Sequence[int] = 256, max_size: int = 512,
                   trainable_stages: Optional[int] = None, extra_norm: Optional[bool] = None,
                   roi_batch_size: int = 512, test_proposals: Optional[int] = None,
                   input_scale: Optional[float] = None, fpn_channels: Optional[int] = None) -> nn.Module:
    """A torchvision ``FasterRCNN`` (``task="box"``) or ``MaskRCNN`` (``"mask"``) on ``backbone`` (a
    :class:`~semssl.models.backbones.ResNetBackbone`, modified in place and shared, not copied), in the ``c4`` or
    ``fpn`` layout (module docstring), for ``num_classes`` object classes (+ background).

    Args:
        norm: ``frozen`` | ``bn`` | ``syncbn`` for the backbone's BatchNorms.
        min_size: the resized shorter side; a tuple draws one per image in training and uses the last at test.
        trainable_stages: 0..5 of ``layer4, layer3, layer2, layer1, stem`` trained (None: 3 with frozen BN, else 5).
        extra_norm: C4 only: a BatchNorm after ``res5`` (None: on unless ``norm="frozen"``).
        roi_batch_size: RoIs sampled per image for the box (and mask) head in training (torchvision's and
            Detectron2's 512; the small recipes take 128).
        test_proposals: proposals per image kept after the RPN's NMS at test (None: 1000, both layouts' default;
            300 is the Faster R-CNN paper's test setting, the small recipes').
        input_scale: multiplies ``min_size``, ``max_size`` and the anchor sizes. None: :func:`stem_input_scale`
            (1 on the standard stem; 1/4 on the small-input stem, whose maps are 4x denser per side), so the
            feature maps, the anchors per object and the RoI levels are those of the standard stem.
        fpn_channels: the FPN's (and so the RPN's and box head's input) channels. None: :func:`fpn_width`, 256 for
            the standard width 64 as every paper, scaled with a narrower backbone's width.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from semssl.models.backbones import STAGES

    _check_choice("layout", layout, LAYOUTS)
    _check_choice("task", task, TASKS)
    _check_choice("norm", norm, NORMS)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
    stages = default_trainable_stages(norm) if trainable_stages is None else trainable_stages
    if not isinstance(stages, int) or not 0 <= stages <= len(TRAINABLE_ORDER):
        raise ConfigError(f"trainable_stages: expected 0..5 (of {', '.join(TRAINABLE_ORDER)}), got {stages!r}")
    if extra_norm and layout != "c4":
        raise ConfigError("extra_norm: the BatchNorm after res5 belongs to the C4 layout (MoCo's "
                          "Res5ROIHeadsExtraNorm); the FPN layout has no res5 head")
    if extra_norm and norm == "frozen":
        raise ConfigError("extra_norm with norm=frozen: a new frozen BatchNorm is the identity; use norm=bn/syncbn "
                          "or extra_norm=False")
    extra = (layout == "c4" and norm != "frozen") if extra_norm is None else bool(extra_norm)
    _freeze_stages(backbone, TRAINABLE_ORDER[stages:])
    if norm == "frozen":
        frozen_batchnorm(backbone)
    scale = stem_input_scale(backbone) if input_scale is None else input_scale
    if not isinstance(scale, (int, float)) or not 0 < scale <= 8:
        raise ConfigError(f"input_scale: expected a number in (0, 8], got {input_scale!r}")
    sizes = (int(min_size),) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
    sizes = tuple(_scaled(s, scale) for s in sizes)
    max_size = _scaled(int(max_size), scale)
    fpn = fpn_width(backbone) if fpn_channels is None else fpn_channels
    if not isinstance(fpn, int) or fpn < 1:
        raise ConfigError(f"fpn_channels: expected an integer >= 1, got {fpn_channels!r}")
    if not isinstance(roi_batch_size, int) or roi_batch_size < 1:
        raise ConfigError(f"roi_batch_size: expected an integer >= 1, got {roi_batch_size!r}")
    if test_proposals is not None and (not isinstance(test_proposals, int) or test_proposals < 1):
        raise ConfigError(f"test_proposals: expected an integer >= 1, got {test_proposals!r}")
    common: dict[str, Any] = {"min_size": sizes, "max_size": int(max_size), "image_mean": list(IMAGENET_MEAN),
                              "image_std": list(IMAGENET_STD), "box_batch_size_per_image": roi_batch_size}
    if test_proposals is not None:
        common["rpn_post_nms_top_n_test"] = test_proposals
    classes = num_classes + 1
    if layout == "fpn":
        body = BackboneWithFPN(backbone, return_layers={s: str(i) for i, s in enumerate(STAGES)},
                               in_channels_list=[int(backbone.channels[s]) for s in STAGES],
                               out_channels=fpn, extra_blocks=LastLevelMaxPool())
        if scale != 1:  # torchvision's FPN anchors (32..512, one size per level), scaled with the input
            common["rpn_anchor_generator"] = AnchorGenerator(
                sizes=tuple((_scaled(a, scale),) for a in FPN_ANCHOR_SIZES),
                aspect_ratios=(C4_ASPECT_RATIOS,) * len(FPN_ANCHOR_SIZES))
        model: nn.Module = (FasterRCNN if task == "box" else MaskRCNN)(body, num_classes=classes, **common)
    else:
        c5 = int(backbone.channels["layer4"])
        res5 = nn.Sequential(OrderedDict([("layer4", backbone.layer4)]
                                         + ([("norm", nn.BatchNorm2d(c5))] if extra else [])))
        box_head = nn.Sequential(OrderedDict([("res5", res5), ("pool", nn.AdaptiveAvgPool2d(1)),
                                              ("flatten", nn.Flatten(1))]))
        anchors = AnchorGenerator(sizes=(tuple(_scaled(a, scale) for a in C4_ANCHOR_SIZES),),
                                  aspect_ratios=(C4_ASPECT_RATIOS,))
        body = C4Body(backbone)
        parts = {"rpn_anchor_generator": anchors,
                 "rpn_head": RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]),
                 "box_roi_pool": MultiScaleRoIAlign(["0"], 14, sampling_ratio=0), "box_head": box_head,
                 "box_predictor": FastRCNNPredictor(c5, classes),
                 **{k: v for k, v in C4_RPN_TOPK.items() if k not in common}}
        if task == "box":
            model = FasterRCNN(body, num_classes=None, **common, **parts)
        else:
            model = MaskRCNN(body, num_classes=None, mask_roi_pool=MultiScaleRoIAlign(["0"], 14, sampling_ratio=0),
                             mask_head=res5, mask_predictor=MaskRCNNPredictor(c5, 256, classes), **common, **parts)
    if scale != 1:  # the padding multiple (torchvision's 32) scales too: the maps stay the standard stem's
        model.transform.size_divisible = _scaled(model.transform.size_divisible, scale)
    if norm == "syncbn":
        model = _sync_batchnorm(model)
    return model


def stem_input_scale(backbone: nn.Module) -> float:
    """The input scale at which ``backbone``'s maps have the standard stem's size: 1, or 1/4 for the small-input
    stem (3x3/1 conv, no max-pool: output stride 1 before ``layer1`` instead of 4).

    Decision: a small-input backbone (the 32 px learning-check checkpoints) is detected at a quarter of the
    recipe's resolution rather than at full resolution with 4x denser maps: the FPN, RPN and RoI costs are those of
    the standard stem at the recipe's size (16x fewer positions), and the objects are nearer the scale the backbone
    was pre-trained at. Boxes are still scored in the original image's coordinates."""
    return 0.25 if getattr(backbone, "small_input", False) else 1.0


def fpn_width(backbone: nn.Module) -> int:
    """The FPN's channels for ``backbone``: 256 at the standard width 64 (torchvision's, Detectron2's and the
    papers'), in proportion for a narrower or wider one (64 for the width-16 learning-check backbones).

    Decision: a fixed 256 would make the FPN, RPN and box head -- not the backbone under test -- most of a narrow
    backbone's detector and of its cost (on the width-16 ResNet-18 the 3x3 FPN and RPN convolutions alone were
    ~16x its layer1..4 per position); scaling keeps the heads' share of the standard detector."""
    width = int(getattr(backbone, "width", 64) or 64)
    return max(8, 256 * width // 64)


def _scaled(size: int, scale: float) -> int:
    return max(1, round(size * scale))


class _Schedule:
    """The loop's scheduler (``step`` / ``state_dict`` / ``load_state_dict``) around a ``LambdaLR`` that, on
    resume, sets the learning rate of the next iteration from *this* run's schedule: the saved optimiser holds the
    lr its own run's schedule set for that iteration, stale when the run is extended to a new length (the
    milestones are fractions of it)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        self.scheduler = scheduler

    def step(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.scheduler
        s.load_state_dict(state)
        lrs = [base * factor(s.last_epoch) for base, factor in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s._last_lr = lrs


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two SGD groups: ``weight_decay`` for the rest, 0 for norm layers' affine terms
    (Detectron2's WEIGHT_DECAY_NORM = 0)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    norm_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in norm_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def coco_json(spec: str, split: str) -> str:
    """A ``--train`` / ``--test`` value as a COCO JSON path: the file itself, or the built-in scenes' JSON of
    ``split`` for ``synthetic:scenes`` (``synthetic:scenes:train|test`` names the split)."""
    if spec.startswith("synthetic"):
        parts = spec.split(":")
        if parts[:2] != ["synthetic", "scenes"] or len(parts) > 3 or (len(parts) == 3 and parts[2] not in
                                                                       ("train", "test")):
            raise ConfigError(f"'{spec}': the built-in detection data is synthetic:scenes, synthetic:scenes:train or "
                              f"synthetic:scenes:test")
        from semssl.eval.dense import synthetic_scenes_json

        return synthetic_scenes_json(parts[2] if len(parts) == 3 else split)
    if not spec.lower().endswith(".json"):
        raise ConfigError(f"'{spec}': expected a COCO-format JSON file or synthetic:scenes")
    return spec


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError as exc:
        raise DataError(f"COCO annotation file not found: '{path}'") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read COCO annotation file '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is not a COCO annotation file (a JSON object with 'images')")
    return data


def _categories(path: str, data: dict[str, Any]) -> list[tuple[int, str]]:
    """``(id, name)`` of the file's categories, sorted by id (CocoSource's label order); none is a DataError."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"COCO annotation file '{path}': no categories (key 'categories' is "
                        f"{'missing' if cats is None else repr(cats)[:40]}); detection needs its class list")
    try:
        return sorted((int(c["id"]), str(c["name"])) for c in cats)
    except (TypeError, KeyError, ValueError) as exc:
        raise DataError(f"COCO annotation file '{path}': a category without an integer 'id' and a 'name' "
                        f"({exc!r})") from exc


def _check_test_categories(test: str, test_data: dict[str, Any], train: str,
                           categories: list[tuple[int, str]]) -> None:
    known = dict(categories)
    for cat_id, name in _categories(test, test_data):
        if cat_id not in known:
            raise DataError(f"COCO annotation file '{test}': category id {cat_id} ('{name}') is not a category of "
                            f"the training file '{train}'")
        if known[cat_id] != name:
            raise DataError(f"COCO annotation file '{test}': category id {cat_id} is '{name}' but '{known[cat_id]}' "
                            f"in the training file '{train}'")


def _image_tensor(image: Any) -> Tensor:
    """A PIL image as float ``[3, H, W]`` in [0, 1] (torchvision's detection input; it normalises itself)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


class DetectionImages(Dataset):
    """``(image [3, H, W] in [0, 1], target)`` of a CocoSource over ``indices``: target ``boxes`` xyxy float,
    ``labels`` (category index + 1), ``image_id``, and ``masks`` uint8 ``[N, H, W]`` when ``masks``."""

    def __init__(self, source: Any, indices: Sequence[int], masks: bool) -> None:
        self.source, self.indices, self.masks = source, list(indices), masks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        sample = self.source[self.indices[i]]
        target: dict[str, Any] = {"boxes": sample["boxes"].float(), "labels": sample["box_labels"] + 1,
                                  "image_id": int(sample["image_id"])}
        if self.masks:
            target["masks"] = sample["masks"]
        return _image_tensor(sample["image"]), target


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """The horizontal mirror of an image and its boxes (x1, x2 -> W - x2, W - x1) and masks."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


def _isolated_batches(dataset: Dataset, batch_size: int, seed: int,
                      workers: int) -> Callable[[int], Iterator[tuple[int, Any]]]:
    """``batches_from`` with the global torch RNG restored around every batch (the DataLoader draws its worker
    seed from it when an epoch starts, which a resumed run would do at another point): batches are
    ``(iteration, items)`` so the step draws the flips from ``(seed, iteration)``."""
    def batches(first: int) -> Iterator[tuple[int, Any]]:
        stream = batches_from(dataset, batch_size, seed, first, list, workers)
        while True:
            rng = torch.get_rng_state()
            iteration, items = next(stream)
            torch.set_rng_state(rng)
            yield iteration, (iteration, items)

    return batches


def _step(seed: int, device: str) -> Callable[[nn.Module, Any], dict[str, Tensor]]:
    def step(model: nn.Module, batch: tuple[int, list[tuple[Tensor, dict[str, Any]]]]) -> dict[str, Tensor]:
        iteration, items = batch
        flips = torch.rand(len(items), generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration)) < 0.5
        images, targets = [], []
        for (image, target), flip in zip(items, flips.tolist()):
            if flip:
                image, target = hflip(image, target)
            images.append(image.to(device))
            targets.append({k: v.to(device) for k, v in target.items() if k in ("boxes", "labels", "masks")})
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **losses}

    return step


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------
def _ground_truth(data: dict[str, Any]) -> Any:
    """A pycocotools ``COCO`` of a COCO dict (a copy), with the keys COCOeval needs but the format leaves
    optional filled in: annotation ``id``, ``iscrowd`` (0) and ``area`` (the box's)."""
    from pycocotools.coco import COCO

    data = copy.deepcopy(data)
    data.setdefault("annotations", [])
    for i, ann in enumerate(data["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(ground_truth: str | Path | dict[str, Any] | Any, results: list[dict[str, Any]],
                  iou_type: str = "bbox", image_ids: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """COCO AP of ``results`` (COCO result dicts: ``image_id``, ``category_id``, ``score`` and ``bbox`` xywh or
    ``segmentation`` RLE) against ``ground_truth`` (a COCO JSON path, dict or ``COCO``), over ``image_ids``
    (default: all). Returns ``ap``, ``ap50``, ``ap75`` in percent and COCOeval's 12 ``stats`` (percent; None where
    it has no ground truth). No result gives AP 0 (COCO's ``loadRes`` cannot take an empty list)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_choice("iou_type", iou_type, ("bbox", "segm"))
    gt = ground_truth if isinstance(ground_truth, COCO) else _ground_truth(
        ground_truth if isinstance(ground_truth, dict) else _read_json(str(ground_truth)))
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "stats": [0.0] * 12, "detections": 0}
    chosen = [dict(r) for r in results]
    if iou_type == "segm":
        for r in chosen:  # the mask's own area and box, as Detectron2's COCO evaluation
            r.pop("bbox", None)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        dt = gt.loadRes(chosen)
        evaluator = COCOeval(gt, dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools (%s):\n%s", iou_type, buffer.getvalue())
    stats = [round(100.0 * float(s), 3) if s >= 0 else None for s in evaluator.stats]
    return {"ap": stats[0] or 0.0, "ap50": stats[1] or 0.0, "ap75": stats[2] or 0.0, "stats": stats,
            "detections": len(results)}


@torch.no_grad()
def predict(model: nn.Module, source: Any, category_ids: Sequence[int], masks: bool, batch_size: int = 4,
            workers: int = 0, device: str = "cpu", progress: bool = True,
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """``model`` (eval mode) on every image of ``source``: COCO box results, mask results (empty unless
    ``masks``) and the ids of the images evaluated (an image that failed to decode is left out once)."""
    from pycocotools import mask as mask_utils

    dataset = DetectionImages(source, range(len(source)), masks=False)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=list)
    boxes_out: list[dict[str, Any]] = []
    masks_out: list[dict[str, Any]] = []
    seen: set[int] = set()
    was_training = model.training
    model.eval()
    with _progress(len(dataset), "evaluate", progress) as bar:
        task = bar.add_task("evaluate", total=len(dataset), status="")
        for batch in loader:
            outputs = model([image.to(device) for image, _ in batch])
            for (_, target), out in zip(batch, outputs):
                image_id = target["image_id"]
                if image_id in seen:  # CocoSource replaced a bad file by the next good one
                    continue
                seen.add(image_id)
                xyxy = out["boxes"].cpu().double()
                xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).tolist()
                scores = out["scores"].cpu().tolist()
                cats = [int(category_ids[int(label) - 1]) for label in out["labels"].cpu().tolist()]
                for box, score, cat in zip(xywh, scores, cats):
                    boxes_out.append({"image_id": image_id, "category_id": cat, "bbox": [round(v, 2) for v in box],
                                      "score": round(float(score), 5)})
                if masks and len(scores):
                    binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                    for rle, score, cat in zip(rles, scores, cats):
                        rle["counts"] = rle["counts"].decode("ascii")
                        masks_out.append({"image_id": image_id, "category_id": cat, "segmentation": rle,
                                          "score": round(float(score), 5)})
            bar.update(task, advance=len(batch))
    model.train(was_training)
    return boxes_out, masks_out, sorted(seen)


# --------------------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Data:
    train_json: str
    test_json: str
    train_set: DetectionImages
    test_source: Any
    ground_truth: Any
    category_ids: list[int]
    without_annotations: int


def _load_data(cfg: DetectConfig) -> _Data:
    from semssl.data.sources import CocoSource

    if not cfg.train or not cfg.test:
        raise ConfigError("detect: give train and test (COCO-format JSON files, or synthetic:scenes)")
    masks = cfg.task == "mask"
    train_json, test_json = coco_json(cfg.train, "train"), coco_json(cfg.test, "test")
    categories = _categories(train_json, _read_json(train_json))
    test_data = _read_json(test_json)
    _check_test_categories(test_json, test_data, train_json, categories)
    train_source = CocoSource(train_json, images_dir=cfg.train_images, load_masks=masks)
    if masks and not train_source.has_segmentations:
        raise DataError(f"COCO annotation file '{train_json}': task=mask needs segmentations, and none of its "
                        f"annotations has one")
    # CocoSource's kept annotations per image (crowd and <= 1 px boxes already dropped)
    kept = [i for i, anns in enumerate(train_source._annotations) if anns]
    if not kept:
        raise DataError(f"COCO annotation file '{train_json}': none of its {len(train_source)} images has an "
                        f"annotation (an empty training set)")
    if not test_data.get("annotations"):
        raise DataError(f"COCO annotation file '{test_json}': no annotations to evaluate against")
    if masks and not any(a.get("segmentation") for a in test_data["annotations"]):
        raise DataError(f"COCO annotation file '{test_json}': task=mask needs segmentations to score masks, and "
                        f"none of its annotations has one")
    test_source = CocoSource(test_json, images_dir=cfg.test_images, load_masks=False)
    without = len(train_source) - len(kept)
    log.info("detect: %d training images with annotations (%d without, skipped), %d categories, %d test images",
             len(kept), without, len(categories), len(test_source))
    return _Data(train_json, test_json, DetectionImages(train_source, kept, masks), test_source,
                 _ground_truth(test_data), [c for c, _ in categories], without)


def _run_one(source: BackboneSource, data: _Data, cfg: DetectConfig, seed: int, out_dir: Optional[Path],
             resume: bool, workers: int, device: str, progress: bool, identity: dict[str, Any],
             description: str) -> dict[str, Any]:
    backbone, info = load_backbone(source)
    torch.manual_seed(seed)
    model = build_detector(backbone, len(data.category_ids), cfg.layout, cfg.task, cfg.norm, cfg.min_size,
                           cfg.max_size, trainable_stages=cfg.trainable_stages, extra_norm=cfg.extra_norm,
                           roi_batch_size=cfg.roi_batch_size, test_proposals=cfg.test_proposals,
                           input_scale=cfg.input_scale, fpn_channels=cfg.fpn_channels).to(device)
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9)
    scheduler = _Schedule(lr_schedule(optimizer, cfg.iterations, "step", warmup=cfg.warmup,
                                      milestones=cfg.milestones))
    result = train_iterations(model, optimizer, scheduler,
                              _isolated_batches(data.train_set, cfg.batch_size, seed, workers), cfg.iterations,
                              _step(seed, device), out_dir, identity, resume=resume,
                              save_every=max(50, cfg.iterations // 20), description=description, progress=progress)
    t0 = time.time()
    boxes, masks, image_ids = predict(model, data.test_source, data.category_ids, cfg.task == "mask",
                                      batch_size=cfg.batch_size, workers=workers, device=device, progress=progress)
    scores: dict[str, Any] = {}
    box = coco_evaluate(data.ground_truth, boxes, "bbox", image_ids)
    scores.update(box_ap=box["ap"], box_ap50=box["ap50"], box_ap75=box["ap75"])
    stats = {"bbox": box["stats"]}
    if cfg.task == "mask":
        segm = coco_evaluate(data.ground_truth, masks, "segm", image_ids)
        scores.update(mask_ap=segm["ap"], mask_ap50=segm["ap50"], mask_ap75=segm["ap75"])
        stats["segm"] = segm["stats"]
    return {**scores, "iterations": result.iterations, "seconds": result.seconds,
            "eval_seconds": round(time.time() - t0, 1), "detections": len(boxes), "test_images": len(image_ids),
            "coco_stats": stats, "backbone": info,
            "final_loss": result.history[-1]["loss"] if result.history else None}


def detect(source: BackboneSource, train: Optional[str] = None, test: Optional[str] = None,
           layout: Optional[str] = None, task: Optional[str] = None, norm: Optional[str] = None,
           iterations: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
           weight_decay: Optional[float] = None, warmup: Optional[int] = None,
           milestones: Optional[tuple[float, ...]] = None, min_size: Optional[int | tuple[int, ...]] = None,
           max_size: Optional[int] = None, workers: int = 0, seed: int = 0, out_dir: Optional[str | Path] = None,
           resume: bool = False, compare_random_init: bool = False, progress: bool = True, device: str = "cpu",
           recipe: Optional[str] = None, trainable_stages: Optional[int] = None, extra_norm: Optional[bool] = None,
           train_images: Optional[str] = None, test_images: Optional[str] = None,
           roi_batch_size: Optional[int] = None, test_proposals: Optional[int] = None,
           input_scale: Optional[float] = None, fpn_channels: Optional[int] = None) -> dict[str, Any]:
    """Fine-tune a detector on ``source``'s backbone with ``train``; COCO AP on ``test`` (module docstring).

    Every option left None takes the ``recipe``'s value (one of :data:`RECIPES`), else the default of
    :class:`DetectConfig` (layout ``fpn``, task ``box``, norm ``frozen``, 1000 iterations, batch 4, lr 0.02,
    wd 1e-4, warm-up 100, milestones (0.75, 0.92), min size 256, max size 512). ``out_dir`` receives ``state.pt``
    (``random_init/state.pt`` for the comparison run) and ``result.json``. Returns
    ``{"model": {box_ap, box_ap50, box_ap75, [mask_ap, ...], iterations, seconds, ...}, ["random_init": {...}],
    ...}``.
    """
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown '{recipe}' ({', '.join(RECIPES)})")
    cfg = DetectConfig(**RECIPES[recipe]) if recipe else DetectConfig()
    given = {"layout": layout, "task": task, "norm": norm, "iterations": iterations, "batch_size": batch_size,
             "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "milestones": milestones,
             "min_size": min_size, "max_size": max_size, "trainable_stages": trainable_stages,
             "extra_norm": extra_norm, "roi_batch_size": roi_batch_size, "test_proposals": test_proposals,
             "input_scale": input_scale, "fpn_channels": fpn_channels, "train": train, "test": test, "train_images": train_images,
             "test_images": test_images}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if isinstance(cfg.min_size, (list, tuple)):
        cfg = replace(cfg, min_size=tuple(int(s) for s in cfg.min_size))
    cfg = replace(cfg, milestones=tuple(float(m) for m in cfg.milestones))
    _check(cfg)
    out = Path(out_dir) if out_dir is not None else None
    data = _load_data(cfg)
    setting = {k: v for k, v in as_dict(cfg).items() if k != "iterations"}
    identity = {"protocol": "detect", "train": data.train_json, "config": setting, "seed": seed,
                "images": len(data.train_set)}
    results: dict[str, Any] = {}
    results["model"] = _run_one(source, data, cfg, seed, out, resume, workers, device, progress,
                                {**identity, "source": source_name(source)}, "detect")
    if compare_random_init:
        baseline = random_like(results["model"]["backbone"], seed)
        base_out = out / "random_init" if out else None
        results["random_init"] = _run_one(baseline, data, cfg, seed, base_out, resume and base_out is not None and
                                          (base_out / "state.pt").exists(), workers, device, progress,
                                          {**identity, "source": "random init"}, "detect (random init)")
    extra = {"protocol": "detect", "recipe": recipe, "config": as_dict(cfg), "train": data.train_json,
             "test": data.test_json, "train_images": len(data.train_set),
             "train_images_without_annotations": data.without_annotations, "seed": seed}
    metrics = ["box_ap", "box_ap50", "box_ap75"]
    if cfg.task == "mask":
        metrics += ["mask_ap", "mask_ap50", "mask_ap75"]
    info = results["model"]["backbone"]
    title = (f"detect: {'Mask' if cfg.task == 'mask' else 'Faster'} R-CNN {info['arch']}-{cfg.layout.upper()}, "
             f"{cfg.iterations} iterations")
    payload = report(title, results, out, extra, metrics + ["iterations", "seconds"])
    return payload


def _check(cfg: DetectConfig) -> None:
    _check_choice("layout", cfg.layout, LAYOUTS)
    _check_choice("task", cfg.task, TASKS)
    _check_choice("norm", cfg.norm, NORMS)
    problems = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("iterations", "batch_size", "max_size", "roi_batch_size") and (
                not isinstance(value, int) or value < 1):
            problems.append(f"{f.name}={value} (an integer >= 1)")
        if f.name in ("lr", "weight_decay", "warmup") and value < 0:
            problems.append(f"{f.name}={value} (>= 0)")
    sizes = (cfg.min_size,) if isinstance(cfg.min_size, int) else cfg.min_size
    if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
        problems.append(f"min_size={cfg.min_size} (integers >= 1)")
    if any(not 0 < m <= 1 for m in cfg.milestones):
        problems.append(f"milestones={cfg.milestones} (fractions of the run in (0, 1])")
    if problems:
        raise ConfigError("detect: " + "; ".join(problems))
