"""``semssl reproduce PAPER TABLE``: one ablation table of a paper at small scale, in one command.

The tables, their rows (recipe + overrides), the paper's numbers and the evaluation behind each column live in
:mod:`semssl.reproduce_tables`. This module plans the runs, runs what is missing, and prints the table:

* every row is pre-trained once per seed (``--seeds 0,1,2``) with ``semssl pretrain``, then evaluated with the
  table's evaluation commands (``semssl eval ...`` / ``semssl transfer ...``), each a child process whose output
  goes to ``<out>/<paper>-<table>/logs/<row>-s<seed>.log``;
* it resumes: a step whose output exists is skipped; a pre-training with ``checkpoints/last.ckpt`` but no
  ``metrics.json`` continues with ``semssl pretrain --resume``, a fine-tuning with ``state.pt`` with ``--resume``;
  a run folder with neither (a start that failed) is moved aside to ``<run>.incomplete-N``, never deleted;
* progress and ETA across runs: before each step a line says which run and step, the share of the estimated
  work done, the elapsed time and the ETA. Estimates start from the measured recipe times of
  :data:`~semssl.reproduce_tables.RECIPE_SECONDS` (scaled by ``trainer.max_steps``) and are corrected by the ratio
  of actual to estimated time of the steps already done in this table's folder (``timings.json``);
* the table: per column, each row's mean ± sd over seeds, the paper's value, the row's difference to its
  baseline row (paired over seeds) beside the paper's, and whether the signs agree ("yes", "no"; "noise" when
  our difference is within one paired standard deviation of zero). Written to ``table.json`` and ``table.md``.

``--dry-run`` lists the runs, each step's state and estimated time, and runs nothing. ``--scale paper`` prints the
exact commands of the paper's protocol for a GPU cluster (placeholders such as ``$IMAGENET100`` name the user's
data) and runs nothing.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from semssl.errors import ConfigError
from semssl.reproduce_tables import EVALUATIONS, PAPER_PLACEHOLDERS, RECIPE_SECONDS, TABLES, Measure, Row, Table

DEFAULT_OUT = "runs/reproduce"
FALLBACK_SECONDS_PER_STEP = 1.0  # a recipe without a measured time in RECIPE_SECONDS


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class Step:
    name: str  # "pretrain" or an evaluation's name
    argv: list[str]  # arguments of `semssl` (with $SEMSSL_DATA_DIR unexpanded)
    output: Path  # the step is done when this exists
    estimate: float  # seconds

    @property
    def done(self) -> bool:
        return self.output.exists()


@dataclass
class Run:
    row: Row
    seed: int
    dir: Path
    steps: list[Step] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.row.key}-s{self.seed}"


def find_table(paper: str, name: str) -> Table:
    """The table ``paper`` / ``name``, or a :class:`ConfigError` that lists what exists."""
    if (paper, name) in TABLES:
        return TABLES[(paper, name)]
    papers = sorted({p for p, _ in TABLES})
    if paper not in papers:
        raise ConfigError(f"reproduce: unknown paper '{paper}' (one of {', '.join(papers)})")
    names = [t for p, t in TABLES if p == paper]
    raise ConfigError(f"reproduce {paper}: unknown table '{name}' (one of {', '.join(names)})")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: expected distinct integers >= 0, e.g. 0,1,2")
    return seeds


def table_dir(table: Table, out: Path) -> Path:
    return out / f"{table.paper}-{table.name}"


def pretrain_argv(row: Row, seed: int, tdir: Path, extra: Sequence[str]) -> list[str]:
    return ["pretrain", "-c", row.recipe, *row.overrides, *extra, f"trainer.seed={seed}", f"trainer.out_dir={tdir}",
            f"trainer.run_name={row.key}-s{seed}", "trainer.progress_bar=false"]


def pretrain_estimate(row: Row, extra: Sequence[str]) -> float:
    """Seconds: the recipe's measured time, scaled by the run's ``trainer.max_steps`` over the recipe's."""
    from semssl.config import load_config

    steps = load_config(row.recipe, [*row.overrides, *extra]).trainer.max_steps
    base_steps = load_config(row.recipe, []).trainer.max_steps
    if row.recipe in RECIPE_SECONDS and base_steps > 0 and steps > 0:
        return RECIPE_SECONDS[row.recipe] * steps / base_steps
    return FALLBACK_SECONDS_PER_STEP * max(steps, 1)


