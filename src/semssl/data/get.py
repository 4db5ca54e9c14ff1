"""``semssl data get NAME``: download (or take with ``--from``), verify and lay out the small real datasets the
packaged recipes name under the data root (:mod:`semssl.data.root`): ``$SEMSSL_DATA_DIR/NAME``.

=======================  ================================================================================
``cifar10``              CIFAR-10, all 50,000 train / 10,000 test images, ``{train,test}/<class>/NNNN.png``
``cifar10-6k``           the first 500 train and 100 test images per class of CIFAR-10, in the dataset's order
                         (``data_batch_1`` ... ``5``, ``test_batch``), ``{train,test}/<class>/NNNN.jpg``
``coco128``              the first 128 COCO train2017 + 128 val2017 images with YOLO, mask and COCO labels
``stanford-background``  Stanford Background (iccv09Data): images, class-index PNG labels, a fixed split
``msrc-v2``              MSRC-v2 with the cleaned segmentations of Malisiewicz & Efros, as PNG masks and COCO JSON
=======================  ================================================================================

Each dataset is built from its public source (:data:`DATASETS`: the URL of every file, its checksum and where that
checksum comes from). A checksum that is published (CIFAR-10's md5 on its page) or fixed by a commit-pinned file
(coco128's instances JSON) is verified, and a mismatch is an error of one line; GitHub's generated commit archives
and the Stanford archive publish none, which the command says, recording the sha256 of the file it used in the
dataset's ``PROVENANCE.txt``. ``--from PATH`` (repeatable) takes a local copy instead: the published file itself
(verified like a download), an extracted folder of it, or a folder already in this layout (not verified: the
checksums are of the published files).

Conversions are part of the command, so the result is the layout the recipes read:

* **cifar10-6k** is cut from the official python archive; file names count each class from ``0000`` in the
  dataset's order. The images are written as JPEG at Pillow's quality 75 — the format of the copy the docs'
  numbers were measured on, which is a JPEG (quality ~75) re-encoding of the same images, so a user's numbers may
  differ slightly from docs/results.md. ``--format png`` writes them losslessly instead.
* **coco128**: the ``lightly-ai/coco128_yolo`` snapshot (images, YOLO boxes, masks), the original COCO JSON of its
  128 train images (``developer0hye/COCO128``), and ``coco_json_val2017/instances_val2017_boxes.json`` converted
  here from the val2017 YOLO boxes (pixel boxes rounded to 0.01, the JSON's 80 categories).
* **stanford-background**: ``labels/<id>.regions.txt`` -> 8-bit palette PNG of class indices, unknown (< 0) ->
  15; the split is the fixed one of the docs' copy (``semssl/data/splits/``; the original archive has none).
* **msrc-v2**: each ``newsegmentations_mats/<name>_GT.mat`` holds a segment map (``newseg``) and one label per
  segment (``newlabels``, 1..23); a pixel's class is its segment's label - 1, 255 (void) where the segment has no
  label. ``semantic/<name>.png`` holds that map; ``instances_{train,test}.json`` one COCO annotation per labelled
  segment (bbox, area, RLE mask, ``category_id`` = class + 1; ``supercategory`` thing / stuff); images are the
  BMPs as JPEG quality 95; the split: names sorted, 7 of every 10 to train.

Nothing is left half-written: downloads go to a ``.part`` file, verified archives are kept in
``<root>/downloads/`` (delete them freely), and the dataset is built in a hidden folder beside its target and moved
into place at the end. A dataset already in place is left alone unless ``force``. Offline, the error names the URL
and ``--from``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Sequence

import numpy as np

from semssl.data.root import GETTABLE, data_root
from semssl.errors import DataError

__all__ = ["DATASETS", "Dataset", "Resource", "convert_msrc", "get_dataset", "yolo_to_coco_boxes"]

#: images per class of the cifar10-6k slice (module level so that tests can cut a smaller one)
CIFAR10_6K_PER_CLASS: dict[str, int] = {"train": 500, "test": 100}
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
COCO128_COMMIT = "6d6f7a059ea63efffdbe48aca2d52c04d4c510e9"
COCO128_JSON_COMMIT = "47a3de30aaf7ad1c02105bd80598fb03ac0d0789"
MSRC_COMMIT = "df10559f6a45e2ba7ea85296647e01a2518a37f6"
SPLITS_DIR = Path(__file__).parent / "splits"

#: MSRC-v2's 23 classes in label order (``newlabels`` 1..23 -> class 0..22) and the stuff among them
MSRC_CLASSES: tuple[str, ...] = (
    "building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face", "car",
    "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat")
MSRC_STUFF = frozenset({"building", "grass", "tree", "sky", "mountain", "water", "road"})
MSRC_VOID = 255
#: Stanford Background: classes 0..7 and the value of unknown pixels; the palette of the docs' copy
STANFORD_UNKNOWN = 15
STANFORD_PALETTE = (128, 128, 128, 129, 127, 38, 120, 69, 125, 53, 125, 34, 0, 11, 123, 118, 20, 12, 122, 81, 25,
                    241, 134, 51)


@dataclass(frozen=True)
class Resource:
    """One published file a dataset is built from: its name as published, URL and checksum (``md5`` or
    ``sha256``; neither when none is published), ``checksum_source`` (where the checksum comes from, or why there is
    none), ``size`` for messages, and ``holds``: a test of whether a folder given to ``--from`` holds its content."""

    filename: str
    url: str
    size: str
    checksum_source: str
    holds: Callable[[Path], bool]
    md5: Optional[str] = None
    sha256: Optional[str] = None


@dataclass(frozen=True)
class Dataset:
    """A dataset ``semssl data get`` writes: what it is, its official page, its files and its build
    (``build(inputs, out, options)``: ``inputs`` maps each resource's filename to a folder or file, ``out`` is the
    empty folder to fill; returns a short summary)."""

    name: str
    what: str
    page: str
    resources: tuple[Resource, ...]
    build: Callable[[dict[str, Path], Path, dict[str, Any]], dict[str, Any]]
    notes: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------------ file helpers
def _rglob_one(base: Path, pattern: str) -> Optional[Path]:
    """The first file or folder under ``base`` (``base`` itself included) matching ``pattern``, else None."""
    if base.is_file():
        return base if PurePosixPath(base.name).match(pattern) else None
    if base.match(pattern):
        return base
    return next(iter(sorted(base.rglob(pattern))), None)


def _find_root(base: Path, marker: str, what: str) -> Path:
    """The shallowest folder under ``base`` (``base`` itself included) holding ``marker`` (a relative path), or a
    DataError saying what is missing."""
    parts = PurePosixPath(marker).parts
    if base.is_dir():
        candidates = [base] + sorted((p for p in base.rglob(parts[-1])), key=lambda p: (len(p.parts), str(p)))
        for candidate in candidates:
            root = candidate if candidate == base else candidate.parents[len(parts) - 1]
            if (root / marker).exists():
                return root
    raise DataError(f"'{base}' holds no {marker} ({what})")


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or a folder's files (contents only, not modes: a read-only source gives a writable copy)."""
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return
    for folder, _, files in os.walk(src):
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(folder) / name, dst / rel / name)


