"""COCO-style scene sources: :class:`CocoSource`, the validated annotation index, JSON reading and the
search for the images folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from semssl.data.sources.base import (
    _PROBE_FILES,
    ImageSource,
    OnError,
    Sample,
    _probe_existing,
    _require_dir,
    _require_file,
)
from semssl.data.sources.decode import ImageDecodeError, load_image
from semssl.errors import DataError

__all__ = ["CocoSource"]


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
        proposals: attach unsupervised ``"proposals"`` (selective search, SoCo's filters; float32 ``[P, 4]``
            xyxy image pixels, the whole image when an image has none) to every sample, from the dataset's cache
            ``<annotation json>.proposals.json`` (:mod:`semssl.data.proposals`): ``True`` computes a missing or
            stale cache first, ``"require"`` raises instead.
        proposal_params: selective-search / filter settings (fields of
            :class:`~semssl.data.proposals.ProposalParams`, e.g. ``{"reference_size": None}`` for SoCo's absolute
            32 px side filter); None = the defaults.

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
        proposals: bool | str = False,
        proposal_params: dict | None = None,
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
        self.proposals = None
        if proposals:
            from semssl.data.proposals import SourceProposals

            self.proposals = SourceProposals(self.paths, self.images_dir, self.annotation_json, mode=proposals,
                                             params=proposal_params)

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
        if self.proposals is not None:
            sample["proposals"] = self.proposals.for_image(index, image.size)
        if self.load_masks:
            segs = [(ann_id, seg) for ann_id, _, _, seg in kept]
            sample["masks"] = self._decode_masks(index, segs, height, width)
        return sample

    def _decode_masks(self, index: int, segs: list[tuple[Any, Any]], height: int, width: int) -> torch.Tensor:
        """Decode polygon / RLE segmentations to ``uint8 [N, H, W]`` 0/1 masks in one pycocotools call."""
        if not segs:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        from pycocotools import mask as mask_utils  # only for masks: boxes-only scenes load without it

        rles = [self._to_rle(index, ann_id, seg, height, width) for ann_id, seg in segs]
        stacked = mask_utils.decode(rles)  # [H, W, N], column-major
        return torch.from_numpy(np.ascontiguousarray(stacked.transpose(2, 0, 1), dtype=np.uint8))

    def _to_rle(self, index: int, ann_id: Any, seg: Any, height: int, width: int) -> dict[str, Any]:
        """One segmentation (polygons, uncompressed or compressed RLE) as a compressed RLE."""
        from pycocotools import mask as mask_utils

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