def evaluations_of(table: Table, detect: bool) -> list[str]:
    return [e for e in table.evaluations if detect or not EVALUATIONS[e].optional]


def plan(table: Table, seeds: Sequence[int], out: Path, detect: bool = False, extra: Sequence[str] = ()) -> list[Run]:
    """Every run of the table (row-major, then seed), each with its steps in order."""
    tdir = table_dir(table, out)
    runs = []
    for row in table.rows:
        pre_estimate = pretrain_estimate(row, extra)
        for seed in seeds:
            run = Run(row, seed, tdir / f"{row.key}-s{seed}")
            run.steps.append(Step("pretrain", pretrain_argv(row, seed, tdir, extra), run.dir / "metrics.json",
                                  pre_estimate))
            for name in evaluations_of(table, detect):
                ev = EVALUATIONS[name]
                if ev.argv:
                    argv = [a.replace("{run}", str(run.dir)) for a in ev.argv]
                    run.steps.append(Step(name, argv, run.dir / ev.output, ev.seconds))
            runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------------ running
def command_line(argv: Sequence[str]) -> str:
    """``semssl ...`` as a shell would take it (``$SEMSSL_DATA_DIR`` left for the shell to expand)."""
    return "semssl " + " ".join(a if a.startswith("$") and " " not in a else shlex.quote(a) for a in argv)


def resumable_argv(step: Step, run: Run) -> list[str]:
    """The step's arguments, turned into a resume where a previous attempt left a checkpoint."""
    if step.name == "pretrain":
        if (run.dir / "checkpoints" / "last.ckpt").exists():
            return ["pretrain", "--resume", str(run.dir)]
        if run.dir.exists():
            n = 1
            while run.dir.with_name(f"{run.dir.name}.incomplete-{n}").exists():
                n += 1
            run.dir.rename(run.dir.with_name(f"{run.dir.name}.incomplete-{n}"))
        return step.argv
    out_dir = step.output.parent
    if step.argv[0] in ("transfer", "finetune") and (out_dir / "state.pt").exists():
        return [*step.argv, "--resume"]
    return step.argv


class Timings:
    """``timings.json`` of a table folder: ``{"<run>/<step>": {"seconds": s, "estimate": e}}``, and the
    actual-to-estimated ratio that corrects the ETA."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, float]] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, key: str, seconds: float, estimate: float) -> None:
        self.data[key] = {"seconds": round(seconds, 1), "estimate": round(estimate, 1)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def ratio(self) -> float:
        spent = sum(v["seconds"] for v in self.data.values())
        estimated = sum(v["estimate"] for v in self.data.values())
        return spent / estimated if spent > 0 and estimated > 0 else 1.0


def hms(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _spawn(argv: list[str], log: Path) -> int:
    """Run ``semssl ARGV`` in a child process (``$SEMSSL_DATA_DIR`` expanded), appending its output to ``log``."""
    from semssl.data.root import expand

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {command_line(argv)}\n")
        fh.flush()
        return subprocess.call([sys.executable, "-m", "semssl", *[expand(a) for a in argv]], stdout=fh,
                               stderr=subprocess.STDOUT)


def execute(table: Table, runs: list[Run], out: Path, say: Callable[[str], None] = print,
            spawn: Callable[[list[str], Path], int] = _spawn) -> list[str]:
    """Run every step not done yet, in order; return the failures (``"<run>/<step>"``). A failed
    pre-training skips that run's evaluations; the other runs go on."""
    tdir = table_dir(table, out)
    timings = Timings(tdir / "timings.json")
    pending = [(run, step) for run in runs for step in run.steps if not step.done]
    total = sum(s.estimate for r in runs for s in r.steps)
    left = sum(s.estimate for _, s in pending)
    start, failed, broken = time.monotonic(), [], set()
    for i, (run, step) in enumerate(pending, 1):
        if run.name in broken or step.done:  # done meanwhile (by another process, or by an earlier step)
            left -= step.estimate
            continue
        eta = left * timings.ratio()
        say(f"[{i}/{len(pending)}] {table.paper} {table.name} · {run.row.label} (seed {run.seed}) · {step.name} · "
            f"{100 * (1 - left / total) if total else 100:.0f} % of the work done · elapsed "
            f"{hms(time.monotonic() - start)} · ETA {hms(eta)}")
        t0 = time.monotonic()
        rc = spawn(resumable_argv(step, run), tdir / "logs" / f"{run.name}.log")
        seconds = time.monotonic() - t0
        left -= step.estimate
        if rc != 0 or not step.done:
            failed.append(f"{run.name}/{step.name}")
            say(f"    failed (exit {rc}); its log: {tdir / 'logs' / (run.name + '.log')}")
            if step.name == "pretrain":
                broken.add(run.name)
            continue
        timings.record(f"{run.name}/{step.name}", seconds, step.estimate)
    say(f"done in {hms(time.monotonic() - start)}" + (f"; {len(failed)} step(s) failed" if failed else ""))
    return failed


