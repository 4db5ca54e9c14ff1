"""The result table every ``semssl eval`` command prints (rich), and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def print_table(title: str, columns: dict[str, dict[str, Any]], out: Optional[str], payload: dict,
                digits: int = 2) -> None:
    """One table: a row per metric, a column per evaluated model (``model`` -> "value"; the random-init baselines
    by their labels), floats with ``digits`` decimals; ``payload`` written as JSON to ``out``."""
    from rich.console import Console
    from rich.table import Table

    from semssl.eval.evaluate import BASELINE_LABELS

    table = Table(title=title)
    table.add_column("metric")
    for name in columns:
        table.add_column("value" if name == "model" else BASELINE_LABELS.get(name, name), justify="right")
    for key in dict.fromkeys(k for rows in columns.values() for k in rows):
        values = [rows.get(key) for rows in columns.values()]
        table.add_row(key, *(f"{v:.{digits}f}" if isinstance(v, float) else "-" if v is None else str(v)
                             for v in values))
    Console().print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2, default=float))
        print(f"wrote {out}")
