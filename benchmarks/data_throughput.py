"""Data-pipeline throughput: samples/s of a recipe's training views, for several numbers of loader workers.

The loader is the engine's own (``semssl.engine.data.train_loader``: the recipe's views, the epoch sampler,
``collate_views``, persistent workers, prefetch 4); only ``data.num_workers`` changes. Each worker count is timed
in steady state (after warm-up batches); the time to the first batch (worker start-up) is reported apart.
On a shared machine samples/s depends on the CPU share other processes leave; CPU ms per sample (main process +
workers, read from /proc) does not, and "cores used" shows how much parallelism the workers actually got.
The built-in dataset is generated on first use (``~/.cache/semssl/synthetic``, or ``$SEMSSL_DATA_DIR/synthetic``).

    .venv/bin/python benchmarks/data_throughput.py                       # the main recipe, 0 and 2 workers
    .venv/bin/python benchmarks/data_throughput.py --workers 0 1 2 --batches 20 --out data_throughput.json
    .venv/bin/python benchmarks/data_throughput.py data.views.0.size=96 data.views.1.size=96

To compare with training: one step consumes ``data.batch_size`` samples, so a loader keeps up when its
samples/s exceed batch_size / step time (benchmarks/main_job.py and step_time.py give step times).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Optional

import torch

from semssl.bench import (
    BenchError,
    data_throughput,
    environment,
    markdown_table,
    script_main,
)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe (default: the main job's)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to time (default 0 2)")
    p.add_argument("--batches", type=int, default=10, help="timed batches per worker count (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first, >= 1 (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process (default 1)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from semssl.config import load_config
    from semssl.engine.data import build_train_dataset, resolve_paths, train_loader

    if any(w < 0 for w in args.workers):
        raise BenchError(f"--workers must be >= 0, got {args.workers}")
    if args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, list(args.overrides))
    paths = resolve_paths(cfg)
    dataset = build_train_dataset(cfg, paths["train"])
    per_batch_needed = (args.warmup + args.batches) * cfg.data.batch_size
    if per_batch_needed > len(dataset):
        raise BenchError(f"{args.warmup} + {args.batches} batches of {cfg.data.batch_size} need "
                         f"{per_batch_needed} samples; the dataset has {len(dataset)}. Lower --batches")
    results = []
    for workers in args.workers:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.data.num_workers = workers
        loader = train_loader(dataset, run_cfg)
        res = data_throughput(loader, args.batches, args.warmup)
        del loader
        results.append({"workers": workers, **{k: round(v, 3) if isinstance(v, float) else v
                                               for k, v in res.items()}})
    return {
        "recipe": cfg.name, "train": paths["train"], "dataset_size": len(dataset),
        "batch_size": cfg.data.batch_size,
        "views": {v.name: {"size": v.size, "n_crops": v.n_crops, "recipe": v.recipe} for v in cfg.data.views},
        "batches": args.batches, "warmup": args.warmup, "overrides": list(args.overrides),
        "results": results, "environment": environment(),
    }


def report(res: dict[str, Any]) -> str:
    views = ", ".join(f"{k} {v['n_crops']}x{v['size']} px" for k, v in res["views"].items())
    head = (f"data pipeline of {res['recipe']}: {res['dataset_size']} images, batch {res['batch_size']}, "
            f"views {views}; {res['batches']} timed batches after {res['warmup']} warm-up\n")
    rows = [(r["workers"], f"{r['samples_per_s']:.0f}", f"{r['views_per_s']:.0f}", _fmt(r["cpu_ms_per_sample"], 2),
             _fmt(r["cores_used"], 2), f"{r['startup_s']:.2f}") for r in res["results"]]
    return head + "\n" + markdown_table(
        ["workers", "samples/s", "views/s", "CPU ms/sample", "cores used", "first batch s"], rows)


def _fmt(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: Optional[list[str]] = None) -> int:
    return script_main("data_throughput", parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
