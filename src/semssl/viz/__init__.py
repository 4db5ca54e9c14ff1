"""Figures: ``semssl viz NAME``. Every module of this package (but those starting with ``_``) is one figure,
found here the first time the command line asks, so a new figure is one new file, listed nowhere else.

A figure module defines

* ``HELP`` — one line for ``semssl viz --help``;
* ``add_arguments(parser)`` — its options (argparse);
* ``run(args) -> int`` — draw the figure (matplotlib, Agg backend), write it where ``args.out`` says, print the
  path, return the exit code.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def figure_modules() -> dict[str, ModuleType]:
    """``{name: module}`` of every figure of this package."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "run") and hasattr(module, "add_arguments"):
                out[info.name] = module
    return dict(sorted(out.items()))
