"""Data sources: turn files on disk into samples, with robust decoding and counted, logged skips.

A *source* is a map-style dataset (``len(source)``, ``source[i]``) that yields plain sample dicts and
never transforms: views, crops and augmentations are applied downstream (``views.py``, ``augment.py``).
Every sample holds

- ``"image"``: a ``PIL.Image.Image`` in mode ``RGB``;
- ``"label"``: the class index (``int``), or ``-1`` when the source has no labels;
- ``"index"``: the index of the sample in the source (the index actually served, see *skipping* below).

COCO-style scene sources add ``"boxes"`` (``float32 [N, 4]``, x1 y1 x2 y2 in image pixels),
``"box_labels"`` (``int64 [N]``, contiguous category index), ``"image_id"`` and, when the annotation file
has segmentations, ``"masks"`` (``uint8 [N, H, W]``).

Skipping: a file that fails to decode is, with ``on_error="skip"`` (the default), recorded in
``source.skipped`` (path -> reason), named in a warning of the ``semssl.data`` logger, and replaced by the
next good index (index+1, index+2, ... modulo the length), so a bad file never stops a long run and never
passes silently. ``on_error="raise"`` raises :class:`ImageDecodeError` instead. ``source.check()`` decodes
every file once up front (the CLI runs it on small datasets before training).

Build a source from a path with :func:`build_source`, which picks the kind from the path.
"""

from __future__ import annotations

import abc
import csv
import difflib
import inspect
import itertools
import json
import logging
import operator
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

__all__ = [
    "IMG_EXTENSIONS",
    "LIST_EXTENSIONS",
    "CocoSource",
    "DataError",
    "FileListSource",
    "ImageDecodeError",
    "ImageFolderSource",
    "ImageSource",
    "Sample",
    "build_source",
    "load_image",
]

logger = logging.getLogger("semssl.data")

#: Image file extensions a folder source lists (lower case, matched case-insensitively); torchvision's set.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Extensions :func:`build_source` reads as a file list.
LIST_EXTENSIONS: tuple[str, ...] = (".txt", ".lst", ".csv")

OnError = Literal["skip", "raise"]
Sample = dict[str, Any]

# How many listed files are probed at construction to catch a wrong root/images_dir early.
_PROBE_FILES = 8
# check() submits work in chunks so a huge dataset does not hold millions of futures at once.
_CHECK_CHUNK = 4096
# Folder names that are dataset splits rather than classes (warned about when they are all the classes).
_SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test", "eval"})
# Directory entries scanned for a "did you mean" suggestion (bounded for huge folders).
_SUGGEST_SCAN = 20000


class DataError(ValueError):
    """Bad data input: a missing path, an empty dataset, a malformed list or annotation file."""


