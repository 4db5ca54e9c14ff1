"""The base of every data source (:class:`ImageSource`) and the path and listing helpers the sources share.

:class:`ImageSource` does the indexing with deterministic skipping of bad files, ``check()`` and ``summary()``;
the helpers check dataset paths (with a "did you mean" hint), list image files and probe listed files.
"""

from __future__ import annotations

import abc
import difflib
import itertools
import logging
import operator
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from semssl.data.root import data_root, dataset_of, missing_dataset
from semssl.data.sources.decode import ImageDecodeError, load_image
from semssl.errors import DataError

__all__ = ["IMG_EXTENSIONS", "ImageSource", "OnError", "Sample"]

logger = logging.getLogger("semssl.data")

#: Image file extensions a folder source lists (lower case, matched case-insensitively); torchvision's set.
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

OnError = Literal["skip", "raise"]
Sample = dict[str, Any]

# How many listed files are probed at construction to catch a wrong root/images_dir early.
_PROBE_FILES = 8
# check() submits work in chunks so a huge dataset does not hold millions of futures at once.
_CHECK_CHUNK = 4096
# Directory entries scanned for a "did you mean" suggestion (bounded for huge folders).
_SUGGEST_SCAN = 20000


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
    under_root = missing_dataset(path)  # under the data root: which dataset, and `semssl data get NAME`
    if under_root and (not hint or not (data_root() / str(dataset_of(path))).is_dir()):
        return DataError(f"{what} {under_root}")
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
