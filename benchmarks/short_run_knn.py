"""Short-budget learning curves: kNN accuracy of a method every 100 steps, next to random init.

The harness used to size the small recipes (docs/results.md, "Sizing the main job"). It trains the method of a
recipe with the engine's own optimisation step (:class:`semssl.bench.MethodStep`: the recipe's optimiser, weight
decay and schedules, EMA of ``momentum_pairs()``), with the peak lr given on the command line (not scaled by the
batch) and a 20-step warm-up, on one thread, and evaluates the method through ``Method.features`` with the kNN
protocol (k 20, T 0.07) on the recipe's evaluation split at step 0 (the three random-init baselines: random init,
random init with BatchNorm statistics re-estimated, centred pixels), every ``--every`` steps and at the end.
Lightning is left out so several variants can run side by side on a small machine.

Numbers in docs/results.md dated before 2026-12-01 came from an earlier hand-written loop (SGD with wd 5e-4 on
every parameter, warm-up as a factor ``min(1, (k+1)/20)`` on the cosine); rerun a command to compare.

    python benchmarks/short_run_knn.py NAME STEPS LR SIZE [KEY=VALUE ...]
    python benchmarks/short_run_knn.py base 400 0.03 48
    python benchmarks/short_run_knn.py gn 400 0.03 48 model.norm=gn model.bn_splits=1 method.proj_batch_norm=true
    python benchmarks/short_run_knn.py gray 400 0.03 48 --aug grayscale_p=1.0      # patch the views' recipe
    python benchmarks/short_run_knn.py base 300 0.03 48 --bn-recal                # + kNN with re-estimated BN

Diagnostics: ``--aug FIELD=VALUE,...`` replaces fields of the photometric recipe of every view (a
:class:`~semssl.data.augment.PhotometricRecipe` field, e.g. ``hue=0.5,grayscale_p=0.5``) for this run only.
``--bn-recal`` also prints kNN after re-estimating the evaluated branch's BatchNorm running statistics on the
evaluation-train images (:func:`semssl.eval.evaluate.reestimate_bn`, as the ``random_init_bn`` baseline) during
training too, which separates "BatchNorm now normalises" from "the features changed".
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from semssl.bench import MethodStep, patch_view_recipes
from semssl.config import load_config
from semssl.engine.data import build_train_dataset, resolve_paths, train_loader
from semssl.eval.data import eval_loader
from semssl.eval.evaluate import baseline_models, evaluate, reestimate_bn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("steps", type=int)
    p.add_argument("lr", type=float, help="peak lr (not scaled by the batch)")
    p.add_argument("size", type=int, help="side of both views and of the evaluation crop")
    p.add_argument("overrides", nargs="*", help="recipe overrides (default recipe = the main job's)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--aug", default="", help="FIELD=VALUE,... replacing fields of the views' photometric recipe")
    p.add_argument("--bn-recal", action="store_true", help="also report kNN with re-estimated BatchNorm statistics")
    args = p.parse_args()

    overrides = [f"data.views.0.size={args.size}", f"data.views.1.size={args.size}",
                 f"data.eval_size={args.size}", "eval.knn_k=[20]", f"optim.lr={args.lr}", "optim.lr_scaling=none",
                 "optim.warmup=20steps", *args.overrides]
    cfg = load_config(args.recipe, overrides)
    if args.aug:
        patch_view_recipes(cfg, args.aug)  # before the loader's workers fork
    torch.manual_seed(0)
    torch.set_num_threads(1)
    paths = resolve_paths(cfg)
    loader = train_loader(build_train_dataset(cfg, paths["train"]), cfg)
    cfg.trainer.max_steps = args.steps
    cfg.trainer.max_epochs = math.ceil(args.steps / len(loader))
    step_fn = MethodStep(cfg, next(iter(loader)), steps_per_epoch=len(loader))  # the engine's own step
    method = step_fn.method
    random_model = copy.deepcopy(method)

    def top1(model: torch.nn.Module) -> str:
        res = evaluate(model, cfg, paths["eval_train"], paths["eval_test"], linear=False)
        return f"{float(res['knn_top1']):.1f}"

    def knn(model: torch.nn.Module) -> str:
        text = top1(model)
        if args.bn_recal:
            text += f" (BN re-estimated {top1(reestimate_bn(model, eval_loader(paths['eval_train'], cfg)))})"
        return text

    baselines = {name: top1(m) for name, m in baseline_models(random_model, cfg, paths["eval_train"]).items()}
    print(f"{args.name} step 0: " + " ".join(f"{name} {value}" for name, value in baselines.items()), flush=True)
    epoch, start, out = 0, time.time(), {}
    while step_fn.step < args.steps:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            out = step_fn.run(batch)
            step = step_fn.step
            if step % args.every == 0 and step < args.steps:
                print(f"{args.name} {step} loss {out['loss'].item():.3f} knn {knn(method)}", flush=True)
            if step >= args.steps:
                break
    print(f"{args.name}: steps {args.steps} lr {args.lr} size {args.size} {args.overrides} "
          f"loss {out['loss'].item():.3f} knn {knn(method)} "
          f"train_s {time.time() - start:.0f}", flush=True)


if __name__ == "__main__":
    main()
