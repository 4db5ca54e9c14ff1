"""The ``semssl`` command line: ``pretrain | eval | data | methods | recipes``.

Every sub-command prints a short human-readable result and, where it measures something, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

EPILOG_PRETRAIN = """\
examples:
  semssl pretrain                                   # the main job: built-in data, a few minutes on a CPU
  semssl pretrain -c mocov2_resnet50_8x32-200e_imagenet data.train=/data/imagenet/train \\
        data.eval_train=/data/imagenet/train data.eval_test=/data/imagenet/val
  semssl pretrain optim.lr=0.06 data.batch_size=32 trainer.max_epochs=20
  semssl pretrain --resume runs/mocov2_resnet18_1x64-400it_synthetic-20261122-101500

overrides are dotted keys of the config tree (see the recipes in configs/); list items by index:
  data.views.0.size=96   trainer.devices=8 trainer.num_nodes=4 trainer.strategy=ddp
every key with its current value: semssl pretrain --print-config [-c RECIPE]
sections: method (name + the method's own keys), data (sources, views, batch size per device), model
(backbone), optim (optimiser, lr per 256 images, schedules), trainer (length, devices, precision, logging,
checkpoints), eval (kNN / linear probe after training)
"""


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=False)])
    logging.getLogger("semssl").setLevel(logging.INFO)
    for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------ pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from semssl.config import load_config
    from semssl.engine.run import pretrain, resume_config

    if args.resume:
        if args.recipe:
            raise SystemExit("semssl pretrain: --resume reads the run's own config.yaml; do not pass --recipe")
        cfg = resume_config(Path(args.resume), args.overrides)
    else:
        cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        from semssl.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    pretrain(cfg, resume=Path(args.resume) if args.resume else None)
    return 0


# ------------------------------------------------------------------------------------------------ eval
def _eval_config(args: argparse.Namespace, info_cfg: Any) -> Any:
    from semssl.config import Config

    cfg = info_cfg if info_cfg is not None else Config()
    if args.size:
        cfg.data.eval_size = args.size
    if args.resize_ratio:
        cfg.data.eval_resize_ratio = args.resize_ratio
    cfg.data.num_workers = args.workers
    cfg.eval.batch_size = args.batch_size
    return cfg


def _load_for_eval(args: argparse.Namespace) -> tuple[Any, dict, Any]:
    """The model to evaluate (a method from a semssl checkpoint, or a bare backbone), its info, its config."""
    from semssl.engine.checkpoint import load_model

    if not args.checkpoint:
        raise SystemExit("semssl eval: give --checkpoint (a run folder, a .ckpt, or a torchvision state_dict)"
                         " or --random-init")
    return load_model(args.checkpoint, arch=args.arch)


def _models_for_eval(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, dict]], Any]:
    """``{name: (model, info)}`` and the evaluation config: a checkpoint's model under ``model``; with
    ``--random-init`` the three baselines of a pre-training run (``random_init``; ``random_init_bn``, BatchNorm
    statistics re-estimated on ``--train``; ``pixels``, see :func:`semssl.eval.evaluate.baseline_models`)."""
    if not args.random_init:
        model, info, cfg = _load_for_eval(args)
        return {"model": (model, info)}, _eval_config(args, cfg)
    import torch

    from semssl.eval.evaluate import BASELINE_LABELS, baseline_models
    from semssl.models.backbones import BackboneModel, ResNetBackbone

    cfg = _eval_config(args, None)
    arch = args.arch or "resnet50"
    torch.manual_seed(args.seed)
    model = BackboneModel(ResNetBackbone(arch, small_input=args.small_input, width=args.width)).eval()
    network = {"arch": arch, "width": args.width, "small_input": args.small_input}
    common = {"seed": args.seed, "method": None, "default_branch": "online"}
    return {name: (m, {"source": BASELINE_LABELS[name], **(network if name != "pixels" else {}), **common})
            for name, m in baseline_models(model, cfg, args.train).items()}, cfg


def _check_kind(model: Any, kind: str) -> str:
    from semssl.errors import ConfigError

    if kind not in model.feature_kinds:
        raise ConfigError(f"--features {kind}: this model has {list(model.feature_kinds)}")
    return kind


def _features_of(model: Any, args: argparse.Namespace, cfg: Any) -> tuple:
    """(train_x, train_y, test_x, test_y) through ``model.features`` on the chosen branch."""
    from semssl.eval.evaluate import split_features

    return split_features(model, cfg, args.train, args.test, branch=args.branch, kind=args.features,
                          drop_unknown=args.drop_unknown_classes)


def _print_result(title: str, columns: dict[str, dict[str, Any]], out: Optional[str], payload: dict) -> None:
    from semssl.eval.report import print_table

    print_table(title, columns, out, payload)


def _prepare(model: Any, info: dict, args: argparse.Namespace) -> None:
    info["branch"] = model.resolve_branch(args.branch)
    info["features"] = _check_kind(model, args.features)


def _payload(results: dict[str, dict], args: argparse.Namespace, **extra: Any) -> dict:
    """JSON of an evaluation: ``{<protocol>: ..., "model": ...}`` for one model; ``{"random_init": {...},
    "random_init_bn": {...}, "pixels": {...}}`` (each ``{<protocol>: ..., "model": ...}``) for the baselines."""
    body = results["model"] if set(results) == {"model"} else results
    return {**body, "train": args.train, "test": args.test, **extra}


def _title(protocol: str, models: dict[str, tuple[Any, dict]], args: argparse.Namespace) -> str:
    if set(models) == {"model"}:
        return f"{protocol} ({models['model'][1]['source']})"
    small = ", small input" if args.small_input else ""
    return (f"{protocol}: random-init baselines ({args.arch or 'resnet50'}, width {args.width}{small}, "
            f"seed {args.seed})")


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from semssl.eval.knn import knn_evaluate

    models, cfg = _models_for_eval(args)
    results, columns = {}, {}
    for name, (model, info) in models.items():
        _prepare(model, info, args)
        train_x, train_y, test_x, test_y = _features_of(model, args, cfg)
        res = knn_evaluate(train_x, train_y, test_x, test_y, ks=tuple(args.k), temperature=args.temperature)
        results[name] = {"knn": res, "model": info}
        columns[name] = {k: v for k, v in res.items() if k.endswith("_top1") or k.endswith("_top5")}
    _print_result(_title(f"kNN, T={args.temperature}", models, args), columns, args.out,
                  _payload(results, args, size=cfg.data.eval_size))
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from semssl.eval.linear import FastLinearConfig, linear_fast

    models, cfg = _models_for_eval(args)
    results, columns = {}, {}
    for name, (model, info) in models.items():
        _prepare(model, info, args)
        if args.protocol == "fast":
            train_x, train_y, test_x, test_y = _features_of(model, args, cfg)
            res = linear_fast(train_x, train_y, test_x, test_y,
                              config=FastLinearConfig(epochs=args.epochs or 100, seed=args.seed,
                                                      **({"lrs": tuple(args.lrs)} if args.lrs else {})))
        else:
            from semssl.eval.evaluate import linear_standard_on_folders

            res = linear_standard_on_folders(model, args, cfg, branch=args.branch, kind=args.features)
        results[name] = {"linear": res, "model": info}
        columns[name] = {k: v for k, v in res.items() if k in ("linear_top1", "linear_top5", "best_lr", "epochs")}
    _print_result(_title(f"linear probe, {args.protocol} protocol", models, args), columns, args.out,
                  _payload(results, args, size=cfg.data.eval_size))
    return 0


# ------------------------------------------------------------------------------------------------ data
def cmd_data_synth(args: argparse.Namespace) -> int:
    from semssl.data.synthetic import SynthConfig, default_root
    from semssl.data.synthetic.build import generate

    root = Path(args.root) if args.root else default_root()
    cfg = SynthConfig(seed=args.seed, object_size=args.object_size, scene_size=args.scene_size,
                      n_train_objects=args.n_train_objects, n_test_objects=args.n_test_objects,
                      n_train_scenes=args.n_train_scenes, n_test_scenes=args.n_test_scenes,
                      num_classes=args.num_classes, workers=args.workers, class_def=args.class_def)
    summary = generate(root, cfg, splits=tuple(args.splits))
    print(json.dumps(summary, indent=2, default=str))
    print(f"built-in data written to {root}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from semssl.data.sources import build_source

    source = build_source(args.path, on_error="skip")
    bad = source.check()
    print(source.summary())
    for item in bad:
        print(f"  unreadable: {item}")
    return 1 if bad else 0


def cmd_data_proposals(args: argparse.Namespace) -> int:
    from semssl.data.proposals import proposals_command

    code, summary = proposals_command(args.path, workers=args.workers, cache=args.cache, check=args.check,
                                      force=args.force, params=args.param)
    print(json.dumps(summary, indent=2))
    return code


# ------------------------------------------------------------------------------------------------ lists
def cmd_methods(args: argparse.Namespace) -> int:
    from semssl.methods import available_methods

    print("\n".join(available_methods()))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from semssl.config import list_recipes

    print("\n".join(list_recipes()))
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _positive(kind: type, low: float = 1, open_low: bool = False):
    """An argparse type: a number of ``kind`` >= ``low`` (> with ``open_low``), with a clear message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if open_low else '>='} {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _add_eval_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="run folder, semssl .ckpt, or plain torchvision ResNet state_dict (.pth)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate the random-init baselines instead: the random backbone as it is, with BatchNorm "
                        "statistics re-estimated on --train, and raw pixels (centred on --train)")
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"],
                   help="architecture of a plain state_dict / random init (inferred from the keys if omitted)")
    p.add_argument("--small-input", action="store_true", help="random init only: the small-input stem")
    p.add_argument("--width", type=int, default=64,
                   help="random init only: ResNet base width (64 = torchvision's; a checkpoint's is read from it)")
    p.add_argument("--branch", choices=["online", "teacher"],
                   help="which network of a semssl checkpoint (default: the method's: teacher for DINO/SCFS)")
    p.add_argument("--drop-unknown-classes", action="store_true",
                   help="leave out (and count) test images of classes absent from --train instead of failing; "
                        "labels are always matched by class name")
    p.add_argument("--features", default="pooled", metavar="KIND",
                   help="which features of the model (Method.features kind): pooled (default) or a method's own "
                        "vector kind, e.g. fg (SCD's foreground semantics)")
    p.add_argument("--train", required=True, help="labelled image folder used as memory / training split")
    p.add_argument("--test", required=True, help="labelled image folder evaluated")
    p.add_argument("--size", type=_positive(int, 8),
                   help="centre-crop size (default: the run's data.eval_size, else 224)")
    p.add_argument("--resize-ratio", type=_positive(float, 1.0),
                   help="resize shorter side to size*ratio before the crop (256/224)")
    p.add_argument("--batch-size", type=_positive(int), default=256)
    p.add_argument("--workers", type=_positive(int, 0), default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the result as JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semssl", description="Self-supervised visual pre-training with semantically consistent positives.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pretrain", help="pre-train a method (no arguments: the main job on the built-in data)",
                       description="Pre-train a backbone with a self-supervised method, then evaluate it (kNN "
                                   "and fast linear probe) next to the same backbone at random initialisation.",
                       epilog=EPILOG_PRETRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--recipe", help="a recipe: packaged name (see `semssl recipes`) or a YAML path "
                                          "(default: the built-in MoCo-v2 recipe)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoints/last.ckpt")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_pretrain)

    pe = sub.add_parser("eval", help="evaluate a checkpoint (knn, linear)")
    esub = pe.add_subparsers(dest="eval_command", metavar="PROTOCOL", required=True)
    pk = esub.add_parser("knn", help="weighted kNN on pooled features (cosine, T 0.07, k 20 and 200)")
    _add_eval_common(pk)
    pk.add_argument("--k", type=_positive(int), nargs="+", default=[20, 200],
                    help="neighbour counts (first one is knn_top1)")
    pk.add_argument("--temperature", type=_positive(float, 0.0, open_low=True), default=0.07)
    pk.set_defaults(func=cmd_eval_knn)
    pl = esub.add_parser("linear", help="linear probe on the frozen backbone (fast or standard protocol)")
    _add_eval_common(pl)
    pl.add_argument("--protocol", choices=["fast", "standard"], default="fast",
                    help="fast: pre-computed centre-crop features, lr searched on a held-out part; "
                         "standard: frozen backbone with crop+flip augmentation (MoCo: lr 30, steps 60/80)")
    pl.add_argument("--epochs", type=_positive(int), help="epochs (default 100)")
    pl.add_argument("--lrs", type=float, nargs="+", help="fast protocol: the searched learning rates")
    pl.add_argument("--lr", type=float, default=30.0, help="standard protocol: base lr per 256 images")
    pl.add_argument("--schedule", choices=["step", "cosine"], default="step",
                    help="standard protocol: steps at 60%%/80%% of the epochs (MoCo) or cosine (SCFS/DINO)")
    pl.add_argument("--weight-decay", type=float, default=0.0)
    pl.set_defaults(func=cmd_eval_linear)
    from semssl.eval import dense as eval_dense

    pdn = esub.add_parser("dense", help=eval_dense.HELP, description=eval_dense.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_dense.add_arguments(pdn)
    pdn.set_defaults(func=eval_dense.run)
    from semssl.eval import bias as eval_bias
    from semssl.eval import objects as eval_objects

    for name, module in (("objects", eval_objects), ("bias", eval_bias)):
        pscene = esub.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(pscene)
        pscene.set_defaults(func=module.run)

    from semssl.viz import figure_modules

    pv = sub.add_parser("viz", help="draw a figure from a checkpoint (see `semssl viz --help`)")
    vsub = pv.add_subparsers(dest="viz_command", metavar="FIGURE", required=True)
    for name, module in figure_modules().items():
        pfig = vsub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(pfig)
        pfig.set_defaults(func=module.run)

    pd = sub.add_parser("data", help="built-in data and data checks")
    dsub = pd.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ps = dsub.add_parser("synth", help="generate the built-in synthetic dataset (objects + scenes)")
    ps.add_argument("--root", help="output folder (default: $SEMSSL_DATA_DIR or ~/.cache/semssl/synthetic)")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--object-size", type=int, default=64)
    ps.add_argument("--scene-size", type=int, default=128)
    ps.add_argument("--n-train-objects", type=int, default=5000)
    ps.add_argument("--n-test-objects", type=int, default=1000)
    ps.add_argument("--n-train-scenes", type=int, default=1000)
    ps.add_argument("--n-test-scenes", type=int, default=200)
    ps.add_argument("--num-classes", type=int, default=10)
    ps.add_argument("--class-def", choices=["shape", "shape_texture"], default="shape",
                    help="a class is a shape (texture drawn per instance; default) or a (shape, texture) pair "
                         "(generator version 1's classes)")
    ps.add_argument("--workers", type=int, default=2)
    ps.add_argument("--splits", nargs="+", default=["objects", "scenes"], choices=["objects", "scenes"])
    ps.set_defaults(func=cmd_data_synth)
    pc = dsub.add_parser("check", help="decode every image of a folder / list / COCO JSON; report bad files")
    pc.add_argument("path")
    pc.set_defaults(func=cmd_data_check)
    pp = dsub.add_parser("proposals", help="compute / refresh the selective-search proposals cache of a COCO JSON "
                                           "or image folder (SoCo/D3SSL; see semssl.data.proposals)")
    pp.add_argument("path")
    pp.add_argument("--workers", type=int, help="worker processes (default: min(8, CPU count))")
    pp.add_argument("--cache", help="cache file (default: <path>.proposals.json beside the data, or the user cache)")
    pp.add_argument("--check", action="store_true", help="only report whether the cache is up to date (exit 1 if not)")
    pp.add_argument("--force", action="store_true", help="recompute every image")
    pp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a selective-search / filter setting (data.proposal_params), e.g. reference_size=null")
    pp.set_defaults(func=cmd_data_proposals)

    pm = sub.add_parser("methods", help="list the available methods, one per line")
    pm.set_defaults(func=cmd_methods)
    pr = sub.add_parser("recipes", help="list the packaged recipes, one per line")
    pr.set_defaults(func=cmd_recipes)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `semssl` console script."""
    from semssl.errors import ConfigError, SemsslError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"semssl: config error: {err}", file=sys.stderr)
        return 2
    except SemsslError as err:  # data, checkpoint, diverging loss: one clear line, no traceback
        print(f"semssl: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a read-only output folder, a full disk, a file that vanished
        import errno

        what = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        hint = ""
        if err.errno == errno.ENOSPC:
            hint = (" (checkpoints are written to a temporary file and renamed, so the previous checkpoint, if any, "
                    "is intact; free space, then resume with --resume RUN_DIR)")
        elif err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            hint = " (choose a writable folder with trainer.out_dir=... or --out)"
        print(f"semssl: cannot continue: {what}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
