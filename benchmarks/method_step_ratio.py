"""Step time of several methods as ratios to the first one, measured in the same process, interleaved.

The paper-style comparison of one method with its base (SCD's Table 9: SCD-MoCo / MoCo-v2, SCD-BYOL (asym) /
BYOL (sym)): each recipe's engine step (``semssl.bench.MethodStep``) with the same backbone, batch and view size,
timed in rounds (A B C A B C ...) after a warm-up, next to the ratio of their whole-step FLOPs, and each one's
ratio to a supervised step on the same batch (as ``step_time.py``).

    .venv/bin/python benchmarks/method_step_ratio.py --recipes mocov2_resnet18_1x64-400it_synthetic \\
        scd_mocov2_resnet18_1x64-400it_synthetic --size 96 --batch 32
    .venv/bin/python benchmarks/method_step_ratio.py --recipes byol_resnet18_1x64-400it_synthetic \\
        scd_byol_resnet18_1x64-400it_synthetic byol-asym_resnet18_1x64-400it_synthetic --size 96 --batch 32

Every recipe gets ``model.arch``, ``data.batch_size`` and its view sizes from the options (the first view
``--size``, the others scaled by their size ratio to it in the recipe, so DINO's local crops stay smaller;
everything else is its own); the batch must divide each recipe's ``model.bn_splits``. Random normalised images
(the cost does not depend on pixel values). ``KEY=VALUE`` overrides apply to every recipe. The last column,
(time / FLOPs) against the supervised step, is 1 when a method runs its FLOPs as fast as a supervised step does.

    .venv/bin/python benchmarks/method_step_ratio.py --recipes dino_resnet18_1x64-200it_synthetic \\
        scfs_resnet18_1x64-200it_synthetic --size 96 --batch 32      # 2 x 96 px + 6 x 48 px crops

ViTs (``--arch vit_small``): the supervised step is the ViT's CLS token into a linear classifier; view sides must
stay whole patches, so give them explicitly (the local view's scaled side is rarely a multiple of 16; overrides go
before ``--recipes``, which takes every word after it):

    .venv/bin/python benchmarks/method_step_ratio.py --arch vit_small --size 96 --batch 16 data.views.1.size=32 \\
        --recipes dino_vit-s16_8x32-200e_imagenet scfs_vit-s16_8x32-200e_imagenet

A recipe may carry its own overrides after ``@`` (``RECIPE@KEY=VALUE@KEY=VALUE``), so variants of one recipe
compare in one run; ``--data`` feeds each recipe one real batch of its own training data (with geometry and
boxes/proposals), which region methods (SoCo, D3SSL) need:

    .venv/bin/python benchmarks/method_step_ratio.py --recipes mocov2_resnet18_1x32-600it_scenes \\
        densecl_resnet18_1x32-600it_scenes dsc_resnet18_1x32-600it_scenes@method.semantic=kmeans --size 128
    .venv/bin/python benchmarks/method_step_ratio.py --data --recipes soco_resnet18_1x32-300it_scenes \\
        d3ssl_resnet18_1x32-300it_scenes --size 128

Variants of one small recipe at its own resolution (below 96 px) need ``--allow-small``, e.g. the channels-last
memory format on a 32 px CIFAR recipe:

    .venv/bin/python benchmarks/method_step_ratio.py --allow-small --size 32 --batch 128 --threads 2 --recipes \\
        scd_byol_resnet18-w16_1x128-1800it_cifar10-6k scd_byol_resnet18-w16_1x128-1800it_cifar10-6k@model.channels_last=true
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from semssl.bench import (
    BenchError,
    MethodStep,
    SupervisedStep,
    count_flops,
    data_batch,
    environment,
    markdown_table,
    random_views,
    script_main,
    summarize,
    time_interleaved,
)

MIN_SIZE = 96


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", required=True, help="recipes; ratios are to the first one")
    p.add_argument("--arch", default="resnet18",
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96,
                   help=f"resolution of the first view in px, >= {MIN_SIZE} (default 96); other views keep their "
                        f"size ratio to it")
    p.add_argument("--allow-small", action="store_true",
                   help=f"allow --size below {MIN_SIZE} px: for variants of the small recipes at their own resolution "
                        f"(e.g. model.channels_last on the 32 px CIFAR recipes); the paper-style comparison of a "
                        f"method with its base is read at >= {MIN_SIZE} px")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", action="store_true",
                   help="one real batch of each recipe's training data (with geometry and boxes) instead of random "
                        "images; needed by methods that read more than the images (SoCo, D3SSL)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every recipe")
    return p.parse_args(argv)


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``RECIPE@KEY=VALUE@...`` -> (RECIPE, [KEY=VALUE, ...])."""
    recipe, *own = spec.split("@")
    if "=" in recipe:
        raise BenchError(f"--recipes: '{spec}' is an override, not a recipe: --recipes takes every word after it, "
                         f"so give KEY=VALUE overrides before --recipes")
    bad = [o for o in own if "=" not in o]
    if not recipe or bad:
        raise BenchError(f"--recipes: '{spec}' is not RECIPE or RECIPE@KEY=VALUE@...")
    return recipe, own


