"""The main job (`semssl pretrain` with no arguments) timed end to end: wall time, peak memory, accuracy.

Runs `semssl pretrain [--recipe R] [overrides...]` as a subprocess and records
  * wall time of the whole command, and the run's own train / total seconds and step count (metrics.json);
  * peak memory, three ways:
      - largest single process: getrusage(RUSAGE_CHILDREN).ru_maxrss after the command exits. It covers every
        descendant that was waited for (the data-loader workers, the dataset generator's workers), but it is the
        peak of the largest one, not a sum;
      - the main process's own peak, as the run reports it (metrics.json run.peak_rss_mb);
      - the whole tree, sampled from /proc every --interval s: summed PSS (shared pages split among the
        processes sharing them: the best estimate of what the machine holds) and summed RSS (an over-estimate:
        pages forked workers share with the main process are counted once per worker);
  * CPU time (user + system) of the whole tree;
  * kNN (k 20) and fast-linear-probe top-1 of the trained backbone and of the same backbone at random init.
The run folder is `<trainer.out_dir>/<trainer.run_name>`; a run name `main_job-bench-<time>` is added unless the
overrides give one (it only names the folder).

    .venv/bin/python benchmarks/main_job.py --out main_job.json          # the main job itself (~10 min)
    .venv/bin/python benchmarks/main_job.py trainer.max_steps=10 eval.linear.epochs=5   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from semssl.bench import BenchError, ProcessTreeSampler, environment, markdown_table


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe passed as `semssl pretrain -c` (default: none, the main job)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between /proc memory samples (default 0.5)")
    p.add_argument("--log", help="send the job's output to this file instead of the terminal")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides passed to `semssl pretrain`")
    return p.parse_args(argv)


def semssl_command() -> list[str]:
    """The `semssl` console script of this interpreter's environment, else `python -m semssl.cli`."""
    script = Path(sys.executable).with_name("semssl")
    if script.exists():
        return [str(script)]
    found = shutil.which("semssl")
    return [found] if found else [sys.executable, "-m", "semssl.cli"]


def with_run_name(overrides: list[str]) -> list[str]:
    if any(o.split("=", 1)[0].strip() == "trainer.run_name" for o in overrides):
        return list(overrides)
    return [*overrides, f"trainer.run_name=main_job-bench-{time.strftime('%Y%m%d-%H%M%S')}"]


def run_dir_of(recipe: Optional[str], overrides: list[str]) -> Path:
    """Where `semssl pretrain` will write: out_dir/run_name (it appends a suffix if that exists: refuse)."""
    from semssl.config import load_config

    cfg = load_config(recipe, overrides)
    path = Path(cfg.trainer.out_dir) / str(cfg.trainer.run_name)
    if path.exists():
        raise BenchError(f"run folder {path} exists already; give another trainer.run_name")
    return path


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    if args.interval <= 0:
        raise BenchError(f"--interval must be > 0, got {args.interval}")
    overrides = with_run_name(args.overrides)
    run_dir = run_dir_of(args.recipe, overrides)
    cmd = [*semssl_command(), "pretrain", *(["-c", args.recipe] if args.recipe else []), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "SEMSSL_RUN_DIR"}  # the run folder is ours to choose
    print("$ " + " ".join(cmd), flush=True)
    log = open(args.log, "w") if args.log else None
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
        with ProcessTreeSampler(proc.pid, interval=args.interval) as sampler:
            returncode = proc.wait()
        wall = time.perf_counter() - start
    finally:
        if log:
            log.close()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = {
        "command": cmd, "returncode": returncode, "run_dir": str(run_dir), "wall_s": round(wall, 1),
        "memory_mb": {"largest_process_peak_rss": round(usage.ru_maxrss / 1024, 1), **sampler.result_mb()},
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "environment": environment(),
    }
    metrics_file = run_dir / "metrics.json"
    if returncode == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        result["metrics"] = metrics
        result["memory_mb"]["main_process_peak_rss"] = metrics.get("run", {}).get("peak_rss_mb")
    return result


def accuracy_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows of the printed table: each baseline present, the trained network, and its gain over the best
    baseline per column ("gain" with one baseline, "gain over best baseline" with several)."""
    def cell(res: Optional[dict], key: str) -> str:
        return f"{res[key]:.2f}" if res and res.get(key) is not None else "-"

    labels = {"random_init": "random init", "random_init_bn": "random init, BN re-estimated", "pixels": "pixels"}
    trained = metrics.get("trained")
    baselines = {name: metrics[name] for name in labels if metrics.get(name)}
    rows = [(labels[name], cell(res, "knn_top1"), cell(res, "linear_top1")) for name, res in baselines.items()]
    rows.append(("trained", cell(trained, "knn_top1"), cell(trained, "linear_top1")))
    if trained and baselines:
        gain = []
        for k in ("knn_top1", "linear_top1"):
            values = [res[k] for res in baselines.values() if res.get(k) is not None]
            gain.append(f"{trained[k] - max(values):+.2f}" if trained.get(k) is not None and values else "-")
        rows.append(("gain" if len(baselines) == 1 else "gain over best baseline", *gain))
    return rows


def report(res: dict[str, Any]) -> str:
    run = res.get("metrics", {}).get("run", {})
    mem = res["memory_mb"]
    steps = run.get("global_step")
    train_s = run.get("train_seconds")
    rows = [
        ("wall time, whole command (s)", res["wall_s"]),
        ("train time, metrics.json (s)", train_s if train_s is not None else "-"),
        ("evaluation time, metrics.json (s)",
         round(run["total_seconds"] - train_s, 1) if train_s is not None and "total_seconds" in run else "-"),
        ("optimisation steps", steps if steps is not None else "-"),
        ("train time / steps (s; includes start-up, dominant in short runs)",
         f"{train_s / steps:.2f}" if steps and train_s else "-"),
        ("CPU time, user + system, whole tree (s)", res["cpu_s"]),
        ("peak RSS, largest process (MB, getrusage)", mem["largest_process_peak_rss"]),
        ("peak RSS, main process (MB, metrics.json)", mem.get("main_process_peak_rss") or "-"),
        ("peak PSS, whole tree (MB, sampled)", mem.get("tree_peak_pss_mb") or "-"),
        ("peak RSS summed, whole tree (MB, sampled)", mem.get("tree_peak_rss_sum_mb") or "-"),
        ("processes in the tree, at most", mem.get("tree_max_processes") or "-"),
    ]
    title = (f"main job: {run.get('method', '?')} / {run.get('arch', '?')}, "
             f"{' '.join(res['command'][1:])}\n")
    text = title + "\n" + markdown_table(["quantity", "value"], rows)
    if "metrics" in res and ("trained" in res["metrics"]):
        text += "\n\n" + markdown_table(["backbone", "kNN top-1 (k=20) %", "linear top-1 (fast) %"],
                                        accuracy_rows(res["metrics"]))
    return text


def main(argv: Optional[list[str]] = None) -> int:
    from semssl.config import ConfigError

    args = parse_args(argv)
    try:
        res = run_job(args)
    except (BenchError, ConfigError) as err:
        print(f"main_job: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2, default=float))
    if res["returncode"] != 0:
        print(f"main_job: `semssl pretrain` failed with exit code {res['returncode']} "
              f"(run folder {res['run_dir']}){'; see ' + args.log if args.log else ''}", file=sys.stderr)
        return res["returncode"]
    if "metrics" not in res:
        print(f"main_job: the job finished but wrote no {res['run_dir']}/metrics.json", file=sys.stderr)
        return 1
    print(report(res))
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