class ImageDecodeError(DataError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image '{self.path}': {reason}")


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DEEP_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully and return it as an RGB ``PIL.Image``.

    The file is decoded completely here (``img.load()``), so a truncated or corrupt file fails in this call
    and not later inside a transform. The EXIF orientation is applied (``ImageOps.exif_transpose``) so the
    pixels are the way a viewer shows them. Colour modes are converted as follows:

    - ``L``/``1``/``CMYK``/``YCbCr``/...: Pillow's own conversion to RGB.
    - ``P`` with a transparency entry, ``PA``, ``LA``, ``RGBA``: composited on black.
      Decision: black, because fully transparent pixels carry no content and their stored colour is often
      garbage; black is also what a premultiplied image shows, and it is the same for every file.
    - 16-bit greyscale (``I;16``, ``I;16B``, ``I``): rescaled by 255/65535 (65535 -> 255, 32768 -> 128),
      not clipped; see :func:`_deep_grey_to_rgb` for ``I`` and ``F`` images outside the 16-bit range.

    Decision: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left to the process; when something sets it to True,
    Pillow itself pads truncated files and this function cannot tell.

    Raises:
        ImageDecodeError: naming the file and the reason (missing file, unknown format, truncated data,
            zero-size image, unsupported mode, ...).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise ImageDecodeError(path, f"image has zero size {img.width}x{img.height}")
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
            # The `with` block closes `img`; never hand that very object back.
            return rgb.copy() if rgb is img else rgb
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(path, "is a directory, not an image file") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "not a recognised image format") from exc
    except Exception as exc:  # Decision: any failure of a decoder plugin means a bad file, never a crash.
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB (see :func:`load_image` for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in _ALPHA_MODES:
        return _composite_on_black(img)
    if img.mode in _DEEP_INT_MODES or img.mode == "F":
        return _deep_grey_to_rgb(img)
    return img.convert("RGB")


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Alpha-composite an image with an alpha channel over a black background."""
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _deep_grey_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or 32-bit float greyscale image to 8-bit RGB, without clipping.

    Integer modes (``I;16*``, ``I``) whose values lie in [0, 65535] are 16-bit data (Pillow opens 16-bit
    PNG/PGM/TIFF as ``I;16`` or ``I``): v -> round(v * 255 / 65535). Float (``F``) images take the smallest
    of the usual ranges [0, 1], [0, 255], [0, 65535] that holds their finite values. Decision: data outside
    those ranges (negative, or beyond 16 bit) has no known full scale, so it is min-max stretched to
    [0, 255]; non-finite float values become 0.
    """
    arr = np.asarray(img).astype(np.float64)
    finite = np.isfinite(arr)
    arr = np.where(finite, arr, 0.0)
    lo = float(arr[finite].min()) if finite.any() else 0.0
    hi = float(arr[finite].max()) if finite.any() else 0.0
    full_scale = _full_scale(img.mode, lo, hi)
    if full_scale is not None:
        scaled = arr * (255.0 / full_scale)
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    out = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def _full_scale(mode: str, lo: float, hi: float) -> float | None:
    """The value that maps to 255 for a deep greyscale image, or None when it must be min-max stretched."""
    if lo < 0:
        return None
    ranges = (65535.0,) if mode != "F" else (1.0, 255.0, 65535.0)
    for full in ranges:
        if hi <= full:
            return full
    return None


# --------------------------------------------------------------------------------------------------
# Path helpers
# --------------------------------------------------------------------------------------------------


def _missing_path_error(path: Path, what: str) -> DataError:
    """A DataError for a path that does not exist, suggesting the closest existing sibling name."""
    probe = path
    while not probe.parent.exists() and probe.parent != probe:
        probe = probe.parent
    hint = ""
    parent = probe.parent
    if parent.is_dir():
        try:
            names = [entry.name for entry in itertools.islice(os.scandir(parent), _SUGGEST_SCAN)]
        except OSError:
            names = []
        close = difflib.get_close_matches(probe.name, names, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean '{parent / close[0]}'?"
    return DataError(f"{what} not found: '{path}'{hint}")


def _require_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a Path, or raise a DataError if it is not an existing directory."""
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(p, what)
    if not p.is_dir():
        raise DataError(f"{what} is not a directory: '{p}'")
    return p


def _require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a Path, or raise a DataError if it is not an existing file."""
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(p, what)
    if not p.is_file():
        raise DataError(f"{what} is not a file: '{p}'")
    return p


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case extensions with a leading dot, so ``"JPG"`` and ``".jpg"`` both work."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise DataError("extensions must name at least one file extension, got an empty list")
    return exts


def _is_hidden(name: str) -> bool:
    """Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``, ``.git``) are never data."""
    return name.startswith(".")


def _list_images(folder: Path, extensions: tuple[str, ...], recursive: bool) -> list[Path]:
    """Image files under ``folder`` (recursive if asked), sorted by relative path, hidden entries skipped."""
    found: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            base = Path(dirpath)
            found.extend(base / f for f in filenames if _is_image_name(f, extensions))
    else:
        found = [e for e in folder.iterdir() if e.is_file() and _is_image_name(e.name, extensions)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _is_image_name(name: str, extensions: tuple[str, ...]) -> bool:
    return not _is_hidden(name) and name.lower().endswith(extensions)


def _no_images_error(root: Path, extensions: tuple[str, ...]) -> DataError:
    return DataError(f"no images found under '{root}' (looked for files ending in {', '.join(extensions)})")


def _probe_existing(paths: Sequence[Path], where: str, what: str) -> None:
    """Raise a DataError when none of the first listed files exists: the root is almost surely wrong."""
    probes = paths[:_PROBE_FILES]
    if probes and not any(p.is_file() for p in probes):
        raise DataError(
            f"none of the first {len(probes)} images listed in {where} exist (e.g. '{probes[0]}'); {what}"
        )


# --------------------------------------------------------------------------------------------------
# Base source
# --------------------------------------------------------------------------------------------------


class ImageSource(abc.ABC):
    """Base of all sources: indexing with deterministic skipping of bad files, ``check()``, ``summary()``.

    Subclasses set ``self.paths`` (one image file per sample), ``self.targets`` and ``self.classes``, and
    implement :meth:`_sample` (build the sample dict around a decoded image). They may override
    :meth:`_decode` to add checks that make a file unusable (e.g. a size that contradicts its annotation).
    """

    paths: list[Path]
    targets: list[int]
    classes: list[str]

    def __init__(self, on_error: OnError = "skip") -> None:
        if on_error not in ("skip", "raise"):
            raise DataError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.on_error: OnError = on_error
        #: Files skipped in this process: path -> reason (each worker process keeps its own).
        self.skipped: dict[str, str] = {}
        self._bad: dict[int, str] = {}

    # -- to implement -------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def location(self) -> Path:
        """The file or folder the source was built from (named in messages)."""

    @abc.abstractmethod
    def _sample(self, index: int, image: Image.Image) -> Sample:
        """The sample dict of ``index`` around its decoded ``image``."""

    def _decode(self, index: int) -> Image.Image:
        """Decode the image of sample ``index``; raises ImageDecodeError when the file is unusable."""
        return load_image(self.paths[index])

    # -- dataset protocol ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> Sample:
        """The sample at ``index``; with on_error="skip" a bad file is replaced by the next good index."""
        index = operator.index(index)  # accepts numpy / torch integers from samplers, returns a plain int
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} images ({self.location})")
        index %= n
        if self.on_error == "raise":
            return self._sample(index, self._decode(index))
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return self._sample(i, self._decode(i))
            except ImageDecodeError as exc:
                self._record_bad(i, exc.reason)
        raise DataError(
            f"every one of the {n} images of '{self.location}' failed to decode; {self._skip_text()}"
        )

    def _record_bad(self, index: int, reason: str) -> None:
        """Remember a bad file once: log it, and count it as skipped when bad files are skipped."""
        if index in self._bad:
            return
        self._bad[index] = reason
        path = str(self.paths[index])
        action = "skipping" if self.on_error == "skip" else "found"
        logger.warning("%s unreadable image '%s': %s", action, path, reason)
        if self.on_error == "skip":
            self.skipped[path] = reason

    # -- checks and reports -------------------------------------------------------------------------
    def check(self, max_workers: int | None = None) -> list[str]:
        """Decode every file once; return (and log) the paths of the bad files, in source order.

        Decoding runs in a thread pool (Pillow's decoders release the GIL). The reasons are in
        :attr:`bad_files`. With ``on_error="skip"`` the bad files are also added to ``skipped`` and later
        served by the next good index without being decoded again.
        """
        workers = max_workers if max_workers is not None else min(8, os.cpu_count() or 1)
        if workers < 1:
            raise DataError(f"max_workers must be >= 1, got {max_workers}")
        n = len(self)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, n, _CHECK_CHUNK):
                indices = range(start, min(n, start + _CHECK_CHUNK))
                for i, reason in zip(indices, pool.map(self._failure_reason, indices)):
                    if reason is not None:
                        self._record_bad(i, reason)
        bad = list(self.bad_files)
        if bad:
            logger.warning("%d of %d images of '%s' failed to decode", len(bad), n, self.location)
        else:
            logger.info("all %d images of '%s' decode", n, self.location)
        return bad

    @property
    def bad_files(self) -> dict[str, str]:
        """Every file found bad so far in this process (path -> reason), in source order; any on_error."""
        return {str(self.paths[i]): self._bad[i] for i in sorted(self._bad)}

    def _failure_reason(self, index: int) -> str | None:
        try:
            self._decode(index)
        except ImageDecodeError as exc:
            return exc.reason
        return None

    def summary(self) -> str:
        """One line: ``"N images, K classes, S skipped: a.jpg (reason), ..."``."""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        return f"{len(self)} images, {classes}, {self._skip_text()}"

    def _skip_text(self, show: int = 5) -> str:
        if not self.skipped:
            return "0 skipped"
        items = [f"{path} ({reason})" for path, reason in itertools.islice(self.skipped.items(), show)]
        more = len(self.skipped) - len(items)
        tail = f", ... and {more} more" if more > 0 else ""
        return f"{len(self.skipped)} skipped: " + ", ".join(items) + tail

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.location}': {self.summary()})"


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


