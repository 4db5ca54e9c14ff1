"""Unsupervised region proposals: SoCo's selective search and filters, computed once per dataset and cached.

**Algorithm** (docs/methods/soco.md §Selective search, §Proposal filters; docs/design.md §Selective search):
OpenCV contrib's ``ximgproc.segmentation`` selective search configured as SoCo's *single strategy* — one graph
segmentation (Felzenszwalb: k = 300, sigma = 0.9, min size = 100) of the image in HSV, hierarchical grouping
with one combined strategy (colour + texture + size + fill similarities, equal weights). It is assembled
explicitly with ``addImage`` / ``addGraphSegmentation`` / ``addStrategy``; OpenCV's
``switchToSelectiveSearchFast/Quality`` use several colour spaces and strategies and give other boxes.
OpenCV returns the same set of boxes on every call but in a random order, so the boxes are de-duplicated and
sorted (by x1, y1, x2, y2): a proposal's id (its index in the image's list) is reproducible.

**Filters** (SoCo's ``ratio3size0308``, :func:`filter_proposals`), with SoCo's fallbacks:

* level 0 — every filter: both sides >= ``min_side``; aspect ``max(w/h, h/w) <= max_aspect`` (3);
  ``sqrt(wh) / sqrt(WH)`` in ``rel_size`` ([0.3, 0.8]);
* level 1 — an image left with no box keeps the boxes passing the aspect filter only ("ratio-3" fallback);
* level 2 — else those passing the side filter only (the ``w, h >= 32`` fallback);
* level 3 — else none: the image's proposal is the whole image (``[0, 0, W, H]``, given by the sources).

Decision: ``min_side`` is 32 px *at a 224 px image* and scales with the image's geometric-mean side,
``min_side_px = 32 * sqrt(W H) / 224`` (``reference_size=224``), so small images (the built-in 128 px scenes)
keep proposals (docs/design.md §Selective search); ``reference_size=None`` is SoCo's absolute 32 px.
Boxes are continuous xyxy pixels (a rectangle of ``w`` pixel columns from ``x`` is ``[x, x + w)``), the
convention of :mod:`semssl.data.views` — SoCo's inclusive ``x2 = x + w - 1`` is not used.

**Cache**: one JSON file per dataset (:class:`ProposalCache`), by default next to the dataset —
``<annotation json>.proposals.json`` for a COCO file, ``<folder>.proposals.json`` beside an image folder,
``<list file>.proposals.json`` for a file list (a file listed several times has one entry) — or,
when that folder is not writable (no write bit, e.g. a shared read-only dataset), in the user cache
``$SEMSSL_CACHE_DIR/proposals`` (default ``~/.cache/semssl/proposals``) as
``<name>-<hash of the absolute path>.proposals.json``. It holds

* the key of the computation: :data:`ALGORITHM_VERSION`, the algorithm and filter parameters
  (:class:`ProposalParams`) and the OpenCV version (recorded; a different version is a logged warning, not a
  recomputation: the algorithm is the same);
* per distinct image, in source order: the file (relative to the images folder), its size in bytes and ``mtime_ns``,
  the decoded ``[W, H]``, the number of raw boxes, the fallback level and the kept boxes.

A cache is *stale* when its parameters or version differ (every image is recomputed), or for the images whose
file is new or whose size / mtime changed (only those are recomputed). A stale cache is never used silently:
:func:`ensure_proposals` either refreshes it (logging why) or raises a :class:`DataError` saying what changed.
Computation runs in ``spawn``-ed worker processes (like :mod:`semssl.data.synthetic.build`), under an
inter-process lock, and the file is written atomically.

Entry points: :func:`selective_search`, :func:`filter_proposals` (pure), :func:`compute_image_proposals` (one
file), :func:`ensure_proposals` (a list of files -> per-image boxes, cached), :func:`check_proposals`
(report only), :class:`SourceProposals` (what a source attaches to its samples; ``proposals=True`` and
``proposal_params`` on :class:`~semssl.data.sources.CocoSource` / :class:`~semssl.data.sources.ImageFolderSource`,
set by a recipe's ``data.proposals`` / ``data.proposal_params``) and ``semssl data proposals PATH [--workers N]
[--param KEY=VALUE] [--check] [--force]`` on the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from semssl.errors import DataError

__all__ = [
    "ALGORITHM_VERSION",
    "CACHE_SUFFIX",
    "ProposalParams",
    "as_params",
    "ProposalCache",
    "SourceProposals",
    "selective_search",
    "min_side_px",
    "side_filter",
    "aspect_filter",
    "relative_size_filter",
    "filter_proposals",
    "compute_image_proposals",
    "default_cache_path",
    "check_proposals",
    "ensure_proposals",
]

log = logging.getLogger("semssl.data")

#: Bump when the boxes computed for the same file and parameters change; caches of another version are stale.
ALGORITHM_VERSION = 1
CACHE_FORMAT = "semssl.proposals"
CACHE_SUFFIX = ".proposals.json"
_FALLBACK_LEVELS = ("all filters", "aspect only", "min side only", "whole image")


# ------------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ProposalParams:
    """Selective search and filter settings (defaults: SoCo, docs/methods/soco.md §Proposal filters; see the
    module docstring).

    ``k``/``sigma``/``min_size``: the graph segmentation; ``min_side``: the side filter in pixels at a
    ``reference_size`` px image (None = absolute pixels, SoCo as released); ``max_aspect``: the aspect filter;
    ``rel_size``: the range of ``sqrt(wh) / sqrt(WH)``; ``max_side``: None, or downscale images whose longer side
    exceeds it before the search (speed only; boxes are mapped back to the original pixels).
    """

    k: float = 300.0
    sigma: float = 0.9
    min_size: int = 100
    min_side: float = 32.0
    reference_size: Optional[float] = 224.0
    max_aspect: float = 3.0
    rel_size: tuple[float, float] = (0.3, 0.8)
    max_side: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(what: str, value: Any) -> DataError:
            return DataError(f"proposal parameters: {what}, got {value!r}")

        if not self.k > 0:
            raise bad("k must be > 0", self.k)
        if not self.sigma >= 0:
            raise bad("sigma must be >= 0", self.sigma)
        if not (isinstance(self.min_size, int) and self.min_size >= 1):
            raise bad("min_size must be an int >= 1", self.min_size)
        if not self.min_side >= 0:
            raise bad("min_side must be >= 0", self.min_side)
        if self.reference_size is not None and not self.reference_size > 0:
            raise bad("reference_size must be > 0 or None", self.reference_size)
        if not self.max_aspect >= 1:
            raise bad("max_aspect must be >= 1", self.max_aspect)
        lo, hi = (float(v) for v in self.rel_size)
        if not 0 <= lo <= hi:
            raise bad("rel_size must be (min, max) with 0 <= min <= max", self.rel_size)
        object.__setattr__(self, "rel_size", (lo, hi))
        if self.max_side is not None and not (isinstance(self.max_side, int) and self.max_side >= 16):
            raise bad("max_side must be None or an int >= 16", self.max_side)

    def key(self) -> dict[str, Any]:
        """JSON-safe parameters (part of the cache key)."""
        d = asdict(self)
        d["rel_size"] = list(self.rel_size)
        return d


def as_params(params: ProposalParams | Mapping[str, Any] | None) -> ProposalParams:
    """``ProposalParams`` from itself, a mapping of its fields (e.g. a recipe's ``{reference_size: null}``) or
    None (the defaults); an unknown key is a DataError naming the valid ones."""
    if params is None:
        return ProposalParams()
    if isinstance(params, ProposalParams):
        return params
    if not isinstance(params, Mapping):
        raise DataError(f"proposal parameters must be a mapping, got {params!r}")
    names = [f.name for f in fields(ProposalParams)]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise DataError(f"unknown proposal parameter(s) {unknown}; valid: {', '.join(names)}")
    values = dict(params)
    if "rel_size" in values:
        values["rel_size"] = tuple(values["rel_size"])
    return ProposalParams(**values)


# ------------------------------------------------------------------------------------------------ algorithm
def _cv2():
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - a dependency
        raise DataError(f"selective search needs OpenCV contrib (opencv-contrib-python-headless): {err}") from None
    if not hasattr(cv2, "ximgproc"):
        raise DataError("selective search needs OpenCV *contrib* (cv2.ximgproc); install "
                        "opencv-contrib-python-headless instead of opencv-python")
    return cv2


def selective_search(image: np.ndarray, params: ProposalParams = ProposalParams()) -> np.ndarray:
    """Raw selective-search boxes of an RGB ``uint8`` image ``[H, W, 3]``: float64 ``[N, 4]`` continuous xyxy
    pixels, de-duplicated and sorted by (x1, y1, x2, y2). SoCo's single strategy (module docstring)."""
    cv2 = _cv2()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"selective_search expects an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    scale = 1.0
    if params.max_side is not None and max(height, width) > params.max_side:
        scale = params.max_side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image)
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    ss.clearImages()
    ss.addImage(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    ss.clearGraphSegmentations()
    ss.addGraphSegmentation(seg.createGraphSegmentation(float(params.sigma), float(params.k), int(params.min_size)))
    ss.clearStrategies()
    ss.addStrategy(seg.createSelectiveSearchSegmentationStrategyMultiple(
        seg.createSelectiveSearchSegmentationStrategyColor(),
        seg.createSelectiveSearchSegmentationStrategyTexture(),
        seg.createSelectiveSearchSegmentationStrategySize(),
        seg.createSelectiveSearchSegmentationStrategyFill(),
    ))
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    if scale != 1.0:
        boxes = boxes / scale
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = np.unique(boxes, axis=0)  # sorted rows: (x1, y1, x2, y2)
    return boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]


