"""The ``semssl`` command line: ``pretrain | eval | viz | report | reproduce | data | methods | recipes | finetune |
transfer | export`` (the transfer commands' options live in :mod:`semssl.cli_transfer`).

Every sub-command prints a short human-readable result and, where it measures something, writes JSON.

Decision: building the parser imports no torch, torchvision, lightning, matplotlib, timm, cv2, pycocotools or PIL
(``semssl --help``, ``semssl methods`` and ``semssl recipes`` answer at once): the options of the heavy commands
live in light modules (:mod:`semssl.eval.options`, :mod:`semssl.viz.options`, :mod:`semssl.cli_transfer`), their
descriptions are their modules' docstrings read from the source (:func:`semssl.cli_transfer.module_doc`), and
each command imports its protocol when it runs (tests/test_cli_quick.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional

from semssl.cli_transfer import module_doc

EPILOG_PRETRAIN = """\
examples:
  semssl pretrain                                   # the main job: built-in data, a few minutes on a CPU
  semssl pretrain -c mocov2_resnet50_8x32-200e_imagenet data.train=/data/imagenet/train \\
        data.eval_train=/data/imagenet/train data.eval_test=/data/imagenet/val
  semssl pretrain optim.lr=0.06 data.batch_size=32 trainer.max_epochs=20
  semssl pretrain --resume runs/mocov2_resnet18-w16_1x128-800it_synthetic-20261202-101500

overrides are dotted keys of the config tree (see the recipes in configs/); list items by index:
  data.views.0.size=96   trainer.devices=8 trainer.num_nodes=4 trainer.strategy=ddp
