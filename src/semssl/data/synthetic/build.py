"""Writing the built-in dataset to disk: per-image tasks run by worker processes, PNG and COCO files, the
manifest, the root's marker and lock, and :func:`generate` / :func:`ensure_synthetic` / :func:`load_manifest`."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from semssl.data.synthetic import (
    GENERATOR_NAME,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PARTS,
    SPLITS,
    SynthConfig,
    default_root,
)
from semssl.data.synthetic.classes import class_names
from semssl.data.synthetic.render import render_object_image, render_scene
from semssl.errors import SynthConfigError, SyntheticDataError

__all__ = ["ensure_synthetic", "generate", "load_manifest"]

_MARKER_NAME = ".semssl-synthetic"
_LOCK_NAME = ".lock"
_STAGING_PREFIX = ".staging-"
_TASK_CHUNK = 100  # images per worker task


def _rng_for(seed: int, split: str, part: str, index: int) -> np.random.Generator:
    """The generator of one image: a function of (seed, split/part, index) only, hence worker-independent."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(f"{split}/{part}".encode()), index]))


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB (HxWx3) or single-channel image as PNG, raising a clear error on failure."""
    data = image[..., ::-1] if image.ndim == 3 else image
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(data))
    if not ok:
        raise SyntheticDataError(f"could not encode {path} as PNG")
    # Decision: encode in memory and write with Python; cv2.imwrite measured ~7x slower per small file here.
    try:
        path.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise SyntheticDataError(f"could not write {path}: {exc}") from exc


@dataclass(frozen=True)
class _Task:
    """A contiguous range of images of one split/part, drawn and written by one worker call."""

    split: str
    part: str
    start: int
    stop: int
    out_dir: str
    seed: int
    size: int
    num_classes: int
    class_def: str
    style: str


def _run_task(task: _Task) -> list[dict[str, Any]]:
    """Draw and write the task's images; scenes return their COCO image/annotation records (without ids)."""
    out = Path(task.out_dir)
    records: list[dict[str, Any]] = []
    for index in range(task.start, task.stop):
        rng = _rng_for(task.seed, task.split, task.part, index)
        name = f"{index:06d}.png"
        if task.split == "objects":
            cls = index % task.num_classes
            image, _ = render_object_image(rng, task.size, cls, task.num_classes, task.class_def, task.style)
            _write_png(out / class_names(task.class_def)[cls] / name, image)
            continue
        scene = render_scene(rng, task.size, task.num_classes, task.class_def, task.style)
        _write_png(out / "images" / name, scene.image)
        _write_png(out / "semantic" / name, scene.semantic)
        records.append({"index": index, "file_name": name,
                        "annotations": [_coco_annotation(c, m) for c, m in zip(scene.classes, scene.masks)]})
    return records