class ImageFolderSource(ImageSource):
    """Images in a folder: ImageNet layout ``root/<class>/<image>`` (labelled) or any folder (unlabelled).

    Args:
        root: the dataset folder.
        labels: ``None`` auto-detects: sub-folders holding images => labelled, one class per sub-folder
            (sorted by name, images found recursively inside each); only images directly in ``root`` =>
            unlabelled. ``True`` forces the class layout (images directly in ``root`` are ignored, with a
            warning). ``False`` lists every image under ``root`` recursively, all with label -1.
        extensions: file extensions to list (case-insensitive).
        on_error: ``"skip"`` or ``"raise"`` for files that fail to decode (module docstring).

    Decision: with ``labels=None``, a folder holding both loose images and class sub-folders is ambiguous
    and raises a DataError asking for ``labels=True`` or ``False`` rather than guessing. Sub-folders with no
    images are not classes (a warning names them). Hidden files and folders are ignored.
    Order: classes sorted by name, images sorted by their path relative to their class folder (or root).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        labels: bool | None = None,
        extensions: Iterable[str] = IMG_EXTENSIONS,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__(on_error)
        self.root = _require_dir(root, "image folder")
        self.extensions = _normalise_extensions(extensions)
        if labels is False:
            self._scan_unlabelled()
        else:
            self._scan_labelled(required=labels is True)
        if not self.paths:
            raise _no_images_error(self.root, self.extensions)
        self.labelled = bool(self.classes)

    @property
    def location(self) -> Path:
        return self.root

    def _scan_unlabelled(self) -> None:
        self.paths = _list_images(self.root, self.extensions, recursive=True)
        self.targets = [-1] * len(self.paths)
        self.classes = []

    def _scan_labelled(self, required: bool) -> None:
        loose = _list_images(self.root, self.extensions, recursive=False)
        subdirs = sorted(e.name for e in self.root.iterdir() if e.is_dir() and not _is_hidden(e.name))
        per_class = {d: _list_images(self.root / d, self.extensions, recursive=True) for d in subdirs}
        classes = [name for name in subdirs if per_class[name]]
        empty = [name for name in subdirs if not per_class[name]]
        if not classes and required:
            raise DataError(
                f"labels=True but '{self.root}' has no class sub-folders holding images "
                f"(looked for files ending in {', '.join(self.extensions)})"
            )
        if not classes:  # flat folder, auto-detected as unlabelled
            self.paths, self.targets, self.classes = loose, [-1] * len(loose), []
            return
        if loose and not required:
            raise DataError(
                f"'{self.root}' holds both images (e.g. '{loose[0].name}') and class sub-folders "
                f"(e.g. '{classes[0]}'): pass labels=True to use the sub-folders as classes and ignore the "
                f"{len(loose)} loose images, or labels=False to use every image unlabelled"
            )
        if loose:
            logger.warning(
                "ignoring %d images directly in '%s' (labels=True uses class sub-folders)",
                len(loose),
                self.root,
            )
        if empty:
            logger.warning(
                "sub-folders of '%s' with no images are not classes: %s", self.root, ", ".join(empty)
            )
        if set(classes) <= _SPLIT_NAMES:
            logger.warning(
                "the classes of '%s' look like dataset splits (%s): point the source at one split, e.g. '%s'",
                self.root,
                ", ".join(classes),
                self.root / classes[-1],
            )
        self.classes = classes
        self.paths, self.targets = [], []
        for label, name in enumerate(classes):
            self.paths.extend(per_class[name])
            self.targets.extend([label] * len(per_class[name]))

    def _sample(self, index: int, image: Image.Image) -> Sample:
        return {"image": image, "label": self.targets[index], "index": index}


# --------------------------------------------------------------------------------------------------
# File lists
# --------------------------------------------------------------------------------------------------


class FileListSource(ImageSource):
    """Images named in a text file, one ``path [label]`` per line.

    Relative paths are resolved against ``root`` if given, else against the list file's folder; absolute
    paths are used as they are. Lines that are blank or start with ``#`` are ignored. In ``.txt``/``.lst``
    files the fields are separated by whitespace (so a path cannot contain spaces there); ``.csv`` files are
    read with the csv module (quoted paths may hold commas or spaces; a header row ``path[,label]`` is
    skipped). Labels are non-negative integers, present on every line or on none: a file mixing both is a
    DataError naming the first line that breaks the rule. ``classes`` are ``"0" .. str(max label)``.
    """

    def __init__(
        self,
        list_file: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__(on_error)
        self.list_file = _require_file(list_file, "file list")
        self.root = _require_dir(root, "file list root") if root is not None else self.list_file.parent
        entries = _parse_list(self.list_file)
        if not entries:
            raise DataError(f"file list '{self.list_file}' names no images (only blank or comment lines)")
        self.paths = [p if p.is_absolute() else self.root / p for _, p, _ in entries]
        labels = [label for _, _, label in entries]
        self.labelled = labels[0] is not None
        self.targets = [label if label is not None else -1 for label in labels]
        self.classes = [str(i) for i in range(max(self.targets) + 1)] if self.labelled else []
        _probe_existing(
            self.paths,
            f"'{self.list_file}'",
            f"relative paths are resolved against '{self.root}'; check root=",
        )

    @property
    def location(self) -> Path:
        return self.list_file

    def _sample(self, index: int, image: Image.Image) -> Sample:
        return {"image": image, "label": self.targets[index], "index": index}


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


# --------------------------------------------------------------------------------------------------
# COCO-style scenes
# --------------------------------------------------------------------------------------------------


class CocoSource(ImageSource):
    """Scene images with boxes (and instance masks) from a COCO-style annotation JSON.

    Args:
        annotation_json: the COCO file (``images``, ``annotations``, ``categories``; ``annotations`` may be
            absent, e.g. for an unlabelled image-info file).
        images_dir: folder the images' ``file_name`` are relative to. Default: the first of
            ``<json folder>/images``, ``<json folder>``, ``<json folder>/images/<split>``,
            ``<json folder>/../<split>``, ``<json folder>/../images/<split>``, ``<json folder>/../images``
            that holds the listed files, where ``<split>`` is the JSON name's last ``_`` part
            (``instances_train2017.json`` -> ``train2017``); this covers the plain layout, COCO's own
            (``annotations/`` beside ``train2017/``) and ``images/train2017``.
        load_masks: decode instance masks (pycocotools) when the file has segmentations.
        on_error: ``"skip"`` or ``"raise"`` for images that fail to decode.

    Per image: crowd annotations (``iscrowd=1``) and boxes with w or h <= 1 are dropped; boxes go from
    x,y,w,h to x1,y1,x2,y2 and are clipped to the image (Decision: downstream crop and RoI geometry assume
    boxes inside the image; a box that becomes <= 1 px wide or high by clipping is dropped too).
    ``box_labels`` index the categories sorted by id. Images without annotations are kept (N = 0).
    Images are ordered by id.
    An image whose decoded size differs from the annotation's width/height is unusable (its boxes would be
    wrong) and is treated like a file that fails to decode.
    """

    def __init__(
        self,
        annotation_json: str | os.PathLike[str],
        images_dir: str | os.PathLike[str] | None = None,
        load_masks: bool = True,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__(on_error)
        self.annotation_json = _require_file(annotation_json, "COCO annotation file")
        data = _read_coco_json(self.annotation_json)
        parsed = _CocoIndex(self.annotation_json, data)
        self.categories: list[str] = parsed.category_names
        self.classes = list(self.categories)
        self.image_ids: list[int] = parsed.image_ids
        self.sizes: list[tuple[int, int] | None] = parsed.sizes  # (width, height) from the JSON
        self._annotations = parsed.annotations  # per image: list of (ann id, bbox xywh, label, segmentation)
        self.has_segmentations = parsed.has_segmentations
        self.load_masks = load_masks and parsed.has_segmentations
        if self.load_masks and parsed.lacking_segmentation is not None:
            raise DataError(
                f"COCO annotation file '{self.annotation_json}': {parsed.lacking_segmentation} has no key "
                f"'segmentation' while other annotations have one, so its mask would be missing; "
                f"pass load_masks=False to use boxes only"
            )
        self.images_dir = _resolve_images_dir(self.annotation_json, images_dir, parsed.file_names)
        self.paths = [self.images_dir / name for name in parsed.file_names]
        self.targets = [-1] * len(self.paths)

    @property
    def location(self) -> Path:
        return self.annotation_json

    def _decode(self, index: int) -> Image.Image:
        image = load_image(self.paths[index])
        expected = self.sizes[index]
        if expected is not None and image.size != expected:
            raise ImageDecodeError(
                self.paths[index],
                f"decoded size {image.width}x{image.height} differs from the annotation's "
                f"{expected[0]}x{expected[1]} in '{self.annotation_json}' (image_id {self.image_ids[index]})",
            )
        return image

    def _sample(self, index: int, image: Image.Image) -> Sample:
        width, height = image.size
        anns = self._annotations[index]
        boxes = np.array([bbox for _, bbox, _, _ in anns], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
        keep = ((xyxy[:, 2] - xyxy[:, 0]) > 1) & ((xyxy[:, 3] - xyxy[:, 1]) > 1)
        kept = [ann for ann, k in zip(anns, keep) if k]
        sample: Sample = {
            "image": image,
            "label": -1,
            "index": index,
            "image_id": self.image_ids[index],
            "boxes": torch.from_numpy(xyxy[keep].astype(np.float32)),
            "box_labels": torch.tensor([label for _, _, label, _ in kept], dtype=torch.int64),
        }
        if self.load_masks:
            segs = [(ann_id, seg) for ann_id, _, _, seg in kept]
            sample["masks"] = self._decode_masks(index, segs, height, width)
        return sample

    def _decode_masks(self, index: int, segs: list[tuple[Any, Any]], height: int, width: int) -> torch.Tensor:
        """Decode polygon / RLE segmentations to ``uint8 [N, H, W]`` 0/1 masks in one pycocotools call."""
        if not segs:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        rles = [self._to_rle(index, ann_id, seg, height, width) for ann_id, seg in segs]
        stacked = mask_utils.decode(rles)  # [H, W, N], column-major
        return torch.from_numpy(np.ascontiguousarray(stacked.transpose(2, 0, 1), dtype=np.uint8))

    def _to_rle(self, index: int, ann_id: Any, seg: Any, height: int, width: int) -> dict[str, Any]:
        """One segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE."""
        if isinstance(seg, list):
            # Fewer than 3 points has no area (and pycocotools would read 4 numbers as a box).
            polygons = [poly for poly in seg if len(poly) >= 6]
            if not polygons:
                empty = {"size": [height, width], "counts": [height * width]}
                return mask_utils.frPyObjects(empty, height, width)
            return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        if [int(s) for s in seg["size"]] != [height, width]:
            raise ImageDecodeError(
                self.paths[index],
                f"RLE size {seg['size']} of annotation {ann_id} in '{self.annotation_json}' differs "
                f"from the image's {height}x{width} (height x width)",
            )
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, height, width)
        counts = seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]
        return {"size": [height, width], "counts": counts}


def _read_coco_json(path: Path) -> dict[str, Any]:
    """Load a COCO JSON file; malformed JSON or a non-object top level is a DataError naming the file."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON in '{path}' at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read COCO annotation file '{path}': {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"'{path}' is not a COCO annotation file: expected a JSON object with key 'images', "
            f"got a {type(data).__name__}"
        )
    return data


