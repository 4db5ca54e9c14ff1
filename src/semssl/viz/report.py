"""The run report: ``semssl report RUN [RUN ...] [-o report.html]`` writes one self-contained HTML page.

Everything is inside the file (plots as base64 PNG data URIs, no script, no font or style sheet from elsewhere), so
it opens from disk, offline, in any browser. Sections (``SECTIONS``, in this order):

* **Configuration** — the resolved ``config.yaml`` and its differences from the recipe it names (``name``: the
  packaged recipe of that name, as packaged now, loaded with :func:`semssl.config.load_config`); with several runs,
  the keys whose values differ between the runs, the cells that differ from the first run highlighted;
* **Training curves** — loss, learning rate, EMA momentum and teacher temperature per step, then every other scalar
  the run logged, from ``logs/csv*/metrics.csv`` (Lightning's CSV logger; a resumed run's ``csv-resume<N>`` files
  are read after it, a step logged twice keeps its later value);
* **Online kNN** — ``monitor/knn_top1`` (``trainer.knn_every_n_epochs``) and the final evaluation's kNN top-1 at
  the last step, the best random-init baseline dashed;
* **Collapse monitors** — the embedding spreads the methods log (``embed_std``, ``z_std``, ``std_z``,
  ``std_dense``, ``zfg_std``), DINO's teacher entropy and RankMe (``monitor/rankme``, ``_dense``, ``_region``:
  :mod:`semssl.eval.rankme`);
* **Evaluation** — ``metrics.json``: the trained network against every random-init baseline, and the gain over
  the best of them; then every ``eval*.json`` (``semssl eval ... --out``) in the run folder or its ``eval/``;
* **Figures** — the PNGs the run drew during training (``figures/``: the first and the last of each figure), and
  the method's own figure drawn now from ``checkpoints/last.ckpt`` on a fixed set of images, the same for every
  run of the report (:data:`METHOD_FIGURES`: saliency for SCD, attention for DINO/SCFS, cluster maps for
  MoCo-v2/BYOL/DenseCL/DSC, D3SSL's region augmentations for SoCo/D3SSL);
* **Run and machine** — wall time, length, peak memory, the machine and the package versions ``metrics.json``
  recorded (:func:`semssl.engine.run.run_environment`); values that differ between runs highlighted.

With several runs, every section shows them side by side and the curves overlay them, one colour per run.

Decision: the page has one small :class:`string.Template` (:data:`PAGE`); every other piece is built from escaped
strings and matplotlib figures (Agg, no pyplot state). A section with nothing to plot says why in a sentence, so
every section has content; a run without ``metrics.json`` (still training, or stopped before its evaluation) is
reported with what it has.

Decision: nothing is written until the whole page is built, then it is written to a temporary file beside ``out``
and renamed: a bad run folder (no ``config.yaml``, a corrupt JSON or CSV) is a :class:`~semssl.errors.ReportError`
naming the file, and an earlier report at ``out`` stays as it was.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Optional, Sequence

from semssl.errors import ReportError, SemsslError

#: section id -> heading, in page order
SECTIONS = {"config": "Configuration", "curves": "Training curves", "knn": "Online kNN",
            "collapse": "Collapse monitors", "evaluation": "Evaluation", "figures": "Figures",
            "environment": "Run and machine"}

#: the training curves: logged key -> (panel title, which runs log it)
CURVES = {"train/loss": ("loss", "every method"),
          "train/lr": ("learning rate", "every run"),
          "train/momentum": ("EMA momentum of the teacher", "methods with a momentum teacher"),
          "train/teacher_temp": ("teacher temperature", "DINO and SCFS")}
#: the collapse monitors: logged key -> (panel title, which runs log it)
COLLAPSE = {"train/embed_std": ("embedding std (teacher pooled, x sqrt D)", "DINO and SCFS"),
            "train/z_std": ("embedding std (online projection)", "MoCo-v2, BYOL, SCD, SoCo, D3SSL"),
            "train/std_z": ("embedding std (projection, x sqrt D)", "DenseCL and DSC"),
            "train/std_dense": ("dense embedding std (x sqrt D)", "DenseCL and DSC"),
            "train/zfg_std": ("foreground embedding std", "SCD"),
            "train/teacher_entropy": ("teacher entropy (nats)", "DINO and SCFS"),
            "monitor/rankme": ("RankMe, pooled embeddings", "every method (trainer.rankme_every_n_steps > 0)"),
            "monitor/rankme_dense": ("RankMe, per-location embeddings", "dense methods (DenseCL, DSC)"),
            "monitor/rankme_region": ("RankMe, per-region embeddings", "region methods (SoCo, D3SSL)")}
KNN_KEY = "monitor/knn_top1"
BASELINES = {"random_init": "random init", "random_init_bn": "random init, BN re-estimated",
             "pixels": "pixels (centred)"}

#: the figure each method is shown with (``semssl viz`` names)
METHOD_FIGURES = {"scd_mocov2": "saliency", "scd_byol": "saliency", "dino": "attention", "scfs": "attention",
                  "densecl": "clusters", "dsc": "clusters", "soco": "regions", "d3ssl": "regions",
                  "mocov2": "clusters", "byol": "clusters"}
#: images the figures are drawn on (spread evenly over the image source, so the same ones every time)
FIGURE_IMAGES = 6

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1500px; padding: 0 1.5em 3em; color: #222; }
header { border-bottom: 2px solid #444; margin-bottom: 1em; }
nav a { margin-right: 1em; }
section { margin: 2em 0; }
h2 { border-bottom: 1px solid #bbb; }
.runs { display: grid; grid-template-columns: repeat($columns, minmax(0, 1fr)); gap: 1.2em; }
.run > h3 { margin: .3em 0; font-size: 1.05em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .2em .55em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.diff { background: #fff2a8; }
.best { font-weight: bold; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: .6em; max-height: 28em; overflow: auto; font-size: 12px; }
img { max-width: 100%; height: auto; }
figure { margin: .6em 0; }
figcaption, .note { color: #555; font-size: .92em; }
.swatch { display: inline-block; width: .9em; height: .9em; border-radius: 2px; vertical-align: -.1em; }
</style>
</head>
<body>
<header>
<h1>$title</h1>
$runs
<nav>$nav</nav>
</header>
$sections
<footer class="note">Written by semssl $version on $written. Self-contained: every plot is embedded in this file.
</footer>
</body>
</html>
""")