def min_side_px(image_wh: Sequence[float], params: ProposalParams = ProposalParams()) -> float:
    """The side filter's threshold in this image's pixels: ``min_side * sqrt(W H) / reference_size`` (or
    ``min_side`` when ``reference_size`` is None)."""
    if params.reference_size is None:
        return float(params.min_side)
    w, h = (float(v) for v in image_wh)
    return float(params.min_side) * math.sqrt(w * h) / float(params.reference_size)


def side_filter(boxes: np.ndarray, min_side: float) -> np.ndarray:
    """Bool ``[N]``: both sides of xyxy ``boxes`` ``[N, 4]`` are >= ``min_side`` pixels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def aspect_filter(boxes: np.ndarray, max_aspect: float) -> np.ndarray:
    """Bool ``[N]``: ``w/h`` in ``[1/max_aspect, max_aspect]`` (degenerate boxes fail)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ok = (w > 0) & (h > 0)
    ratio = np.where(ok, w / np.where(h > 0, h, 1.0), 0.0)
    return ok & (ratio <= max_aspect) & (ratio * max_aspect >= 1.0)


def relative_size_filter(boxes: np.ndarray, image_wh: Sequence[float], rel_size: tuple[float, float]) -> np.ndarray:
    """Bool ``[N]``: ``sqrt(w h) / sqrt(W H)`` in ``[rel_size[0], rel_size[1]]``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = (boxes[:, 2] - boxes[:, 0]).clip(min=0), (boxes[:, 3] - boxes[:, 1]).clip(min=0)
    rel = np.sqrt(w * h) / math.sqrt(float(image_wh[0]) * float(image_wh[1]))
    return (rel >= rel_size[0]) & (rel <= rel_size[1])


def filter_proposals(
    boxes: np.ndarray, image_wh: Sequence[float], params: ProposalParams = ProposalParams()
) -> tuple[np.ndarray, int]:
    """SoCo's filters with its fallbacks (module docstring): ``(kept boxes [M, 4], level)``; level 0 = every
    filter, 1 = aspect only, 2 = side only, 3 = nothing kept (the sources then use the whole image)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = side_filter(boxes, min_side_px(image_wh, params))
    aspect = aspect_filter(boxes, params.max_aspect)
    size = relative_size_filter(boxes, image_wh, params.rel_size)
    for level, keep in enumerate((side & aspect & size, aspect, side)):
        if keep.any():
            return boxes[keep], level
    return boxes[:0], 3


