"""The data root: the one folder under which recipes name their datasets (``$SEMSSL_DATA_DIR/<dataset>/...``).

Rule: the data root is ``$SEMSSL_DATA_DIR`` when that variable is set (``~`` expanded), else ``~/.cache/semssl``.
Under it live

* the real datasets, one folder per name: ``cifar10``, ``cifar10-6k``, ``coco128``, ``stanford-background``,
  ``msrc-v2`` — each written by ``semssl data get NAME`` (:mod:`semssl.data.get`) or put there by hand;
* ``synthetic/``: the built-in generated data (:func:`semssl.data.synthetic.default_root`).

Decision: one variable for all data, the synthetic set one folder below it. Before, ``$SEMSSL_DATA_DIR`` was the
synthetic set's own folder; making it the root of every dataset keeps the default location of the built-in data
(``~/.cache/semssl/synthetic``, the cache folder it always used) and lets one setting — a fast disk, a shared
read-only copy — serve every recipe. A recipe that names ``$SEMSSL_DATA_DIR`` therefore works from a fresh clone
once ``semssl data get NAME`` has run, with nothing placed beside the repository.

:func:`expand` replaces ``$SEMSSL_DATA_DIR`` (or ``${SEMSSL_DATA_DIR}``) in a string by the data root, the default
included when the variable is unset; the config does so for every string value when it is read
(:mod:`semssl.config`), and the command line for every path option (``--train '$SEMSSL_DATA_DIR/...'``, quoted so
that the shell leaves it to semssl). No other variable is expanded. :func:`missing_dataset` is the one-line message
for a path under the root that does not exist: which dataset it is and how to get it.

This module is light (no third-party import): the config imports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = ["DATA_ENV", "GETTABLE", "data_root", "dataset_of", "describe_root", "expand", "missing_dataset"]

#: the environment variable that names the data root
DATA_ENV = "SEMSSL_DATA_DIR"

#: the datasets ``semssl data get NAME`` writes (the registry of :mod:`semssl.data.get` has exactly these keys)
GETTABLE: tuple[str, ...] = ("cifar10", "cifar10-6k", "coco128", "stanford-background", "msrc-v2")

_VAR = re.compile(r"\$(?:\{" + DATA_ENV + r"\}|" + DATA_ENV + r"(?![A-Za-z0-9_]))")


def data_root() -> Path:
    """``$SEMSSL_DATA_DIR`` if set (``~`` expanded), else ``~/.cache/semssl`` (module docstring)."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "semssl"


def describe_root() -> str:
    """The data root and where it comes from, for messages."""
    if os.environ.get(DATA_ENV):
        return f"data root {data_root()} (${DATA_ENV})"
    return f"data root {data_root()} (the default: ${DATA_ENV} is unset)"


def expand(text: str) -> str:
    """``text`` with every ``$SEMSSL_DATA_DIR`` / ``${SEMSSL_DATA_DIR}`` replaced by :func:`data_root`."""
    if "$" not in text:
        return text
    root = str(data_root())
    return _VAR.sub(lambda _: root, text)


def dataset_of(path: str | os.PathLike[str]) -> Optional[str]:
    """The dataset name (first folder below the data root) of a path under the data root, else None."""
    try:
        rel = Path(path).expanduser().absolute().relative_to(data_root().absolute())
    except ValueError:
        return None
    return rel.parts[0] if rel.parts else None


def missing_dataset(path: str | os.PathLike[str], key: Optional[str] = None) -> Optional[str]:
    """One line for a ``path`` under the data root that does not exist (None when it exists or lies elsewhere):
    the key that names it, the path, the data root and ``semssl data get NAME`` — or, for a name that command does
    not know, what to do instead."""
    if Path(path).exists():
        return None
    name = dataset_of(path)
    if name is None:
        return None
    where = f"{key}: " if key else ""
    if name in GETTABLE:
        if (data_root() / name).is_dir():  # the dataset is there, the path inside it is not
            return (f"{where}'{path}' not found: {name} is under the {describe_root()} but has no such file or "
                    f"folder (a partial copy? `semssl data get {name} --force` writes it again)")
        return (f"{where}'{path}' not found: {name} is not under the {describe_root()}; get it with "
                f"`semssl data get {name}`, or set {DATA_ENV} to the folder that holds {name}/")
    return (f"{where}'{path}' not found: '{name}' is not under the {describe_root()}, and `semssl data get` does "
            f"not know it (it gets: {', '.join(GETTABLE)}); put {name}/ there or set {DATA_ENV}")