# ------------------------------------------------------------------------------------------------ reading runs
@dataclass
class RunRecord:
    """What the report reads from one run folder."""

    path: Path
    label: str
    config: dict
    metrics: Optional[dict]
    scalars: dict[str, list[tuple[int, float]]]  # logged key -> [(step, value)], by step
    csv_files: list[Path]
    evals: list[tuple[Path, dict]]
    figures: list[Path]
    colour: str = COLOURS[0]
    recipe: Optional[dict] = None  # the recipe's resolved config, when it can be loaded
    recipe_note: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def run_info(self) -> dict:
        return (self.metrics or {}).get("run") or {}

    @property
    def method(self) -> str:
        return str((self.config.get("method") or {}).get("name", "?"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None


def read_config(run: Path) -> dict:
    """The run's ``config.yaml`` as a dict; a ReportError naming the file when it is missing or not a config."""
    import yaml

    from semssl.config import yaml_load

    path = run / "config.yaml"
    if not path.is_file():
        raise ReportError(f"{path}: missing, so {run} is not a semssl run folder (semssl pretrain writes "
                          f"config.yaml there before the first step)")
    try:
        data = yaml_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), dict):
        raise ReportError(f"{path}: not a semssl run config (expected a mapping with a 'method' section)")
    return data


def csv_files(run: Path) -> list[Path]:
    """``logs/csv/metrics.csv`` then each resume's ``logs/csv-resume<N>/metrics.csv``, in resume order."""
    logs = run / "logs"
    resumes = sorted((p for p in logs.glob("csv-resume*") if re.fullmatch(r"csv-resume\d+", p.name)),
                     key=lambda p: int(p.name.removeprefix("csv-resume")))
    return [d / "metrics.csv" for d in [logs / "csv", *resumes] if (d / "metrics.csv").is_file()]


