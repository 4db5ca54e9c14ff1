"""Object-level kNN (O-KNN) and disturbed O-KNN (D3SSL, docs/methods/d3ssl.md §O-KNN; docs/design.md §O-KNN).

Protocol:

* every image of a COCO-style split is brought to ``size`` x ``size`` (:func:`letterbox`) and its ground-truth
  boxes scaled with it; the objects whose box has both sides >= ``min_side`` (16 px) *at that resolution* are
  kept (:func:`select_objects`) — all of them: the memory is every kept object of the train split, the queries
  every kept object of the test split (docs/design.md §O-KNN; the paper's "N objects per image" is not given);
* object feature = RoIAlign 7x7 of the box on the last stage map (``model.features(images, branch,
  kind="layer4")``), average-pooled (:func:`roi_features`) — ``roi="c5"``, the reading of docs/design.md §O-KNN
  of the paper's "from the C5 block ... RoIAlign 7x7 and average pooling"; ``roi="c4"`` is the other reading
  docs/methods/d3ssl.md §O-KNN leaves open, the region path SoCo/D3SSL pre-train with: RoIAlign 14x14 on layer3,
  the backbone's layer4 on the RoIs, average pooling (:func:`c4_roi_features`);
* weighted kNN of :func:`semssl.eval.knn.knn_evaluate` (cosine, k 20, votes exp(s/0.07)); top-1 / top-5 in
  percent, keys ``oknn_top1`` / ``oknn_top5``;
* disturbed O-KNN: the same, but every pixel outside the selected boxes of an image is replaced by the pixel at
  the same place of another image of the same split (:func:`disturb`, :func:`partner_indices`); keys
  ``oknn_disturbed_top1`` / ``oknn_disturbed_top5``;
* ``by_supercategory`` (``--by-supercategory``): also each of those on the queries of one ``supercategory`` of the
  memory's categories (e.g. MSRC-v2's ``thing`` / ``stuff`` segments), against the whole memory, keys
  ``oknn_<supercategory>_top1`` (``oknn_disturbed_<supercategory>_top1``) and ``n_queries_<supercategory>``.

Random-init baselines (docs/design.md §Random-init baselines, issue 12): ``random_init``, ``random_init_bn`` (BatchNorm
statistics re-estimated on the train split's images at the evaluated resolution) and ``pixels``
(:class:`ObjectPixels`: RoIAlign 7x7 of the image itself, flattened, centred by the memory's mean, L2-normalised).

Everything goes through ``model.features(images, branch, kind)``, so any :class:`~semssl.methods.Method` and a
:class:`~semssl.models.backbones.BackboneModel` (plain state_dict or random init) are evaluated alike.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align

from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from semssl.data.sources.coco import CocoSource
from semssl.errors import ConfigError, DataError
from semssl.eval.features import EvalInputError
from semssl.eval.knn import knn_evaluate
from semssl.eval.options import RESIZE_MODES, ROI_MODES

__all__ = [
    "ObjectPixels",
    "ObjectsConfig",
    "SceneObjects",
    "box_mask",
    "c4_roi_features",
    "disturb",
    "evaluate_objects",
    "extract_object_features",
    "letterbox",
    "normalize",
    "object_baselines",
    "oknn",
    "open_coco",
    "partner_indices",
    "roi_features",
    "scale_boxes",
    "select_objects",
    "stage_stride",
]

log = logging.getLogger("semssl.eval")


# ------------------------------------------------------------------------------------------------ geometry
def normalize(image: Tensor) -> Tensor:
    """``[..., 3, H, W]`` in [0, 1] -> ImageNet-normalised (the networks' input convention)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image - mean) / std


def letterbox(image: Image.Image, size: int, mode: str = "pad") -> tuple[Tensor, tuple[float, float]]:
    """The image as a normalised ``[3, size, size]`` tensor and the (sx, sy) factors that map its boxes.

    ``pad`` (default): keep the aspect ratio — the longer side becomes ``size`` (bicubic, as the evaluation
    transform), the image sits at the top-left corner and the rest is 0 *after* normalisation (the mean colour),
    as torchvision's detection transform pads its batches. ``stretch``: resize to ``size`` x ``size``.

    Decision (an open point of the paper): ``pad`` keeps the objects' shapes, which object classification
    depends on; scene images are rarely square (COCO 4:3). The factors are those of the actual resized image
    (after rounding), so scaled boxes stay on the pixels they covered.
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize: expected one of {RESIZE_MODES}, got {mode!r}")
    if size < 1:
        raise ConfigError(f"size: expected a positive int, got {size!r}")
    image = image.convert("RGB")
    width, height = image.size
    if mode == "stretch":
        new_w, new_h = size, size
    else:
        scale = size / max(width, height)
        new_w, new_h = max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale)))
    resized = image.resize((new_w, new_h), Image.BICUBIC) if (new_w, new_h) != (width, height) else image
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(new_h, new_w, 3)
    tensor = normalize(pixels.permute(2, 0, 1).float() / 255.0)
    canvas = torch.zeros(3, size, size)
    canvas[:, :new_h, :new_w] = tensor
    return canvas, (new_w / width, new_h / height)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """``[N, 4]`` (x1, y1, x2, y2) boxes scaled by (sx, sy) (float32)."""
    factors = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    return boxes.float().reshape(-1, 4) * factors


def select_objects(boxes: Tensor, labels: Tensor, min_side: float = 16.0) -> tuple[Tensor, Tensor]:
    """The boxes (and their labels) whose width *and* height are >= ``min_side`` pixels
    (docs/design.md §O-KNN: 16 px at the evaluated resolution)."""
    boxes = boxes.reshape(-1, 4)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    return boxes[keep], labels.reshape(-1)[keep]


def box_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """``bool [height, width]``: True on every pixel a box touches (union over ``boxes`` ``[N, 4]``).

    Decision: pixel column i (covering [i, i+1)) belongs to a box [x1, x2) when floor(x1) <= i < ceil(x2), and
    likewise for rows — a pixel partly covered by a box counts as inside, so no pixel of an object is replaced
    by the disturbing image.
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.reshape(-1, 4).tolist():
        c1, c2 = max(0, math.floor(x1)), min(width, math.ceil(x2))
        r1, r2 = max(0, math.floor(y1)), min(height, math.ceil(y2))
        if c2 > c1 and r2 > r1:
            mask[r1:r2, c1:c2] = True
    return mask


def disturb(image: Tensor, other: Tensor, boxes: Tensor) -> Tensor:
    """Disturbed O-KNN's input: ``image`` ``[C, H, W]`` inside the boxes (:func:`box_mask`), ``other`` (another
    image of the same split, same size and normalisation) everywhere else."""
    if image.shape != other.shape:
        raise EvalInputError(f"disturb: image {tuple(image.shape)} and other {tuple(other.shape)} differ in shape")
    mask = box_mask(boxes, image.shape[-2], image.shape[-1])
    return torch.where(mask, image, other)


def partner_indices(n: int, seed: int = 0) -> Tensor:
    """For each of ``n`` images, the index of the image that replaces its background: (i + o_i) mod n with o_i
    uniform in [1, n-1] from a generator seeded with ``seed`` — deterministic, and never the image itself."""
    if n < 2:
        raise DataError(f"disturbed O-KNN needs at least 2 images in a split, got {n}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, n, (n,), generator=generator)
    return (torch.arange(n) + offsets) % n


def stage_stride(image_size: int, map_size: int) -> float:
    """The stride of a stage map: the power of two nearest to image/map.

    Decision: a ResNet stage's true stride is a power of two (4, 8, 16, 32; a quarter of those with the
    small-input stem) even when the input is not a multiple of it: at 100 px layer4 is 4x4 (ratio 25, stride 32)
    and layer2 13x13 (ratio 7.7, stride 8). Models whose maps are not a power-of-two subsampling (e.g. ViTs with
    14 px patches) are outside this rule.
    """
    if map_size < 1 or image_size < 1:
        raise EvalInputError(f"stage_stride: image size {image_size} and map size {map_size} must be positive")
    return float(2 ** round(math.log2(image_size / map_size)))


def roi_features(feature_map: Tensor, boxes: Sequence[Tensor], image_size: tuple[int, int],
                 output_size: int = 7, pool: str = "avg") -> Tensor:
    """Region features of ``boxes`` (per image ``[K_i, 4]`` in input pixels) on ``feature_map`` ``[B, C, h, w]``.

    RoIAlign ``output_size`` x ``output_size`` (torchvision, ``aligned=True``, adaptive sampling ratio as
    Detectron2's ROIAlign, spatial scale 1/stride with the stride of :func:`stage_stride`), then ``avg``: the
    mean over the bins -> ``[sum K_i, C]``, ``flatten`` -> ``[sum K_i, C * output_size**2]`` (the pixel
    baseline), or ``none`` -> the RoIs ``[sum K_i, C, output_size, output_size]``. Rows follow the images, then
    the boxes within an image. float32.

    Note: RoIAlign samples bilinearly, so a bin next to a box edge reads up to half a map cell beyond it unless
    its sampling points fall on cell centres (box edges on the cell grid and a box width of a multiple of
    ``output_size`` cells); coupling and positional measures on deep stages include that reach.
    """
    if pool not in ("avg", "flatten", "none"):
        raise ConfigError(f"pool: expected 'avg', 'flatten' or 'none', got {pool!r}")
    if feature_map.dim() != 4 or len(boxes) != feature_map.shape[0]:
        raise EvalInputError(f"roi_features: expected a [B, C, h, w] map and B box tensors, got map "
                             f"{tuple(feature_map.shape)} and {len(boxes)} box tensors")
    stride_y = stage_stride(image_size[0], feature_map.shape[-2])
    stride_x = stage_stride(image_size[1], feature_map.shape[-1])
    if stride_x != stride_y:
        raise EvalInputError(f"roi_features: the map {tuple(feature_map.shape[-2:])} has strides {stride_y} x "
                             f"{stride_x} on a {image_size} image; expected one stride")
    fmap = feature_map.float()
    rois = roi_align(fmap, [b.to(fmap.device, torch.float32).reshape(-1, 4) for b in boxes], output_size,
                     spatial_scale=1.0 / stride_x, sampling_ratio=-1, aligned=True)
    return rois.mean(dim=(2, 3)) if pool == "avg" else rois.flatten(1) if pool == "flatten" else rois


def c4_roi_features(layer3: Tensor, boxes: Sequence[Tensor], image_size: tuple[int, int], layer4: nn.Module,
                    output_size: int = 14) -> Tensor:
    """SoCo's C4 region feature (``roi="c4"``): RoIAlign ``output_size`` x ``output_size`` (14, SoCo's) of
    ``boxes`` on the ``layer3`` map ``[B, C3, h, w]`` (:func:`roi_features`), ``layer4`` (the backbone's C5 stage)
    on the RoIs, average pooling -> ``[sum K_i, C5]`` float32.

    For the whole-image box of a 224 px image (layer3 14x14) the RoIAlign samples exactly the map's cell centres,
    so the feature equals the backbone's pooled feature of the image (a test checks it)."""
    rois = roi_features(layer3, boxes, image_size, output_size, pool="none")
    return layer4(rois).float().mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------------ data
def open_coco(path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None) -> CocoSource:
    """A :class:`CocoSource` (boxes only, no masks) from a COCO JSON or a folder holding one.

    A folder is read through its ``annotations.json`` (the built-in scenes' layout), else its only ``*.json``.
    When the images folder is not given and :class:`CocoSource` cannot find it, every ``_``-separated part of
    the JSON's name is tried as the split folder (``instances_val2017_boxes.json`` -> ``../images/val2017``,
    coco128's layout).
    """
    p = Path(path)
    if p.is_dir():
        candidates = [p / "annotations.json"] if (p / "annotations.json").is_file() else sorted(p.glob("*.json"))
        if len(candidates) != 1:
            raise DataError(f"'{p}': expected a COCO JSON or a folder with annotations.json or exactly one .json "
                            f"file, found {[c.name for c in candidates]}")
        p = candidates[0]
    try:
        return CocoSource(p, images_dir=images_dir, load_masks=False)
    except DataError as err:
        if images_dir is not None or "cannot find the images" not in str(err):
            raise
        for part in p.stem.split("_"):
            for folder in (p.parent.parent / "images" / part, p.parent.parent / part, p.parent / part):
                if folder.is_dir():
                    try:
                        return CocoSource(p, images_dir=folder, load_masks=False)
                    except DataError:
                        continue
        raise


def category_map(memory_names: Sequence[str], query_names: Sequence[str]) -> dict[int, int]:
    """Query category index -> memory category index, matched by name; a name the memory lacks gets a new index
    after the memory's (its objects can never be classified right, and count as errors)."""
    index = {name: i for i, name in enumerate(memory_names)}
    out, extra = {}, len(memory_names)
    for i, name in enumerate(query_names):
        if name not in index:
            index[name] = extra
            extra += 1
        out[i] = index[name]
    return out


class SceneObjects(Dataset):
    """A COCO-style source at the evaluated resolution, with its selected objects.

    Item: ``image`` (normalised ``[3, size, size]``; disturbed when ``partners`` is given), ``boxes``
    ``[K, 4]`` (the selected objects, evaluated-resolution pixels), ``labels`` ``[K]`` (category index, mapped
    by ``label_map``), ``index``, ``skipped`` (True when the source could not decode this image: it then
    contributes nothing; the source logs it).
    """

    def __init__(self, source: CocoSource, size: int, resize: str = "pad", min_side: float = 16.0,
                 partners: Tensor | None = None, label_map: dict[int, int] | None = None) -> None:
        self.source, self.size, self.resize, self.min_side = source, size, resize, min_side
        self.partners, self.label_map = partners, label_map
        if partners is not None and len(partners) != len(source):
            raise EvalInputError(f"partners: {len(partners)} entries for {len(source)} images")

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Tensor | None, dict | None]:
        sample = self.source[index]
        if sample["index"] != index:  # the source served the next good image instead of a bad one
            return None, None
        image, (sx, sy) = letterbox(sample["image"], self.size, self.resize)
        return image, {"boxes": scale_boxes(sample["boxes"], sx, sy), "labels": sample["box_labels"]}

    def __getitem__(self, index: int) -> dict:
        image, ann = self._load(index)
        if image is None:
            return {"image": torch.zeros(3, self.size, self.size), "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.int64), "index": index, "skipped": True}
        boxes, labels = select_objects(ann["boxes"], ann["labels"], self.min_side)
        if self.label_map is not None:
            labels = torch.tensor([self.label_map[int(v)] for v in labels], dtype=torch.int64)
        if self.partners is not None:
            other, _ = self._load(int(self.partners[index]))
            if other is None:  # an undecodable partner: use the mean colour (0) as the replacing image
                other = torch.zeros_like(image)
            image = disturb(image, other, boxes)
        return {"image": image, "boxes": boxes, "labels": labels, "index": index, "skipped": False}


def collate_objects(items: list[dict]) -> dict:
    """Stack images; keep boxes as a list (one ``[K_i, 4]`` per image); concatenate labels."""
    return {"image": torch.stack([it["image"] for it in items]), "boxes": [it["boxes"] for it in items],
            "labels": torch.cat([it["labels"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "skipped": sum(bool(it["skipped"]) for it in items)}


def scene_loader(dataset: SceneObjects, batch_size: int = 32, workers: int = 0) -> DataLoader:
    """The dataset in order, batched by :func:`collate_objects`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate_objects)


# ------------------------------------------------------------------------------------------------ models
class ObjectPixels(nn.Module):
    """The raw-pixel O-KNN baseline (issue 12): RoIAlign 7x7 of the (normalised) image itself, flattened
    (``object_pool = "flatten"``), centred by the memory objects' mean and L2-normalised (``center_objects``).

    Decision: "raw RGB" is read as the image the networks see (ImageNet-normalised): a per-channel affine map
    of the RGB values, as the image-level :class:`~semssl.eval.evaluate.PixelModel` does.
    """

    branches = ("online",)
    default_branch = "online"
    feature_kinds = ("layer4",)
    object_pool = "flatten"
    center_objects = True

    def resolve_branch(self, branch: str | None = None) -> str:
        if branch not in (None, "online"):
            raise ConfigError(f"branch '{branch}': the pixel baseline has only the 'online' branch")
        return "online"

    @torch.no_grad()
    def features(self, images: Tensor, branch: str | None = None, kind: str = "layer4") -> Tensor:
        self.resolve_branch(branch)
        return images


@torch.no_grad()
def extract_object_features(model: nn.Module, loader: DataLoader, branch: str | None = None,
                            kind: str = "layer4", output_size: int = 7, device: Any = "cpu",
                            roi: str = "c5") -> tuple[Tensor, Tensor, int]:
    """(object features ``[N, D]`` float32 on CPU, labels ``[N]``, skipped images) of every selected object of
    ``loader`` (:func:`scene_loader`), in dataset order. ``model`` is run in eval mode and its mode restored.

    ``roi="c5"``: :func:`roi_features` (``output_size``, on the ``kind`` map); ``roi="c4"``:
    :func:`c4_roi_features` (14x14 on layer3, then the backbone's layer4) — models without a backbone (the pixel
    baseline) keep their own features."""
    if roi not in ROI_MODES:
        raise ConfigError(f"roi: expected one of {ROI_MODES}, got {roi!r}")
    pool = getattr(model, "object_pool", "avg")
    c4 = roi == "c4" and hasattr(model, "backbone_for")
    layer4 = model.backbone_for(model.resolve_branch(branch)).stage("layer4") if c4 else None
    was_training = model.training
    model.eval()
    feats, labels, skipped = [], [], 0
    try:
        for batch in loader:
            skipped += batch["skipped"]
            if sum(len(b) for b in batch["boxes"]) == 0:
                continue
            images = batch["image"].to(device)
            if c4:
                fmap = model.features(images, branch=branch, kind="layer3")
                feats.append(c4_roi_features(fmap, batch["boxes"], tuple(images.shape[-2:]), layer4).cpu())
            else:
                fmap = model.features(images, branch=branch, kind=kind)
                feats.append(roi_features(fmap, batch["boxes"], tuple(images.shape[-2:]), output_size, pool).cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    if not feats:
        raise EvalInputError(f"no object of the split passes the size filter (both box sides >= "
                             f"{loader.dataset.min_side} px at {loader.dataset.size} px)")
    return torch.cat(feats), torch.cat(labels), skipped


def oknn(memory: Tensor, memory_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
         temperature: float = 0.07, prefix: str = "oknn") -> dict[str, float]:
    """Weighted kNN (:func:`~semssl.eval.knn.knn_evaluate`) of object features: ``{prefix}_top1``,
    ``{prefix}_top5`` in percent."""
    res = knn_evaluate(memory, memory_labels, queries, query_labels, ks=(k,), temperature=temperature)
    return {f"{prefix}_top1": res["knn_top1"], f"{prefix}_top5": res["knn_top5"]}


@dataclass
class ObjectsConfig:
    """Settings of :func:`evaluate_objects` (defaults = docs/design.md §O-KNN, at the paper's 224 px)."""

    size: int = 224
    resize: str = "pad"
    min_side: float = 16.0
    k: int = 20
    temperature: float = 0.07
    output_size: int = 7
    kind: str = "layer4"
    #: ``c5`` (docs/design.md §O-KNN: RoIAlign ``output_size`` on the ``kind`` map) or ``c4`` (SoCo's
    #: pre-training path: RoIAlign 14x14 on layer3, then layer4; ``output_size`` and ``kind`` are then unused)
    roi: str = "c5"
    disturbed: bool = False
    #: which splits get disturbed: ``both`` (default: "the feature extraction pipeline is kept the same", so the
    #: memory too) or ``test`` (queries only, against a clean memory)
    disturb: str = "both"
    #: also O-KNN on the queries of each supercategory (module docstring)
    by_supercategory: bool = False
    seed: int = 0
    batch_size: int = 32
    workers: int = 0


def supercategories(source: CocoSource) -> list[str]:
    """The ``supercategory`` of each category of ``source``, in its label order (categories sorted by id); ``""``
    where a category has none."""
    try:
        data = json.loads(Path(source.annotation_json).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the categories of '{source.annotation_json}': {err}") from err
    cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
    return [str(c.get("supercategory") or "") for c in cats]


def by_group(memory: Tensor, memory_labels: Tensor, queries: Tensor, query_labels: Tensor, groups: list[str],
             cfg: "ObjectsConfig", prefix: str) -> dict[str, float]:
    """O-KNN of the queries of each group (``groups[label]``, e.g. supercategory) against the whole memory:
    ``{prefix}_<group>_top1`` / ``_top5`` and ``n_queries_<group>`` (groups without a query are left out)."""
    out: dict[str, float] = {}
    for name in sorted(set(groups) - {""}):
        keep = torch.tensor([groups[label] == name for label in query_labels.tolist()], dtype=torch.bool)
        if keep.any():
            out.update(oknn(memory, memory_labels, queries[keep], query_labels[keep], cfg.k, cfg.temperature,
                            f"{prefix}_{name}"))
            out[f"n_queries_{name}"] = int(keep.sum())
    return out


def _datasets(train: CocoSource, test: CocoSource, cfg: ObjectsConfig,
              disturbed: bool) -> tuple[SceneObjects, SceneObjects]:
    label_map = category_map(train.categories, test.categories)
    memory_partners = partner_indices(len(train), cfg.seed) if disturbed and cfg.disturb == "both" else None
    query_partners = partner_indices(len(test), cfg.seed + 1) if disturbed else None
    return (SceneObjects(train, cfg.size, cfg.resize, cfg.min_side, memory_partners),
            SceneObjects(test, cfg.size, cfg.resize, cfg.min_side, query_partners, label_map))


def _run(model: nn.Module, train: CocoSource, test: CocoSource, cfg: ObjectsConfig, disturbed: bool,
         branch: str | None, device: Any) -> tuple[dict[str, float], dict[str, int]]:
    memory_set, query_set = _datasets(train, test, cfg, disturbed)
    memory, memory_labels, skipped_m = extract_object_features(
        model, scene_loader(memory_set, cfg.batch_size, cfg.workers), branch, cfg.kind, cfg.output_size, device,
        cfg.roi)
    queries, query_labels, skipped_q = extract_object_features(
        model, scene_loader(query_set, cfg.batch_size, cfg.workers), branch, cfg.kind, cfg.output_size, device,
        cfg.roi)
    if getattr(model, "center_objects", False):
        mean = memory.double().mean(0).float()
        memory, queries = memory - mean, queries - mean
    prefix = "oknn_disturbed" if disturbed else "oknn"
    counts = {"n_memory": memory.shape[0], "n_queries": queries.shape[0], "skipped_images": skipped_m + skipped_q,
              "n_classes_memory": int(memory_labels.unique().numel()),
              "n_classes_queries": int(query_labels.unique().numel())}
    out = oknn(memory, memory_labels, queries, query_labels, cfg.k, cfg.temperature, prefix)
    if cfg.by_supercategory:
        out.update(by_group(memory, memory_labels, queries, query_labels, supercategories(train), cfg, prefix))
    return out, counts


def evaluate_objects(model: nn.Module, train: CocoSource, test: CocoSource, cfg: ObjectsConfig | None = None,
                     branch: str | None = None, device: Any = "cpu") -> dict[str, Any]:
    """O-KNN of ``model`` with the train split's objects as memory and the test split's as queries; with
    ``cfg.disturbed`` also disturbed O-KNN. Returns ``oknn_top1``, ``oknn_top5`` (and ``oknn_disturbed_top1``,
    ``oknn_disturbed_top5``), the object counts and the protocol's settings."""
    cfg = cfg or ObjectsConfig()
    if cfg.disturb not in ("both", "test"):
        raise ConfigError(f"disturb: expected 'both' or 'test', got {cfg.disturb!r}")
    if cfg.roi not in ROI_MODES:
        raise ConfigError(f"roi: expected one of {ROI_MODES}, got {cfg.roi!r}")
    out, counts = _run(model, train, test, cfg, False, branch, device)
    if cfg.disturbed:
        disturbed, _ = _run(model, train, test, cfg, True, branch, device)
        out.update(disturbed)
    if counts["skipped_images"]:
        log.warning("O-KNN: %d undecodable image(s) skipped", counts["skipped_images"])
    return {**out, **counts, "k": cfg.k, "temperature": cfg.temperature, "size": cfg.size, "resize": cfg.resize,
            "min_side": cfg.min_side,
            "roi": f"RoIAlign {cfg.output_size}x{cfg.output_size} on {cfg.kind}" if cfg.roi == "c5" else
            "RoIAlign 14x14 on layer3, then layer4 (C4)",
            **({"disturb": cfg.disturb, "seed": cfg.seed} if cfg.disturbed else {})}


def object_baselines(random_model: nn.Module, train: CocoSource, cfg: ObjectsConfig, kind: str = "layer4",
                     device: Any = "cpu") -> dict[str, nn.Module]:
    """The three O-KNN random-init baselines: ``random_init`` (``random_model`` itself), ``random_init_bn`` (a copy
    with BatchNorm statistics re-estimated on the train split's clean images at the evaluated resolution, through
    ``features(kind)``) and ``pixels`` (:class:`ObjectPixels`)."""
    from semssl.eval.evaluate import reestimate_bn

    loader = scene_loader(SceneObjects(train, cfg.size, cfg.resize, cfg.min_side), cfg.batch_size, cfg.workers)
    return {"random_init": random_model.to(device).eval(),
            "random_init_bn": reestimate_bn(random_model, loader, kind=kind, device=device),
            "pixels": ObjectPixels().eval()}


# ------------------------------------------------------------------------------------------------ command line
# (its options: semssl.eval.options.add_objects_arguments)
def run(args: Any) -> int:
    from semssl.eval.report import models_for_eval, payload_of, print_table

    train = open_coco(args.train, args.train_images)
    test = open_coco(args.test, args.test_images)
    cfg = ObjectsConfig(size=args.size, resize=args.resize, min_side=args.min_side, k=args.k,
                        temperature=args.temperature, roi=args.roi, disturbed=args.disturbed, disturb=args.disturb,
                        by_supercategory=args.by_supercategory, seed=args.seed, batch_size=args.batch_size,
                        workers=args.workers)
    models, _ = models_for_eval(args, lambda m: object_baselines(m, train, cfg))
    results, columns = {}, {}
    for name, (model, info) in models.items():
        res = evaluate_objects(model, train, test, cfg, branch=info.get("branch"))
        results[name] = {"objects": res, "model": info}
        columns[name] = {k: v for k, v in res.items() if k.startswith("oknn")}
        columns[name].update(n_memory=res["n_memory"], n_queries=res["n_queries"])
    source = models["model"][1]["source"] if set(models) == {"model"} else \
        f"random-init baselines, {args.arch or 'resnet50'}, seed {args.seed}"
    print_table(f"O-KNN, k={args.k}, T={args.temperature}, {args.size} px ({source})", columns, args.out,
                payload_of(results, train=str(args.train), test=str(args.test), size=args.size), digits=3)
    return 0
