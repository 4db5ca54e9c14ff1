"""The command line of the transfer protocols: ``semssl finetune``, ``semssl transfer segment|detect`` and
``semssl export``. Argument parsing only: each command turns its options into the typed call of its function in
:mod:`semssl.transfer` (no argparse ``Namespace`` below this module). Registered by :mod:`semssl.cli`.
"""

from __future__ import annotations

import argparse
from typing import Any

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
    p.add_argument("--checkpoint", help="run folder, semssl .ckpt, or plain torchvision ResNet state_dict (.pth)")
    p.add_argument("--random-init", action="store_true", help="start from a random network instead of --checkpoint")
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"],
                   help="depth of a state_dict (inferred if omitted; a checkpoint of another depth is an error) or "
                        "of --random-init (default resnet50)")
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
                       description=__import__("semssl.transfer.finetune", fromlist=["_"]).__doc__,
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


def add_commands(sub: Any, positive: Any) -> None:
    """Register ``finetune``, ``transfer`` and ``export`` on the top-level sub-parsers ``sub``."""
    _add_finetune(sub, positive)