def read_scalars(files: Sequence[Path]) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar of the CSV files by step (a later file wins at a step logged twice)."""
    by_key: dict[str, dict[int, float]] = {}
    for path in files:
        try:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "step" not in reader.fieldnames:
                    raise ReportError(f"{path}: no 'step' column (not a Lightning CSV log)")
                for line, row in enumerate(reader, start=2):
                    try:
                        step = int(float(row["step"]))
                        values = {k: float(v) for k, v in row.items() if k not in ("step", "epoch") and k
                                  and v not in ("", None)}
                    except (TypeError, ValueError) as err:
                        raise ReportError(f"{path}: line {line} is not a row of numbers ({err})") from None
                    for key, value in values.items():
                        by_key.setdefault(key, {})[step] = value
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise ReportError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    return {k: sorted(v.items()) for k, v in sorted(by_key.items())}


def read_run(path: Path) -> RunRecord:
    """A :class:`RunRecord` of the run folder ``path`` (ReportError naming the file at fault)."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such run folder")
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder (give the run folder semssl pretrain printed)")
    config = read_config(path)
    metrics_file = path / "metrics.json"
    metrics = _read_json(metrics_file) if metrics_file.is_file() else None
    if metrics is not None and not isinstance(metrics, dict):
        raise ReportError(f"{metrics_file}: not a semssl metrics file (expected a JSON object)")
    files = csv_files(path)
    evals = [(p, _read_json(p)) for p in sorted(path.glob("eval*.json")) + sorted((path / "eval").glob("*.json"))]
    run = RunRecord(path=path, label=path.name, config=config, metrics=metrics, scalars=read_scalars(files),
                    csv_files=files, evals=evals, figures=sorted((path / "figures").glob("*.png")))
    if metrics is None:
        run.notes.append(f"{metrics_file.name} is not there: the run is still training, or stopped before its "
                         f"evaluation; the page shows what it logged so far.")
    if not files:
        run.notes.append(f"{path / 'logs' / 'csv' / 'metrics.csv'} is not there: no step was logged yet.")
    run.recipe, run.recipe_note = recipe_of(config)
    return run


def recipe_of(config: dict) -> tuple[Optional[dict], str]:
    """(the resolved config of the packaged recipe the run names, a sentence saying which) — (None, why) when no
    packaged recipe has that name or it no longer loads."""
    from semssl.config import ConfigError, PACKAGE_CONFIGS, load_config, to_dict

    name = str(config.get("name", ""))
    if not (PACKAGE_CONFIGS / f"{name}.yaml").is_file():
        return None, (f"the run is named '{name}', which is not a packaged recipe (a recipe given as a path, or a "
                      f"name= override): no recipe to compare with")
    try:
        return to_dict(load_config(name)), f"the packaged recipe {name}, as this semssl version ships it"
    except ConfigError as err:
        return None, f"the packaged recipe {name} does not load now ({err}): no differences shown"


