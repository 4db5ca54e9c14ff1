"""The command-line options of the heavy evaluation commands, ``semssl eval dense | objects | bias``: their one-line
``HELP`` and ``add_*_arguments(parser)``, apart from the protocols themselves (:mod:`semssl.eval.dense`,
:mod:`semssl.eval.objects`, :mod:`semssl.eval.bias`) so that building the parser imports no torch. Each command's
``--help`` description is its protocol module's docstring, read from the source by the command line.

This module is light (no third-party import); the protocol modules take their choices (``RESIZE_MODES``,
``ROI_MODES``) from it.
"""

from __future__ import annotations

import argparse

from semssl.eval.report import add_model_options

HELP_DENSE = "dense (segmentation) probe: linear 1x1-conv head on frozen stage maps -> mIoU, pixel accuracy"
HELP_OBJECTS = "object-level kNN (O-KNN) and disturbed O-KNN on COCO-style ground-truth boxes (D3SSL)"
HELP_BIAS = "coupling rate and positional bias (3x3 mean cosine) per stage, from annotated objects (D3SSL Figs. 3-4)"

#: ``semssl eval objects --resize`` / ``--roi`` (checked by :mod:`semssl.eval.objects`)
RESIZE_MODES = ("pad", "stretch")
ROI_MODES = ("c5", "c4")

#: the ResNet stages ``semssl eval bias`` measures by default (:data:`semssl.models.backbones.STAGES`, which imports
#: torch; tests/test_cli_quick.py keeps the two equal)
STAGES = ("layer1", "layer2", "layer3", "layer4")


def add_dense_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``semssl eval dense`` (:func:`semssl.eval.dense.run`)."""
    p.add_argument("--checkpoint", help="run folder, semssl .ckpt, or plain torchvision ResNet state_dict (.pth)")
    p.add_argument("--random-init", action="store_true",
                   help="probe the random-init baselines of --arch instead (random_init, random_init_bn, pixels)")
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"],
                   help="architecture of a plain state_dict / random init (inferred from the keys if omitted)")
    p.add_argument("--small-input", action="store_true", help="random init only: the small-input stem")
    p.add_argument("--width", type=int, default=64, help="random init only: ResNet base width (64 = torchvision's)")
    p.add_argument("--branch", choices=["online", "teacher"], help="which network of a semssl checkpoint")
    p.add_argument("--train", required=True,
                   help="training split: synthetic:scenes, a COCO JSON with segmentations, IMAGES_DIR:MASKS_DIR or "
                        "IMAGES_DIR:MASKS_DIR:LIST_FILE")
    p.add_argument("--test", required=True, help="evaluated split (same forms as --train)")
    p.add_argument("--stage", default="layer4",
                   help="feature map probed: layer1..layer4, or a method's map kind (DenseCL/DSC: dense); several "
                        "joined by '+' (layer3+layer4) are upsampled to the finest and concatenated")
    p.add_argument("--output-stride", type=int, default=0, choices=(0, 8, 16, 32),
                   help="dilate the backbone for the probe: 16 dilates layer4, 8 layer3 and layer4 (denser maps of "
                        "the same weights); default 0: as trained")
    p.add_argument("--size", type=int, default=128, help="images and masks resized to SIZE x SIZE (default 128)")
    p.add_argument("--epochs", type=int, default=50, help="passes of the head over the training split (50)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the head (0.01, cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay of the head (default 0)")
    p.add_argument("--ignore-index", type=int, default=255, help="mask value excluded from loss and scores "
                                                                 "(coco128 semantic masks: 0 = unlabeled)")
    p.add_argument("--class-map", help="merge mask values before probing: a JSON {raw: merged} or a COCO JSON whose "
                                      "categories' supercategory is the merged class (e.g. coco128's panoptic "
                                      "JSON: 133 classes -> 27 supercategories)")
    p.add_argument("--pixels-per-image", type=int, default=1024,
                   help="random pixels per image in each step of the head's loss (default 1024; 0: all)")
    p.add_argument("--head-batch-size", type=int, default=0, help="images per head step (0: automatic)")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the head's training (and of --random-init; a run's baselines use its own seed)")
    p.add_argument("--baselines", action="store_true",
                   help="also probe random_init, random_init_bn and pixels (written next to 'trained')")
    p.add_argument("--out", help="write the result as JSON here")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options ``semssl eval objects`` and ``semssl eval bias`` share."""
    add_model_options(parser, "evaluate the random-init baselines instead (the random backbone as it is, and "
                              "with BatchNorm statistics re-estimated on the data)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--seed", type=int, default=0,
                        help="random init's seed, and the seed of every random choice of the protocol")
    parser.add_argument("--out", help="write the result as JSON here")


def add_objects_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl eval objects`` (:func:`semssl.eval.objects.run`)."""
    add_model_arguments(parser)
    parser.add_argument("--train", required=True,
                        help="COCO JSON (or a folder holding annotations.json) whose objects are the memory")
    parser.add_argument("--test", required=True, help="COCO JSON (or folder) whose objects are the queries")
    parser.add_argument("--train-images", help="images folder of --train (found next to the JSON if omitted)")
    parser.add_argument("--test-images", help="images folder of --test (found next to the JSON if omitted)")
    parser.add_argument("--size", type=int, default=224, help="evaluated resolution (square canvas; default 224)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="pad",
                        help="pad: keep the aspect ratio, longer side = size, pad with the mean colour "
                             "(default); stretch: resize to size x size")
    parser.add_argument("--min-side", type=float, default=16.0,
                        help="objects whose box has both sides >= this many pixels at the evaluated size are used")
    parser.add_argument("--disturbed", action="store_true",
                        help="also disturbed O-KNN: pixels outside the selected boxes replaced by another image")
    parser.add_argument("--disturb", choices=["both", "test"], default="both",
                        help="disturbed O-KNN: disturb memory and queries (default) or the queries only")
    parser.add_argument("--roi", choices=ROI_MODES, default="c5",
                        help="object feature: c5 = RoIAlign 7x7 on layer4, average-pooled (docs/design.md §O-KNN, "
                             "default); c4 = "
                             "RoIAlign 14x14 on layer3, then layer4, average-pooled (SoCo's pre-training path; the "
                             "pixel baseline is the same either way)")
    parser.add_argument("--by-supercategory", action="store_true",
                        help="also O-KNN of the queries of each supercategory (MSRC-v2: thing, stuff)")
    parser.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos/T)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes")


def add_bias_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl eval bias`` (:func:`semssl.eval.bias.measure`; ``--plot`` / ``--examples`` draw
    with :mod:`semssl.viz.bias`)."""
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="COCO JSON (or a folder holding annotations.json)")
    parser.add_argument("--images", help="images folder of --data (found next to the JSON if omitted)")
    parser.add_argument("--size", type=int, default=224,
                        help="evaluated resolution: canvas of 3 x (size // 3) pixels, objects of size // 3")
    parser.add_argument("--pairs", type=int, default=100, help="object pairs for the coupling rate (>= 100)")
    parser.add_argument("--objects", type=int, default=100, help="objects for the positional bias (>= 100)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help="stage feature kinds to measure")
    parser.add_argument("--min-side", type=float, default=16.0,
                        help="objects whose box has both sides >= this many source pixels are used")
    parser.add_argument("--plot", help="also draw the per-stage curves (PNG), as `semssl viz bias` does")
    parser.add_argument("--examples", help="also draw the first canvases (PNG): the pairs and tilings measured")
