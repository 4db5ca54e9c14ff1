"""One markdown table of the region metrics of several models: O-KNN, disturbed O-KNN, CR and MCS per stage.

Issue 12's comparison (SoCo vs D3SSL vs D3SSL without L_dp, with the random baselines) reads what the
evaluations already wrote:

* ``semssl eval objects ... --out A.json`` — O-KNN top-1 / top-5 and disturbed top-1 / top-5; a checkpoint's file
  holds one model (``objects``), a ``--random-init`` file holds the three baselines (``random_init``,
  ``random_init_bn``, ``pixels``), each becoming a row;
* ``semssl eval bias ... --out B.json`` — coupling rate and MCS per stage (a ``--random-init`` file holds
  ``random_init`` and ``random_init_bn``).

Each argument is ``LABEL=OBJECTS_JSON[,BIAS_JSON]`` (either may be ``-``); a run folder instead of the JSON pair
reads ``<run>/eval_objects.json`` and ``<run>/eval_bias.json``::

    python benchmarks/region_table.py SoCo=runs/soco_coco128_s0 D3SSL=runs/d3ssl_coco128_s0 \\
        random=/tmp/random_objects.json,/tmp/random_bias.json

A label given to a random-init file is a prefix (``random`` -> ``random: random_init`` ...). Files written with
``--by-supercategory`` add each supercategory's top-1 and disturbed top-1 (MSRC-v2: ``thing``, ``stuff``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OKNN = (("O-KNN top-1", "oknn_top1"), ("top-5", "oknn_top5"), ("disturbed top-1", "oknn_disturbed_top1"),
        ("disturbed top-5", "oknn_disturbed_top5"))
STAGES = ("layer1", "layer2", "layer3", "layer4")
BASELINES = ("random_init", "random_init_bn", "pixels")


def _load(path: str) -> dict[str, Any] | None:
    if path in ("", "-"):
        return None
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        sys.exit(f"region_table: {path} does not exist (was the evaluation run with --out?)")
    except json.JSONDecodeError as exc:
        sys.exit(f"region_table: {path} is not valid JSON: {exc}")


def _models(doc: dict[str, Any] | None, key: str) -> dict[str, dict[str, Any]]:
    """``{model: metrics}`` of one file: the checkpoint's own entry ``key``, or each random-init baseline."""
    if doc is None:
        return {}
    if key in doc:
        return {"": doc[key]}
    if any(name in doc for name in BASELINES):
        return {name: doc[name].get(key, doc[name]) for name in BASELINES if name in doc}
    if "coupling_rate" in doc:  # a checkpoint's bias file is the metrics themselves
        return {"": doc}
    sys.exit(f"region_table: no '{key}' or random-init entries in this file (keys: {sorted(doc)[:8]})")


def rows(spec: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``[(label, objects metrics, bias metrics)]`` of one ``LABEL=OBJECTS[,BIAS]`` argument."""
    label, sep, paths = spec.partition("=")
    if not sep:
        sys.exit(f"region_table: expected LABEL=OBJECTS_JSON[,BIAS_JSON] or LABEL=RUN_FOLDER, got {spec!r}")
    if Path(paths).is_dir():
        paths = f"{Path(paths) / 'eval_objects.json'},{Path(paths) / 'eval_bias.json'}"
    objects_path, _, bias_path = paths.partition(",")
    objects = _models(_load(objects_path), "objects")
    bias = _models(_load(bias_path), "bias")
    names = list(dict.fromkeys([*objects, *bias]))
    return [(f"{label}: {n}" if n else label, objects.get(n, {}), bias.get(n, {})) for n in names]


def _cell(metrics: dict[str, Any], *keys: str, digits: int) -> str:
    value: Any = metrics
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return "-" if value is None else f"{float(value):.{digits}f}"


def supercategory_columns(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """O-KNN top-1 of each supercategory of ``--by-supercategory`` files (``n_queries_<super>``), plain and
    disturbed: ``[(header, key)]`` in the order the files first name them."""
    supers = dict.fromkeys(k[len("n_queries_"):] for metrics in objects for k in metrics if k.startswith("n_queries_"))
    return [col for s in supers for col in ((f"{s} top-1", f"oknn_{s}_top1"),
                                            (f"disturbed {s} top-1", f"oknn_disturbed_{s}_top1"))]


def table(specs: list[str]) -> str:
    all_rows = [row for spec in specs for row in rows(spec)]
    oknn = [*OKNN, *supercategory_columns([objects for _, objects, _ in all_rows])]
    header = ["model", *(name for name, _ in oknn), "CR " + " / ".join(s[-1] for s in STAGES),
              "MCS " + " / ".join(s[-1] for s in STAGES)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, objects, bias in all_rows:
        cells = [label, *(_cell(objects, key, digits=1) for _, key in oknn)]
        for kind in ("coupling_rate", "positional_mcs"):
            cells.append(" / ".join(_cell(bias, kind, s, digits=3) for s in STAGES))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="LABEL=OBJECTS_JSON[,BIAS_JSON] or LABEL=RUN_FOLDER")
    print(table(p.parse_args(argv).models))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