every key with its current value: semssl pretrain --print-config [-c RECIPE]
sections: method (name + the method's own keys), data (sources, views, batch size per device), model
(backbone), optim (optimiser, lr per 256 images, schedules), trainer (length, devices, precision, logging,
checkpoints), eval (kNN / linear probe after training)
"""


def _setup_logging(verbose: bool) -> None:
    """The terminal: warnings, and semssl's INFO lines (one per phase of a command); ``-v`` adds semssl's details
    (DEBUG: the fast linear probe's lr search, ...) and the other libraries' INFO lines. semssl's loggers pass
    every record on, so a run's ``logs/semssl.log`` has the details too (:func:`semssl.engine.run.open_run_log`)."""
    from rich.logging import RichHandler

    terminal = RichHandler(show_path=False, rich_tracebacks=False, level=logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", handlers=[terminal])
    logging.getLogger("semssl").setLevel(logging.DEBUG)
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


def _models_for_eval(args: argparse.Namespace) -> tuple[dict[str, tuple[Any, dict]], Any]:
    """``{name: (model, info)}`` and the evaluation config: a checkpoint's model under ``model``; with
    ``--random-init`` the three baselines of a pre-training run (``random_init``; ``random_init_bn``, BatchNorm
    statistics re-estimated on ``--train``; ``pixels``, see :func:`semssl.eval.evaluate.baseline_models`)."""
    from semssl.eval.evaluate import baseline_models
    from semssl.eval.report import models_for_eval

    fresh = _eval_config(args, None) if args.random_init else None
    models, cfg = models_for_eval(args, lambda random_model: baseline_models(random_model, fresh, args.train))
    return models, fresh if args.random_init else _eval_config(args, cfg)


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


def _title(protocol: str, models: dict[str, tuple[Any, dict]], args: argparse.Namespace) -> str:
    if set(models) == {"model"}:
        return f"{protocol} ({models['model'][1]['source']})"
    small = ", small input" if args.small_input else ""
    return (f"{protocol}: random-init baselines ({args.arch or 'resnet50'}, width {args.width}{small}, "
            f"seed {args.seed})")


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from semssl.eval.knn import knn_evaluate
    from semssl.eval.report import payload_of

    models, cfg = _models_for_eval(args)
    results, columns = {}, {}
    for name, (model, info) in models.items():
        _prepare(model, info, args)
        train_x, train_y, test_x, test_y = _features_of(model, args, cfg)
        res = knn_evaluate(train_x, train_y, test_x, test_y, ks=tuple(args.k), temperature=args.temperature)
        results[name] = {"knn": res, "model": info}
        columns[name] = {k: v for k, v in res.items() if k.endswith("_top1") or k.endswith("_top5")}
    _print_result(_title(f"kNN, T={args.temperature}", models, args), columns, args.out,
                  payload_of(results, train=args.train, test=args.test, size=cfg.data.eval_size))
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from semssl.eval.linear import FastLinearConfig, linear_fast
    from semssl.eval.report import payload_of

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
                  payload_of(results, train=args.train, test=args.test, size=cfg.data.eval_size))
    return 0


def cmd_eval_dense(args: argparse.Namespace) -> int:
    """``semssl eval dense``: the work is :func:`semssl.eval.dense.run`."""
    from semssl.eval.dense import run

    return run(args)


def cmd_eval_objects(args: argparse.Namespace) -> int:
    """``semssl eval objects``: the work is :func:`semssl.eval.objects.run`."""
    from semssl.eval.objects import run

    return run(args)


def cmd_eval_bias(args: argparse.Namespace) -> int:
    """``semssl eval bias``: measure (semssl.eval.bias), then draw ``--plot`` / ``--examples`` (semssl.viz.bias)."""
    from semssl.eval.bias import measure

    res = measure(args)
    if args.plot or args.examples:
        from semssl.viz.bias import curves_from_payload, plot_bias, plot_canvases

        if args.plot:
            print(f"wrote {plot_bias(curves_from_payload(res['payload'], res['label']), args.plot, res['title'])}")
        if args.examples:
            print(f"wrote {plot_canvases(res['prepared'], args.examples)}")
    return 0


# ------------------------------------------------------------------------------------------------ viz
def cmd_viz(args: argparse.Namespace) -> int:
    """``semssl viz NAME``: the work is ``semssl.viz.NAME.run`` (imported now: figures load torch, matplotlib)."""
    import importlib

    return importlib.import_module(f"semssl.viz.{args.viz_command}").run(args)


# ------------------------------------------------------------------------------------------------ data
def cmd_data_synth(args: argparse.Namespace) -> int:
    from semssl.data.synthetic import SynthConfig, default_root
    from semssl.data.synthetic.build import generate

    root = Path(args.root) if args.root else default_root()
    cfg = SynthConfig(seed=args.seed, object_size=args.object_size, scene_size=args.scene_size,
                      n_train_objects=args.n_train_objects, n_test_objects=args.n_test_objects,
                      n_train_scenes=args.n_train_scenes, n_test_scenes=args.n_test_scenes,
                      num_classes=args.num_classes, workers=args.workers, class_def=args.class_def,
                      style=args.style)
    summary = generate(root, cfg, splits=tuple(args.splits))
    print(json.dumps(summary, indent=2, default=str))
    print(f"built-in data written to {root}")
    return 0


def cmd_data_get(args: argparse.Namespace) -> int:
    """``semssl data get NAME``: the work is :func:`semssl.data.get.get_dataset`."""
    from semssl.data.get import get_dataset

    summary = get_dataset(args.name, root=Path(args.root) if args.root else None, sources=args.sources,
                          force=args.force, options={"format": args.format})
    print(json.dumps(summary, indent=2, default=str))
    print(f"{args.name}: {summary['path']}")
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
    """Compute / refresh (or with ``--check`` only inspect: exit 1 when stale) the proposals cache of a COCO JSON,
    an image folder or a file list, listing the images exactly as the sources do (so it is the cache a source
    reads)."""
    from semssl.data.proposals import check_proposals, ensure_proposals, parse_params
    from semssl.data.sources import (
        CocoSource,
        FileListSource,
        ImageFolderSource,
        build_source,
    )
    from semssl.errors import DataError

    source = build_source(args.path)
    if isinstance(source, CocoSource):
        paths, base_dir, location = list(source.paths), source.images_dir, source.annotation_json
    elif isinstance(source, ImageFolderSource):
        paths, base_dir, location = list(source.paths), source.root, source.root
    elif isinstance(source, FileListSource):
        paths, base_dir, location = list(source.paths), source.root, source.list_file
    else:
        raise DataError(f"proposals are cached for COCO annotation files, image folders and file lists, not for "
                        f"'{args.path}' ({type(source).__name__})")
    settings = parse_params(args.param)
    if args.check:
        state = check_proposals(paths, base_dir, location, settings, cache_path=args.cache)
        code, summary = (0 if state.fresh else 1), {"cache": str(state.path), "images": state.n_files,
                                                    "fresh": state.fresh, "status": state.describe()}
    else:
        code, (_, summary) = 0, ensure_proposals(paths, base_dir, location, settings, cache_path=args.cache,
                                                 workers=args.workers, force=args.force)
    print(json.dumps(summary, indent=2))
    return code


# ------------------------------------------------------------------------------------------------ report
def cmd_report(args: argparse.Namespace) -> int:
    """``semssl report RUN [RUN ...]``: the work is :func:`semssl.viz.report.write_report`."""
    from semssl.viz.report import write_report

    out = write_report([Path(run) for run in args.runs], Path(args.out), images=args.images, draw=not args.no_draw)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------ reproduce
EPILOG_REPRODUCE = """\
tables: {tables}
examples:
  semssl reproduce d3ssl table7 --dry-run                 # the runs, their state and estimated time
  semssl reproduce d3ssl table7 --seeds 0,1,2             # run what is missing, then print the table
  semssl reproduce dsc table4 --seeds 0 --detect          # with the detection AP columns (slow here)
  semssl reproduce scfs table7 --scale paper              # the exact commands for a GPU cluster
  semssl reproduce scfs table8 --seeds 0 --set trainer.max_steps=500   # a shorter budget for every row
"""


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``semssl reproduce PAPER TABLE``: the work is :func:`semssl.reproduce.reproduce`."""
    from semssl.reproduce import reproduce

    return reproduce(args.paper, args.table, seeds=args.seeds, out=args.out, scale=args.scale, dry=args.dry_run,
                     detect=args.detect, extra=args.set)


# ------------------------------------------------------------------------------------------------ lists
_REGISTERED = re.compile(r"""^@register\(\s*["']([^"']+)["']\s*\)""", re.MULTILINE)


def method_names() -> list[str]:
    """What ``semssl methods`` lists: the names the method files register (``@register("name")``), read from their
    source, since importing the registry (:func:`semssl.methods.available_methods`) loads torch; the registry itself
    where there is no source. tests/test_cli_quick.py checks that the two agree."""
    files = sorted((Path(__file__).parent / "methods").glob("*.py"))
    if not files:
        from semssl.methods import available_methods

        return available_methods()
    return sorted({name for path in files if not path.name.startswith("_")
                   for name in _REGISTERED.findall(path.read_text(encoding="utf-8"))})


#: the packaged recipes' folder, :data:`semssl.config.PACKAGE_CONFIGS` (the config imports the method registry,
#: hence torch; tests/test_cli_quick.py keeps the two equal)
RECIPE_FOLDER = Path(__file__).parent / "configs"


def recipe_names() -> list[str]:
    """What ``semssl recipes`` lists: the packaged recipes, as :func:`semssl.config.list_recipes` lists them."""
    return sorted(p.stem for p in RECIPE_FOLDER.glob("*.yaml"))


def cmd_methods(args: argparse.Namespace) -> int:
    print("\n".join(method_names()))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    print("\n".join(recipe_names()))
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
    from semssl.eval.report import add_model_options

    add_model_options(p, "evaluate the random-init baselines instead: the random backbone as it is, with BatchNorm "
                         "statistics re-estimated on --train, and raw pixels (centred on --train)")
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
    p.add_argument("--batch-size", type=_positive(int), default=256,
                   help="images per feature-extraction batch (default 256)")
    p.add_argument("--workers", type=_positive(int, 0), default=2, help="data-loading worker processes (default 2)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the --random-init backbones and of the linear probe's training (default 0)")
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
    pk.add_argument("--temperature", type=_positive(float, 0.0, open_low=True), default=0.07,
                    help="temperature T of the neighbour weights exp(cos / T) (default 0.07)")
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
    pl.add_argument("--weight-decay", type=float, default=0.0,
                    help="standard protocol: weight decay of the linear head (default 0)")
    pl.set_defaults(func=cmd_eval_linear)
    from semssl.eval import options as eval_options

    protocols = {"dense": (eval_options.HELP_DENSE, eval_options.add_dense_arguments, cmd_eval_dense),
                 "objects": (eval_options.HELP_OBJECTS, eval_options.add_objects_arguments, cmd_eval_objects),
                 "bias": (eval_options.HELP_BIAS, eval_options.add_bias_arguments, cmd_eval_bias)}
    for name, (help_text, add_arguments, func) in protocols.items():  # described by semssl.eval.<name>'s docstring
        peval = esub.add_parser(name, help=help_text, description=module_doc(f"semssl.eval.{name}"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(peval)
        peval.set_defaults(func=func)

    from semssl.viz.options import FIGURES

    pv = sub.add_parser("viz", help="draw a figure from a checkpoint (see `semssl viz --help`)")
    vsub = pv.add_subparsers(dest="viz_command", metavar="FIGURE", required=True)
    for name, (help_text, add_arguments) in FIGURES.items():
        pfig = vsub.add_parser(name, help=help_text, description=help_text)
        add_arguments(pfig)
        pfig.set_defaults(func=cmd_viz)

    pd = sub.add_parser("data", help="built-in data, the recipes' datasets (get) and data checks")
    dsub = pd.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ps = dsub.add_parser("synth", help="generate the built-in synthetic dataset (objects + scenes)")
    ps.add_argument("--root", help="output folder (default: <data root>/synthetic, the data root being "
                                   "$SEMSSL_DATA_DIR or ~/.cache/semssl)")
    ps.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ps.add_argument("--object-size", type=int, default=64, help="side of an object image in pixels (default 64)")
    ps.add_argument("--scene-size", type=int, default=128, help="side of a scene image in pixels (default 128)")
    ps.add_argument("--n-train-objects", type=int, default=5000, help="object images in the train split")
    ps.add_argument("--n-test-objects", type=int, default=1000, help="object images in the test split")
    ps.add_argument("--n-train-scenes", type=int, default=1000, help="scene images in the train split")
    ps.add_argument("--n-test-scenes", type=int, default=200, help="scene images in the test split")
    ps.add_argument("--num-classes", type=int, default=10, help="object classes (default 10)")
    ps.add_argument("--class-def", choices=["shape", "shape_texture"], default="shape",
                    help="a class is a shape (texture drawn per instance; default) or a (shape, texture) pair "
                         "(generator version 1's classes)")
    ps.add_argument("--style", choices=["plain", "cluttered"], default="plain",
                    help="plain: flat backgrounds, solid objects, no distractors (version 3; default); cluttered: "
                         "version 2's gradients, clutter, textures and distractors")
    ps.add_argument("--workers", type=int, default=2, help="worker processes drawing the images (default 2)")
    ps.add_argument("--splits", nargs="+", default=["objects", "scenes"], choices=["objects", "scenes"],
                    help="which parts to generate (default both)")
    ps.set_defaults(func=cmd_data_synth)
    from semssl.data.root import GETTABLE

    pg = dsub.add_parser("get", help="download (or take --from a local copy), verify and lay out a dataset the "
                                     "recipes use, under the data root ($SEMSSL_DATA_DIR or ~/.cache/semssl)",
                         description="Write the dataset NAME into <data root>/NAME, the layout the recipes read "
                                     "($SEMSSL_DATA_DIR/NAME/...), from its public source: download with a "
                                     "progress bar and checksum check, or --from a local archive or folder. "
                                     "Sources, checksums and conversions: semssl.data.get.")
    pg.add_argument("name", choices=GETTABLE, metavar="NAME", help=f"one of: {', '.join(GETTABLE)}")
    pg.add_argument("--from", dest="sources", action="append", default=[], metavar="PATH",
                    help="a local copy instead of the download: the published archive or file (verified), or a "
                         "folder holding it extracted; repeat for a dataset built from several files")
    pg.add_argument("--root", help="the data root to write into (default: $SEMSSL_DATA_DIR or ~/.cache/semssl)")
    pg.add_argument("--force", action="store_true", help="write the dataset again when it is already there")
    pg.add_argument("--format", choices=["jpg", "png"],
                    help="cifar10 / cifar10-6k image files (default: png for cifar10; jpg, quality 75, for "
                         "cifar10-6k, the format of the copy the docs were measured on)")
    pg.set_defaults(func=cmd_data_get)
    pc = dsub.add_parser("check", help="decode every image of a folder / list / COCO JSON; report bad files")
    pc.add_argument("path", help="an image folder, a file list or a COCO annotation JSON")
    pc.set_defaults(func=cmd_data_check)
    pp = dsub.add_parser("proposals", help="compute / refresh the selective-search proposals cache of a COCO "
                                           "JSON, image folder or file list (SoCo/D3SSL; see semssl.data.proposals)")
    pp.add_argument("path", help="a COCO annotation JSON, an image folder or a file list")
    pp.add_argument("--workers", type=int, help="worker processes (default: min(8, CPU count))")
    pp.add_argument("--cache", help="cache file (default: <path>.proposals.json beside the data, or the user cache)")
    pp.add_argument("--check", action="store_true", help="only report whether the cache is up to date (exit 1 if not)")
    pp.add_argument("--force", action="store_true", help="recompute every image")
    pp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a selective-search / filter setting (data.proposal_params), e.g. reference_size=null")
    pp.set_defaults(func=cmd_data_proposals)

    prep = sub.add_parser("report", help="one self-contained HTML page of one or more runs: config, curves, "
                                         "collapse monitors, evaluation, figures, machine",
                          description="Write one HTML page (plots embedded, no server, opens from disk) of the run "
                                      "folders: the resolved config and its differences from the recipe, the loss, "
                                      "lr, EMA and teacher-temperature curves, online kNN, the collapse monitors "
                                      "(embedding std, teacher entropy, RankMe), the evaluation against every "
                                      "baseline, the method's figures, wall time, machine and package versions. "
                                      "Several runs are shown side by side, their curves overlaid.")
    prep.add_argument("runs", nargs="+", metavar="RUN", help="run folders (what semssl pretrain printed)")
    prep.add_argument("-o", "--out", default="report.html", help="HTML file to write (default report.html)")
    prep.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                      help="images the method's figures are drawn on (default: the first run's evaluation test "
                           "split, 6 images spread over it)")
    prep.add_argument("--no-draw", action="store_true",
                      help="draw no figure from the checkpoints; embed only those the runs drew during training")
    prep.set_defaults(func=cmd_report)

    from semssl.reproduce_tables import TABLES

    prd = sub.add_parser("reproduce", help="one ablation table of a paper at small scale: every row, every seed, "
                                           "then the table beside the paper's",
                         description=(module_doc("semssl.reproduce") or "").split("\n\n")[0]
                         + " Runs what is missing (resumes), shows progress and an ETA, prints each column's rows "
                           "beside the paper's numbers with the sign of every difference (docs/reproduction.md).",
                         epilog=EPILOG_REPRODUCE.format(tables=", ".join(f"{p} {t}" for p, t in TABLES)),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    prd.add_argument("paper", choices=sorted({p for p, _ in TABLES}), help="scfs | scd | dsc | d3ssl")
    prd.add_argument("table", help="the paper's table: " + "; ".join(
        f"{p}: {'|'.join(t for q, t in TABLES if q == p)}" for p in sorted({p for p, _ in TABLES})))
    prd.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of every row (default 0,1,2)")
    prd.add_argument("--out", default="runs/reproduce",
                     help="folder of the tables' runs, <out>/<paper>-<table>/<row>-s<seed> (default runs/reproduce)")
    prd.add_argument("--scale", choices=["small", "paper"], default="small",
                     help="small: run here (default); paper: print the commands for a GPU cluster, run nothing")
    prd.add_argument("--dry-run", action="store_true",
                     help="list the runs, their state and estimated time; run nothing")
    prd.add_argument("--detect", action="store_true",
                     help="also run the detection transfer (semssl transfer detect) for the AP columns (slow here)")
    prd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an override added to every row's pre-training (e.g. trainer.max_steps=500); repeatable")
    prd.set_defaults(func=cmd_reproduce)

    pm = sub.add_parser("methods", help="list the available methods, one per line")
    pm.set_defaults(func=cmd_methods)
    pr = sub.add_parser("recipes", help="list the packaged recipes, one per line")
    pr.set_defaults(func=cmd_recipes)

    from semssl.cli_transfer import add_commands

    add_commands(sub, _positive)  # finetune, transfer segment|detect, export
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `semssl` console script."""
    from semssl.errors import ConfigError, RunPreempted, SemsslError

    from semssl.data.root import expand

    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in vars(args).items():  # '$SEMSSL_DATA_DIR/...' in any path option: the data root
        if isinstance(value, str):
            setattr(args, key, expand(value))
        elif isinstance(value, list):
            setattr(args, key, [expand(v) if isinstance(v, str) else v for v in value])
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except RunPreempted as stop:  # SIGTERM / SIGUSR1: the step's checkpoint is written (engine/preempt.py)
        if stop.message:
            print(stop.message, file=sys.stderr)
        return 0
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