# ------------------------------------------------------------------------------------------------ one image
def _file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def compute_image_proposals(path: str | os.PathLike[str], params: ProposalParams = ProposalParams()) -> dict:
    """The cache entry of one image file (without its ``file`` key): ``size``, ``mtime_ns`` (taken before
    decoding), ``wh``, ``n_raw``, ``level``, ``boxes`` (list of ``[x1, y1, x2, y2]``); an unreadable file gets
    ``error`` (the reason) and no boxes — the source skips it anyway."""
    from semssl.data.sources.decode import ImageDecodeError, load_image

    path = Path(path)
    try:
        entry: dict[str, Any] = _file_stat(path)
    except OSError as err:
        return {"size": -1, "mtime_ns": -1, "wh": [0, 0], "n_raw": 0, "level": 3, "boxes": [],
                "error": f"cannot stat: {err.strerror}"}
    try:
        image = load_image(path)
    except ImageDecodeError as err:
        return {**entry, "wh": [0, 0], "n_raw": 0, "level": 3, "boxes": [], "error": err.reason}
    raw = selective_search(np.asarray(image, dtype=np.uint8), params)
    kept, level = filter_proposals(raw, image.size, params)
    boxes = [[_num(v) for v in b] for b in kept.tolist()]
    return {**entry, "wh": [int(image.width), int(image.height)], "n_raw": int(raw.shape[0]), "level": int(level),
            "boxes": boxes}