def _coco_annotation(cls: int, mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of one visible mask: RLE (counts as str), tight bbox [x, y, w, h], pixel area."""
    import pycocotools.mask as mask_utils  # here, not at the top: the engine imports this module without it

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "category_id": cls + 1,
        "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
    }


def _coco_document(records: list[dict[str, Any]], size: int, num_classes: int, class_def: str) -> dict[str, Any]:
    """Assemble the COCO instances file of one scene split (image ids = index + 1, annotation ids from 1)."""
    images, annotations = [], []
    for rec in records:
        image_id = rec["index"] + 1
        images.append({"id": image_id, "file_name": rec["file_name"], "width": size, "height": size})
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    names = class_names(class_def)
    categories = [{"id": k + 1, "name": names[k], "supercategory": "shape"} for k in range(num_classes)]
    info = {"description": "semssl synthetic scenes", "version": str(GENERATOR_VERSION)}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def _tasks(config: SynthConfig, splits: Sequence[str], staging: Path) -> list[_Task]:
    """Create the staging folders and cut every split/part into tasks of :data:`_TASK_CHUNK` images."""
    counts = {("objects", "train"): config.n_train_objects, ("objects", "test"): config.n_test_objects,
              ("scenes", "train"): config.n_train_scenes, ("scenes", "test"): config.n_test_scenes}
    tasks = []
    for split in splits:
        size = config.object_size if split == "objects" else config.scene_size
        for part in PARTS:
            out = staging / split / part
            subdirs = class_names(config.class_def)[: config.num_classes] if split == "objects" else ("images", "semantic")
            for sub in subdirs:
                (out / sub).mkdir(parents=True, exist_ok=True)
            n = counts[(split, part)]
            for start in range(0, n, _TASK_CHUNK):
                tasks.append(_Task(split, part, start, min(start + _TASK_CHUNK, n), str(out), config.seed, size,
                                   config.num_classes, config.class_def, config.style))
    return tasks


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _run_all(tasks: list[_Task], workers: int) -> list[list[dict[str, Any]]]:
    """Run the tasks, in-process or on a pool; results come back in task order either way.

    Decision: the ``spawn`` start method, so a parent that already runs threads (torch, OpenCV) cannot leave
    a forked child deadlocked; the children import only numpy, OpenCV and pycocotools.
    """
    workers = min(workers, len(tasks))
    if workers <= 1:
        return [_run_task(t) for t in tasks]
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        return pool.map(_run_task, tasks, chunksize=1)


def _manifest_key(config: SynthConfig, splits: Sequence[str]) -> dict[str, Any]:
    """The part of the manifest that decides whether a dataset on disk matches a config."""
    cfg = {k: v if isinstance(v, str) else int(v)  # int(): numpy ints are not JSON
           for k, v in asdict(config).items() if k != "workers"}
    return {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "config": cfg,
            "class_names": list(class_names(config.class_def)[: config.num_classes]), "splits": list(splits)}


def load_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a generated dataset, or None if there is none (an absent or interrupted generation)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SyntheticDataError(f"{path}: unreadable manifest ({exc}); delete it to regenerate") from exc
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR_NAME:
        raise SyntheticDataError(f"{path}: not a semssl synthetic-data manifest (no generator={GENERATOR_NAME!r})")
    return manifest


def _refuse_foreign(root: Path) -> None:
    """Raise if ``root`` is a non-empty folder without the generator's marker (someone else's files).

    Decision: generation replaces the split folders of its root, so it only ever writes into a new or empty
    folder or one it made itself (marked by a hidden file), never into a folder of the user's own data.
    """
    if root.exists() and not root.is_dir():
        raise SyntheticDataError(f"synthetic-data root {root} exists and is not a folder")
    if not root.is_dir() or (root / _MARKER_NAME).exists():
        return
    foreign = sorted(p.name for p in root.iterdir() if p.name not in (_LOCK_NAME, MANIFEST_NAME))
    if foreign:
        raise SyntheticDataError(
            f"refusing to generate synthetic data into {root}: it already holds files not made by the "
            f"generator ({', '.join(foreign[:5])}); choose an empty or new folder")


def _claim_root(root: Path) -> None:
    """Check that ``root`` is free or ours, create it and mark it as ours."""
    _refuse_foreign(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _MARKER_NAME
    if not marker.exists():
        marker.write_text("made by semssl.data.synthetic; this folder is regenerated as a whole\n")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``root`` (POSIX ``flock``), so concurrent ranks generate only once."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(root / _LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _canonical_splits(splits: Sequence[str]) -> list[str]:
    if isinstance(splits, str):
        splits = (splits,)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise SynthConfigError(f"splits = {list(splits)!r}: choose one or more of {list(SPLITS)}")
    return [s for s in SPLITS if s in splits]


def _generate_unlocked(root: Path, config: SynthConfig, splits: list[str]) -> dict[str, Any]:
    """Generate into a staging folder, swap it in, then write the manifest (last, atomically).

    Decision: the dataset is regenerated as a whole: the old manifest is removed first and every split folder
    is replaced, so an interruption at any point leaves no manifest and nothing stale is ever mistaken for
    complete output.
    """
    start = time.perf_counter()
    _claim_root(root)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for stale in root.glob(_STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = root / f"{_STAGING_PREFIX}{os.getpid()}"
    tasks = _tasks(config, splits, staging)
    results = _run_all(tasks, config.workers)

    files: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        if "objects" in splits:
            n = config.n_train_objects if part == "train" else config.n_test_objects
            names = class_names(config.class_def)
            per_class = {names[k]: len(range(k, n, config.num_classes)) for k in range(config.num_classes)}
            files[f"objects/{part}"] = {"images": n, "per_class": per_class}
        if "scenes" in splits:
            records = [r for t, res in zip(tasks, results) if (t.split, t.part) == ("scenes", part) for r in res]
            doc = _coco_document(records, config.scene_size, config.num_classes, config.class_def)
            (staging / "scenes" / part / "annotations.json").write_text(json.dumps(doc))
            files[f"scenes/{part}"] = {"images": len(doc["images"]), "annotations": len(doc["annotations"])}

    for split in SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
        if split in splits:
            os.replace(staging / split, root / split)
    shutil.rmtree(staging, ignore_errors=True)
    _write_json_atomic(root / MANIFEST_NAME, {**_manifest_key(config, splits), "files": files})
    return {"root": str(root), "seconds": time.perf_counter() - start, "workers": min(config.workers, len(tasks)),
            "files": files}


def generate(root: Path, config: SynthConfig = SynthConfig(),
             splits: Sequence[str] = ("objects", "scenes")) -> dict[str, Any]:
    """Generate the dataset under ``root`` (replacing what a previous generation left there).

    Returns a summary: ``root``, ``seconds``, ``workers`` and ``files`` (image counts per split/part, per-class
    counts for objects, annotation counts for scenes). With ``config.workers > 1`` the images are drawn by
    ``spawn``-ed processes, so a script calling this must do so under ``if __name__ == "__main__":``.
    """
    config.validate()
    wanted = _canonical_splits(splits)
    root = Path(root).expanduser()
    _refuse_foreign(root)
    with _locked(root):
        return _generate_unlocked(root, config, wanted)


def _matches(root: Path, config: SynthConfig, splits: Sequence[str]) -> bool:
    """True if ``root`` holds a complete dataset generated with this config and generator version."""
    try:
        manifest = load_manifest(root)
    except SyntheticDataError:
        return False
    if manifest is None:
        return False
    key = _manifest_key(config, splits)
    if any(manifest.get(k) != v for k, v in key.items()):
        return False
    return all((root / s / p).is_dir() for s in splits for p in PARTS)


def ensure_synthetic(root: Path | None = None, config: SynthConfig = SynthConfig()) -> Path:
    """Return ``root`` (default :func:`default_root`) holding both splits for ``config``; generate if needed.

    Regenerates only when the manifest is missing (never generated, or interrupted) or differs from the config
    or the generator version. Safe to call from several processes at once: one generates, the others wait.
    """
    config.validate()
    root = Path(root).expanduser() if root is not None else default_root()
    splits = list(SPLITS)
    if _matches(root, config, splits):
        return root
    _refuse_foreign(root)
    with _locked(root):
        if not _matches(root, config, splits):  # another process may have generated it meanwhile
            _generate_unlocked(root, config, splits)
    return root