def _digests(path: Path) -> dict[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _verify(path: Path, res: Resource) -> str:
    """Check ``path`` against the resource's checksum; a line for PROVENANCE.txt (a DataError on mismatch)."""
    got = _digests(path)
    for algo in ("md5", "sha256"):
        expected = getattr(res, algo)
        if expected:
            if got[algo] != expected.lower():
                raise DataError(f"{path}: {algo} {got[algo]} is not the {expected} of {res.filename} "
                                f"({res.checksum_source}): the file is corrupt or another one; delete it and "
                                f"download again, or pass the right file with --from")
            return f"{res.filename}: {algo} {expected} verified ({res.checksum_source})"
    return f"{res.filename}: not verified ({res.checksum_source}); its sha256: {got['sha256']}"


def _progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)


def _count_progress(total: int, description: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    return progress, progress.add_task(description, total=total)


def _download(res: Resource, dest: Path) -> None:
    """Fetch ``res.url`` into ``dest`` through a ``.part`` file, with a progress bar; one-line DataError offline."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    part = Path(part_name)
    try:
        request = urllib.request.Request(res.url, headers={"User-Agent": "semssl-data-get"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response, os.fdopen(fd, "wb") as out:
                fd = -1
                total = int(response.headers.get("Content-Length") or 0) or None
                with _progress() as progress:
                    task = progress.add_task(f"{res.filename} ({res.size})", total=total)
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        progress.advance(task, len(chunk))
        except urllib.error.URLError as err:  # offline, DNS, refused, HTTP 404 ...
            reason = getattr(err, "reason", err)
            raise DataError(f"cannot download {res.url} ({reason}); fetch {res.filename} another way and pass "
                            f"it with --from PATH") from None
        except (http.client.HTTPException, ConnectionError, TimeoutError) as err:
            raise DataError(f"cannot download {res.url} ({type(err).__name__}: {err}); fetch {res.filename} "
                            f"another way and pass it with --from PATH") from None
        os.replace(part, dest)
    finally:
        if fd >= 0:
            os.close(fd)
        part.unlink(missing_ok=True)
        if not dest.exists() and not any(dest.parent.iterdir()):
            dest.parent.rmdir()  # no empty downloads/ left by a failed first download


def _safe_member(name: str) -> Optional[PurePosixPath]:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _extract(archive: Path, into: Path, want: Callable[[str], bool]) -> Path:
    """Extract the regular-file members of a .tar(.gz|.bz2|.xz) or .zip archive whose name ``want`` accepts into
    ``into`` (never outside it); returns ``into``. An unreadable archive is a DataError naming it."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    member = _safe_member(info.filename)
                    if member is None or info.is_dir() or not want(str(member)):
                        continue
                    target = into / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive, mode="r:*") as tf:
                for info in tf:
                    member = _safe_member(info.name)
                    if member is None or not info.isfile() or not want(str(member)):
                        continue
                    target = into / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(info)
                    if src is None:
                        continue
                    with src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"'{archive}' is not a readable archive ({type(err).__name__}: {err})") from None
    return into


