"""Figures: ``semssl viz NAME``. Every module of this package (but those starting with ``_``) that defines ``run``
is one figure, found here the first time it is asked for.

A figure module defines

* ``run(args) -> int`` — draw the figure (matplotlib, Agg backend), write it where ``args.out`` says, print the
  path, return the exit code;

and, if the figure can be drawn during training (``trainer.figures`` in a recipe, e.g. SCD's saliency maps
forming), ``during_training(method, cfg, paths, out, **options) -> None``: draw it for the live ``method`` (a
:class:`~semssl.methods.Method`, in eval mode for the call) into the PNG file ``out``; ``paths`` are the run's
resolved data paths (``train``, ``eval_train``, ``eval_test``) and ``options`` the entry's other keys.

Its command-line entry (the line of ``semssl viz --help`` and ``add_<name>_arguments(parser)``, its options)
sits in :mod:`semssl.viz.options`, a light module, so that building the parser imports no figure module (torch,
matplotlib); a test checks that the entries and the figure modules agree. So a new figure is one new file and its
entry there.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any


def save_figure(fig: Any, out: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure to ``out`` (PNG; its folder created), close it, and return the path."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def figure_modules() -> dict[str, ModuleType]:
    """``{name: module}`` of every figure of this package."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "run"):
                out[info.name] = module
    return dict(sorted(out.items()))


def training_figure(name: str) -> ModuleType:
    """The figure module ``name``, which must support ``during_training`` (a ConfigError otherwise)."""
    from semssl.errors import ConfigError

    modules = figure_modules()
    able = [n for n, m in modules.items() if hasattr(m, "during_training")]
    if name not in able:
        raise ConfigError(f"trainer.figures: '{name}' is not a figure that can be drawn during training "
                          f"(available: {able or 'none'})")
    return modules[name]