def _num(v: float) -> float | int:
    """Integers as ints (compact JSON; OpenCV boxes are integral unless ``max_side`` rescaled them)."""
    r = round(v, 3)
    return int(r) if float(r).is_integer() else r


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _worker(task: tuple[int, str, dict]) -> tuple[int, dict]:
    index, path, params = task
    return index, compute_image_proposals(path, as_params(params))


# ------------------------------------------------------------------------------------------------ cache
def _user_cache_dir() -> Path:
    env = os.environ.get("SEMSSL_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "semssl") / "proposals"


def _writable_dir(folder: Path) -> bool:
    """An existing folder this process may write *and* that has a write bit set: root ignores permission bits,
    but a folder without any write bit (a shared read-only dataset) is read-only by intent."""
    try:
        return folder.is_dir() and os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def default_cache_path(location: str | os.PathLike[str]) -> Path:
    """Where the cache of the dataset at ``location`` (a COCO JSON, an image folder or a file list) lives: beside
    it when that folder is writable, else in the user cache (module docstring). An existing cache file wins."""
    location = Path(location).absolute()
    beside = location.with_name(location.name + CACHE_SUFFIX)
    digest = hashlib.sha1(str(location).encode()).hexdigest()[:12]
    fallback = _user_cache_dir() / f"{location.name}-{digest}{CACHE_SUFFIX}"
    if beside.is_file():
        return beside
    if fallback.is_file():
        return fallback
    return beside if _writable_dir(beside.parent) else fallback


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX ``flock`` on the hidden ``.<cache name>.lock`` beside it) so concurrent
    ranks compute once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path.absolute())


def _opencv_version() -> str:
    try:
        import cv2

        return str(cv2.__version__)
    except ImportError:  # pragma: no cover
        return "none"