_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip")


def _is_archive(path: Path) -> bool:
    return path.is_file() and (path.name.lower().endswith(_ARCHIVE_SUFFIXES) or zipfile.is_zipfile(path)
                               or tarfile.is_tarfile(path))


# ------------------------------------------------------------------------------------------------ CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's batches (dicts of lists, strings and numpy arrays) and nothing else: a pickle is code,
    and an unverified folder given to --from may hold any file."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"'{path}' is not a CIFAR-10 python batch ({err})") from None
    if not isinstance(raw, dict):
        raise DataError(f"'{path}' is not a CIFAR-10 python batch (a {type(raw).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _build_cifar(inputs: dict[str, Path], out: Path, options: dict[str, Any],
                 per_class: Optional[dict[str, int]], default_format: str) -> dict[str, Any]:
    from PIL import Image

    base = _find_root(inputs["cifar-10-python.tar.gz"], "data_batch_1", "the CIFAR-10 python batches")
    fmt = options.get("format") or default_format
    meta = _cifar_batch(base / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])]
    if len(names) != 10:
        raise DataError(f"'{base / 'batches.meta'}': expected 10 label_names, got {len(names)}")
    summary: dict[str, Any] = {"format": fmt}
    for part, batches in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        limit = per_class[part] if per_class else None
        counts = [0] * len(names)
        for cls in names:
            (out / part / cls).mkdir(parents=True, exist_ok=True)
        for batch in batches:
            if limit is not None and min(counts) >= limit:
                break
            data = _cifar_batch(base / batch)
            images = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [int(v) for v in data["labels"]]
            progress, task = _count_progress(len(labels), f"{part}: {batch}")
            with progress:
                for image, label in zip(images, labels):
                    progress.advance(task)
                    if limit is not None and counts[label] >= limit:
                        continue
                    target = out / part / names[label] / f"{counts[label]:04d}.{fmt}"
                    if fmt == "jpg":
                        Image.fromarray(image).save(target, quality=75)
                    else:
                        Image.fromarray(image).save(target)
                    counts[label] += 1
        if limit is not None and min(counts) < limit:
            short = names[int(np.argmin(counts))]
            raise DataError(f"'{base}': only {min(counts)} {part} images of class {short}; the slice needs {limit}")
        summary[part] = dict(zip(names, counts))
    return summary