# ------------------------------------------------------------------------------------------------ the table
def _lookup(data: Any, path: Sequence[str]) -> Optional[float]:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, (int, float)) and not isinstance(data, bool) else None


def read_value(run: Run, measure: Measure) -> Optional[float]:
    ev = EVALUATIONS[measure.evaluation]
    path = run.dir / ev.output
    if not path.exists():
        return None
    try:
        return _lookup(json.loads(path.read_text()), measure.path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); move it aside and rerun the step") from None


def _mean_sd(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def agreement(ours: Optional[float], ours_sd: Optional[float], paper: Optional[float]) -> str:
    """``yes`` / ``no`` (signs of our and the paper's difference), ``noise`` where ours is within one
    paired sd of 0, ``-`` where either is missing or the paper's is 0."""
    if ours is None or paper is None or paper == 0:
        return "-"
    if ours_sd is not None and abs(ours) <= ours_sd:
        return "noise"
    return "yes" if math.copysign(1, ours) == math.copysign(1, paper) and ours != 0 else "no"


def collect(table: Table, runs: list[Run], measures: Sequence[Measure]) -> dict[str, Any]:
    """``{"rows": [...], "measures": [...]}``: per row and measure the seeds' values, mean, sd, paper value,
    the paired difference to the baseline row and the paper's difference, and the agreement."""
    by_row: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_row.setdefault(run.row.key, {})[run.seed] = run
    rows = []
    for row in table.rows:
        base = table.baseline_of(row)
        cells = {}
        for m in measures:
            values = {s: read_value(r, m) for s, r in by_row.get(row.key, {}).items()}
            got = [v for v in values.values() if v is not None]
            mean, sd = _mean_sd(got)
            base_runs, diffs = by_row.get(base.key, {}), []
            for s, v in values.items():
                b = read_value(base_runs[s], m) if s in base_runs else None
                if v is not None and b is not None:
                    diffs.append(v - b)
            delta, delta_sd = _mean_sd(diffs) if base.key != row.key else (None, None)
            paper, paper_base = row.paper.get(m.key), base.paper.get(m.key)
            paper_delta = paper - paper_base if paper is not None and paper_base is not None and base is not row \
                else None
            cells[m.key] = {"values": {str(s): v for s, v in values.items()}, "mean": mean, "sd": sd, "paper": paper,
                            "delta": delta, "delta_sd": delta_sd, "paper_delta": paper_delta,
                            "agrees": agreement(delta, delta_sd, paper_delta)}
        rows.append({"key": row.key, "label": row.label, "baseline": base.key, "recipe": row.recipe,
                     "overrides": list(row.overrides), "cells": cells})
    return {"paper": table.paper, "table": table.name, "title": table.title, "protocol": table.protocol,
            "small": table.small, "measures": [{"key": m.key, "header": m.header, "paper": m.paper,
                                               "evaluation": m.evaluation,
                                               "kind": EVALUATIONS[m.evaluation].kind} for m in measures],
            "rows": rows}


def _fmt(value: Optional[float], digits: int, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _cell(c: dict, digits: int) -> str:
    text = _fmt(c["mean"], digits)
    n = sum(v is not None for v in c["values"].values())
    if c["sd"] is not None:
        text += f" ± {c['sd']:.{digits}f}"
    return f"{text} (n {n})" if n > 1 else text


def markdown(result: dict, measures: Sequence[Measure]) -> str:
    """The table as Markdown: one block per column of the paper, rows × (ours, paper, Δ ours, Δ paper, agree)."""
    lines = [f"### {result['paper'].upper()} {result['table']}: {result['title']}", "",
             f"Paper: {result['protocol']}. Here: {result['small']}.", ""]
    for m in measures:
        kind = EVALUATIONS[m.evaluation].kind
        lines += [f"**{m.header}** ({kind}; paper column: {m.paper or 'none'}"
                  f"{'; lower is better' if not m.higher_is_better else ''})", "",
                  "| row | ours | paper | Δ ours vs base | Δ paper | signs agree |", "|---|---:|---:|---:|---:|---|"]
        for r in result["rows"]:
            c = r["cells"][m.key]
            base = "base" if r["baseline"] == r["key"] else f"{_fmt(c['delta'], m.digits, True)}" + (
                f" ± {c['delta_sd']:.{m.digits}f}" if c["delta_sd"] is not None else "")
            lines.append(f"| {r['label']} | {_cell(c, m.digits)} | {_fmt(c['paper'], m.digits)} | {base} | "
                         f"{_fmt(c['paper_delta'], m.digits, True)} | {c['agrees']} |")
        lines.append("")
    return "\n".join(lines)


def print_table(result: dict, measures: Sequence[Measure], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console()
    console.print(f"[bold]{result['paper'].upper()} {result['table']}: {result['title']}[/bold]")
    console.print(f"paper: {result['protocol']}\nhere: {result['small']}")
    for m in measures:
        kind = EVALUATIONS[m.evaluation].kind
        t = RichTable(title=f"{m.header} ({kind}; paper: {m.paper or '-'}"
                            f"{'; lower is better' if not m.higher_is_better else ''})")
        for col in ("row", "ours", "paper", "Δ ours vs base", "Δ paper", "agree"):
            t.add_column(col, justify="left" if col in ("row", "agree") else "right")
        for r in result["rows"]:
            c = r["cells"][m.key]
            delta = "base" if r["baseline"] == r["key"] else _fmt(c["delta"], m.digits, True) + (
                f" ± {c['delta_sd']:.{m.digits}f}" if c["delta_sd"] is not None else "")
            t.add_row(r["label"], _cell(c, m.digits), _fmt(c["paper"], m.digits), delta,
                      _fmt(c["paper_delta"], m.digits, True), c["agrees"])
        console.print(t)


def shown_measures(table: Table, detect: bool) -> list[Measure]:
    active = set(evaluations_of(table, detect)) | {"pretrain"}
    return [m for m in table.measures if m.evaluation in active]


# ------------------------------------------------------------------------------------------------ dry run, paper
def dry_run(table: Table, runs: list[Run], out: Path, say: Callable[[str], None] = print) -> float:
    """List the runs and steps with their state and estimate; return the estimated seconds still to run."""
    ratio = Timings(table_dir(table, out) / "timings.json").ratio()
    left = 0.0
    say(f"{table.paper} {table.name}: {table.title} — {len(table.rows)} rows x {len(runs) // len(table.rows)} "
        f"seeds = {len(runs)} runs")
    for run in runs:
        say(f"  {run.name}  ({run.row.label}: {' '.join([run.row.recipe, *run.row.overrides])})")
        for step in run.steps:
            state = "done" if step.done else "to run"
            if not step.done:
                left += step.estimate * ratio
            say(f"    {step.name:<13} {state:<7} ~{hms(step.estimate * ratio)}   {command_line(step.argv)}")
    skipped = [e for e in table.evaluations if EVALUATIONS[e].optional and all(e != s.name for r in runs
                                                                                 for s in r.steps)]
    if skipped:
        say(f"  not run without --detect: {', '.join(skipped)}")
    say(f"estimated time still to run: {hms(left)} (one run at a time, this machine's measured step times"
        f"{f', corrected x{ratio:.2f} by the runs done' if ratio != 1.0 else ''})")
    return left


def paper_commands(table: Table, seeds: Sequence[int], out: str = "runs/reproduce-paper") -> list[str]:
    """The paper-scale commands of every row and seed (the table's ``paper_scale`` templates filled in)."""
    tdir = f"{out}/{table.paper}-{table.name}"
    lines = []
    for row in table.rows:
        overrides = row.paper_overrides if row.paper_overrides is not None else row.overrides
        for seed in seeds:
            run_name = f"{row.key}-s{seed}"
            fill = {"recipe": row.paper_recipe or table.paper_recipe,
                    "overrides": " ".join(map(shlex.quote, overrides)), "seed": seed, "out": tdir,
                    "run_name": run_name, "run": f"{tdir}/{run_name}"}
            lines.append(f"# {row.label}, seed {seed}")
            lines += [" ".join(t.format(**fill).split()) for t in table.paper_scale]
    return lines


def print_paper(table: Table, seeds: Sequence[int], say: Callable[[str], None] = print) -> None:
    lines = paper_commands(table, seeds)
    used = [k for k in PAPER_PLACEHOLDERS if any(re.search(re.escape(k) + r"\b", line) for line in lines)]
    say(f"# {table.paper} {table.name} at the paper's scale: {table.protocol}")
    say("# run on a GPU cluster (each recipe's own trainer.devices; add trainer.num_nodes=N to spread out); data:")
    for k in used:
        say(f"#   {k} = {PAPER_PLACEHOLDERS[k]}")
    for line in lines:
        say(line)


# ------------------------------------------------------------------------------------------------ the command
def reproduce(paper: str, name: str, seeds: str = "0,1,2", out: str = DEFAULT_OUT, scale: str = "small",
              dry: bool = False, detect: bool = False, extra: Sequence[str] = (),
              spawn: Callable[[list[str], Path], int] = _spawn, say: Callable[[str], None] = print) -> int:
    """``semssl reproduce``: 0 when every step ran (or only a listing was asked), 1 when a step failed."""
    table, seed_list = find_table(paper, name), parse_seeds(seeds)
    if scale == "paper":
        print_paper(table, seed_list, say)
        return 0
    if scale != "small":
        raise ConfigError(f"--scale {scale!r}: small (run here) or paper (print the cluster commands)")
    out_path = Path(out)
    runs = plan(table, seed_list, out_path, detect, extra)
    if dry:
        dry_run(table, runs, out_path, say)
        return 0
    failed = execute(table, runs, out_path, say, spawn)
    measures = shown_measures(table, detect)
    result = collect(table, runs, measures)
    tdir = table_dir(table, out_path)
    tdir.mkdir(parents=True, exist_ok=True)
    (tdir / "table.json").write_text(json.dumps({**result, "seeds": seed_list, "failed": failed}, indent=2))
    (tdir / "table.md").write_text(markdown(result, measures))
    print_table(result, measures)
    say(f"wrote {tdir / 'table.json'} and {tdir / 'table.md'}")
    return 1 if failed else 0


def table_names() -> list[str]:
    return [f"{p} {t}" for p, t in TABLES]


__all__ = ["reproduce", "plan", "collect", "paper_commands", "find_table", "table_names"]
