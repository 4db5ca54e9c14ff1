"""Image-folder sources: :class:`ImageFolderSource` (ImageNet layout ``root/<class>/<image>`` or any folder)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from semssl.data.sources.base import (
    IMG_EXTENSIONS,
    ImageSource,
    OnError,
    Sample,
    _is_hidden,
    _list_images,
    _no_images_error,
    _normalise_extensions,
    _require_dir,
)
from semssl.errors import DataError

__all__ = ["ImageFolderSource"]

logger = logging.getLogger("semssl.data")

# Folder names that are dataset splits rather than classes (warned about when they are all the classes).
_SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test", "eval"})


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
        proposals: attach unsupervised ``"proposals"`` (selective search, SoCo's filters; float32 ``[P, 4]``
            xyxy image pixels, the whole image when an image has none) to every sample, from the dataset's cache
            ``<folder>.proposals.json`` beside the folder (:mod:`semssl.data.proposals`): ``True`` computes a
            missing or stale cache first, ``"require"`` raises instead.
        proposal_params: selective-search / filter settings (fields of
            :class:`~semssl.data.proposals.ProposalParams`, e.g. ``{"reference_size": None}`` for SoCo's absolute
            32 px side filter); None = the defaults.

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
        proposals: bool | str = False,
        proposal_params: dict | None = None,
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
        self.proposals = None
        if proposals:
            from semssl.data.proposals import SourceProposals

            self.proposals = SourceProposals(self.paths, self.root, self.root, mode=proposals,
                                             params=proposal_params)

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
        sample: Sample = {"image": image, "label": self.targets[index], "index": index}
        if self.proposals is not None:
            sample["proposals"] = self.proposals.for_image(index, image.size)
        return sample
