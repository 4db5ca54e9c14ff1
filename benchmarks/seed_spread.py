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
# --evals NAME: the checkpoint's own entry of <run>/eval_NAME.json, and (column, key path inside it) per metric
EVALS: dict[str, tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "objects": ("objects", (("O-KNN top-1", ("oknn_top1",)), ("O-KNN top-5", ("oknn_top5",)),
                            ("disturbed top-1", ("oknn_disturbed_top1",)),
                            ("disturbed top-5", ("oknn_disturbed_top5",)))),
    "objects_c4": ("objects", (("O-KNN C4 top-1", ("oknn_top1",)), ("O-KNN C4 top-5", ("oknn_top5",)),
                               ("disturbed C4 top-1", ("oknn_disturbed_top1",)),
                               ("disturbed C4 top-5", ("oknn_disturbed_top5",)))),
    "bias": ("", tuple((f"{name} {stage}", (key, stage)) for name, key in (("CR", "coupling_rate"),
                                                                           ("MCS", "positional_mcs"))
                       for stage in ("layer3", "layer4"))),
    "dense": ("trained", (("mIoU", ("dense_miou",)), ("pixel acc", ("dense_pixel_acc",)))),
    "dense_super": ("trained", (("mIoU, merged classes", ("dense_miou",)),
                                ("pixel acc, merged classes", ("dense_pixel_acc",)))),
}


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


def _at(obj: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return float(obj) if isinstance(obj, (int, float)) else None


def eval_values(run: Path, name: str) -> dict[str, float]:
    """``{column: value}`` of ``<run>/eval_<name>.json`` (one of :data:`EVALS`)."""
    path = run / f"eval_{name}.json"
    section, columns = EVALS[name]
    payload = _load(path)
    own = payload.get(section) if section else payload
    if not isinstance(own, dict):
        sys.exit(f"seed_spread: {path} has no '{section}' section (keys: {sorted(payload)[:8]})")
    out = {label: value for label, key in columns if (value := _at(own, key)) is not None}
    if not out:
        sys.exit(f"seed_spread: {path} holds none of {[key[0] for _, key in columns]}")
    return out


def run_values(run: Path, features: list[str], evals: list[str] = ()) -> dict[str, float]:
    """``{column: value}`` of one run: the pooled metrics of its metrics.json (needed unless ``evals`` are given),
    each ``--features`` kind, then each ``--evals`` file."""
    out: dict[str, float] = {}
    if not evals or (run / "metrics.json").exists():
        trained = _load(run / "metrics.json").get("trained")
        if not isinstance(trained, dict) and not evals:
            sys.exit(f"seed_spread: {run / 'metrics.json'} has no 'trained' section")
        for label, key in METRICS if isinstance(trained, dict) else ():
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
    for name in evals:
        out.update(eval_values(run, name))
    return out


def _digits(column: str) -> int:
    """Percentages get one decimal, the dense probe's mIoU (a few percent on coco128's 129 classes) two, the
    ratios of ``semssl eval bias`` (CR, MCS, near 1) three."""
    return 3 if column.startswith(("CR ", "MCS ")) else 2 if column.startswith("mIoU") else 1


def _mean_std(values: list[float], digits: int = 1) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", metavar="NAME=RUN[,RUN...]", help="a recipe's runs, one per seed")
    p.add_argument("--features", nargs="*", default=[], help="also read eval_{knn,linear}_<kind>.json (e.g. fg)")
    p.add_argument("--evals", nargs="*", default=[], choices=sorted(EVALS),
                   help="also read <run>/eval_<name>.json of the scene evaluations")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="add the seed-paired difference A - B")
    args = p.parse_args(argv)

    groups: dict[str, list[dict[str, float]]] = {}
    for spec in args.groups:
        name, sep, runs = spec.partition("=")
        if not sep or not runs:
            sys.exit(f"seed_spread: {spec!r} is not NAME=RUN[,RUN...]")
        groups[name] = [run_values(Path(r), args.features, args.evals) for r in runs.split(",")]
    columns = list(dict.fromkeys(c for rows in groups.values() for row in rows for c in row))

    print("| recipe | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, rows in groups.items():
        for seed, row in enumerate(rows):
            cells = [f"{row[c]:.{_digits(c)}f}" if c in row else "-" for c in columns]
            print(f"| {name} | {seed} | " + " | ".join(cells) + " |")
        cells = [_mean_std([row[c] for row in rows if c in row], _digits(c)) for c in columns]
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
            cells.append(_mean_std(diffs, _digits(c)) if diffs else "-")
        print(f"| **{a} − {b}** | paired | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
