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

Modules: ``decode`` (:func:`load_image`), ``base`` (:class:`ImageSource` and shared path helpers),
``folder`` (:class:`ImageFolderSource`), ``filelist`` (:class:`FileListSource`), ``coco``
(:class:`CocoSource`) and ``build`` (:func:`build_source`); the public names are re-exported here.
"""

from __future__ import annotations

from semssl.data.sources.base import IMG_EXTENSIONS, ImageSource, Sample
from semssl.data.sources.build import LIST_EXTENSIONS, _detect_kind, build_source  # noqa: F401
from semssl.data.sources.coco import CocoSource
from semssl.data.sources.decode import ImageDecodeError, load_image
from semssl.data.sources.filelist import FileListSource
from semssl.data.sources.folder import ImageFolderSource
from semssl.errors import DataError

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
