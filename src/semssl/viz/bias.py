"""Coupling rate and positional bias per stage, one line per checkpoint (D3SSL Figs. 3b and 4b), from the JSON of
``semssl eval bias``; and the canvases the two measures are computed on (Figs. 3a and 4a).

``semssl viz bias --inputs soco.json d3ssl.json --labels SoCo D3SSL --out bias.png``. A JSON of one model gives one
line (labelled by ``--labels``, else the file name); a JSON of the random-init baselines gives one line per
baseline.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from semssl.viz import save_figure

#: (JSON key, panel title, y label, ideal value)
PANELS = (("coupling_rate", "Coupling (D3SSL Fig. 3)", "coupling rate  cos(A1,B) / cos(A2,B)", 1.0),
          ("positional_mcs", "Positional bias (D3SSL Fig. 4)", "mean cosine, centre vs 8 others (3x3)", 1.0))


def curves_from_payload(payload: Mapping[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """``{label: result}`` of one ``semssl eval bias`` JSON: the result itself for one model, one entry per
    baseline (``label: random_init`` ..., or the baseline's name alone when ``label`` is empty) for the
    random-init baselines."""
    if "coupling_rate" in payload or "positional_mcs" in payload:
        return {label: dict(payload)}
    nested = {name: value for name, value in payload.items()
              if isinstance(value, Mapping) and ("coupling_rate" in value or "positional_mcs" in value)}
    if not nested:
        raise ValueError(f"{label}: not an output of `semssl eval bias` (no 'coupling_rate' / 'positional_mcs')")
    return {(f"{label}: {name}" if label else name): dict(value) for name, value in nested.items()}


def plot_bias(curves: Mapping[str, Mapping[str, Any]], out: str | Path, title: str | None = None) -> Path:
    """Two panels (CR, MCS) with stages on the x axis and one line per entry of ``curves`` (``{label: result}``
    where a result holds ``coupling_rate`` / ``positional_mcs`` as ``{stage: value}``); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (key, panel, ylabel, ideal) in zip(axes, PANELS):
        stages: list[str] = []
        for label, result in curves.items():
            values = result.get(key) or {}
            names = list(values)
            stages += [s for s in names if s not in stages]
            ax.plot(names, [values[s] for s in names], marker="o", label=label)
        ax.axhline(ideal, color="grey", lw=0.8, ls="--")
        ax.set_title(panel)
        ax.set_xlabel("stage")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def plot_canvases(prepared: Mapping[str, Any], out: str | Path, count: int = 3) -> Path:
    """The first ``count`` CR pairs (A with B, A alone) and MCS tilings of :func:`semssl.eval.bias.prepare_crops`,
    with the boxes RoIAlign reads (D3SSL Figs. 3a, 4a); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from semssl.eval.bias import pair_canvases, tile_canvas

    count = min(count, prepared["crops_a"].shape[0], prepared["crops_mcs"].shape[0])
    fig, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    for row in range(count):
        both, alone, box_a, box_b = pair_canvases(prepared["crops_a"][row], prepared["crops_b"][row],
                                                  prepared["canvas"])
        tiled, cells = tile_canvas(prepared["crops_mcs"][row])
        panels = ((both, [(box_a, "A1", "lime"), (box_b, "B", "red")]), (alone, [(box_a, "A2", "lime")]),
                  (tiled, [(b, "", "yellow" if i == 4 else "white") for i, b in enumerate(cells)]))
        for ax, (image, boxes) in zip(axes[row], panels):
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            for box, name, colour in boxes:
                x1, y1, x2, y2 = box.tolist()
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour, lw=1))
                if name:
                    ax.text(x1 + 1, y1 + 6, name, color=colour, fontsize=8)
            ax.set_axis_off()
    axes[0][0].set_title("CR: A next to B")
    axes[0][1].set_title("CR: A alone")
    axes[0][2].set_title("MCS: 3x3 tiling")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def run(args: argparse.Namespace) -> int:
    if args.labels and len(args.labels) != len(args.inputs):
        raise SystemExit(f"semssl viz bias: {len(args.labels)} labels for {len(args.inputs)} inputs")
    labels: Sequence[str] = args.labels or [Path(p).stem for p in args.inputs]
    curves: dict[str, dict[str, Any]] = {}
    for path, label in zip(args.inputs, labels):
        curves.update(curves_from_payload(json.loads(Path(path).read_text()), label))
    print(f"wrote {plot_bias(curves, args.out, args.title)}")
    return 0