# ------------------------------------------------------------------------------------------------ helpers
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config (list items by index, as overrides address them) -> leaf values."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None or isinstance(value, bool) \
        else str(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Optional[Sequence[Sequence[str]]] = None
           ) -> str:
    """An HTML table of already escaped cells (``classes``: a CSS class per cell, '' for none)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            cls = classes[r][c] if classes else ""
            cells.append(f'<td class="{cls}">{cell}</td>' if cls else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _side_by_side(runs: Sequence[RunRecord], parts: Sequence[str]) -> str:
    cols = "".join(f'<div class="run"><h3><span class="swatch" style="background:{r.colour}"></span> '
                   f'{_e(r.label)}</h3>{part}</div>' for r, part in zip(runs, parts))
    return f'<div class="runs">{cols}</div>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{_png_uri(data)}" alt="{_e(alt)}">{cap}</figure>'


def _plot(panels: Sequence[tuple[str, list[tuple[RunRecord, list[tuple[int, float]]]]]], columns: int = 2,
          hlines: Optional[dict[str, list[tuple[RunRecord, float, str]]]] = None) -> bytes:
    """One PNG of small multiples: per panel (title, [(run, points)]) a line per run in the run's colour; ``hlines``
    adds dashed horizontal lines (run, y, label) to the panel of that title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5.2 * columns, 3.0 * rows))
    FigureCanvasAgg(fig)
    several = len({id(r) for _, series in panels for r, _ in series}) > 1
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        for run, points in series:
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = {"marker": "o", "ms": 4} if len(points) <= 30 else {}
            ax.plot(xs, ys, color=run.colour, lw=1.3, label=run.label if several else None, **style)
        for run, y, label in (hlines or {}).get(title, []):
            ax.axhline(y, color=run.colour, ls="--", lw=1, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if several or (hlines or {}).get(title):
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _curve_panels(runs: Sequence[RunRecord], keys: dict[str, tuple[str, str]]
                  ) -> tuple[list[tuple[str, list]], list[str]]:
    """(panels of the keys some run logged, sentences for those none did)."""
    panels, missing = [], []
    for key, (title, who) in keys.items():
        series = [(r, r.scalars[key]) for r in runs if r.scalars.get(key)]
        if series:
            panels.append((f"{title} ({key})", series))
        else:
            missing.append(f"{title} ({key}): not logged by {'these runs' if len(runs) > 1 else 'this run'} "
                           f"(logged by {who})")
    return panels, missing


# ------------------------------------------------------------------------------------------------ sections
def section_config(runs: Sequence[RunRecord]) -> str:
    import yaml

    parts = []
    if len(runs) > 1:
        flat = [flatten(r.config) for r in runs]
        keys = sorted(set().union(*flat))
        differing = [k for k in keys if len({_show(f.get(k, _MISSING)) for f in flat}) > 1]
        if differing:
            rows = [[f"<code>{_e(k)}</code>", *(_e(_show(f.get(k, _MISSING))) for f in flat)] for k in differing]
            classes = [["", *("diff" if _show(f.get(k, _MISSING)) != _show(flat[0].get(k, _MISSING)) else ""
                              for f in flat)] for k in differing]
            parts.append(f"<h3>Differences between the runs ({len(differing)} keys)</h3>"
                         + _note("Highlighted: a value that differs from the first run's.")
                         + _table(["key", *(_e(r.label) for r in runs)], rows, classes))
        else:
            parts.append("<h3>Differences between the runs</h3>" + _note("The runs have the same configuration."))
    per_run = []
    for run in runs:
        text = [_note(f"Compared with {run.recipe_note}.")]
        if run.recipe is not None:
            mine, recipe = flatten(run.config), flatten(run.recipe)
            keys = sorted(set(mine) | set(recipe))
            diffs = [k for k in keys if _show(mine.get(k, _MISSING)) != _show(recipe.get(k, _MISSING))]
            if diffs:
                rows = [[f"<code>{_e(k)}</code>", _e(_show(recipe.get(k, _MISSING))), _e(_show(mine.get(k, _MISSING)))]
                        for k in diffs]
                text.append(f"<h4>Differences from the recipe ({len(diffs)})</h4>"
                            + _table(["key", "recipe", "run"], rows, [["", "", "diff"]] * len(rows)))
            else:
                text.append(_note("No difference from the recipe."))
        resolved = yaml.safe_dump(run.config, sort_keys=False)
        text.append(f"<h4>Resolved config ({_e(run.path / 'config.yaml')})</h4><pre>{_e(resolved)}</pre>")
        per_run.append("".join(text))
    parts.append(_side_by_side(runs, per_run))
    return "".join(parts)


def section_curves(runs: Sequence[RunRecord]) -> str:
    panels, missing = _curve_panels(runs, CURVES)
    parts = []
    if panels:
        parts.append(_img(_plot(panels), "training curves", "Per optimisation step, from the CSV log."))
    shown = set(CURVES) | set(COLLAPSE) | {KNN_KEY}
    others = sorted({k for r in runs for k in r.scalars if k not in shown})
    if others:
        other_panels = [(k, [(r, r.scalars[k]) for r in runs if r.scalars.get(k)]) for k in others]
        parts.append("<h3>Every other logged scalar</h3>"
                     + _img(_plot(other_panels, columns=3), "other scalars", ", ".join(others)))
    parts += [_note(m) for m in missing]
    if not panels and not others:
        parts.append(_note("No step was logged (no logs/csv/metrics.csv in "
                           + ", ".join(str(r.path) for r in runs) + ")."))
    return "".join(parts)


def section_knn(runs: Sequence[RunRecord]) -> str:
    series, hlines, notes = [], [], []
    for run in runs:
        points = list(run.scalars.get(KNN_KEY, []))
        trained = (run.metrics or {}).get("trained") or {}
        every = (run.config.get("trainer") or {}).get("knn_every_n_epochs", 0)
        k = trained.get("knn_k")
        if "knn_top1" in trained and run.run_info.get("global_step") is not None:
            # the log's step of a row is the batch index (0-based): the last batch of a run of N steps is N - 1
            final = (max(0, int(run.run_info["global_step"]) - 1), float(trained["knn_top1"]))
            if not points or points[-1][0] != final[0]:
                points.append(final)
        if points:
            series.append((run, points))
        best = max(((name, float(run.metrics[name]["knn_top1"])) for name in BASELINES
                    if isinstance((run.metrics or {}).get(name), dict) and "knn_top1" in run.metrics[name]),
                    key=lambda t: t[1], default=None)
        if best:
            hlines.append((run, best[1], f"{run.label if len(runs) > 1 else ''} best baseline: "
                                         f"{BASELINES[best[0]]}".strip()))
        what = (f"online kNN every {every} epoch(s) (trainer.knn_every_n_epochs)" if every else
                "the online kNN monitor was off (trainer.knn_every_n_epochs: 0): the point is the final evaluation")
        final_text = (f"; final evaluation: kNN top-1 {trained['knn_top1']:.2f} % (k = {k})"
                      if "knn_top1" in trained else "; no final evaluation in metrics.json")
        notes.append(f"{run.label}: {what}{final_text}.")
    parts = []
    if series:
        title = "kNN top-1 % (monitor/knn_top1 and the final evaluation)"
        parts.append(_img(_plot([(title, series)], columns=1, hlines={title: hlines}), "online kNN"))
    else:
        parts.append(_note("No kNN accuracy was measured: the online monitor was off and there is no final "
                           "evaluation."))
    parts += [_note(n) for n in notes]
    return "".join(parts)


def section_collapse(runs: Sequence[RunRecord]) -> str:
    panels, missing = _curve_panels(runs, COLLAPSE)
    parts = []
    if panels:
        parts.append(_img(_plot(panels, columns=3), "collapse monitors",
                          "RankMe (Garrido et al., ICML 2023) = exp(entropy of the normalised singular values) of "
                          "one training batch's embeddings: 1 = collapsed to a line, at most min(rows, dims)."))
    else:
        parts.append(_note("No collapse monitor was logged by " + ", ".join(r.label for r in runs) + "."))
    parts += [_note(m) for m in missing]
    return "".join(parts)


def _eval_table(run: RunRecord) -> str:
    m = run.metrics or {}
    trained = m.get("trained")
    if not isinstance(trained, dict):
        why = "no metrics.json" if run.metrics is None else "metrics.json has no 'trained' entry (eval.enabled false?)"
        return _note(f"No evaluation: {why}.")
    ks = [k for k in ((run.config.get("eval") or {}).get("knn_k") or []) if f"k{k}_top1" in trained]
    columns = [(f"k{k}_top1", f"kNN top-1 (k={k}) %") for k in ks] or [("knn_top1", "kNN top-1 %")]
    columns.append(("linear_top1", f"linear top-1 ({trained.get('protocol', 'fast')}) %"))
    entries = [("trained", trained)] + [(BASELINES[n], m[n]) for n in BASELINES if isinstance(m.get(n), dict)]
    best = {key: max((e.get(key) for _, e in entries[1:] if isinstance(e.get(key), (int, float))), default=None)
            for key, _ in columns}
    rows, classes = [], []
    for name, entry in entries:
        rows.append([_e(name), *(_fmt(entry.get(key)) for key, _ in columns)])
        classes.append(["", *("num best" if name != "trained" and len(entries) > 2 and entry.get(key) == best[key]
                              and best[key] is not None else "num" for key, _ in columns)])
    if len(entries) > 1:
        gains = [f"{trained[key] - best[key]:+.2f}" if isinstance(trained.get(key), (int, float)) and
                 best[key] is not None else "-" for key, _ in columns]
        rows.append(["gain over the best baseline", *gains])
        classes.append(["", *(["num"] * len(columns))])
    size = (run.config.get("data") or {}).get("eval_size")
    info = run.run_info
    where = (f"Evaluated on {info.get('eval_test')} (memory / training split {info.get('eval_train')})"
             f"{f', {size} px' if size else ''}. Bold: the best baseline.")
    return _table(["backbone", *(_e(t) for _, t in columns)], rows, classes) + _note(where)


def _numbers(tree: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """The numeric leaves of a JSON result, dotted (two levels at most)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict) and depth < 3:
        for k, v in tree.items():
            if isinstance(v, bool):
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (int, float)):
                out[key] = v
            elif isinstance(v, dict):
                out.update(_numbers(v, key, depth + 1))
    return out


def _eval_json(path: Path, data: Any) -> str:
    if not isinstance(data, dict):
        return _note(f"{path.name}: not a result object.")
    # one model: its result at the top level (``model``: what was evaluated); --random-init: {baseline: result}
    baselines = {k: data[k] for k in BASELINES if isinstance(data.get(k), dict)}
    columns = baselines or {"this checkpoint": data}
    numbers = {name: _numbers({k: v for k, v in body.items() if k not in ("model",)} if isinstance(body, dict)
                              else {}) for name, body in columns.items()}
    keys = [k for k in dict.fromkeys(k for nums in numbers.values() for k in nums)
            if not re.search(r"(^|\.)(seed|epochs|knn_k|size|batch_size)$", k)]
    if not keys:
        return _note(f"{path.name}: no numbers in it.")
    rows = [[f"<code>{_e(k)}</code>", *(_fmt(numbers[n].get(k)) for n in columns)] for k in keys]
    classes = [["", *(["num"] * len(columns))] for _ in rows]
    return (f"<h4>{_e(path.name)}</h4>" + _table(["metric", *(_e(BASELINES.get(n, n)) for n in columns)], rows,
                                                 classes)
            + _note(" ".join(f"{k}: {data[k]}" for k in ("train", "test") if isinstance(data.get(k), str))))


def section_evaluation(runs: Sequence[RunRecord]) -> str:
    parts = []
    for run in runs:
        text = [_eval_table(run)]
        if run.evals:
            text.append("<h4>semssl eval results in the run folder</h4>")
            text += [_eval_json(p, d) for p, d in run.evals]
        parts.append("".join(text))
    return _side_by_side(runs, parts)


def _figure_name(path: Path) -> str:
    return re.sub(r"-epoch\d+$", "", path.stem)


def _image_source(run: RunRecord, images: Optional[Sequence[str]]) -> tuple[Optional[list[str]], str]:
    """The images the figures are drawn on: ``images`` if given, else the run's evaluation test split (its
    validation split, its training data), the first one that exists on this machine."""
    if images:
        return list(images), "the images given with --images"
    info = run.run_info
    data = run.config.get("data") or {}
    builtin = str(data.get("train", "")) in ("synthetic", "synthetic:objects")  # the built-in objects' splits
    for key, value in (("eval_test", info.get("eval_test") or data.get("eval_test") or (builtin and "test")),
                       ("eval_train", info.get("eval_train") or data.get("eval_train") or (builtin and "train")),
                       ("train", data.get("train"))):
        if value in ("test", "train"):  # a run without metrics.json: where semssl generated the built-in data
            value = str(_synthetic_root(run) / "objects" / value)
        if isinstance(value, str) and value and not value.startswith("synthetic") and Path(value).exists():
            return [value], f"{FIGURE_IMAGES} images spread over {value} (the run's {key})"
    return None, "none of the run's image folders (data.eval_test, data.eval_train, data.train) is on this machine"


def _synthetic_root(run: RunRecord) -> Path:
    """Where the run's built-in data is (``data.synthetic.root``, else the data root's ``synthetic``)."""
    from semssl.data.synthetic import default_root

    root = ((run.config.get("data") or {}).get("synthetic") or {}).get("root")
    return Path(root) if root else default_root()


def _scene_files(run: RunRecord, fallback: Sequence[str]) -> list[Path]:
    """Image files for the region figure: the run's training scenes (a COCO JSON or a folder) when they are on
    this machine, else ``fallback``'s."""
    from semssl.viz.images import image_files

    train = str((run.config.get("data") or {}).get("train", ""))
    if train.startswith("synthetic:scenes"):
        train = str(_synthetic_root(run) / "scenes" / "train" / "annotations.json")
    if train.lower().endswith(".json") and Path(train).is_file():
        from semssl.data.sources import CocoSource

        source = CocoSource(train, load_masks=False)
        return [Path(p) for p in source.paths]
    if train and not train.startswith("synthetic") and Path(train).is_dir():
        return image_files([train], 10 ** 9)
    return image_files(fallback, 10 ** 9)