def build(spec: str, args: argparse.Namespace) -> Any:
    from semssl.config import load_config

    recipe, own = split_spec(spec)
    overrides = [*args.overrides, *own]
    base = load_config(recipe, overrides)
    # the first view gets --size; the others keep their ratio to it (DINO / SCFS local crops stay smaller)
    first = base.data.views[0].size
    sizes = [f"data.views.{i}.size={max(1, round(args.size * v.size / first))}"
             for i, v in enumerate(base.data.views)]
    cfg = load_config(recipe, [f"model.arch={args.arch}", f"data.batch_size={args.batch}", *sizes, *overrides])
    if cfg.model.bn_splits > 1 and args.batch % cfg.model.bn_splits:
        raise BenchError(f"--batch {args.batch} is not divisible by model.bn_splits={cfg.model.bn_splits} of "
                         f"{spec}")
    return cfg


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.size < MIN_SIZE and not args.allow_small:
        raise BenchError(f"--size {args.size}: use >= {MIN_SIZE} px (or --allow-small for a small recipe's variants)")
    torch.set_num_threads(args.threads)
    steps: dict[str, Any] = {}
    for recipe in args.recipes:
        cfg = build(recipe, args)
        batch = data_batch(cfg, args.batch) if args.data else {"views": random_views(cfg, args.batch, seed=args.seed)}
        if not steps:
            first = batch["views"][cfg.data.views[0].name][: args.batch]
            steps["supervised"] = SupervisedStep(first, arch=args.arch, seed=args.seed,
                                                 small_input=cfg.model.small_input, width=cfg.model.width,
                                                 patch_size=cfg.model.patch_size, img_size=cfg.model.img_size)
        if recipe in steps:
            raise BenchError(f"--recipes: '{recipe}' is given twice")
        torch.manual_seed(args.seed)
        steps[recipe] = MethodStep(cfg, batch)
    flops = {k: count_flops(s).total for k, s in steps.items()}
    times = time_interleaved(steps, args.steps, args.warmup)
    med = {k: summarize(v)["median"] for k, v in times.items()}
    ref = args.recipes[0]
    rows = {k: {"median_ms": round(1000 * med[k], 1), "gflops": round(flops[k] / 1e9, 3),
                "time_ratio": round(med[k] / med[ref], 3),
                "flop_ratio": round(flops[k] / flops[ref], 3),
                "time_ratio_to_supervised": round(med[k] / med["supervised"], 3),
                "flop_ratio_to_supervised": round(flops[k] / flops["supervised"], 3)} for k in args.recipes}
    return {"reference": ref, "arch": args.arch, "batch": args.batch, "size": args.size, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "overrides": list(args.overrides), "rows": rows,
            "raw_times_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "environment": environment()}


def report(res: dict[str, Any]) -> str:
    head = f"{res['arch']}, batch {res['batch']}, {res['size']} px, {res['steps']} interleaved steps; ratios to " \
           f"{res['reference']}"
    table = markdown_table(
        ["recipe", "median ms", "GFLOPs", "time ratio", "FLOP ratio", "time / supervised", "FLOPs / supervised",
         "(time / FLOPs) vs supervised"],
        [[k, r["median_ms"], r["gflops"], r["time_ratio"], r["flop_ratio"], r["time_ratio_to_supervised"],
          r["flop_ratio_to_supervised"], round(r["time_ratio_to_supervised"] / r["flop_ratio_to_supervised"], 3)]
         for k, r in res["rows"].items()])
    return f"{head}\n\n{table}"


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("method_step_ratio", parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