def _cifar_holds(folder: Path) -> bool:
    return _rglob_one(folder, "data_batch_1") is not None


CIFAR_ARCHIVE = Resource(
    filename="cifar-10-python.tar.gz", url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", size="163 MB",
    md5="c58f30108f718f92721af3b95e74349a", checksum_source=f"published on {CIFAR_PAGE}", holds=_cifar_holds)


def _build_cifar10(inputs: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    return _build_cifar(inputs, out, options, None, "png")


def _build_cifar10_6k(inputs: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    return _build_cifar(inputs, out, options, dict(CIFAR10_6K_PER_CLASS), "jpg")


# ------------------------------------------------------------------------------------------------ coco128
def yolo_to_coco_boxes(images_dir: Path, labels_dir: Path, categories: list[dict[str, Any]],
                       description: str) -> dict[str, Any]:
    """COCO instances (boxes only) of YOLO box labels: one image entry per ``*.jpg`` (sorted, id = the numeric
    stem), one annotation per label line, class ``c`` -> ``categories[c]['id']``, pixel boxes and areas rounded to
    0.01; annotation ids count from 1. Reproduces the docs' ``instances_val2017_boxes.json`` byte for byte."""
    from PIL import Image

    images, annotations = [], []
    for path in sorted(images_dir.glob("*.jpg")):
        with Image.open(path) as im:
            width, height = im.size
        image_id = int(path.stem)
        images.append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        label = labels_dir / f"{path.stem}.txt"
        if not label.is_file():
            continue
        for n, line in enumerate(label.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 5:
                raise DataError(f"{label}:{n}: expected 'class xc yc w h', got {line!r}")
            cls = int(fields[0])
            xc, yc, w, h = (float(v) for v in fields[1:])
            if not 0 <= cls < len(categories):
                raise DataError(f"{label}:{n}: class {cls} outside 0..{len(categories) - 1}")
            bw, bh = w * width, h * height
            x, y = xc * width - bw / 2, yc * height - bh / 2
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": categories[cls]["id"],
                                "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                                "area": round(bw * bh, 2), "iscrowd": 0})
    return {"info": {"description": description}, "categories": categories, "images": images,
            "annotations": annotations}


def _coco128_holds(folder: Path) -> bool:
    try:
        _find_root(folder, "object_detection/labels/val2017", "")
    except DataError:
        return False
    return True


def _coco_json_holds(folder: Path) -> bool:
    return _rglob_one(folder, "instances_train2017.json") is not None


_COCO128_SKIP = {"scripts", ".gitignore", ".github", "coco_json_train2017", "coco_json_val2017", "PROVENANCE.txt",
                 "SOURCE_COMMIT.txt"}


def _build_coco128(inputs: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    base = _find_root(inputs[COCO128_ARCHIVE.filename], "object_detection/labels/val2017",
                      "the coco128_yolo snapshot")
    for name in ("images/train2017", "images/val2017"):
        if not (base / name).is_dir():
            raise DataError(f"'{base}' holds no {name}/ (the coco128_yolo snapshot)")
    for entry in sorted(base.iterdir()):
        if entry.name in _COCO128_SKIP:
            continue
        _copy(entry, out / entry.name)
    train_json = _rglob_one(inputs[COCO128_JSON.filename], "instances_train2017.json")
    if train_json is None:
        raise DataError(f"'{inputs[COCO128_JSON.filename]}' holds no instances_train2017.json")
    (out / "coco_json_train2017").mkdir()
    _copy(train_json, out / "coco_json_train2017" / "instances_train2017.json")
    categories = json.loads(train_json.read_text())["categories"]
    val = yolo_to_coco_boxes(out / "images" / "val2017", out / "object_detection" / "labels" / "val2017",
                             categories, "COCO val2017, first 128 images: boxes converted from the YOLO labels of "
                                         "coco128 (no masks)")
    (out / "coco_json_val2017").mkdir()
    (out / "coco_json_val2017" / "instances_val2017_boxes.json").write_text(json.dumps(val))
    (out / "SOURCE_COMMIT.txt").write_text(COCO128_COMMIT + "\n")
    return {"train2017 images": len(list((out / "images" / "train2017").glob("*.jpg"))),
            "val2017 images": len(val["images"]), "val2017 boxes": len(val["annotations"])}


COCO128_ARCHIVE = Resource(
    filename=f"coco128_yolo-{COCO128_COMMIT}.tar.gz",
    url=f"https://github.com/lightly-ai/coco128_yolo/archive/{COCO128_COMMIT}.tar.gz", size="about 60 MB",
    checksum_source="none published: GitHub generates commit archives on the fly; the commit fixes their content",
    holds=_coco128_holds)
COCO128_JSON = Resource(
    filename="instances_train2017.json",
    url=f"https://raw.githubusercontent.com/developer0hye/COCO128/{COCO128_JSON_COMMIT}/annotations/"
        f"instances_train2017.json", size="0.6 MB",
    sha256="b50631f1014dd6799df6b946be53e6f23693364a9a7690bdd2a6e754439f0ca0",
    checksum_source=f"fixed by commit {COCO128_JSON_COMMIT[:7]}; the sha256 of the copy the docs used",
    holds=_coco_json_holds)


# ------------------------------------------------------------------------------------------------ Stanford Background
def _stanford_split(part: str) -> list[str]:
    return (SPLITS_DIR / f"stanford-background_{part}.txt").read_text().split()


def _stanford_holds(folder: Path) -> bool:
    try:
        root = _find_root(folder, "horizons.txt", "")
    except DataError:
        return False
    return (root / "images").is_dir() and (root / "labels").is_dir()


def _build_stanford(inputs: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    base = _find_root(inputs[STANFORD_ARCHIVE.filename], "horizons.txt", "the iccv09Data folder")
    ids = sorted(p.stem for p in (base / "images").glob("*.jpg"))
    (out / "images").mkdir()
    (out / "labels").mkdir()
    (out / "splits").mkdir()
    for name in ("README", "horizons.txt"):
        if (base / name).is_file():
            _copy(base / name, out / name)
    progress, task = _count_progress(len(ids), "labels")
    with progress:
        for image_id in ids:
            progress.advance(task)
            _copy(base / "images" / f"{image_id}.jpg", out / "images" / f"{image_id}.jpg")
            text = base / "labels" / f"{image_id}.regions.txt"
            png = base / "labels" / f"{image_id}.png"
            if text.is_file():
                rows = [r.split() for r in text.read_text().splitlines() if r.strip()]
                try:
                    regions = np.array(rows, dtype=np.int16)
                except ValueError:
                    raise DataError(f"{text}: not a matrix of integers of one width") from None
                labels = np.where(regions < 0, STANFORD_UNKNOWN, regions).astype(np.uint8)
                mask = Image.fromarray(labels).convert("P")
                mask.putpalette(list(STANFORD_PALETTE))
                mask.save(out / "labels" / f"{image_id}.png")
            elif png.is_file():
                _copy(png, out / "labels" / png.name)
            else:
                raise DataError(f"'{base / 'labels'}' has no {image_id}.regions.txt (nor {image_id}.png)")
    present = set(ids)
    for part in ("train", "val"):
        split = _stanford_split(part)
        missing = [i for i in split if i not in present]
        if missing:
            raise DataError(f"'{base / 'images'}' lacks {len(missing)} image(s) of the {part} split "
                            f"(e.g. {missing[0]}.jpg)")
        (out / "splits" / f"{part}.txt").write_text("".join(f"{i}\n" for i in split))
    return {"images": len(ids), "train": len(_stanford_split("train")), "val": len(_stanford_split("val"))}


STANFORD_ARCHIVE = Resource(
    filename="iccv09Data.tar.gz", url="http://dags.stanford.edu/data/iccv09Data.tar.gz", size="about 17 MB",
    checksum_source="none published on http://dags.stanford.edu/projects/scenedataset.html", holds=_stanford_holds)


# ------------------------------------------------------------------------------------------------ MSRC-v2
def _msrc_segments(mat: dict[str, np.ndarray], shape: tuple[int, int], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(segment map [H, W] int, labels per segment id 1..N) of one cleaned-segmentation MAT-file."""
    if "newlabels" not in mat:
        raise DataError(f"{where}: no variable 'newlabels' (has: {', '.join(sorted(mat)) or 'none'})")
    seg = mat.get("newseg")
    if seg is None:  # the one 2-D array of the image's size
        maps = [a for k, a in mat.items() if k != "newlabels" and a.ndim == 2 and a.shape == shape]
        if len(maps) != 1:
            raise DataError(f"{where}: no segment map 'newseg' of the image's size {shape} "
                            f"(has: {', '.join(f'{k} {a.shape}' for k, a in mat.items())})")
        seg = maps[0]
    if seg.shape != shape:
        raise DataError(f"{where}: segment map of size {seg.shape}, the image is {shape}")
    return np.asarray(seg).astype(np.int64), np.asarray(mat["newlabels"]).reshape(-1).astype(np.int64)


def convert_msrc(base: Path, out: Path, quality: int = 95) -> dict[str, Any]:
    """MSRC-v2 (``base/Images/<name>.bmp``, ``base/newsegmentations_mats/<name>_GT.mat``) -> ``out/images/*.jpg``,
    ``semantic/*.png``, ``instances_{train,test}.json``, ``{train,test}.txt`` (module docstring)."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    from semssl.data.matfile import load_mat

    mats = base / "newsegmentations_mats"
    names = sorted(p.stem for p in (base / "Images").glob("*.bmp") if (mats / f"{p.stem}_GT.mat").is_file())
    if not names:
        raise DataError(f"'{base}': no Images/<name>.bmp with its newsegmentations_mats/<name>_GT.mat")
    for sub in ("images", "semantic"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": c, "supercategory": "stuff" if c in MSRC_STUFF else "thing"}
                  for i, c in enumerate(MSRC_CLASSES)]
    splits: dict[str, dict[str, list]] = {p: {"images": [], "annotations": []} for p in ("train", "test")}
    n_ann = 0
    progress, task = _count_progress(len(names), "msrc-v2")
    with progress:
        for index, name in enumerate(names):
            progress.advance(task)
            part = "train" if index % 10 < 7 else "test"
            with Image.open(base / "Images" / f"{name}.bmp") as im:
                rgb = im.convert("RGB")
            width, height = rgb.size
            rgb.save(out / "images" / f"{name}.jpg", quality=quality)
            where = str(mats / f"{name}_GT.mat")
            seg, labels = _msrc_segments(load_mat(mats / f"{name}_GT.mat"), (height, width), where)
            semantic = np.full((height, width), MSRC_VOID, dtype=np.uint8)
            image_id = index + 1
            splits[part]["images"].append({"id": image_id, "file_name": f"{name}.jpg", "width": width,
                                           "height": height})
            for segment in np.unique(seg):
                if not 1 <= segment <= len(labels) or not 1 <= labels[segment - 1] <= len(MSRC_CLASSES):
                    continue  # a segment without a label: void
                cls = int(labels[segment - 1]) - 1
                mask = seg == segment
                semantic[mask] = cls
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                n_ann += 1
                splits[part]["annotations"].append({
                    "id": n_ann, "image_id": image_id, "category_id": cls + 1,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
                    "iscrowd": 0, "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}})
            Image.fromarray(semantic).save(out / "semantic" / f"{name}.png")
    for part, content in splits.items():
        (out / f"instances_{part}.json").write_text(json.dumps({**content, "categories": categories}))
        (out / f"{part}.txt").write_text("".join(f"{im['file_name'][:-4]}\n" for im in content["images"]))
    return {"images": len(names), **{f"{p} images": len(c["images"]) for p, c in splits.items()},
            **{f"{p} segments": len(c["annotations"]) for p, c in splits.items()}}


def _msrc_holds(folder: Path) -> bool:
    try:
        root = _find_root(folder, "newsegmentations_mats", "")
    except DataError:
        return False
    return (root / "Images").is_dir()


def _build_msrc(inputs: dict[str, Path], out: Path, options: dict[str, Any]) -> dict[str, Any]:
    base = _find_root(inputs[MSRC_ARCHIVE.filename], "newsegmentations_mats", "MSRC_v2's cleaned segmentations")
    if not (base / "Images").is_dir():
        raise DataError(f"'{base}' holds newsegmentations_mats/ but no Images/ (MSRC_v2)")
    return convert_msrc(base, out)


MSRC_ARCHIVE = Resource(
    filename=f"MultiGraph_MultiLabel_Learning-{MSRC_COMMIT}.tar.gz",
    url=f"https://github.com/TonyZZX/MultiGraph_MultiLabel_Learning/archive/{MSRC_COMMIT}.tar.gz",
    size="a few hundred MB (the whole repository; only MSRC_v2/ is read)",
    checksum_source="none published: GitHub generates commit archives on the fly; the commit fixes their content",
    holds=_msrc_holds)


def _msrc_member(name: str) -> bool:
    return "/MSRC_v2/Images/" in f"/{name}" or "/MSRC_v2/newsegmentations_mats/" in f"/{name}"


def _stanford_member(name: str) -> bool:
    return not name.endswith((".surfaces.txt", ".layers.txt"))  # 2/3 of the archive, unused


# ------------------------------------------------------------------------------------------------ the registry
DATASETS: dict[str, Dataset] = {
    "cifar10": Dataset(
        "cifar10", "CIFAR-10: 50,000 train / 10,000 test images, 32 px, 10 classes (ImageFolder, PNG)", CIFAR_PAGE,
        (CIFAR_ARCHIVE,), _build_cifar10),
    "cifar10-6k": Dataset(
        "cifar10-6k", "the first 500 train / 100 test images per class of CIFAR-10, in the dataset's order "
                      "(ImageFolder, JPEG quality 75)", CIFAR_PAGE, (CIFAR_ARCHIVE,), _build_cifar10_6k,
        ("The docs' numbers were measured on a JPEG (quality ~75) re-encoding of the same images, so numbers "
         "measured on this copy may differ slightly.",)),
    "coco128": Dataset(
        "coco128", "the first 128 COCO train2017 + 128 val2017 images: YOLO boxes, masks, COCO JSON",
        "https://github.com/lightly-ai/coco128_yolo", (COCO128_ARCHIVE, COCO128_JSON), _build_coco128,
        ("COCO annotations: CC BY 4.0; images: Flickr terms (per-image licences in the JSON).",)),
    "stanford-background": Dataset(
        "stanford-background", "Stanford Background (iccv09Data): 715 outdoor scenes, 8 classes + unknown (15)",
        "http://dags.stanford.edu/projects/scenedataset.html", (STANFORD_ARCHIVE,), _build_stanford,
        ("No data licence is stated; cite Gould, Fulton, Koller, ICCV 2009.",)),
    "msrc-v2": Dataset(
        "msrc-v2", "MSRC-v2: 591 photographs, 23 classes, cleaned per-object segmentations (BMVC07)",
        "http://www.cs.cmu.edu/~tmalisie/projects/bmvc07/", (MSRC_ARCHIVE,), _build_msrc,
        ("No data licence is stated by the source. Some Stanford Background images come from MSRC.",)),
}
assert tuple(DATASETS) == GETTABLE, "semssl.data.root.GETTABLE must list the datasets of semssl.data.get"

_MEMBERS: dict[str, Callable[[str], bool]] = {MSRC_ARCHIVE.filename: _msrc_member,
                                             STANFORD_ARCHIVE.filename: _stanford_member}


# ------------------------------------------------------------------------------------------------ the command
def _match_from(dataset: Dataset, sources: Sequence[Path]) -> dict[str, Path]:
    """Assign each ``--from`` path to the resource it provides: a file by its published name, else to the one
    resource left of its kind (archive or not); a folder to every resource it holds."""
    found: dict[str, Path] = {}
    for src in sources:
        if not src.exists():
            raise DataError(f"--from {src}: no such file or folder")
    files = [s for s in sources if s.is_file()]
    for src in files:
        named = [r for r in dataset.resources if r.filename == src.name]
        if named:
            found[named[0].filename] = src
    for src in (s for s in files if s not in found.values()):
        left = [r for r in dataset.resources if r.filename not in found]
        kind = [r for r in left if r.filename.endswith(_ARCHIVE_SUFFIXES) == _is_archive(src)]
        if len(kind) != 1:
            raise DataError(f"--from {src}: cannot tell which of {', '.join(r.filename for r in left) or 'nothing'} "
                            f"this is; give it its published name")
        found[kind[0].filename] = src
    for src in (s for s in sources if s.is_dir()):
        matched = [r for r in dataset.resources if r.filename not in found and r.holds(src)]
        if not matched:
            wanted = "; ".join(f"{r.filename} ({r.url})" for r in dataset.resources)
            raise DataError(f"--from {src}: this folder holds none of what {dataset.name} is built from: {wanted}")
        for res in matched:
            found[res.filename] = src
    return found


def _provenance(dataset: Dataset, lines: list[str], summary: dict[str, Any]) -> str:
    sources = "\n".join(f"- {r.filename}: {r.url}" for r in dataset.resources)
    text = (f"{dataset.name}: {dataset.what}\nOfficial page: {dataset.page}\nWritten by `semssl data get "
            f"{dataset.name}` (semssl.data.get, whose docstring describes every conversion) from:\n{sources}\n"
            f"Checks:\n" + "\n".join(f"- {line}" for line in lines) + "\n"
            f"Contents: {json.dumps(summary)}\n" + "".join(f"{note}\n" for note in dataset.notes))
    return text


def get_dataset(name: str, root: Optional[Path] = None, sources: Sequence[Path] = (), force: bool = False,
                options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write dataset ``name`` into ``root/name`` (``root`` = the data root by default) from its public sources or
    ``sources`` (``--from`` paths); return a summary. A DataError of one line for every failure."""
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown dataset '{name}': `semssl data get` knows {', '.join(DATASETS)}{hint}")
    dataset = DATASETS[name]
    root = Path(root).expanduser() if root is not None else data_root()
    target = root / name
    if target.exists() and not force:
        return {"dataset": name, "path": str(target), "status": "already there (--force writes it again)"}
    root.mkdir(parents=True, exist_ok=True)
    given = _match_from(dataset, [Path(s).expanduser() for s in sources])
    work = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.work-"))
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.partial-"))
    try:
        inputs, checks = {}, []
        for res in dataset.resources:
            path = given.get(res.filename)
            if path is None:
                path = root / "downloads" / res.filename
                if path.is_file():
                    try:
                        checks.append(_verify(path, res) + " (kept from an earlier download)")
                    except DataError:
                        path.unlink()
                if not path.is_file():
                    _download(res, path)
                    checks.append(_verify(path, res) + f" (downloaded from {res.url})")
            elif path.is_file():
                checks.append(_verify(path, res) + f" (--from {path})")
            else:
                checks.append(f"{res.filename}: not verified (--from the folder {path}: the checksum is of the "
                              f"published file)")
            if path.is_file() and _is_archive(path):
                want = _MEMBERS.get(res.filename, lambda _: True)
                path = _extract(path, work / res.filename, want)
            inputs[res.filename] = path
        summary = dataset.build(inputs, partial, dict(options or {}))
        (partial / "PROVENANCE.txt").write_text(_provenance(dataset, checks, summary))
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp made it private
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old-"))
            os.replace(target, old / name)
        os.replace(partial, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return {"dataset": name, "path": str(target), "checks": checks, **summary,
            **({"note": " ".join(dataset.notes)} if dataset.notes else {})}
