"""The command line of the transfer protocols: ``semssl finetune``, ``semssl transfer segment|detect`` and
``semssl export``. Argument parsing only: each command turns its options into the typed call of its function in
:mod:`semssl.transfer` (no argparse ``Namespace`` below this module). Registered by :mod:`semssl.cli`.

Building the parser imports no protocol module (they import torch): the choices it offers are kept here
(``HEADS``, ``LAYOUTS``, ``FORMATS``, ...; tests/test_cli_quick.py checks them against the protocols' own) and
each command's description is its module's docstring read from the source (:func:`module_doc`).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import tokenize
from pathlib import Path
from typing import Any

#: the choices of the options, as :mod:`semssl.transfer.segment`, :mod:`~semssl.transfer.detect` and
#: :mod:`~semssl.transfer.export` define them (``SEGMENT_NORMS`` is segment's ``NORMS``, ``DETECT_NORMS``
#: detect's; ``OUTPUT_STRIDES`` is :data:`semssl.models.backbones.OUTPUT_STRIDES`)
HEADS = ("fcn", "deeplabv3")
SEGMENT_NORMS = ("bn", "syncbn", "frozen")
OUTPUT_STRIDES = (8, 16, 32)
SCHEDULES = ("poly", "cosine")
LAYOUTS = ("c4", "fpn")
TASKS = ("box", "mask")
DETECT_NORMS = ("frozen", "syncbn", "bn")
FORMATS = ("torchvision", "timm", "detectron2", "onnx")


def module_doc(name: str) -> str | None:
    """The docstring of the package module ``name`` (``semssl.transfer.detect``), read from its source file without
    importing it or its package, so that a ``--help`` description costs no torch import; the module's
    ``__doc__`` when there is no source file."""
    parts = name.split(".")
    path = Path(__file__).parent.joinpath(*parts[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if not path.is_file():
        return importlib.import_module(name).__doc__
    with tokenize.open(path) as source:
        for token in tokenize.generate_tokens(source.readline):
            if token.type == tokenize.STRING:
                return ast.literal_eval(token.string)
            if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE):
                return None
    return None


EPILOG_FINETUNE = """\
examples:
  semssl finetune --checkpoint runs/RUN --train DATA/cifar10-6k/train --test DATA/cifar10-6k/test \\
        --recipe cifar10-6k_10pct_small --compare random-init --out runs/RUN/finetune-10pct
  semssl finetune --checkpoint runs/RUN --train /data/imagenet/train --test /data/imagenet/val \\
        --recipe scd-mocov2-semi_1pct --size 224 --workers 8 --out ft-1pct      # SCD Table 6, 1 %
  semssl finetune --checkpoint resnet50.pth --train ... --test ... --fraction 0.1 --resume --out ft-10pct