@dataclass
class ProposalCache:
    """The contents of a cache file (module docstring): ``params``, ``version``, ``opencv`` and ``entries``
    (file -> entry). :meth:`read` returns None for a missing file and raises DataError for an unreadable one."""

    path: Path
    params: dict = field(default_factory=dict)
    version: int = ALGORITHM_VERSION
    opencv: str = ""
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Optional["ProposalCache"]:
        path = Path(path)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"proposals cache '{path}' is unreadable ({err}); delete it or run "
                            f"`semssl data proposals` to rebuild it") from None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("images"), list):
            raise DataError(f"'{path}' is not a semssl proposals cache (no format={CACHE_FORMAT!r}); move it away")
        entries = {e["file"]: e for e in data["images"] if isinstance(e, dict) and "file" in e}
        return cls(path, data.get("params", {}), data.get("version", -1), data.get("opencv", ""), entries)

    def write(self, files: Sequence[str], base_dir: Path, location: Path) -> None:
        """Write the entries of ``files`` (in that order) atomically."""
        doc = {
            "format": CACHE_FORMAT,
            "version": self.version,
            "algorithm": "selective search (OpenCV ximgproc, single strategy: one graph segmentation in HSV, "
                         "colour+texture+size+fill), SoCo filters with fallbacks",
            "opencv": self.opencv,
            "params": self.params,
            "dataset": str(location),
            "images_dir": str(base_dir),
            "images": [{"file": f, **{k: v for k, v in self.entries[f].items() if k != "file"}} for f in files],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        os.replace(tmp, self.path)


@dataclass
class Staleness:
    """What :func:`check_proposals` found: ``reason`` for the whole cache (missing, other parameters or
    version) or per-file ``changed`` / ``missing`` lists; ``fresh`` when nothing needs computing."""

    path: Path
    reason: Optional[str] = None
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    n_files: int = 0

    @property
    def fresh(self) -> bool:
        return self.reason is None and not self.changed and not self.missing

    def describe(self, show: int = 3) -> str:
        if self.reason:
            return self.reason
        parts = []
        if self.changed:
            parts.append(f"{len(self.changed)} file(s) changed since it was computed (e.g. "
                         f"{', '.join(self.changed[:show])})")
        if self.missing:
            parts.append(f"{len(self.missing)} file(s) not in it (e.g. {', '.join(self.missing[:show])})")
        return "; ".join(parts) or "up to date"


def _stale_files(cache: ProposalCache, files: Sequence[str], paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    changed, missing = [], []
    for name, path in zip(files, paths):
        entry = cache.entries.get(name)
        if entry is None:
            missing.append(name)
            continue
        try:
            stat = _file_stat(path)
        except OSError:
            stat = {"size": -1, "mtime_ns": -1}
        if entry.get("size") != stat["size"] or entry.get("mtime_ns") != stat["mtime_ns"]:
            changed.append(name)
    return changed, missing


def check_proposals(
    paths: Sequence[str | os.PathLike[str]],
    base_dir: str | os.PathLike[str],
    location: str | os.PathLike[str],
    params: ProposalParams = ProposalParams(),
    cache_path: str | os.PathLike[str] | None = None,
) -> Staleness:
    """Compare the cache of a dataset (its image ``paths``, relative to ``base_dir``; ``location`` = the JSON or
    folder it was built from) with the files on disk and ``params``; compute nothing."""
    paths = [Path(p) for p in paths]
    files = [_relative(p, Path(base_dir)) for p in paths]
    path = Path(cache_path) if cache_path is not None else default_cache_path(location)
    cache = ProposalCache.read(path)
    if cache is None:
        return Staleness(path, reason=f"no proposals cache at '{path}'", n_files=len(files))
    if cache.version != ALGORITHM_VERSION:
        return Staleness(path, reason=f"cache '{path}' was computed by algorithm version {cache.version}, "
                                      f"this is version {ALGORITHM_VERSION}", n_files=len(files))
    if cache.params != params.key():
        diff = {k: (cache.params.get(k), v) for k, v in params.key().items() if cache.params.get(k) != v}
        text = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items()) or "unknown keys"
        return Staleness(path, reason=f"cache '{path}' was computed with other parameters ({text})",
                         n_files=len(files))
    if cache.opencv != _opencv_version():
        log.warning("proposals cache %s was computed with OpenCV %s, this is %s (same algorithm; kept)",
                    path, cache.opencv, _opencv_version())
    changed, missing = _stale_files(cache, files, paths)
    return Staleness(path, changed=changed, missing=missing, n_files=len(files))


_MIN_POOL_TASKS = 32
"""Fewer images are computed in-process: starting a ``spawn``-ed worker (Python, torch, OpenCV) costs seconds."""


def _compute(tasks: list[tuple[int, str, dict]], workers: int) -> Iterator[tuple[int, dict]]:
    """Entries in completion order; in-process for one worker or few images, else a ``spawn`` pool (a parent
    running torch / OpenCV threads cannot leave a forked child deadlocked)."""
    workers = max(1, min(workers, len(tasks)))
    if workers == 1 or len(tasks) < _MIN_POOL_TASKS:
        for task in tasks:
            yield _worker(task)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_worker, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))


