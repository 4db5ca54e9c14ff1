"""``semssl transfer segment``: fine-tuned semantic segmentation (FCN / DeepLab-v3) on any checkpoint's backbone.

The transfer DenseCL, DSC and SoCo report on PASCAL VOC and Cityscapes (an FCN on a dilated ResNet-50, the
MMSegmentation protocol), end to end on any :class:`~semssl.transfer.common.BackboneSource`, with the resumable
loop, progress bar and result table of :mod:`semssl.transfer.common`.

Model (:class:`SegmentationModel`)
    The semssl ResNet with torchvision's heads: ``FCNHead`` (``head="fcn"``) or ``DeepLabHead`` (ASPP,
    ``head="deeplabv3"``) on ``layer4``, an optional auxiliary ``FCNHead`` on ``layer3`` (loss weight
    ``aux_weight``, MMSeg's 0.4; 0 builds none), both upsampled bilinearly (``align_corners=False``) to the input
    size. ``output_stride`` 8 / 16 / 32 turns the stride-2 convolutions of ``layer3`` and ``layer4`` / of
    ``layer4`` / of none into stride 1 with dilation
    (:func:`semssl.models.backbones.dilate_backbone`: torchvision's rule, for ``BasicBlock`` too, the *a trous*
    equivalent of the original). ``output_stride`` is named for the standard stem: with the small-input stem the
    map is 4x denser (``feature_stride`` in the result). Decision: DeepLab's ASPP rates are (12, 24, 36) at
    output stride 8 (as torchvision's DeepLab-v3) and scale with it: (6, 12, 18) at 16, (3, 6, 9) at 32.

Data (``train`` / ``test``)
    The specs of ``semssl eval dense`` (:func:`semssl.eval.dense.segmentation_source`: ``synthetic:scenes``, a
    COCO JSON with segmentations, ``IMAGES_DIR:MASKS_DIR`` and ``IMAGES_DIR:MASKS_DIR:LIST_FILE``: the folder
    pairs whose image is named in ``LIST_FILE`` (one id per line: the path relative to
    ``IMAGES_DIR`` without extension, e.g. Stanford Background's ``splits/train.txt``; ids without a pair are
    counted in ``skipped``). Decision: mask values are the class indices as they are (MMSeg's convention; no
    renumbering as the dense probe's ``class_index`` does): ``num_classes`` is given, or inferred as the largest
    training value + 1 (``ignore_index`` excluded; the result says which, ``num_classes_from``). Both splits
    are scanned once before training, so a value >= ``num_classes`` other than ``ignore_index`` is a DataError
    naming the file (or the image index of a COCO file) and the value before any time is spent.
    Training views (:func:`scale_crop_flip`, MMSeg's pipeline): rescale by ``r ~ U(ratio_range)`` (0.5, 2.0)
    times ``test_size / shorter side`` (Decision: the random scale is relative to the test scale, as MMSeg's
    ``img_scale`` is the test scale too: VOC 512, Cityscapes the image's own 1024; ``test_size=0``: the image's
    own size), random crop of ``crop_size`` (pad bottom/right when smaller: image 0 after ImageNet
    normalisation, i.e. the mean colour as MMSeg pads after ``Normalize``; mask ``ignore_index``), horizontal flip
    with p 0.5. Decision: MMSeg's ``cat_max_ratio`` crop re-draw and photometric distortion are left out (the
    brief's augmentation; ``ratio_range``, the crop and the flip are the geometric part). Test views: the shorter
    side resized to ``test_size`` (``0``: the whole image at its own size), the mask resized to the same size
    (nearest), one image per forward pass.

Training
    SGD momentum 0.9 on every parameter with one ``lr`` and ``weight_decay``, iteration based
    (:func:`~semssl.transfer.common.train_iterations`, resumable from ``<out_dir>/state.pt``; Decision: the
    iteration count is not part of the state's identity, so a finished run continues to more iterations —
    the lr schedule is then recomputed for the new length, as ``semssl finetune``). Schedules: ``poly``
    (MMSeg's: ``(lr - min_lr) * (1 - i / T) ** 0.9 + min_lr``, ``min_lr`` 1e-4; :func:`poly_schedule`) or
    ``cosine`` (:func:`~semssl.transfer.common.lr_schedule`). Loss: cross-entropy over the non-ignored pixels
    of the upsampled logits, plus ``aux_weight`` x the auxiliary head's. ``norm``: ``bn`` (plain BatchNorm,
    trained), ``frozen`` (the backbone's BatchNorm frozen with torchvision's ``FrozenBatchNorm2d``; Decision: the
    heads' BatchNorm stays trainable, as MMSeg freezes only the backbone's ``norm_eval``) or ``syncbn``
    (``nn.SyncBatchNorm.convert_sync_batchnorm`` of the whole model, MMSeg's setting). torch's SyncBatchNorm
    falls back to plain BatchNorm without a process group, and raises on a CPU tensor when one is initialised;
    Decision: it is converted only when a process group is initialised and the device is a GPU, otherwise the
    model keeps plain BatchNorm (the same keys and, on one process, the same numbers) with a logged note, and
    the result's ``norm_effective`` says which ran. This function trains one process: it does not wrap the
    model in DistributedDataParallel.
    Augmentation randomness comes from torch's global generator (restored on resume; with ``workers`` > 0 the
    workers' seeds are drawn from it), so a resumed run sees the same images in the same order but, in
    general, other crops.

Evaluation
    mIoU (mean over the classes present in the test masks or the predictions, :func:`semssl.eval.dense.
    segmentation_scores`), pixel accuracy and per-class IoU, in percent, over every non-ignored test pixel.
    ``compare_random_init`` runs the same schedule from :func:`~semssl.transfer.common.random_like` and reports
    both (``model`` and ``random_init``), printed as ``semssl eval``'s table and written to
    ``<out_dir>/result.json``.

Recipes (:data:`RECIPES`): the papers' GPU settings and small ones that finish on this project's 2-core CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from semssl.errors import ConfigError, DataError
from semssl.models.backbones import OUTPUT_STRIDES, dilate_backbone
from semssl.transfer.common import (
    BackboneSource,
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

HEADS = ("fcn", "deeplabv3")
NORMS = ("bn", "syncbn", "frozen")
SCHEDULES = ("poly", "cosine")
METRICS = ("miou", "pixel_acc", "iterations", "seconds")
EVAL_PIXELS = 1 << 20  # at most this many pixels per evaluation batch (plus the batch_size cap)


@dataclass(frozen=True)
class SegmentConfig:
    """The segmentation transfer settings (module docstring). ``test_size`` 0: test on the whole image at its own
    size; ``num_classes`` None: inferred from the training masks."""

    num_classes: Optional[int] = None
    ignore_index: int = 255
    head: str = "fcn"
    output_stride: int = 8
    crop_size: int = 128
    test_size: int = 128
    ratio_range: tuple[float, float] = (0.5, 2.0)
    iterations: int = 1000
    batch_size: int = 8
    lr: float = 0.01
    min_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "poly"
    power: float = 0.9
    aux_weight: float = 0.4
    norm: str = "bn"


# Decision: a recipe is a dict of SegmentConfig fields, each stated in full; the data it was made for is in its
# header (``train`` / ``test`` stay arguments). Sources: DenseCL's segmentation transfer is its mmsegmentation
# fork (docs/methods/densecl.md §Evaluation: FCN, Cityscapes 40k, VOC 20k); DSC paper 002, "Downstream tasks
# training": "fine-tune a FCN [36] model with 20k iterations and 40k iterations respectively" (VOC / Cityscapes).
# What neither paper prints is taken from MMSeg's own FCN config of that setting (fcn_r50-d8: dilated ResNet-50
# at output stride 8, FCN head + auxiliary FCN head on layer3 weighted 0.4, SyncBN, SGD momentum 0.9, lr 0.01,
# wd 5e-4, poly 0.9 to 1e-4, ratio range 0.5-2.0).
RECIPES: dict[str, dict[str, Any]] = {
    # PASCAL VOC 2012 + SBD aug (DenseCL: train_aug2012, 10,582 images; DSC: train2012) -> val: 21 classes, 255 =
    # void. MMSeg fcn_r50-d8_512x512_20k_voc12aug: 20k iterations, 512 crop, batch 16 (4 GPUs x 4), test at the
    # 512 short side (img_scale (2048, 512)). GPU scale (ResNet-50).
    "voc-aug_fcn": {"num_classes": 21, "ignore_index": 255, "head": "fcn", "output_stride": 8, "crop_size": 512,
                    "test_size": 512, "iterations": 20_000, "batch_size": 16, "lr": 0.01, "weight_decay": 5e-4,
                    "schedule": "poly", "aux_weight": 0.4, "norm": "syncbn"},
    # Cityscapes train_fine (2,975 images, leftImg8bit + gtFine labelTrainIds) -> val: 19 classes, 255 = ignore.
    # MMSeg fcn_r50-d8_769x769_40k_cityscapes (the crop DenseCL's fork uses): 40k iterations, 769 crop, batch 8
    # (4 GPUs x 2; Decision: neither paper states the batch, this is MMSeg's), test on the whole 2048x1024 image
    # (test_size 0; MMSeg slides a 769 window, Decision: one whole-image pass instead).
    "cityscapes_fcn": {"num_classes": 19, "ignore_index": 255, "head": "fcn", "output_stride": 8, "crop_size": 769,
                       "test_size": 0, "iterations": 40_000, "batch_size": 8, "lr": 0.01, "weight_decay": 5e-4,
                       "schedule": "poly", "aux_weight": 0.4, "norm": "syncbn"},
    # Small, CPU: Stanford Background ($SEMSSL_DATA_DIR/stanford-background; 572 train / 143 val images, ~320x240,
    # 8 classes, 15 = unknown), as the voc-aug recipe scaled down: output stride 8, FCN + aux 0.4, poly, lr 0.01,
    # wd 5e-4, ratio 0.5-2.0, plain BN (one process), 128 crop / 128 short side, batch 8.
    #   --train $SEMSSL_DATA_DIR/stanford-background/images:$SEMSSL_DATA_DIR/stanford-background/labels:\
    #           $SEMSSL_DATA_DIR/stanford-background/splits/train.txt   (--test: the same with splits/val.txt)
    # Measured on this 2-core CPU (2 threads; the machine shared with other jobs, load average 5-7), ResNet-18
    # (width 64, standard stem) random init: 10 iterations in 20.2 s, then 30 in 138.3 s (2.0-4.6 s/iteration);
    # scan + start ~15 s; the 143 test images 36.1 s. Decision: 140 iterations (~2 epochs) = 11.6 min at the slow
    # rate, 6 min at the fast one (x2 with compare_random_init).
    "stanford-background_small": {"num_classes": 8, "ignore_index": 15, "head": "fcn", "output_stride": 8,
                                  "crop_size": 128, "test_size": 128, "iterations": 140, "batch_size": 8,
                                  "lr": 0.01, "weight_decay": 5e-4, "schedule": "poly", "aux_weight": 0.4,
                                  "norm": "bn"},
    # Small, CPU: MSRC-v2 ($SEMSSL_DATA_DIR/msrc-v2; 414 train / 177 test images, 320x213 / 320x240, 23 classes,
    # 255 = void), the same scaled-down voc-aug setting as stanford-background_small.
    #   --train $SEMSSL_DATA_DIR/msrc-v2/images:$SEMSSL_DATA_DIR/msrc-v2/semantic:$SEMSSL_DATA_DIR/msrc-v2/train.txt
    #   --test  $SEMSSL_DATA_DIR/msrc-v2/images:$SEMSSL_DATA_DIR/msrc-v2/semantic:$SEMSSL_DATA_DIR/msrc-v2/test.txt
    # Measured as stanford-background_small (load average ~5.8): 15 iterations in 82.9 s (5.5 s/iteration), the
    # 177 test images 41.8 s, scan + start ~15 s. Decision: 110 iterations (~2 epochs) = 11.0 min at that rate.
    "msrc-v2_small": {"num_classes": 23, "ignore_index": 255, "head": "fcn", "output_stride": 8, "crop_size": 128,
                      "test_size": 128, "iterations": 110, "batch_size": 8, "lr": 0.01, "weight_decay": 5e-4,
                      "schedule": "poly", "aux_weight": 0.4, "norm": "bn"},
}


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLab-v3's atrous rates at ``output_stride``: (12, 24, 36) at 8, scaled with the stride."""
    return tuple(r * 8 // output_stride for r in (12, 24, 36))  # type: ignore[return-value]


class SegmentationModel(nn.Module):
    """``backbone -> head(layer4)`` (and ``aux(layer3)``) upsampled to the input size: ``forward(x)`` returns
    ``{"out": [B, K, H, W]}`` plus ``"aux"`` (the same shape) when there is an auxiliary head (computed in
    training and evaluation alike, as torchvision's segmentation models)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, aux: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone, self.head, self.aux = backbone, head, aux

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x, stages=("layer3", "layer4"))
        out = {"out": F.interpolate(self.head(feats["layer4"]), size=size, mode="bilinear", align_corners=False)}
        if self.aux is not None:
            out["aux"] = F.interpolate(self.aux(feats["layer3"]), size=size, mode="bilinear", align_corners=False)
        return out


def build_segmentation_model(backbone: nn.Module, num_classes: int, head: str = "fcn", output_stride: int = 8,
                             aux: bool = True) -> SegmentationModel:
    """The backbone dilated to ``output_stride`` with torchvision's ``FCNHead`` / ``DeepLabHead`` on ``layer4``
    and, with ``aux``, an ``FCNHead`` on ``layer3`` (the backbone is modified in place)."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead
    from torchvision.models.segmentation.fcn import FCNHead

    if head not in HEADS:
        raise ConfigError(f"head: unknown '{head}' ({', '.join(HEADS)})")
    if num_classes < 1:
        raise ConfigError(f"num_classes: expected >= 1, got {num_classes}")
    dilate_backbone(backbone, output_stride)
    channels = backbone.channels
    if head == "fcn":
        main: nn.Module = FCNHead(channels["layer4"], num_classes)
    else:
        main = DeepLabHead(channels["layer4"], num_classes, atrous_rates=aspp_rates(output_stride))
    return SegmentationModel(backbone, main, FCNHead(channels["layer3"], num_classes) if aux else None)


def apply_norm(model: nn.Module, norm: str, device: str) -> tuple[nn.Module, str]:
    """``(model, effective norm)``: ``frozen`` freezes the backbone's BatchNorm, ``syncbn`` converts the whole model
    to SyncBatchNorm where it can run (a process group and a GPU; otherwise plain BN with a note), ``bn`` keeps it.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm: unknown '{norm}' ({', '.join(NORMS)})")
    if norm == "frozen":
        frozen_batchnorm(model.backbone)
        return model, "frozen"
    if norm == "syncbn":
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.device(device).type in ("cuda", "xpu"):
            return nn.SyncBatchNorm.convert_sync_batchnorm(model), "syncbn"
        why = "no process group is initialised" if not distributed else f"SyncBatchNorm cannot run on {device}"
        log.info("segment: norm=syncbn: %s, so plain BatchNorm is used (the same on one process)", why)
        return model, "bn"
    return model, "bn"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationData:
    """A parsed ``train`` / ``test`` spec: the source, a name per index for messages (the image file of a folder
    pair; None for COCO) and the pairs left out (``skipped``, by reason)."""

    source: Any
    names: Optional[list[str]]
    skipped: dict[str, int]

    def name(self, index: int) -> str:
        if self.names is not None:
            return self.names[index]
        return f"{self.source.location} (image {index})"


def segmentation_data(spec: str, split: str, on_error: str = "skip") -> SegmentationData:
    """Parse a ``train`` / ``test`` spec (module docstring): the forms of
    :func:`semssl.eval.dense.segmentation_source`, ``IMAGES_DIR:MASKS_DIR:LIST_FILE`` included."""
    from semssl.eval.dense import segmentation_source

    source = segmentation_source(spec, split, None, on_error)
    return SegmentationData(source, source.names, dict(source.skipped))


def _normalised(image: Any) -> Tensor:
    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``image [3, H, W]`` bilinear (antialiased when shrinking) and ``mask [H, W]`` nearest to ``size``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    shrink = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    x = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=shrink)[0]
    m = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(mask.dtype)
    return x, m


def shorter_side_to(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``size`` and the aspect ratio kept (``size`` 0: unchanged)."""
    if size <= 0:
        return height, width
    scale = size / min(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def scale_crop_flip(image: Tensor, mask: Tensor, crop_size: int, ratio_range: tuple[float, float], base_size: int,
                    ignore_index: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """A training view (module docstring): rescale by ``r ~ U(ratio_range)`` x ``base_size / shorter side``
    (``base_size`` 0: the image's own size), a random ``crop_size`` crop, padded bottom/right with 0 (image) and
    ``ignore_index`` (mask) where the image is smaller, flipped horizontally with p 0.5. The image and the mask
    always get the same geometry."""
    height, width = image.shape[-2:]
    low, high = ratio_range
    r = low + (high - low) * float(torch.rand((), generator=generator))
    base = base_size if base_size > 0 else min(height, width)
    scale = r * base / min(height, width)
    size = (max(1, int(round(height * scale))), max(1, int(round(width * scale))))
    image, mask = resize_pair(image, mask, size)
    h, w = size
    top = int(torch.randint(0, max(0, h - crop_size) + 1, (), generator=generator))
    left = int(torch.randint(0, max(0, w - crop_size) + 1, (), generator=generator))
    image = image[:, top:top + crop_size, left:left + crop_size]
    mask = mask[top:top + crop_size, left:left + crop_size]
    pad_h, pad_w = crop_size - image.shape[-2], crop_size - image.shape[-1]
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
    if float(torch.rand((), generator=generator)) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image.contiguous(), mask.contiguous()


class SegmentationTrainSet(Dataset):
    """Training views of a source: ``{"image": [3, S, S] normalised, "mask": int64 [S, S]}``
    (:func:`scale_crop_flip`)."""

    def __init__(self, source: Any, cfg: SegmentConfig) -> None:
        self.source, self.cfg = source, cfg

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, mask = self.source.load(index)
        cfg = self.cfg
        x, m = scale_crop_flip(_normalised(image), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)),
                               cfg.crop_size, cfg.ratio_range, cfg.test_size, cfg.ignore_index)
        return {"image": x, "mask": m}


class SegmentationTestSet(Dataset):
    """Test views: the shorter side resized to ``size`` (0: as it is), image and mask alike."""

    def __init__(self, source: Any, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, mask = self.source.load(index)
        x, m = _normalised(image), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
        x, m = resize_pair(x, m, shorter_side_to(*m.shape, self.size))
        return {"image": x, "mask": m}


class _MaskValues(Dataset):
    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[int, Tensor, tuple[int, int]]:
        _, mask = self.source.load(index)
        return index, torch.from_numpy(np.unique(np.asarray(mask, dtype=np.int64))), tuple(mask.shape)


def scan_masks(data: SegmentationData, ignore_index: int, num_classes: Optional[int], split: str,
               workers: int = 0) -> tuple[int, list[tuple[int, int]]]:
    """Read every mask once: ``(the largest value other than ignore_index (-1 if none), each mask's (H, W))``. A
    negative value, or one >= ``num_classes`` (when given), is a DataError naming the file and the value."""
    largest, shapes = -1, [(0, 0)] * len(data.source)
    loader = DataLoader(_MaskValues(data.source), batch_size=None, num_workers=workers)
    for index, values, shape in loader:
        shapes[int(index)] = (int(shape[0]), int(shape[1]))
        values = values[values != ignore_index]
        if not len(values):
            continue
        if int(values.min()) < 0:
            raise DataError(f"{split} mask of '{data.name(int(index))}' has the negative value {int(values.min())} "
                            f"(class indices are >= 0; ignore_index is {ignore_index})")
        top = int(values.max())
        if num_classes is not None and top >= num_classes:
            raise DataError(f"{split} mask of '{data.name(int(index))}' has the value {top}, but num_classes is "
                            f"{num_classes} (classes 0..{num_classes - 1}, ignore_index {ignore_index}); pass "
                            f"num_classes / ignore_index to match the masks")
        largest = max(largest, top)
    return largest, shapes


def _collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {"image": torch.stack([x["image"] for x in items]), "mask": torch.stack([x["mask"] for x in items])}


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------
def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int, power: float = 0.9,
                  min_lr: float = 1e-4) -> torch.optim.lr_scheduler.LambdaLR:
    """MMSeg's poly schedule per iteration: ``lr_i = (lr - min_lr) * (1 - i / T) ** power + min_lr`` for every
    parameter group (``min_lr`` capped at the group's lr)."""
    factors = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])
        floor = min(min_lr, base) / base if base > 0 else 0.0

        def factor(i: int, floor: float = floor) -> float:
            return (1 - floor) * (1 - min(i, iterations) / max(1, iterations)) ** power + floor

        factors.append(factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Mean cross-entropy over the non-ignored pixels; 0 (with a graph) when every pixel is ignored."""
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def same_size_batches(sizes: list[tuple[int, int]], batch_size: int,
                      max_pixels: int = EVAL_PIXELS) -> list[list[int]]:
    """Indices grouped into batches of equal ``(h, w)``: at most ``batch_size`` images and ``max_pixels`` pixels
    per batch (at least one image), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    batches = []
    for (h, w), members in groups.items():
        n = max(1, min(batch_size, max_pixels // max(1, h * w)))
        batches.extend(members[j:j + n] for j in range(0, len(members), n))
    return batches


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, ignore_index: int, workers: int = 0,
             device: str = "cpu", batches: Optional[list[list[int]]] = None) -> dict[str, Any]:
    """``miou``, ``pixel_acc`` and ``per_class_iou`` (percent) of ``model`` on ``dataset``, a batch of images of one
    size per pass (``batches``: lists of indices, e.g. :func:`same_size_batches`; default one image each)."""
    from semssl.eval.dense import confusion_matrix, segmentation_scores

    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    batches = batches if batches is not None else [[i] for i in range(len(dataset))]
    try:
        for batch in DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate):
            pred = model(batch["image"].to(device))["out"].argmax(dim=1).cpu()
            target = batch["mask"]
            target = torch.where(target == ignore_index, torch.full_like(target, -1), target)
            confusion += confusion_matrix(pred, target, num_classes)
    finally:
        model.train(was_training)
    scores = segmentation_scores(confusion)
    return {"miou": scores["dense_miou"], "pixel_acc": scores["dense_pixel_acc"],
            "per_class_iou": scores["per_class_iou"]}


def _run_one(source: BackboneSource, train_set: Dataset, test_set: Dataset, test_sizes: list[tuple[int, int]],
             cfg: SegmentConfig, num_classes: int, seed: int, out_dir: Optional[Path], resume: bool, workers: int,
             device: str, progress: bool, identity: dict[str, Any], description: str) -> dict[str, Any]:
    backbone, info = load_backbone(source)
    torch.manual_seed(seed)
    model = build_segmentation_model(backbone, num_classes, cfg.head, cfg.output_stride, aux=cfg.aux_weight > 0)
    model, norm = apply_norm(model, cfg.norm, device)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "poly":
        scheduler = poly_schedule(optimizer, cfg.iterations, cfg.power, cfg.min_lr)
    else:
        scheduler = lr_schedule(optimizer, cfg.iterations, cfg.schedule)

    def step(m: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        target = batch["mask"].to(device)
        out = m(batch["image"].to(device))
        losses = {"loss_out": _cross_entropy(out["out"], target, cfg.ignore_index)}
        loss = losses["loss_out"]
        if "aux" in out:
            losses["loss_aux"] = _cross_entropy(out["aux"], target, cfg.ignore_index)
            loss = loss + cfg.aux_weight * losses["loss_aux"]
        return {"loss": loss, **losses}

    result = train_iterations(model, optimizer, scheduler,
                              lambda first: batches_from(train_set, cfg.batch_size, seed, first, _collate, workers),
                              cfg.iterations, step, out_dir, identity, resume=resume,
                              save_every=max(50, cfg.iterations // 20), description=description, progress=progress)
    t0 = time.time()
    scores = evaluate(model, test_set, num_classes, cfg.ignore_index, workers, device,
                      same_size_batches(test_sizes, cfg.batch_size))
    stride = backbone.strides["layer4"] if hasattr(backbone, "strides") else None
    return {**scores, "iterations": result.iterations, "seconds": result.seconds,
            "eval_seconds": round(time.time() - t0, 1), "backbone": info, "norm_effective": norm,
            "feature_stride": stride, "resumed_from": result.resumed_from,
            "final_loss": result.history[-1]["loss"] if result.history else None}


def _check(cfg: SegmentConfig) -> None:
    problems = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("crop_size", "iterations", "batch_size") and (not isinstance(value, int) or value < 1):
            problems.append(f"{f.name}={value} (an integer >= 1)")
        if f.name in ("lr", "weight_decay", "aux_weight", "min_lr", "momentum", "power") and value < 0:
            problems.append(f"{f.name}={value} (>= 0)")
    if cfg.test_size < 0:
        problems.append(f"test_size={cfg.test_size} (the shorter side in pixels; 0 = the whole image as it is)")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        problems.append(f"num_classes={cfg.num_classes} (>= 1, or None to infer it from the training masks)")
    if cfg.head not in HEADS:
        problems.append(f"head={cfg.head} ({', '.join(HEADS)})")
    if cfg.output_stride not in OUTPUT_STRIDES:
        problems.append(f"output_stride={cfg.output_stride} ({', '.join(map(str, OUTPUT_STRIDES))})")
    if cfg.norm not in NORMS:
        problems.append(f"norm={cfg.norm} ({', '.join(NORMS)})")
    if cfg.schedule not in SCHEDULES:
        problems.append(f"schedule={cfg.schedule} ({', '.join(SCHEDULES)})")
    low, high = cfg.ratio_range
    if not 0 < low <= high:
        problems.append(f"ratio_range={cfg.ratio_range} (0 < low <= high)")
    if cfg.head == "deeplabv3" and cfg.batch_size < 2:
        problems.append("batch_size=1 with head=deeplabv3 (its ASPP image-pooling branch has BatchNorm on a 1x1 "
                        "map, which needs >= 2 images per batch in training)")
    if problems:
        raise ConfigError("segment: " + "; ".join(problems))


def segment(source: BackboneSource, train: str, test: str, num_classes: Optional[int] = None,
            ignore_index: Optional[int] = None, head: Optional[str] = None, output_stride: Optional[int] = None,
            crop_size: Optional[int] = None, test_size: Optional[int] = None, iterations: Optional[int] = None,
            batch_size: Optional[int] = None, lr: Optional[float] = None, weight_decay: Optional[float] = None,
            schedule: Optional[str] = None, aux_weight: Optional[float] = None, norm: Optional[str] = None,
            workers: int = 0, seed: int = 0, out_dir: Optional[str | Path] = None, resume: bool = False,
            compare_random_init: bool = False, progress: bool = True, device: str = "cpu",
            recipe: Optional[str] = None, on_error: str = "skip") -> dict[str, Any]:
    """Fine-tune ``source``'s backbone with an FCN / DeepLab-v3 head on ``train``; mIoU and pixel accuracy on
    ``test`` (module docstring).

    Every setting left None takes ``recipe``'s value (:data:`RECIPES`), else :class:`SegmentConfig`'s default
    (``ignore_index`` 255, ``head`` fcn, ``output_stride`` 8, ``crop_size`` 128, ``test_size`` 128 (0: the whole
    image), ``iterations`` 1000, ``batch_size`` 8, ``lr`` 0.01, ``weight_decay`` 5e-4, ``schedule`` poly,
    ``aux_weight`` 0.4, ``norm`` bn; ``num_classes`` None = inferred from the training masks). ``out_dir``
    receives ``state.pt`` (``random_init/state.pt`` for the comparison run) and ``result.json``. Returns
    ``{"model": {...}, ["random_init": {...}], protocol, config, num_classes, ...}``.
    """
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown '{recipe}' ({', '.join(RECIPES)})")
    cfg = replace(SegmentConfig(), **RECIPES[recipe]) if recipe else SegmentConfig()
    given = {"num_classes": num_classes, "ignore_index": ignore_index, "head": head, "output_stride": output_stride,
             "crop_size": crop_size, "test_size": test_size, "iterations": iterations, "batch_size": batch_size,
             "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "aux_weight": aux_weight, "norm": norm}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    _check(cfg)
    if resume and out_dir is None:
        raise ConfigError("segment: resume=True needs out_dir (the folder holding state.pt)")
    out = Path(out_dir) if out_dir is not None else None
    train_data = segmentation_data(train, "train", on_error)
    test_data = segmentation_data(test, "test", on_error)
    for split, data, spec in (("train", train_data, train), ("test", test_data, test)):
        if len(data.source) == 0:
            raise DataError(f"segment: the {split} split '{spec}' has no image with a mask")
    largest, _ = scan_masks(train_data, cfg.ignore_index, cfg.num_classes, "train", workers)
    if cfg.num_classes is None:
        if largest < 0:
            raise DataError(f"segment: every training mask pixel of '{train}' is ignore_index {cfg.ignore_index}; "
                            f"nothing to learn")
        cfg, classes_from = replace(cfg, num_classes=largest + 1), "inferred from the train masks (largest value + 1)"
        log.info("segment: num_classes=%d inferred from the training masks", cfg.num_classes)
    else:
        classes_from = "given"
    _, test_shapes = scan_masks(test_data, cfg.ignore_index, cfg.num_classes, "test", workers)
    test_sizes = [shorter_side_to(h, w, cfg.test_size) for h, w in test_shapes]
    assert cfg.num_classes is not None
    train_set, test_set = SegmentationTrainSet(train_data.source, cfg), SegmentationTestSet(test_data.source,
                                                                                          cfg.test_size)
    # what a resumed state must share; not the length (a finished run can be continued) nor the test settings
    identity = {"protocol": "segment", "train": str(train), "seed": seed, "images": len(train_set),
                "config": {k: v for k, v in as_dict(cfg).items() if k not in ("iterations", "test_size")}}
    log.info("segment: %d training / %d test images, %d classes (%s)", len(train_set), len(test_set),
             cfg.num_classes, classes_from)
    results: dict[str, Any] = {}
    results["model"] = _run_one(source, train_set, test_set, test_sizes, cfg, cfg.num_classes, seed, out, resume,
                                workers, device, progress, {**identity, "source": source_name(source)}, "segment")
    if compare_random_init:
        baseline = random_like(results["model"]["backbone"], seed)
        sub = out / "random_init" if out is not None else None
        results["random_init"] = _run_one(baseline, train_set, test_set, test_sizes, cfg, cfg.num_classes, seed, sub,
                                          resume and sub is not None and (sub / "state.pt").exists(), workers,
                                          device, progress, {**identity, "source": "random init"},
                                          "segment (random init)")
    extra = {"protocol": "segment", "recipe": recipe, "config": as_dict(cfg), "train": str(train),
             "test": str(test), "num_classes": cfg.num_classes, "num_classes_from": classes_from,
             "ignore_index": cfg.ignore_index, "train_images": len(train_set), "test_images": len(test_set),
             "skipped": {"train": train_data.skipped, "test": test_data.skipped}, "seed": seed}
    title = (f"segment: {cfg.head} on {results['model']['backbone']['arch']}, output stride {cfg.output_stride}, "
             f"{cfg.iterations} iterations, {cfg.num_classes} classes")
    payload = report(title, results, out, extra, list(METRICS))
    return payload