def draw_method_figure(run: RunRecord, images: Sequence[str], out: Path) -> tuple[str, str]:
    """Draw the method's figure (:data:`METHOD_FIGURES`) of the run's last checkpoint on ``images`` into ``out``;
    returns (figure name, caption)."""
    from semssl.viz.images import spread

    name = METHOD_FIGURES.get(run.method, "clusters")
    if name == "regions":
        from semssl.viz.regions import draw_regions

        files = spread(_scene_files(run, images), 3)
        draw_regions(files, out, size=max(64, int((run.config.get("data") or {}).get("eval_size", 128))))
        return name, (f"D3SSL's region augmentations (the data pipeline's, no network) on {len(files)} images: "
                      f"{', '.join(f.name for f in files)}")
    from semssl.checkpoints import load_model
    from semssl.viz import figure_modules

    model, info, cfg = load_model(run.path)
    paths = {"train": images[0], "eval_train": images[0], "eval_test": images[0]}
    module = figure_modules()[name]
    if name == "attention":
        module.during_training(model, cfg, paths, out)
    else:
        module.during_training(model, cfg, paths, out, n=FIGURE_IMAGES)
    return name, f"{name} of checkpoints/last.ckpt (step {info.get('global_step')}), drawn for this report"


def section_figures(runs: Sequence[RunRecord], images: Optional[Sequence[str]], draw: bool) -> str:
    source, source_text = _image_source(runs[0], images)
    parts = []
    with tempfile.TemporaryDirectory(prefix="semssl-report-") as tmp:
        for i, run in enumerate(runs):
            text = []
            by_name: dict[str, list[Path]] = {}
            for path in run.figures:
                by_name.setdefault(_figure_name(path), []).append(path)
            for name, paths in by_name.items():
                for path in dict.fromkeys([paths[0], paths[-1]]):
                    text.append(_img(path.read_bytes(), path.stem, f"{path.name}: drawn during training "
                                                                   f"(trainer.figures)"))
            if not draw:
                text.append(_note("Figures from the checkpoint were not drawn (--no-draw)."))
            elif source is None:
                text.append(_note(f"No figure drawn from the checkpoint: {source_text}; give --images."))
            else:
                out = Path(tmp) / f"run{i}.png"
                try:
                    name, caption = draw_method_figure(run, source, out)
                    where = "" if name == "regions" else f"; images: {source_text}"
                    text.append(_img(out.read_bytes(), name, f"{caption}{where}."))
                except (SemsslError, OSError) as err:
                    text.append(_note(f"The method's figure could not be drawn: {err}"))
            if not by_name and not text:
                text.append(_note("No figure."))
            parts.append("".join(text))
    return _side_by_side(runs, parts)