"""


def add_source_options(p: argparse.ArgumentParser) -> None:
    """Which backbone a transfer command starts from (``semssl.transfer.BackboneSource``)."""
    p.add_argument("--checkpoint",
                   help="run folder, semssl .ckpt, or plain torchvision ResNet / timm ViT state_dict (.pth)")
    p.add_argument("--random-init", action="store_true", help="start from a random network instead of --checkpoint")
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny", "vit_small",
                                      "vit_base"],
                   help="architecture of a state_dict (inferred if omitted; a checkpoint of another one is an error) "
                        "or of --random-init (a ResNet; default resnet50)")
    p.add_argument("--width", type=int, default=64, help="--random-init only: ResNet base width (64 = torchvision's)")
    p.add_argument("--small-input", action="store_true", help="--random-init only: the 3x3/1 stem without max-pool")
    p.add_argument("--branch", choices=["online", "teacher"],
                   help="which network of a semssl checkpoint (default: the method's: teacher for DINO/SCFS)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """What every fine-tuning command shares: seed, workers, output folder, resume, comparison."""
    p.add_argument("--seed", type=int, default=0, help="seed of the subset, the head, the data order")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--out", help="output folder: state.pt (for --resume), result.json and the run's files")
    p.add_argument("--resume", action="store_true", help="continue from --out's state.pt after an interruption")
    p.add_argument("--compare", choices=["random-init"],
                   help="random-init: also run the same schedule from a random network of the same architecture "
                        "and print both rows")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def source_of(args: argparse.Namespace) -> Any:
    from semssl.transfer.common import BackboneSource

    if bool(args.checkpoint) == bool(args.random_init):
        raise SystemExit(f"semssl {args.command}: give --checkpoint (a run folder, a .ckpt or a torchvision "
                         f"state_dict) or --random-init")
    return BackboneSource(checkpoint=args.checkpoint, random_init=args.random_init, arch=args.arch,
                          width=args.width, small_input=args.small_input, branch=args.branch, seed=args.seed)


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.resume and not args.out:
        raise SystemExit(f"semssl {args.command}: --resume needs --out (the folder holding state.pt)")
    return {"seed": args.seed, "workers": args.workers, "out_dir": args.out, "resume": args.resume,
            "compare_random_init": args.compare == "random-init", "device": args.device,
            "progress": not args.no_progress}


# ------------------------------------------------------------------------------------------------ finetune
def cmd_finetune(args: argparse.Namespace) -> int:
    from semssl.transfer import finetune

    finetune(source_of(args), args.train, args.test, recipe=args.recipe, fraction=args.fraction,
             epochs=args.epochs, batch_size=args.batch_size, lr_backbone=args.lr_backbone, lr_head=args.lr_head,
             weight_decay=args.weight_decay, schedule=args.schedule, size=args.size, subset_file=args.subset_file,
             **_run_kwargs(args))
    return 0


def _add_finetune(sub: Any, positive: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune the whole backbone + a linear head on labelled images "
                                        "(semi-supervised 1 %%/10 %%, transfer)",
                       description=module_doc("semssl.transfer.finetune"),
                       epilog=EPILOG_FINETUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    p.add_argument("--train", required=True, help="labelled image folder (ImageNet layout) to fine-tune on")
    p.add_argument("--test", required=True, help="labelled image folder evaluated (classes matched by name)")
    p.add_argument("--recipe", help="named settings (semssl.transfer.finetune.RECIPES): simclr-semi_1pct, "
                                    "scd-mocov2-semi_10pct, scfs-table5, cifar10-6k_10pct_small, ...")
    p.add_argument("--fraction", type=float, help="class-balanced share of the training labels: 0.01, 0.1, 1.0")
    p.add_argument("--subset-file", help="reuse a subset list (relative path per line) instead of drawing one")
    p.add_argument("--epochs", type=positive(int), help="epochs over the subset")
    p.add_argument("--batch-size", type=positive(int), help="images per step")
    p.add_argument("--lr-backbone", type=positive(float, 0.0), help="backbone learning rate")
    p.add_argument("--lr-head", type=positive(float, 0.0), help="linear head learning rate")
    p.add_argument("--weight-decay", type=positive(float, 0.0), help="SGD weight decay")
    p.add_argument("--schedule", choices=["step", "cosine", "constant"], help="learning-rate schedule")
    p.add_argument("--size", type=positive(int, 8), help="crop size of training and test views")
    add_run_options(p)
    p.set_defaults(func=cmd_finetune)


# ------------------------------------------------------------------------------------------------ transfer segment
EPILOG_SEGMENT = """\
examples:
  D=DATA/stanford-background
  semssl transfer segment --checkpoint runs/RUN --recipe stanford-background_small --compare random-init \\
        --train $D/images:$D/labels:$D/splits/train.txt --test $D/images:$D/labels:$D/splits/val.txt --out seg-sb
  semssl transfer segment --checkpoint runs/RUN --recipe msrc-v2_small \\
        --train DATA/msrc-v2/images:DATA/msrc-v2/semantic:DATA/msrc-v2/train.txt \\
        --test DATA/msrc-v2/images:DATA/msrc-v2/semantic:DATA/msrc-v2/test.txt --out seg-msrc
  semssl transfer segment --checkpoint resnet50.pth --recipe voc-aug_fcn --device cuda \\
        --train VOC/JPEGImages:VOC/SegmentationClassAug:VOC/train_aug.txt \\
        --test VOC/JPEGImages:VOC/SegmentationClass:VOC/val.txt --out seg-voc    # DenseCL / DSC, GPU scale
  semssl transfer segment --random-init --arch resnet18 --train synthetic:scenes --test synthetic:scenes \\
        --iterations 20
