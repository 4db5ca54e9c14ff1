"""A reference level for the scene learning checks: the backbone trained *with the evaluation's own labels*.

The scene issues (11, 12) ask for a backbone pre-trained <= 30 minutes here that beats the random baselines by
>= 5 points on coco128: dense-probe mIoU (issue 11) or O-KNN top-1 (issue 12). This script asks what the same
backbone (ResNet-18, same width and resolution) reaches in the same time when it is trained *supervised*, on the
train split of the very labels the check evaluates — semantic masks for ``dense``, object categories for
``objects``. It is not a bound on what any method can do, but a self-supervised method on the same 128 images has
strictly less information than this, so a level under the bar says the bar is out of reach in this regime.

* ``dense``: backbone -> 1x1 conv on the stage map -> bilinear upsampling to the image size, pixel-wise cross
  entropy (``--ignore-index`` ignored; ``--class-map`` merges the mask values first, as ``semssl eval dense``);
  ``--output-stride 16|8`` trains the backbone dilated (a denser map for the head, the same weights' shapes);
* ``objects``: backbone -> RoIAlign 7x7 of each selected ground-truth box on layer4, average-pooled
  (:func:`semssl.eval.objects.roi_features`, the O-KNN feature) -> linear classifier over the categories.

Both: the whole train split held in memory at ``--size`` (the evaluation's resizing), a random horizontal flip
per image (boxes/masks flipped with it), SGD (momentum 0.9, weight decay 5e-4, cosine lr), batch ``--batch-size``,
until ``--minutes`` of training or ``--steps``. The backbone is saved as a plain torchvision ``state_dict``, which
``semssl eval dense`` / ``semssl eval objects`` read with ``--checkpoint FILE`` like any other checkpoint:

    C=${SEMSSL_DATA_DIR:-$HOME/.cache/semssl}/coco128
    python benchmarks/supervised_ceiling.py objects --train $C/coco_json_train2017/instances_train2017.json \\
        --width 32 --size 128 --minutes 25 --out runs/ceiling_objects_w32.pth
    semssl eval objects --checkpoint runs/ceiling_objects_w32.pth --train ... --test ... --size 128
    python benchmarks/supervised_ceiling.py dense --train $C/images/train2017:$C/semantic_segmentation/masks/train2017 \\
        --ignore-index 0 --width 32 --size 128 --minutes 25 --out runs/ceiling_dense_w32.pth
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.checkpoints import atomic_torch_save
from semssl.eval.dense import (
    SegmentationDataset,
    class_index,
    read_class_map,
    segmentation_source,
)
from semssl.eval.objects import SceneObjects, open_coco, roi_features
from semssl.models.backbones import ResNetBackbone, dilate_backbone


def load_dense(args) -> tuple[Tensor, Tensor, int]:
    """Images ``[N, 3, S, S]``, class indices ``[N, S, S]`` (-1 = ignored) and the class count."""
    data = SegmentationDataset(segmentation_source(args.train, "train"), args.size)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["image"] for it in items])
    raw = torch.stack([it["mask"] for it in items])
    class_map = read_class_map(args.class_map) if args.class_map else None
    values, masks, _ = class_index(raw, raw[:0], args.ignore_index, class_map)
    return images, masks, len(values)


def load_objects(args) -> tuple[Tensor, list[Tensor], list[Tensor], int]:
    """Images, per-image boxes and labels of the selected objects (the O-KNN selection), and the class count."""
    source = open_coco(args.train)
    data = SceneObjects(source, args.size)
    items = [data[i] for i in range(len(data))]
    items = [it for it in items if not it["skipped"] and len(it["boxes"])]
    if not items:
        raise SystemExit(f"{args.train}: no object has both box sides >= 16 px at --size {args.size}")
    return (torch.stack([it["image"] for it in items]), [it["boxes"] for it in items],
            [it["labels"] for it in items], len(source.categories))


def flip_batch(images: Tensor, flips: Tensor) -> Tensor:
    """Images (or masks) ``[B, ..., W]`` mirrored left-right where ``flips`` ``[B]`` is True."""
    return torch.where(flips.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """``[K, 4]`` x1, y1, x2, y2 boxes of a ``width``-pixel-wide image, mirrored left-right."""
    out = boxes.clone()
    out[:, [0, 2]] = width - boxes[:, [2, 0]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("dense", "objects"))
    p.add_argument("--train", required=True, help="as semssl eval dense / objects --train")
    p.add_argument("--out", required=True, help="where to write the backbone's torchvision state_dict")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--stage", default="layer4", help="dense: the stage the 1x1 head reads")
    p.add_argument("--output-stride", type=int, default=0, choices=(0, 8, 16),
                   help="dense: train the backbone dilated to this stride (the probe's --output-stride; the saved "
                        "weights are the plain network's); 0: as built")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--class-map", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    backbone = ResNetBackbone(args.arch, width=args.width)
    if args.output_stride:
        dilate_backbone(backbone, args.output_stride)
    if args.task == "dense":
        images, masks, k = load_dense(args)
        head = nn.Conv2d(backbone.channels[args.stage], k, 1)
        print(f"dense: {len(images)} images, {k} classes, stage {args.stage}", flush=True)
    else:
        images, boxes, labels, k = load_objects(args)
        head = nn.Linear(backbone.channels["layer4"], k)
        print(f"objects: {len(images)} images, {sum(len(b) for b in boxes)} objects, {k} categories", flush=True)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    n, size = len(images), args.size
    budget = args.minutes * 60
    start, step, losses = time.perf_counter(), 0, []
    backbone.train()
    while step < args.steps:
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        for group in opt.param_groups:  # cosine over the time budget (the step count is not known beforehand)
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
        idx = torch.randperm(n)[: args.batch_size]
        flips = torch.rand(len(idx)) < 0.5
        x = flip_batch(images[idx], flips)
        if args.task == "dense":
            y = flip_batch(masks[idx], flips)
            fmap = backbone(x, stages=(args.stage,), upto=args.stage)[args.stage]
            logits = F.interpolate(head(fmap), size=(size, size), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=-1)
        else:
            bxs = [flip_boxes(boxes[i], size) if f else boxes[i] for i, f in zip(idx.tolist(), flips.tolist())]
            y = torch.cat([labels[i] for i in idx.tolist()])
            feats = roi_features(backbone(x)["layer4"], bxs, (size, size))
            loss = F.cross_entropy(head(feats), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step} {time.perf_counter() - start:.0f}s loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    print(f"trained {step} steps in {time.perf_counter() - start:.0f} s; final loss "
          f"{sum(losses[-50:]) / max(len(losses[-50:]), 1):.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(backbone.state_dict(), Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