def _environment_rows(run: RunRecord) -> dict[str, Any]:
    info = run.run_info
    rows: dict[str, Any] = {"run folder": str(run.path), "method": run.method,
                            "backbone": f"{info.get('arch', (run.config.get('model') or {}).get('arch'))}, width "
                                        f"{info.get('width', (run.config.get('model') or {}).get('width'))}"}
    for key, label in (("started", "started"), ("train_seconds", "training wall time (s)"),
                       ("total_seconds", "wall time with evaluation (s)"), ("global_step", "steps"),
                       ("epochs", "epochs"), ("world_size", "processes"), ("peak_rss_mb", "peak memory (MB)")):
        if key in info:
            rows[label] = info[key]
    if run.metrics is None and run.scalars:
        rows["steps logged so far"] = max(p[0] for v in run.scalars.values() for p in v) + 1
    machine, versions = info.get("machine"), info.get("versions")
    if isinstance(machine, dict):
        rows.update({f"machine: {k}": v for k, v in machine.items()})
    else:
        rows["machine"] = "not recorded (metrics.json written before semssl recorded it)"
    if isinstance(versions, dict):
        rows.update({f"version: {k}": v for k, v in versions.items()})
    else:
        rows["package versions"] = "not recorded (metrics.json written before semssl recorded it)"
    return rows