"""


def cmd_segment(args: argparse.Namespace) -> int:
    from semssl.transfer import segment

    segment(source_of(args), args.train, args.test, recipe=args.recipe, num_classes=args.num_classes,
            ignore_index=args.ignore_index, head=args.head, output_stride=args.output_stride,
            crop_size=args.crop_size, test_size=args.test_size, iterations=args.iterations,
            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
            aux_weight=args.aux_weight, norm=args.norm, **_run_kwargs(args))
    return 0


def _add_segment(sub: Any, positive: Any) -> None:
    p = sub.add_parser("segment", help="fine-tune an FCN / DeepLab-v3 on the backbone; mIoU, pixel accuracy",
                       description=module_doc("semssl.transfer.segment"),
                       epilog=EPILOG_SEGMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    p.add_argument("--train", required=True,
                   help="IMAGES_DIR:MASKS_DIR[:LIST_FILE] (pairs matched by stem), a COCO JSON with segmentations, "
                        "or synthetic:scenes")
    p.add_argument("--test", required=True, help="the test split, in the same forms as --train")
    p.add_argument("--recipe", help="named settings (semssl.transfer.segment.RECIPES): voc-aug_fcn, cityscapes_fcn, "
                                    "stanford-background_small, msrc-v2_small")
    p.add_argument("--num-classes", type=positive(int), help="classes (default: the largest training mask value + 1)")
    p.add_argument("--ignore-index", type=positive(int, 0), help="mask value left out of loss and scores (255)")
    p.add_argument("--head", choices=HEADS, help="fcn (FCNHead) or deeplabv3 (ASPP)")
    p.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES, help="dilate layer3/layer4 to this stride")
    p.add_argument("--crop-size", type=positive(int, 8), help="training crop in pixels")
    p.add_argument("--test-size", type=positive(int, 0), help="shorter side of test images (0: as they are)")
    p.add_argument("--iterations", type=positive(int), help="training iterations")
    p.add_argument("--batch-size", type=positive(int), help="images per iteration")
    p.add_argument("--lr", type=positive(float, 0.0), help="SGD learning rate")
    p.add_argument("--weight-decay", type=positive(float, 0.0), help="SGD weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, help="poly (MMSeg) or cosine")
    p.add_argument("--aux-weight", type=positive(float, 0.0), help="weight of the layer3 auxiliary head (0: none)")
    p.add_argument("--norm", choices=SEGMENT_NORMS, help="bn, syncbn (several GPUs) or frozen backbone BatchNorm")
    add_run_options(p)
    p.set_defaults(func=cmd_segment)


# ------------------------------------------------------------------------------------------------ transfer detect
EPILOG_DETECT = """\
examples:
  semssl transfer detect --checkpoint runs/RUN --recipe msrc-v2_small --compare random-init \\
        --train DATA/msrc-v2/instances_train.json --test DATA/msrc-v2/instances_test.json --out det-msrc
  semssl transfer detect --checkpoint runs/RUN --recipe coco128_small \\
        --train DATA/coco128/coco_json_train2017/instances_train2017.json \\
        --test DATA/coco128/coco_json_val2017/instances_val2017_boxes.json \\
        --test-images DATA/coco128/images/val2017 --out det-coco128
  semssl transfer detect --checkpoint r50.pth --recipe voc0712_c4 --device cuda \\
        --train voc0712_trainval.json --test voc07_test.json --out det-voc     # the papers' VOC, GPU scale
  semssl transfer detect --random-init --arch resnet18 --train synthetic:scenes --test synthetic:scenes \\
        --layout c4 --task mask --iterations 20
