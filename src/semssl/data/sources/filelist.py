"""File-list sources: :class:`FileListSource` (one ``path [label]`` per line) and the parsing of list files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from PIL import Image

from semssl.data.sources.base import (
    IMG_EXTENSIONS,
    ImageSource,
    OnError,
    Sample,
    _probe_existing,
    _require_dir,
    _require_file,
)
from semssl.errors import DataError

__all__ = ["FileListSource"]


class FileListSource(ImageSource):
    """Images named in a text file, one ``path [label]`` per line.

    Relative paths are resolved against ``root`` if given (a run's ``data.train_root``), else against the list
    file's folder; absolute paths are used as they are. A path without an image extension is an id: the image
    ``<id>.jpg`` (or any other image extension) beside it. Lines that are blank or start with ``#`` are ignored. In
    ``.txt``/``.lst`` files the fields are separated by whitespace (so a path cannot contain spaces there); ``.csv``
    files are read with the csv module (quoted paths may hold commas or spaces; a header row ``path[,label]`` is
    skipped). Labels are non-negative integers, present on every line or on none: a file mixing both is a DataError
    naming the first line that breaks the rule. ``classes`` are ``"0" .. str(max label)``. A path may appear on
    several lines (it is then sampled that many times per epoch: a way to weight the parts of a mixed list).

    ``proposals`` / ``proposal_params``: as for :class:`~semssl.data.sources.folder.ImageFolderSource`, with the
    cache ``<list file>.proposals.json`` beside the list (one entry per distinct file).
    """

    def __init__(
        self,
        list_file: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        on_error: OnError = "skip",
        proposals: bool | str = False,
        proposal_params: dict | None = None,
    ) -> None:
        super().__init__(on_error)
        self.list_file = _require_file(list_file, "file list")
        self.root = _require_dir(root, "file list root") if root is not None else self.list_file.parent
        entries = _parse_list(self.list_file)
        if not entries:
            raise DataError(f"file list '{self.list_file}' names no images (only blank or comment lines)")
        self.paths = _with_extensions([p if p.is_absolute() else self.root / p for _, p, _ in entries])
        labels = [label for _, _, label in entries]
        self.labelled = labels[0] is not None
        self.targets = [label if label is not None else -1 for label in labels]
        self.classes = [str(i) for i in range(max(self.targets) + 1)] if self.labelled else []
        _probe_existing(
            self.paths,
            f"'{self.list_file}'",
            f"relative paths are resolved against '{self.root}'; check root=",
        )
        self.proposals = None
        if proposals:
            from semssl.data.proposals import SourceProposals

            self.proposals = SourceProposals(self.paths, self.root, self.list_file, mode=proposals,
                                             params=proposal_params)

    @property
    def location(self) -> Path:
        return self.list_file

    def _sample(self, index: int, image: Image.Image) -> Sample:
        sample: Sample = {"image": image, "label": self.targets[index], "index": index}
        if self.proposals is not None:
            sample["proposals"] = self.proposals.for_image(index, image.size)
        return sample


def _with_extensions(paths: list[Path]) -> list[Path]:
    """Entries named by id (no image extension, e.g. Stanford Background's ``splits/train.txt``) become the one
    image ``<id><ext>`` beside them, ``ext`` any of :data:`IMG_EXTENSIONS` (first in that order); other entries,
    and ids without such a file, are kept as they are (the existence check reports them)."""
    listings: dict[Path, dict[str, Path]] = {}
    out = []
    for path in paths:
        if path.suffix.lower() in IMG_EXTENSIONS or path.is_file():
            out.append(path)
            continue
        folder = path.parent
        if folder not in listings:
            found: dict[str, Path] = {}
            if folder.is_dir():
                for ext in reversed(IMG_EXTENSIONS):
                    for f in folder.glob(f"*{ext}"):
                        found[f.name[: -len(ext)]] = f
            listings[folder] = found
        out.append(listings[folder].get(path.name, path))
    return out


def _parse_list(list_file: Path) -> list[tuple[int, Path, int | None]]:
    """Parse a file list into ``(line number, path, label or None)``, enforcing all-or-none labels."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read file list '{list_file}': {exc}") from exc
    is_csv = list_file.suffix.lower() == ".csv"
    entries: list[tuple[int, Path, int | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = _split_fields(stripped, is_csv)
        if is_csv and not entries and [f.lower() for f in fields] in (["path"], ["path", "label"]):
            continue  # header row
        entry = _parse_entry(list_file, lineno, fields)
        if entries and (entry[2] is None) != (entries[0][2] is None):
            has_label = "has a label" if entry[2] is not None else "has no label"
            other = "has none" if entry[2] is not None else "has one"
            raise DataError(
                f"file list '{list_file}' mixes lines with and without labels: line {entry[0]} {has_label} "
                f"but line {entries[0][0]} {other} (put a label on every line or on none)"
            )
        entries.append(entry)
    return entries


def _split_fields(line: str, is_csv: bool) -> list[str]:
    if is_csv:
        return [f.strip() for f in next(csv.reader([line]))]
    return line.split()


def _parse_entry(list_file: Path, lineno: int, fields: list[str]) -> tuple[int, Path, int | None]:
    """One list line: ``path`` or ``path label``; anything else is a DataError naming the line."""
    if len(fields) not in (1, 2) or not fields[0]:
        hint = " (paths with spaces: use a quoted .csv list)" if len(fields) > 2 else ""
        raise DataError(
            f"file list '{list_file}' line {lineno}: expected 'path [label]', got {len(fields)} fields{hint}"
        )
    if len(fields) == 1:
        return lineno, Path(fields[0]), None
    label_text = fields[1]
    if not label_text.isdigit():
        raise DataError(
            f"file list '{list_file}' line {lineno}: label {label_text!r} is not a non-negative integer"
        )
    return lineno, Path(fields[0]), int(label_text)
