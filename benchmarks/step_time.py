"""Step time of a pre-training method as a ratio to a supervised step, next to the ratio of whole-step FLOPs.

Both steps use the same backbone, batch size and resolution; they are measured in the same process, interleaved
(supervised, method, supervised, method, ...) after a warm-up, so the load of other processes on a shared
machine hits both alike. The method is built from a recipe (default: the main job's, MoCo-v2) with the backbone,
batch and view sizes overridden; everything else (queue size, bn_splits, head widths, optimiser) is the recipe's.

    .venv/bin/python benchmarks/step_time.py                       # ResNet-18, batch 32, 96 px, 1 thread
    .venv/bin/python benchmarks/step_time.py --arch resnet50 --size 128 --out step_time_r50.json
    .venv/bin/python benchmarks/step_time.py --profile 3           # also profile where the time goes

What is compared (one optimisation step each):
  supervised  ResNetBackbone + Linear(dim, --num-classes), cross-entropy, SGD (momentum 0.9, wd 1e-4), one view.
  method      what the engine does per iteration without Lightning (semssl.bench.MethodStep): schedules,
              method.training_step, backward, optimiser step, EMA update of momentum_pairs().
Both get the same batch: random normalised images by default, or (--data) one real batch of the recipe's data.
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one whole step of each: convolutions and
matrix products, forward and backward, including the heads, the queue matmul, the loss and the key encoder's
forward. Elementwise work (BatchNorm, ReLU, the optimiser, the EMA update) counts 0 on both sides; the EMA update
is ~2 FLOPs per parameter (22 M for ResNet-18), under 0.1 % of a step.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from semssl.bench import (
    BenchError,
    FlopCount,
    MethodStep,
    SupervisedStep,
    count_flops,
    data_batch,
    environment,
    markdown_table,
    profile_steps,
    random_views,
    script_main,
    summarize,
    time_interleaved,
)

MIN_SIZE = 96
TARGET_TOLERANCE = 0.10  # time_ratio / flop_ratio within 10 % of 1.0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe of the method (default: the main job's, MoCo-v2)")
    p.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--size", type=int, default=96, help=f"view resolution in px, >= {MIN_SIZE} (default 96)")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the supervised head (default 1000)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps of each with torch.profiler and print where the time goes")
    p.add_argument("--data", action="store_true",
                   help="use one real batch of the recipe's training data (with geometry / boxes) instead of random "
                        "images; needed by methods that read more than the images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra recipe overrides")
    return p.parse_args(argv)


def method_overrides(cfg_views: list[Any], args: argparse.Namespace) -> list[str]:
    """Backbone, batch and every view's size set to the benchmark's; user overrides applied last."""
    out = [f"model.arch={args.arch}", f"data.batch_size={args.batch}"]
    out += [f"data.views.{i}.size={args.size}" for i in range(len(cfg_views))]
    return out + list(args.overrides)


def build_config(args: argparse.Namespace) -> Any:
    from semssl.config import load_config

    if args.size < MIN_SIZE:
        raise BenchError(f"--size {args.size}: use >= {MIN_SIZE} px. Below that ResNet's last stage is 2x2 or "
                         f"smaller and per-op overheads, not the method's work, dominate the step")
    base = load_config(args.recipe, list(args.overrides))
    # the config check rejects a --batch that model.bn_splits does not divide (data.batch_size = --batch)
    return load_config(args.recipe, method_overrides(base.data.views, args))


def flop_row(count: FlopCount) -> dict[str, Any]:
    return {"gflops": round(count.gflops, 3), "by_op_gflops": {k: round(v / 1e9, 4) for k, v in count.by_op.items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    batch = data_batch(cfg, args.batch) if args.data else {"views": random_views(cfg, args.batch, seed=args.seed)}
    first_view = cfg.data.views[0].name
    supervised = SupervisedStep(batch["views"][first_view][: args.batch], arch=args.arch,
                                num_classes=args.num_classes, small_input=cfg.model.small_input, seed=args.seed,
                                channels_last=cfg.model.channels_last, width=cfg.model.width)
    method = MethodStep(cfg, batch)
    name = cfg.method.name
    steps = {"supervised": supervised, name: method}

    flops = {k: count_flops(step) for k, step in steps.items()}  # also a first warm-up call of each
    times = time_interleaved(steps, args.steps, args.warmup)
    stats = {k: summarize(v) for k, v in times.items()}

    time_ratio = stats[name]["median"] / stats["supervised"]["median"]
    flop_ratio = flops[name].total / flops["supervised"].total
    result: dict[str, Any] = {
        "method": name, "recipe": cfg.name, "arch": args.arch, "batch": args.batch, "size": args.size,
        "views": {v.name: {"size": v.size, "n_crops": v.n_crops} for v in cfg.data.views},
        "queue_size": getattr(cfg.method, "queue_size", None), "bn_splits": cfg.model.bn_splits,
        "num_classes_supervised": args.num_classes, "batch_source": "data" if args.data else "random",
        "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "overrides": list(args.overrides),
        "time_s": {k: {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in s.items()}
                   for k, s in stats.items()},
        "raw_times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "flops": {k: flop_row(c) for k, c in flops.items()},
        "time_ratio": round(time_ratio, 3), "flop_ratio": round(flop_ratio, 3),
        "time_over_flop_ratio": round(time_ratio / flop_ratio, 3),
        "within_target": abs(time_ratio / flop_ratio - 1) <= TARGET_TOLERANCE,
        "environment": environment(),
    }
    if args.profile > 0:
        result["profile"] = profile_compare(steps, args.profile)
    return result


def profile_compare(steps: dict[str, Any], n_steps: int, top: int = 15) -> dict[str, Any]:
    """Self CPU ms per step of each op for each step, and the ops where the method spends the most extra."""
    per_op: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        table, per_step = profile_steps(step, n_steps=n_steps)
        print(f"\n### torch.profiler: {name} ({n_steps} steps, self CPU time)\n{table}")
        per_op[name] = per_step
    ref, other = list(per_op)
    ops = set(per_op[ref]) | set(per_op[other])
    diff = sorted(((op, per_op[other].get(op, 0.0), per_op[ref].get(op, 0.0)) for op in ops),
                  key=lambda r: r[1] - r[2], reverse=True)[:top]
    rows = [(op, f"{m:.1f}", f"{s:.1f}", f"{m - s:+.1f}") for op, m, s in diff]
    print(f"\n### ops with the most extra self CPU time per step ({other} vs {ref})\n")
    print(markdown_table(["op", f"{other} ms", f"{ref} ms", "extra ms"], rows))
    return {"per_step_self_cpu_ms": {k: {op: round(v, 3) for op, v in d.items() if v >= 0.05}
                                     for k, d in per_op.items()},
            "top_extra": [{"op": op, other: round(m, 3), ref: round(s, 3)} for op, m, s in diff]}


def report(res: dict[str, Any]) -> str:
    name = res["method"]
    rows = []
    for k in ("supervised", name):
        t, f = res["time_s"][k], res["flops"][k]
        rows.append((k, f"{t['median'] * 1000:.0f}", f"{t['q1'] * 1000:.0f}-{t['q3'] * 1000:.0f}",
                     f"{f['gflops']:.2f}", f"{f['gflops'] / t['median']:.1f}"))
    head = (f"{name} vs supervised: {res['arch']}, batch {res['batch']}, {res['size']} px, "
            f"{res['threads']} thread(s), {res['steps']} interleaved steps after {res['warmup']} warm-up rounds "
            f"(queue {res['queue_size']}, bn_splits {res['bn_splits']})\n")
    table = markdown_table(["step", "median ms", "IQR ms", "GFLOPs/step", "GFLOP/s"], rows)
    ratios = markdown_table(["time ratio", "FLOP ratio", "time ratio / FLOP ratio", "within 10 % of 1"],
                            [(f"{res['time_ratio']:.3f}", f"{res['flop_ratio']:.3f}",
                              f"{res['time_over_flop_ratio']:.3f}", "yes" if res["within_target"] else "no")])
    return f"{head}\n{table}\n\n{ratios}"


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("step_time", parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