def ensure_proposals(
    paths: Sequence[str | os.PathLike[str]],
    base_dir: str | os.PathLike[str],
    location: str | os.PathLike[str],
    params: ProposalParams = ProposalParams(),
    cache_path: str | os.PathLike[str] | None = None,
    compute: bool = True,
    workers: Optional[int] = None,
    force: bool = False,
) -> tuple[list[dict], dict]:
    """Per-image cache entries of ``paths`` (source order) and a summary, from the dataset's cache.

    A fresh cache is read as it is. A stale one (module docstring) is refreshed when ``compute`` — only the
    new or changed files, or every file when the parameters / version differ or ``force`` — with ``workers``
    processes (default ``min(8, cpu count)``), and written back; without ``compute`` it raises a DataError saying
    what is stale. The summary: cache path, images, computed, seconds, images/s, boxes per image (mean, min,
    max), images per fallback level, unreadable files."""
    paths = [Path(p) for p in paths]
    base_dir, location = Path(base_dir), Path(location)
    files = [_relative(p, base_dir) for p in paths]
    distinct = list(dict.fromkeys(files))  # a file listed twice (a weighted file list) is cached once
    path = Path(cache_path) if cache_path is not None else default_cache_path(location)
    state = check_proposals(paths, base_dir, location, params, path)
    computed, seconds = 0, 0.0
    if force or not state.fresh:
        if not compute:
            raise DataError(f"proposals of '{location}' are not usable: {state.describe()}; run "
                            f"`semssl data proposals {location}` to compute them")
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # a `spawn`-ed child re-importing an unguarded main script: computing here would wait forever on
            # the lock its parent holds while that parent waits for this child
            raise DataError(f"proposals of '{location}' would be computed while a worker process starts; call "
                            "the code that computes them under `if __name__ == \"__main__\":`, or run "
                            f"`semssl data proposals {location}` first")
        if multiprocessing.parent_process() is not None:
            workers = 1  # a worker process (e.g. a daemonic DataLoader worker) may not start its own pool
        with _locked(path):
            state = check_proposals(paths, base_dir, location, params, path)  # another process may have done it
            if force or not state.fresh:
                cache = ProposalCache.read(path) if state.reason is None and not force else None
                cache = cache or ProposalCache(path, params.key(), ALGORITHM_VERSION, _opencv_version())
                todo = set(files) if (force or state.reason) else set(state.changed) | set(state.missing)
                why = "forced" if force else state.describe()
                log.warning("computing selective-search proposals of %d of %d images of %s (%s) -> %s",
                            len(todo), len(files), location, why, path)
                first = {f: i for i, f in reversed(list(enumerate(files)))}
                tasks = [(first[f], str(paths[first[f]]), params.key()) for f in distinct if f in todo]
                start, n_workers = time.perf_counter(), workers or min(8, os.cpu_count() or 1)
                for done, (i, entry) in enumerate(_compute(tasks, n_workers), 1):
                    cache.entries[files[i]] = entry
                    if done % 500 == 0:
                        log.info("proposals: %d / %d images", done, len(tasks))
                seconds, computed = time.perf_counter() - start, len(tasks)
                cache.params, cache.version, cache.opencv = params.key(), ALGORITHM_VERSION, _opencv_version()
                cache.write(distinct, base_dir, location)
    cache = ProposalCache.read(path)
    assert cache is not None
    entries = [cache.entries[f] for f in files]
    return entries, _summary(path, entries, computed, seconds)