class _CocoIndex:
    """Validated, per-image view of a COCO dict; every problem is a DataError naming the file and key."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        images = self._list(data, "images", required=True)
        annotations = self._list(data, "annotations", required=False)
        categories = self._list(data, "categories", required=bool(annotations))
        if not images:
            raise self._error("no images (key 'images' is empty)")
        self._read_categories(categories)
        self._read_images(images)
        self._read_annotations(annotations)

    def _error(self, message: str) -> DataError:
        return DataError(f"COCO annotation file '{self.path}': {message}")

    def _list(self, data: dict[str, Any], key: str, required: bool) -> list[Any]:
        if key not in data:
            if required:
                raise self._error(f"no key '{key}'")
            return []
        value = data[key]
        if not isinstance(value, list):
            raise self._error(f"key '{key}' must be a list, got {type(value).__name__}")
        return value

    def _field(self, entry: Any, key: str, where: str) -> Any:
        if not isinstance(entry, dict):
            raise self._error(f"{where} must be an object, got {type(entry).__name__}")
        if key not in entry:
            raise self._error(f"{where} has no key '{key}'")
        return entry[key]

    def _int_field(self, entry: Any, key: str, where: str) -> int:
        value = self._field(entry, key, where)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._error(f"{where} key '{key}' must be an integer, got {value!r}")
        return value

    def _read_categories(self, categories: list[Any]) -> None:
        by_id: dict[int, str] = {}
        for i, cat in enumerate(categories):
            cat_id = self._int_field(cat, "id", f"categories[{i}]")
            name = self._field(cat, "name", f"categories[{i}] (id {cat_id})")
            if cat_id in by_id:
                raise self._error(f"category id {cat_id} appears twice")
            by_id[cat_id] = str(name)
        order = sorted(by_id)
        self.category_index = {cat_id: i for i, cat_id in enumerate(order)}
        self.category_names = [by_id[cat_id] for cat_id in order]

    def _read_images(self, images: list[Any]) -> None:
        records = []
        for i, img in enumerate(images):
            img_id = self._int_field(img, "id", f"images[{i}]")
            file_name = self._field(img, "file_name", f"images[{i}] (id {img_id})")
            records.append((img_id, str(file_name), self._image_size(img, f"images[{i}] (id {img_id})")))
        records.sort(key=lambda r: r[0])
        self.image_ids = [r[0] for r in records]
        if len(set(self.image_ids)) != len(self.image_ids):
            dup = next(a for a, b in zip(self.image_ids, self.image_ids[1:]) if a == b)
            raise self._error(f"image id {dup} appears twice")
        self.file_names = [r[1] for r in records]
        self.sizes = [r[2] for r in records]
        self.position = {img_id: i for i, img_id in enumerate(self.image_ids)}

    def _image_size(self, img: dict[str, Any], where: str) -> tuple[int, int] | None:
        """(width, height) when the entry gives both (COCO always does; they are optional here)."""
        if "width" not in img or "height" not in img:
            return None
        width, height = img["width"], img["height"]
        if not (_numbers([width, height]) and width > 0 and height > 0):
            raise self._error(f"{where} 'width'/'height' must be positive numbers, got {width!r}/{height!r}")
        return int(width), int(height)

    def _read_annotations(self, annotations: list[Any]) -> None:
        self.annotations: list[list[tuple[Any, list[float], int, Any]]] = [[] for _ in self.image_ids]
        self.has_segmentations = False
        lacking_segmentation: str | None = None
        for i, ann in enumerate(annotations):
            ann_id = ann.get("id", i) if isinstance(ann, dict) else i
            where = f"annotations[{i}] (id {ann_id})"
            img_id = self._int_field(ann, "image_id", where)
            bbox = self._field(ann, "bbox", where)
            cat_id = self._int_field(ann, "category_id", where)
            if img_id not in self.position:
                raise self._error(f"{where} refers to unknown image_id {img_id}")
            if cat_id not in self.category_index:
                raise self._error(f"{where} refers to unknown category_id {cat_id}")
            if not (isinstance(bbox, list) and len(bbox) == 4 and _numbers(bbox)):
                raise self._error(f"{where} key 'bbox' must be [x, y, w, h], got {bbox!r}")
            seg = ann.get("segmentation")
            if seg:
                self._check_segmentation(seg, where, self.sizes[self.position[img_id]])
                self.has_segmentations = True
            if ann.get("iscrowd", 0) or bbox[2] <= 1 or bbox[3] <= 1:
                continue
            if not seg and lacking_segmentation is None:
                lacking_segmentation = where
            label = self.category_index[cat_id]
            self.annotations[self.position[img_id]].append((ann_id, [float(v) for v in bbox], label, seg))
        #: The first kept annotation without a segmentation, in a file that has segmentations elsewhere.
        self.lacking_segmentation = lacking_segmentation if self.has_segmentations else None

    def _check_segmentation(self, seg: Any, where: str, size: tuple[int, int] | None) -> None:
        """Structural check of a polygon list or an RLE dict, so mask decoding cannot fail later."""
        if isinstance(seg, list):
            for poly in seg:
                if not (isinstance(poly, list) and len(poly) % 2 == 0 and _numbers(poly)):
                    raise self._error(
                        f"{where} key 'segmentation' must be a list of "
                        f"polygons [x1, y1, x2, y2, ...] or an RLE object"
                    )
            return
        counts = self._field(seg, "counts", f"{where} segmentation")
        rle_size = self._field(seg, "size", f"{where} segmentation")
        if not (isinstance(rle_size, list) and len(rle_size) == 2 and _numbers(rle_size)):
            raise self._error(f"{where} segmentation 'size' must be [height, width], got {rle_size!r}")
        if size is not None and [int(s) for s in rle_size] != [size[1], size[0]]:
            raise self._error(
                f"{where} segmentation 'size' {rle_size} differs from "
                f"its image's height x width [{size[1]}, {size[0]}]"
            )
        if not isinstance(counts, (list, str, bytes)):
            raise self._error(f"{where} segmentation 'counts' must be a list or a string")
        pixels = int(rle_size[0]) * int(rle_size[1])
        if isinstance(counts, list) and (not _numbers(counts) or sum(counts) != pixels):
            raise self._error(
                f"{where} segmentation 'counts' must be run lengths adding up to height x width = {pixels}"
            )


def _numbers(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _resolve_images_dir(
    json_path: Path, images_dir: str | os.PathLike[str] | None, file_names: list[str]
) -> Path:
    """Find the folder the COCO ``file_name`` entries live in (see :class:`CocoSource`)."""
    probes = file_names[:_PROBE_FILES]
    if images_dir is not None:
        folder = _require_dir(images_dir, "COCO images folder")
        _probe_existing([folder / n for n in probes], f"'{json_path}'", f"looked in images_dir '{folder}'")
        return folder
    candidates = _images_dir_candidates(json_path)
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in probes):
            return folder
    tried = ", ".join(f"'{c}'" for c in candidates)
    raise DataError(
        f"cannot find the images of '{json_path}' (e.g. '{probes[0]}'); looked in {tried}; pass images_dir="
    )


def _images_dir_candidates(json_path: Path) -> list[Path]:
    here, up = json_path.parent, json_path.parent.parent
    candidates = [here / "images", here]
    stem = json_path.stem
    if "_" in stem:
        split = stem.rsplit("_", 1)[1]
        candidates += [here / "images" / split, up / split, up / "images" / split]
    candidates.append(up / "images")
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

_KINDS: dict[str, type[ImageSource]] = {
    "folder": ImageFolderSource,
    "list": FileListSource,
    "coco": CocoSource,
}


def build_source(path: str | os.PathLike[str], kind: str = "auto", **kw: Any) -> ImageSource:
    """Build a source from a path; ``kind="auto"`` picks it from the path.

    A ``.json`` file is a COCO annotation file (:class:`CocoSource`), a ``.txt``/``.lst``/``.csv`` file a
    file list (:class:`FileListSource`), a directory an image folder (:class:`ImageFolderSource`).
    ``kind`` may also be ``"folder"``, ``"list"`` or ``"coco"``. ``kw`` go to the source's constructor;
    an option the chosen source does not take is a DataError naming the ones it does.
    """
    p = Path(path)
    if not p.exists():
        raise _missing_path_error(p, "dataset path")
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