"""


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got '{text}'")
    return parse


def cmd_detect(args: argparse.Namespace) -> int:
    from semssl.transfer import detect

    min_size = args.min_size[0] if args.min_size and len(args.min_size) == 1 else args.min_size
    detect(source_of(args), args.train, args.test, recipe=args.recipe, layout=args.layout, task=args.task,
           norm=args.norm, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
           weight_decay=args.weight_decay, warmup=args.warmup, milestones=args.milestones, min_size=min_size,
           max_size=args.max_size, trainable_stages=args.trainable_stages, extra_norm=args.extra_norm,
           train_images=args.train_images, test_images=args.test_images, roi_batch_size=args.roi_batch_size,
           test_proposals=args.test_proposals, input_scale=args.input_scale,
           fpn_channels=args.fpn_channels, **_run_kwargs(args))
    return 0


def _add_detect(sub: Any, positive: Any) -> None:
    p = sub.add_parser("detect", help="fine-tune Faster / Mask R-CNN (C4 or FPN) on the backbone; COCO box/mask AP",
                       description=module_doc("semssl.transfer.detect"),
                       epilog=EPILOG_DETECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    p.add_argument("--train", required=True, help="COCO-format JSON of the training images, or synthetic:scenes")
    p.add_argument("--test", required=True, help="COCO-format JSON of the test images, or synthetic:scenes")
    p.add_argument("--train-images", help="the training images folder, where it is not found beside the JSON")
    p.add_argument("--test-images", help="the test images folder, where it is not found beside the JSON")
    p.add_argument("--recipe", help="named settings (semssl.transfer.detect.RECIPES): voc0712_c4, coco_1x_c4, "
                                    "coco_1x_fpn, msrc-v2_small, coco128_small")
    p.add_argument("--layout", choices=LAYOUTS, help="c4 (RoIAlign on C4, res5 box head) or fpn")
    p.add_argument("--task", choices=TASKS, help="box (Faster R-CNN) or mask (Mask R-CNN)")
    p.add_argument("--norm", choices=DETECT_NORMS, help="frozen BatchNorm, syncbn (several GPUs) or bn")
    p.add_argument("--iterations", type=positive(int), help="training iterations")
    p.add_argument("--batch-size", type=positive(int), help="images per iteration")
    p.add_argument("--lr", type=positive(float, 0.0), help="SGD learning rate")
    p.add_argument("--weight-decay", type=positive(float, 0.0), help="SGD weight decay (none on norm parameters)")
    p.add_argument("--warmup", type=positive(int, 0), help="linear warm-up iterations")
    p.add_argument("--milestones", type=_numbers(float), help="lr x0.1 at these fractions of the run, e.g. 0.75,0.92")
    p.add_argument("--min-size", type=_numbers(int), help="shorter side: one value, or a comma list drawn from")
    p.add_argument("--max-size", type=positive(int), help="cap of the longer side")
    p.add_argument("--trainable-stages", type=int, choices=range(0, 6),
                   help="stages trained from the top: layer4, layer3, layer2, layer1, stem (5 = all)")
    p.add_argument("--extra-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="C4: a BatchNorm after res5 (MoCo's Res5ROIHeadsExtraNorm)")
    p.add_argument("--roi-batch-size", type=positive(int), help="RoIs sampled per image for the box head")
    p.add_argument("--test-proposals", type=positive(int), help="RPN proposals kept per test image")
    p.add_argument("--input-scale", type=positive(float),
                   help="multiplies the image sizes and anchors (default: 1, or 1/4 for a small-input stem)")
    p.add_argument("--fpn-channels", type=positive(int),
                   help="the FPN's channels (default: 256 x backbone width / 64, so 256 for a standard ResNet)")
    add_run_options(p)
    p.set_defaults(func=cmd_detect)


# ------------------------------------------------------------------------------------------------ export
EPILOG_EXPORT = """\
examples:
  semssl export --checkpoint runs/RUN --out exported/              # all four formats + RUN's side JSON
  semssl export --checkpoint runs/RUN --format torchvision,onnx --onnx-size 224 --out exported/
  semssl export --checkpoint runs/scfs_run --branch online --format detectron2 --out exported/
"""


def cmd_export(args: argparse.Namespace) -> int:
    from semssl.transfer import export

    # no --format: every format the backbone takes (a ViT: timm only)
    formats = [f for spec in args.format for f in spec.split(",") if f.strip()] if args.format else None
    export(source_of(args), args.out, formats=formats, onnx_size=args.onnx_size, name=args.name)
    return 0


def _add_export(sub: Any, positive: Any) -> None:
    p = sub.add_parser("export", help="write a checkpoint's backbone as torchvision / timm / detectron2 / ONNX",
                       description=module_doc("semssl.transfer.export"),
                       epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_options(p)
    p.add_argument("--format", action="append",
                   help=f"one of {', '.join(FORMATS)}, repeated or comma-separated (default: all four; a ViT: timm)")
    p.add_argument("--out", required=True, help="output folder of the files and the side JSON")
    p.add_argument("--name", help="the files' stem (default: the run's name)")
    p.add_argument("--onnx-size", type=positive(int, 8), default=224, help="ONNX input height and width")
    p.add_argument("--seed", type=int, default=0, help="--random-init only: the seed of the random network")
    p.set_defaults(func=cmd_export)


def add_commands(sub: Any, positive: Any) -> None:
    """Register ``finetune``, ``transfer segment|detect`` and ``export`` on the top-level sub-parsers ``sub``."""
    _add_finetune(sub, positive)
    transfer = sub.add_parser("transfer", help="fine-tuned transfer: segment (FCN / DeepLab-v3), detect "
                                               "(Faster / Mask R-CNN)",
                              description="Fine-tuned dense transfer of a checkpoint's backbone: "
                                          "`semssl transfer segment` and `semssl transfer detect`.")
    protocols = transfer.add_subparsers(dest="protocol", required=True, metavar="{segment,detect}")
    _add_segment(protocols, positive)
    _add_detect(protocols, positive)
    _add_export(sub, positive)