def _summary(path: Path, entries: list[dict], computed: int, seconds: float) -> dict:
    counts = [len(e["boxes"]) for e in entries if "error" not in e]
    levels = {name: sum(1 for e in entries if "error" not in e and e["level"] == i)
              for i, name in enumerate(_FALLBACK_LEVELS)}
    return {
        "cache": str(path),
        "images": len(entries),
        "computed": computed,
        "seconds": round(seconds, 2),
        "images_per_second": round(computed / seconds, 2) if computed and seconds > 0 else None,
        "boxes_per_image": {"mean": round(float(np.mean(counts)), 2) if counts else 0.0,
                            "min": min(counts, default=0), "max": max(counts, default=0)},
        "raw_boxes_per_image": round(float(np.mean([e["n_raw"] for e in entries])), 1) if entries else 0.0,
        "fallback_levels": levels,
        "unreadable": [e.get("file", "?") for e in entries if "error" in e],
    }


# ------------------------------------------------------------------------------------------------ for sources
class SourceProposals:
    """The proposals a source attaches to its samples: ``source_proposals[index]`` for a decoded image of size
    ``(W, H)`` is a float32 ``[N, 4]`` tensor of xyxy source pixels, or the whole image ``[[0, 0, W, H]]`` when
    the image has no proposal (SoCo's load-time fallback, docs/methods/soco.md §Proposal filters).

    ``mode``: ``True`` / ``"auto"`` computes a missing or stale cache (logged), ``"require"`` raises a DataError
    instead (e.g. for a run that must not start a long computation). A decoded size that differs from the one
    recorded in the cache raises a DataError (the file changed without its size or mtime changing)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        base_dir: str | os.PathLike[str],
        location: str | os.PathLike[str],
        mode: bool | str = True,
        params: ProposalParams | Mapping[str, Any] | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        workers: Optional[int] = None,
    ) -> None:
        if mode not in (True, "auto", "require"):
            raise DataError(f"proposals must be false, true, 'auto' or 'require', got {mode!r}")
        params = as_params(params)
        entries, self.summary = ensure_proposals(paths, base_dir, location, params, cache_path,
                                                 compute=mode != "require", workers=workers)
        self.location = str(location)
        self.files = [_relative(Path(p), Path(base_dir)) for p in paths]
        self.sizes = [tuple(e["wh"]) for e in entries]
        self.boxes = [np.asarray(e["boxes"], dtype=np.float32).reshape(-1, 4) for e in entries]

    def __len__(self) -> int:
        return len(self.boxes)

    def for_image(self, index: int, size_wh: tuple[int, int]) -> torch.Tensor:
        """The proposals of image ``index`` whose decoded size is ``size_wh`` (see the class docstring)."""
        if tuple(size_wh) != self.sizes[index]:
            raise DataError(
                f"proposals cache of '{self.location}': image '{self.files[index]}' decodes to "
                f"{size_wh[0]}x{size_wh[1]} but its proposals were computed on {self.sizes[index][0]}x"
                f"{self.sizes[index][1]}; run `semssl data proposals {self.location} --force`")
        boxes = self.boxes[index]
        if boxes.shape[0] == 0:
            return torch.tensor([[0.0, 0.0, float(size_wh[0]), float(size_wh[1])]])
        return torch.from_numpy(boxes.copy())


# ------------------------------------------------------------------------------------------------ command line
def parse_params(items: Sequence[str]) -> ProposalParams:
    """``["reference_size=null", "max_side=500"]`` (values parsed as YAML) -> :class:`ProposalParams`."""
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DataError(f"--param {item!r}: expected KEY=VALUE, e.g. reference_size=null")
        values[key.strip()] = yaml.safe_load(raw)
    return as_params(values)
