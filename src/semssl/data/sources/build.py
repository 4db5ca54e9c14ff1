"""The source factory: :func:`build_source` picks the kind of source from a dataset path."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from semssl.data.sources.base import ImageSource, _missing_path_error
from semssl.data.sources.coco import CocoSource
from semssl.data.sources.filelist import FileListSource
from semssl.data.sources.folder import ImageFolderSource
from semssl.errors import DataError

__all__ = ["COCO_SPLIT_FILE", "LIST_EXTENSIONS", "build_source"]

#: The file that makes a directory a COCO-style split (read by :func:`build_source` instead of the folder).
COCO_SPLIT_FILE = "annotations.json"

#: Extensions :func:`build_source` reads as a file list.
LIST_EXTENSIONS: tuple[str, ...] = (".txt", ".lst", ".csv")

_KINDS: dict[str, type[ImageSource]] = {
    "folder": ImageFolderSource,
    "list": FileListSource,
    "coco": CocoSource,
}


def build_source(path: str | os.PathLike[str], kind: str = "auto", **kw: Any) -> ImageSource:
    """Build a source from a path; ``kind="auto"`` picks it from the path.

    A ``.json`` file is a COCO annotation file (:class:`CocoSource`), a ``.txt``/``.lst``/``.csv`` file a
    file list (:class:`FileListSource`), a directory an image folder (:class:`ImageFolderSource`) — except a
    directory holding a COCO ``annotations.json`` (the built-in scenes' split layout: ``images/``,
    ``semantic/``, ``annotations.json``), which is read through that file, as ``semssl eval objects`` reads it:
    as a plain folder its ``semantic/`` class-index masks would be listed as images of a class "semantic".
    ``kind`` may also be ``"folder"``, ``"list"`` or ``"coco"``. ``kw`` go to the source's constructor;
    an option the chosen source does not take is a DataError naming the ones it does.
    """
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(p, "dataset path")
    if kind in ("auto", "coco") and p.is_dir() and (p / COCO_SPLIT_FILE).is_file():
        p = p / COCO_SPLIT_FILE
    chosen = _detect_kind(p) if kind == "auto" else kind
    if chosen not in _KINDS:
        raise DataError(f"unknown source kind {kind!r} for '{p}'; use one of: auto, {', '.join(_KINDS)}")
    cls = _KINDS[chosen]
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"][1:]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise DataError(
            f"option(s) {', '.join(unknown)} do not apply to a {chosen} source ('{p}'); "
            f"it takes: {', '.join(accepted)}"
        )
    return cls(p, **kw)


def _detect_kind(p: Path) -> str:
    if p.is_dir():
        return "folder"
    suffix = p.suffix.lower()
    if suffix == ".json":
        return "coco"
    if suffix in LIST_EXTENSIONS:
        return "list"
    raise DataError(
        f"cannot tell what kind of dataset '{p}' is: expected a directory (image folder), a .json file "
        f"(COCO annotations) or a {'/'.join(LIST_EXTENSIONS)} file (file list)"
    )
