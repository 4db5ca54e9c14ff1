"""Mean and spread over seeds of finished runs, and the per-seed difference between two recipes.

The issues' "same-budget comparison" asks for 3 seeds with their spread wherever a method and its base differ by
less than 2 points. This reads what the runs already wrote — ``<run>/metrics.json`` (the evaluation at the end of
``semssl pretrain``: kNN k 20 / k 200 and the fast linear probe of the trained backbone) and, when present,
``<run>/eval_knn_<kind>.json`` / ``<run>/eval_linear_<kind>.json`` written by ``semssl eval knn|linear --features
<kind> --out ...`` — and prints one markdown table: per-seed values, mean and sample standard deviation per
metric, and for ``--diff A B`` the mean ± std of the seed-paired difference A − B.

    python benchmarks/seed_spread.py mocov2=runs/mocov2_w16_s{0,1,2} scd=runs/scd_mocov2_w16_s{0,1,2} \\
        --diff scd mocov2 --features fg

Runs are paired by position (the first run of each group is seed 0, ...). A missing file is an error naming it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METRICS = (("kNN k 20", "k20_top1"), ("kNN k 200", "k200_top1"), ("linear (fast)", "linear_top1"))


def _find(obj: Any, key: str) -> float | None:
    """The first value of ``key`` in a nested JSON object (depth first), or None."""
    if isinstance(obj, dict):
        if key in obj and isinstance(obj[key], (int, float)):
            return float(obj[key])
        for value in obj.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        sys.exit(f"seed_spread: {path} does not exist (is the run finished / was the eval run with --out?)")
    except json.JSONDecodeError as exc:
        sys.exit(f"seed_spread: {path} is not valid JSON: {exc}")


def run_values(run: Path, features: list[str]) -> dict[str, float]:
    """``{column: value}`` of one run: the pooled metrics of its metrics.json, then each ``--features`` kind."""
    trained = _load(run / "metrics.json").get("trained")
    if not isinstance(trained, dict):
        sys.exit(f"seed_spread: {run / 'metrics.json'} has no 'trained' section")
    out: dict[str, float] = {}
    for label, key in METRICS:
        value = _find(trained, key)
        if value is not None:
            out[label] = value
    for kind in features:
        for protocol, labels in (("knn", METRICS[:2]), ("linear", METRICS[2:])):
            path = run / f"eval_{protocol}_{kind}.json"
            if not path.exists():
                continue
            payload = _load(path)
            for label, key in labels:
                value = _find(payload, key)
                if value is not None:
                    out[f"{label}, {kind}"] = value
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", metavar="NAME=RUN[,RUN...]", help="a recipe's runs, one per seed")
    p.add_argument("--features", nargs="*", default=[], help="also read eval_{knn,linear}_<kind>.json (e.g. fg)")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="add the seed-paired difference A - B")
    args = p.parse_args(argv)

    groups: dict[str, list[dict[str, float]]] = {}
    for spec in args.groups:
        name, sep, runs = spec.partition("=")
        if not sep or not runs:
            sys.exit(f"seed_spread: {spec!r} is not NAME=RUN[,RUN...]")
        groups[name] = [run_values(Path(r), args.features) for r in runs.split(",")]
    columns = list(dict.fromkeys(c for rows in groups.values() for row in rows for c in row))

    print("| recipe | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, rows in groups.items():
        for seed, row in enumerate(rows):
            cells = [f"{row[c]:.1f}" if c in row else "-" for c in columns]
            print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
        cells = [_mean_std([row[c] for row in rows if c in row]) for c in columns]
        print(f"| **{name}** | mean ± std ({len(rows)}) | " + " | ".join(cells) + " |")
    if args.diff:
        a, b = args.diff
        for name in (a, b):
            if name not in groups:
                sys.exit(f"seed_spread: --diff names {name!r}, not one of {list(groups)}")
        if len(groups[a]) != len(groups[b]):
            sys.exit(f"seed_spread: {a} has {len(groups[a])} runs and {b} {len(groups[b])}; pairs need equal counts")
        cells = []
        for c in columns:
            diffs = [ra[c] - rb[c] for ra, rb in zip(groups[a], groups[b]) if c in ra and c in rb]
            cells.append(_mean_std(diffs) if diffs else "-")
        print(f"| **{a} − {b}** | paired | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