def section_environment(runs: Sequence[RunRecord]) -> str:
    tables = [_environment_rows(r) for r in runs]
    keys = list(dict.fromkeys(k for t in tables for k in t))
    rows, classes = [], []
    for key in keys:
        values = [_fmt(t.get(key), 1) if isinstance(t.get(key), float) else _show(t.get(key, "-")) for t in tables]
        rows.append([_e(key), *(_e(v) for v in values)])
        differs = len(runs) > 1 and len(set(values)) > 1 and key not in ("run folder",)
        classes.append(["", *(("diff" if differs else "") for _ in values)])
    header = ["", *(_e(r.label) for r in runs)]
    note = "Highlighted: values that differ between the runs." if len(runs) > 1 else ""
    run_notes = [f"{r.label}: {n}" for r in runs for n in r.notes]
    return _table(header, rows, classes) + (_note(note) if note else "") + "".join(_note(n) for n in run_notes)


# ------------------------------------------------------------------------------------------------ the page
def _labels(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(Path(p.parent.name) / p.name) if names.count(p.name) > 1 else p.name for p in paths]


def build_report(runs: Sequence[RunRecord], images: Optional[Sequence[str]] = None, draw: bool = True) -> str:
    """The HTML page of ``runs`` (read with :func:`read_run`)."""
    import semssl

    for i, run in enumerate(runs):
        run.colour = COLOURS[i % len(COLOURS)]
    bodies = {"config": section_config(runs), "curves": section_curves(runs), "knn": section_knn(runs),
              "collapse": section_collapse(runs), "evaluation": section_evaluation(runs),
              "figures": section_figures(runs, images, draw), "environment": section_environment(runs)}
    sections = "\n".join(f'<section id="{sid}"><h2>{_e(SECTIONS[sid])}</h2>\n{bodies[sid]}\n</section>'
                         for sid in SECTIONS)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS.items())
    summary = []
    for run in runs:
        info = run.run_info
        trained = (run.metrics or {}).get("trained") or {}
        bits = [run.method, f"recipe {run.config.get('name', '?')}"]
        if "global_step" in info:
            bits.append(f"{info['global_step']} steps")
        if "knn_top1" in trained:
            bits.append(f"kNN {trained['knn_top1']:.2f} %")
        summary.append(f'<li><span class="swatch" style="background:{run.colour}"></span> <b>{_e(run.label)}</b> '
                       f'({_e(run.path)}): {_e(", ".join(bits))}</li>')
    title = ("Run report: " + runs[0].label) if len(runs) == 1 else f"Run report: {len(runs)} runs side by side"
    return PAGE.substitute(title=_e(title), runs=f"<ul>{''.join(summary)}</ul>", nav=nav, sections=sections,
                           columns=len(runs), version=_e(semssl.__version__),
                           written=_e(time.strftime("%Y-%m-%d %H:%M:%S")))


def write_report(runs: Sequence[str | Path], out: str | Path = "report.html", images: Optional[Sequence[str]] = None,
                 draw: bool = True) -> Path:
    """Write the report of the run folders ``runs`` (one, or several side by side) to ``out`` and return its path.

    ``images``: files or folders the method's figures are drawn on (default: the first run's evaluation test
    split); ``draw=False`` embeds only the figures the runs drew during training. A missing or unreadable run
    folder is a :class:`~semssl.errors.ReportError` naming the file at fault, raised before anything is written."""
    if not runs:
        raise ReportError("give at least one run folder")
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"{out}: is a folder; give the HTML file to write (-o report.html)")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"{out}: the report is an HTML page; give a file name ending in .html")
    paths = [Path(r) for r in runs]
    records = [read_run(p) for p in paths]
    for record, label in zip(records, _labels(paths)):
        record.label = label
    page = build_report(records, images=images, draw=draw)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
