"""Multi-view / multi-crop sampling that records each crop's geometry, and the Batch collate.

A :class:`MultiViewTransform` turns one source sample (``{"image": PIL RGB, "label", "index", optional
"boxes", "box_labels", "masks"}``) into several named views (DESIGN.md "Key abstractions", the Batch contract):

* every crop is a RandomResizedCrop (torchvision's sampling algorithm, ``v2.RandomResizedCrop.make_params``,
  with the spec's scale/ratio) or the whole image (SoCo view 1, METHODS.md §5.1: resized to a square, aspect
  not kept), followed by a horizontal flip with probability ``flip_p``, applied with
  ``torchvision.transforms.v2.functional`` to the image, to the boxes (``tv_tensors.BoundingBoxes``) and to the
  instance masks; then the crop's photometric recipe (:mod:`semssl.data.augment`) and normalisation;
* every crop records its **geometry**, a float tensor ``[5] = (x1, y1, x2, y2, flip)``: the crop box in
  source-image pixels in continuous coordinates (a crop covering pixel columns ``[x, x + w)`` has
  ``x1 = x, x2 = x + w``) and the flip flag (the flip is applied after the resize, horizontally).  With it
  :func:`view_to_source`, :func:`source_to_view` and :func:`map_boxes` relate any two views of an image (e.g.
  SCFS's RoI crop: where a local crop lies inside global crop 0, METHODS.md §1 / DESIGN.md "SCFS").

Coordinates are continuous pixel coordinates throughout (pixel ``i`` covers ``[i, i + 1)``, its centre is
``i + 0.5``): torchvision's box kernels and its ``align_corners=False`` resampling both follow this
convention, so boxes mapped with the recorded geometry land on the same pixels as the resampled image.

:func:`collate_views` stacks per-sample outputs into the Batch dict, **crop-major** (index = crop * B + image),
the order DINO/SCFS use (``torch.cat`` of a list of crops; METHODS.md §1.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from semssl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricTransform,
    RecipeError,
    get_recipe,
    interpolation_mode,
    tensor_to_array,
)

__all__ = [
    "ViewError",
    "SampleError",
    "ViewSpec",
    "CropParams",
    "MultiViewTransform",
    "render_crop",
    "collate_views",
    "view_to_source",
    "source_to_view",
    "map_boxes",
    "clip_boxes",
    "box_area",
    "MIN_VALID_BOX_AREA",
]

MIN_VALID_BOX_AREA = 1.0
"""A box is valid in a crop when its clipped area there is at least this many squared view pixels."""

_VIEW_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class ViewError(ValueError):
    """A view specification or a geometry/box argument is invalid."""


class SampleError(ValueError):
    """A source sample (or a list of transformed samples given to the collate) is malformed."""


@dataclass
class ViewSpec:
    """One named view: ``n_crops`` square crops of side ``size``, each with its photometric recipe.

    ``recipe`` is one recipe name for all crops or a list with one name per crop (DINO: global crop 0 ->
    ``dino_global1``, crop 1 -> ``dino_global2``, METHODS.md §1.7).  ``whole_image=True`` resizes the whole
    image to ``size x size`` without keeping its aspect (SoCo view 1, METHODS.md §5.1); ``scale``/``ratio``
    are then unused.  ``interpolation`` is ``"bilinear"`` (MoCo/BYOL/SoCo) or ``"bicubic"`` (DINO/SCFS).
    """

    name: str
    size: int
    n_crops: int = 1
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    recipe: str | list[str] = "mocov2"
    whole_image: bool = False
    flip_p: float = 0.5
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        where = f"view spec {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ViewError(f"view spec name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.size) or self.size < 8:
            raise ViewError(f"{where}: size must be an int >= 8, got {self.size!r}")
        if not _is_int(self.n_crops) or self.n_crops < 1:
            raise ViewError(f"{where}: n_crops must be an int >= 1, got {self.n_crops!r}")
        self.scale = _check_range(self.scale, "scale", where, upper=1.0)
        self.ratio = _check_range(self.ratio, "ratio", where, upper=None)
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise ViewError(f"{where}: flip_p must be in [0, 1], got {self.flip_p!r}")
        if self.interpolation not in _VIEW_INTERPOLATIONS:
            raise ViewError(
                f"{where}: unknown interpolation {self.interpolation!r}; valid: {', '.join(_VIEW_INTERPOLATIONS)}"
            )
        recipes = self.recipes()
        if len(recipes) != self.n_crops:
            raise ViewError(
                f"{where}: recipe list has {len(recipes)} entries but n_crops is {self.n_crops}; "
                "give one recipe name, or one per crop"
            )
        for name in recipes:
            try:
                get_recipe(name)
            except RecipeError as err:
                raise ViewError(f"{where}: {err}") from None

    def recipes(self) -> list[str]:
        """The recipe name of every crop (length ``n_crops``)."""
        if isinstance(self.recipe, str):
            return [self.recipe] * self.n_crops
        return list(self.recipe)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_range(value: Any, what: str, where: str, upper: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ViewError(f"{where}: {what} must be a pair (min, max), got {value!r}") from None
    if not (0.0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ViewError(f"{where}: {what} must satisfy 0 < min <= max{bound}, got {value!r}")
    return (lo, hi)


@dataclass(frozen=True)
class CropParams:
    """One crop: the source rectangle rows ``[top, top + height)``, columns ``[left, left + width)``, and
    whether the resized crop is flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    def geometry_list(self) -> list[float]:
        """``[x1, y1, x2, y2, flip]`` in source pixels (continuous coordinates), as Python floats."""
        return [
            float(self.left), float(self.top), float(self.left + self.width), float(self.top + self.height),
            float(self.flip),
        ]

    def geometry(self) -> torch.Tensor:
        """The recorded geometry, a float32 tensor ``[5] = (x1, y1, x2, y2, flip)``."""
        return torch.tensor(self.geometry_list(), dtype=torch.float32)


@dataclass
class _Source:
    """A validated input sample, in the tensor forms the kernels take."""

    image: torch.Tensor  # uint8 [3, H, W]
    label: int
    index: int
    boxes: tv_tensors.BoundingBoxes | None = None
    box_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None  # uint8 [N, H, W]


class MultiViewTransform:
    """Sample named multi-crop views of one sample and record their geometry (see module docstring).

    Args:
        specs: the views; names must be unique.
        blur_reference_size: blur sigma scaling reference (see :mod:`semssl.data.augment`), None = absolute.
        normalize: True -> float32 views normalised with ImageNet mean/std; False -> uint8 views (raw pixels,
            for visualisation or on-device normalisation).

    Calling it returns ``{"views": {name: [n_crops tensors C,H,W]}, "geometry": {name: Tensor[n_crops,5]},
    "label", "index", "source_size": (H, W)}`` plus, when the sample has boxes, ``"boxes": {name:
    Tensor[n_crops,P,4]}`` (in each crop's pixels, clipped to it), ``"box_ids": Tensor[P]`` (the source box
    index), ``"box_valid": {name: BoolTensor[n_crops,P]}`` (clipped area >= 1 px^2 in the view),
    ``"box_labels": Tensor[P]`` when given, and ``"masks": {name: Tensor[n_crops,P,H,W]}`` when given.
    """

    def __init__(self, specs: Sequence[ViewSpec], blur_reference_size: int | None = 224, normalize: bool = True):
        specs = list(specs)
        if not specs:
            raise ViewError("MultiViewTransform needs at least one ViewSpec")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ViewError(f"view names must be unique; repeated: {', '.join(duplicates)}")
        for spec in specs:
            if not isinstance(spec, ViewSpec):
                raise ViewError(f"specs must be ViewSpec instances, got {type(spec).__name__}")
        self.specs = specs
        self.normalize = bool(normalize)
        self.blur_reference_size = blur_reference_size
        self._photometric = {
            s.name: [PhotometricTransform(r, s.size, blur_reference_size) for r in s.recipes()] for s in specs
        }
        self._rrc = {s.name: v2.RandomResizedCrop(s.size, scale=s.scale, ratio=s.ratio) for s in specs}
        self._interp = {s.name: interpolation_mode(s.interpolation) for s in specs}
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (np.float32(1.0) / np.asarray(IMAGENET_STD, dtype=np.float32)).reshape(3, 1, 1)

    @property
    def recipe_names(self) -> dict[str, list[str]]:
        """View name -> the recipe name of each crop."""
        return {s.name: s.recipes() for s in self.specs}

    def __repr__(self) -> str:
        views = ", ".join(f"{s.name}: {s.n_crops}x{s.size}" for s in self.specs)
        return f"MultiViewTransform({views}; normalize={self.normalize})"

    # ---------------------------------------------------------------- sampling
    def sample_params(self, height: int, width: int) -> dict[str, list[CropParams]]:
        """Draw the crop rectangle and flip of every crop for a ``height x width`` source image.

        Uses torch's global RNG (seeded per DataLoader worker), exactly as torchvision's transforms do.
        """
        probe = torch.empty((0, height, width))  # query_size() only reads the shape
        params: dict[str, list[CropParams]] = {}
        for spec in self.specs:
            crops = []
            for _ in range(spec.n_crops):
                if spec.whole_image:
                    top, left, h, w = 0, 0, height, width
                else:
                    p = self._rrc[spec.name].make_params([probe])
                    top, left, h, w = p["top"], p["left"], p["height"], p["width"]
                flip = spec.flip_p > 0 and bool(torch.rand(1).item() < spec.flip_p)
                crops.append(CropParams(top, left, h, w, flip))
            params[spec.name] = crops
        return params

    # ---------------------------------------------------------------- apply
    def __call__(self, sample: dict, params: dict[str, list[CropParams]] | None = None) -> dict:
        """Transform one source sample; ``params`` (from :meth:`sample_params`) fixes the geometry if given."""
        src = _validate_sample(sample)
        height, width = src.image.shape[-2:]
        if params is None:
            params = self.sample_params(height, width)
        else:
            self._check_params(params, src.index)
        out: dict[str, Any] = {
            "views": {},
            "geometry": {},
            "label": src.label,
            "index": src.index,
            "source_size": (int(height), int(width)),
        }
        if src.boxes is not None:
            out.update(boxes={}, box_valid={}, box_ids=torch.arange(src.boxes.shape[0], dtype=torch.int64))
            if src.box_labels is not None:
                out["box_labels"] = src.box_labels
            if src.masks is not None:
                out["masks"] = {}
        for spec in self.specs:
            self._render_view(spec, src, params[spec.name], out)
        return out

    def _check_params(self, params: dict[str, list[CropParams]], index: int) -> None:
        for spec in self.specs:
            crops = params.get(spec.name)
            if crops is None or len(crops) != spec.n_crops:
                got = "none" if crops is None else len(crops)
                raise ViewError(
                    f"sample index {index}: params for view {spec.name!r} must list {spec.n_crops} CropParams, "
                    f"got {got}"
                )

    def _render_view(self, spec: ViewSpec, src: _Source, crops: list[CropParams], out: dict) -> None:
        images, boxes, valid, masks = [], [], [], []
        for crop, photometric in zip(crops, self._photometric[spec.name]):
            image, crop_boxes, crop_masks = render_crop(
                src.image, crop, spec.size, self._interp[spec.name], src.boxes, src.masks
            )
            images.append(self._finish_image(image, photometric))
            if crop_boxes is not None:
                boxes.append(crop_boxes)
                valid.append(box_area(crop_boxes) >= MIN_VALID_BOX_AREA)
            if crop_masks is not None:
                masks.append(crop_masks)
        out["views"][spec.name] = images
        out["geometry"][spec.name] = torch.tensor([c.geometry_list() for c in crops], dtype=torch.float32)
        if src.boxes is not None:
            out["boxes"][spec.name] = torch.stack(boxes)
            out["box_valid"][spec.name] = torch.stack(valid)
        if src.masks is not None:
            out["masks"][spec.name] = torch.stack(masks)

    def _finish_image(self, image: torch.Tensor, photometric: PhotometricTransform) -> torch.Tensor:
        """Photometric recipe, then ImageNet normalisation (float32) or re-quantisation (uint8)."""
        if photometric.recipe.is_identity and not self.normalize:
            return image.clone(memory_format=torch.contiguous_format)  # the crop may view the source tensor
        x = photometric.apply_array(tensor_to_array(image), photometric.make_params([]))
        if self.normalize:
            x -= self._mean  # x is a fresh [3, H, W] array owned here: normalise in place
            x *= self._inv_std
            return torch.from_numpy(x)
        return torch.from_numpy(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))


def render_crop(
    image: torch.Tensor,
    crop: CropParams,
    size: int,
    interpolation: v2.InterpolationMode,
    boxes: tv_tensors.BoundingBoxes | None = None,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Crop + resize to ``size x size`` + optional horizontal flip of an image and its boxes and masks.

    Boxes go through torchvision's BoundingBoxes kernels (shifted, clamped to the crop, scaled, flipped);
    they come back as a plain float32 ``[P, 4]`` tensor in view pixels.  Decision: masks are resampled with
    ``nearest-exact`` (pixel-centre sampling, consistent with the continuous-coordinate geometry) rather than
    torchvision's mask default ``nearest`` (which samples at pixel corners and shifts masks by up to half an
    output pixel towards the top-left).
    """
    args = (crop.top, crop.left, crop.height, crop.width, [size, size])
    out_image = F.resized_crop(image, *args, interpolation=interpolation, antialias=True)
    out_boxes = out_masks = None
    if boxes is not None:
        out_boxes = F.resized_crop(boxes, *args)
    if masks is not None:
        out_masks = F.resized_crop(masks, *args, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    if crop.flip:
        out_image = F.horizontal_flip(out_image)
        out_boxes = F.horizontal_flip(out_boxes) if out_boxes is not None else None
        out_masks = F.horizontal_flip(out_masks) if out_masks is not None else None
    if out_boxes is not None:
        out_boxes = out_boxes.as_subclass(torch.Tensor).to(torch.float32)
    return out_image, out_boxes, out_masks


def _validate_sample(sample: dict) -> _Source:
    """Check a source sample and convert it to tensors; raise :class:`SampleError` naming the key at fault."""
    if not isinstance(sample, dict):
        raise SampleError(f"a source sample must be a dict, got {type(sample).__name__}")
    if "index" not in sample:
        raise SampleError(f"source sample has no 'index' key (keys: {sorted(sample)})")
    index = _as_int(sample["index"], "index", "?")
    where = f"sample index {index}"
    label = _as_int(sample.get("label", -1), "label", index)
    if "image" not in sample:
        raise SampleError(f"{where}: no 'image' key (keys: {sorted(sample)})")
    image = _image_tensor(sample["image"], where)
    height, width = image.shape[-2:]
    src = _Source(image=image, label=label, index=index)
    if sample.get("boxes") is not None:
        src.boxes = _boxes(sample["boxes"], (height, width), where)
    n = 0 if src.boxes is None else src.boxes.shape[0]
    if sample.get("box_labels") is not None:
        if src.boxes is None:
            raise SampleError(f"{where}: 'box_labels' given without 'boxes'")
        src.box_labels = torch.as_tensor(sample["box_labels"]).to(torch.int64).reshape(-1)
        if src.box_labels.shape[0] != n:
            raise SampleError(f"{where}: 'box_labels' has {src.box_labels.shape[0]} entries for {n} boxes")
    if sample.get("masks") is not None:
        if src.boxes is None:
            raise SampleError(f"{where}: 'masks' given without 'boxes' (masks are per object, one per box)")
        src.masks = _masks(sample["masks"], n, (height, width), where)
    return src


def _as_int(value: Any, key: str, index: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_int(value):
        raise SampleError(f"sample index {index}: {key!r} must be an int, got {value!r}")
    return int(value)


def _image_tensor(image: Any, where: str) -> torch.Tensor:
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return F.pil_to_tensor(image)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise SampleError(
                f"{where}: 'image' tensor must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}"
            )
        return image.as_subclass(torch.Tensor)
    raise SampleError(f"{where}: 'image' must be a PIL image or a uint8 tensor, got {type(image).__name__}")


def _boxes(boxes: Any, canvas: tuple[int, int], where: str) -> tv_tensors.BoundingBoxes:
    t = torch.as_tensor(boxes, dtype=torch.float32)
    if t.ndim == 1 and t.numel() == 0:
        t = t.reshape(0, 4)
    if t.ndim != 2 or t.shape[1] != 4:
        raise SampleError(f"{where}: 'boxes' must be [N, 4] (x1, y1, x2, y2), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise SampleError(f"{where}: 'boxes' contains non-finite values")
    bad = (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise SampleError(f"{where}: box {i} {t[i].tolist()} has x2 < x1 or y2 < y1 (expected xyxy pixels)")
    return tv_tensors.BoundingBoxes(t, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=canvas)


def _masks(masks: Any, n: int, canvas: tuple[int, int], where: str) -> torch.Tensor:
    t = torch.as_tensor(masks)
    if t.ndim != 3 or t.shape[0] != n or tuple(t.shape[1:]) != tuple(canvas):
        raise SampleError(
            f"{where}: 'masks' must be [N, H, W] = [{n}, {canvas[0]}, {canvas[1]}], got {tuple(t.shape)}"
        )
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.dtype != torch.uint8:
        raise SampleError(f"{where}: 'masks' must be uint8 or bool, got {t.dtype}")
    return t


# -------------------------------------------------------------------- collate
def collate_views(samples: list[dict]) -> dict:
    """Stack transformed samples into the Batch contract (use as a DataLoader ``collate_fn``).

    ``views[name]``: ``[n_crops*B, C, H, W]`` crop-major (index = crop*B + image); ``geometry[name]``:
    ``[n_crops*B, 5]``; ``label``/``index``: int64 ``[B]``; ``source_size``: int64 ``[B, 2]`` (H, W).  With boxes,
    padded to the batch's largest P: ``boxes[name]`` ``[n_crops*B, P, 4]`` (0 for padding), ``box_ids``
    ``[B, P]`` (-1 for padding), ``box_valid[name]`` ``[n_crops*B, P]`` (False for padding), ``box_labels``
    ``[B, P]`` (-1 for padding) and ``masks[name]`` ``[n_crops*B, P, H, W]`` (0 for padding).

    Decision: a sample without boxes in a batch where others have them counts as having none (all padding);
    masks, which carry pixel data, must be present in every sample or none.
    """
    if not isinstance(samples, (list, tuple)) or not samples:
        raise SampleError("collate_views needs a non-empty list of transformed samples")
    first = samples[0]
    for i, s in enumerate(samples):
        if not isinstance(s, dict) or "views" not in s or "geometry" not in s:
            raise SampleError(f"collate_views: item {i} is not a MultiViewTransform output (no 'views'/'geometry')")
    layout = {name: len(crops) for name, crops in first["views"].items()}
    for i, s in enumerate(samples):
        got = {name: len(crops) for name, crops in s["views"].items()}
        if got != layout:
            raise SampleError(f"collate_views: item {i} has views {got}, item 0 has {layout}")
    batch: dict[str, Any] = {
        "views": {n: _crop_major([s["views"][n] for s in samples], n) for n in layout},
        "geometry": {n: _crop_major([list(s["geometry"][n]) for s in samples], n) for n in layout},
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
        "source_size": torch.tensor([list(s["source_size"]) for s in samples], dtype=torch.int64),
    }
    if any("boxes" in s for s in samples):
        _collate_boxes(samples, layout, batch)
    return batch


def _crop_major(per_sample: list[list[torch.Tensor]], name: str) -> torch.Tensor:
    """``per_sample[b][c]`` -> tensor indexed ``c * B + b``."""
    n_crops = len(per_sample[0])
    try:
        stacked = [torch.stack([crops[c] for crops in per_sample]) for c in range(n_crops)]
        return torch.cat(stacked)
    except RuntimeError as err:
        raise SampleError(f"collate_views: crops of view {name!r} differ in shape or dtype ({err})") from None


def _collate_boxes(samples: list[dict], layout: dict[str, int], batch: dict) -> None:
    n_images = len(samples)
    counts = [int(s["box_ids"].shape[0]) if "boxes" in s else 0 for s in samples]
    p_max = max(counts)
    with_masks = ["masks" in s for s in samples if "boxes" in s]
    has_masks = any(with_masks)
    if has_masks and not all(with_masks):
        raise SampleError("collate_views: some samples have 'masks' and others not; masks must be all or none")
    has_labels = any("box_labels" in s for s in samples)
    box_ids = torch.full((n_images, p_max), -1, dtype=torch.int64)
    box_labels = torch.full((n_images, p_max), -1, dtype=torch.int64)
    boxes, valid, masks = {}, {}, {}
    for name, n_crops in layout.items():
        boxes[name] = torch.zeros((n_crops, n_images, p_max, 4), dtype=torch.float32)
        valid[name] = torch.zeros((n_crops, n_images, p_max), dtype=torch.bool)
        if has_masks:
            size = _mask_size(samples, name)
            masks[name] = torch.zeros((n_crops, n_images, p_max, *size), dtype=torch.uint8)
    for b, (s, p) in enumerate(zip(samples, counts)):
        if "boxes" not in s:
            continue
        box_ids[b, :p] = s["box_ids"]
        if "box_labels" in s:
            box_labels[b, :p] = s["box_labels"]
        for name in layout:
            boxes[name][:, b, :p] = s["boxes"][name]
            valid[name][:, b, :p] = s["box_valid"][name]
            if has_masks:
                masks[name][:, b, :p] = s["masks"][name]
    batch["boxes"] = {n: t.flatten(0, 1) for n, t in boxes.items()}
    batch["box_valid"] = {n: t.flatten(0, 1) for n, t in valid.items()}
    batch["box_ids"] = box_ids
    if has_labels:
        batch["box_labels"] = box_labels
    if has_masks:
        batch["masks"] = {n: t.flatten(0, 1) for n, t in masks.items()}


def _mask_size(samples: list[dict], name: str) -> tuple[int, int]:
    for s in samples:
        if "masks" in s:
            return tuple(s["masks"][name].shape[-2:])  # type: ignore[return-value]
    raise SampleError(f"collate_views: no masks for view {name!r}")


# ----------------------------------------------------------------- geometry
def _view_hw(view_size: int | Sequence[int]) -> tuple[float, float]:
    if _is_int(view_size):
        return float(view_size), float(view_size)
    try:
        h, w = (float(v) for v in view_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ViewError(f"view_size must be an int or (H, W), got {view_size!r}") from None
    return h, w


def _check_boxes_geometry(boxes: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = torch.as_tensor(boxes, dtype=torch.float32) if not isinstance(boxes, torch.Tensor) else boxes
    geometry = torch.as_tensor(geometry, dtype=torch.float32) if not isinstance(geometry, torch.Tensor) else geometry
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ViewError(f"boxes must be [..., N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if geometry.ndim < 1 or geometry.shape[-1] != 5:
        raise ViewError(f"geometry must be [..., 5] (x1, y1, x2, y2, flip), got shape {tuple(geometry.shape)}")
    try:
        torch.broadcast_shapes(boxes.shape[:-1], geometry.shape[:-1] + (1,))
    except RuntimeError:
        raise ViewError(
            f"geometry {tuple(geometry.shape)} does not broadcast against boxes {tuple(boxes.shape)}: "
            "give geometry [5] or [..., 5] with the boxes' leading dims [..., N, 4]"
        ) from None
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    return boxes.to(dtype), geometry.to(device=boxes.device, dtype=dtype).unsqueeze(-2)


def view_to_source(
    boxes: torch.Tensor, geometry: torch.Tensor, view_size: int | Sequence[int]
) -> torch.Tensor:
    """Map boxes ``[..., N, 4]`` from a view's pixels to source-image pixels: undo the flip, then scale by the
    crop box and offset by its corner.  ``geometry`` is ``[5]`` or ``[..., 5]``; ``geometry[..., None, :]``
    broadcasts against the boxes (e.g. batch boxes ``[n_crops*B, P, 4]`` with batch geometry
    ``[n_crops*B, 5]``, or one box ``[1, 4]`` against many crops ``[K, 5]`` -> ``[K, 1, 4]``)."""
    boxes, g = _check_boxes_geometry(boxes, geometry)
    vh, vw = _view_hw(view_size)
    x1, y1, x2, y2 = boxes.unbind(-1)
    flip = g[..., 4] > 0.5
    x1, x2 = torch.where(flip, vw - x2, x1), torch.where(flip, vw - x1, x2)
    sx = (g[..., 2] - g[..., 0]) / vw
    sy = (g[..., 3] - g[..., 1]) / vh
    return torch.stack(
        [g[..., 0] + x1 * sx, g[..., 1] + y1 * sy, g[..., 0] + x2 * sx, g[..., 1] + y2 * sy], dim=-1
    )


def source_to_view(
    boxes: torch.Tensor, geometry: torch.Tensor, view_size: int | Sequence[int], clip: bool = False
) -> torch.Tensor:
    """Map boxes ``[..., N, 4]`` from source-image pixels into a view's pixels (inverse of
    :func:`view_to_source`); ``clip=True`` clips them to the view as the transform does."""
    boxes, g = _check_boxes_geometry(boxes, geometry)
    vh, vw = _view_hw(view_size)
    sx = vw / (g[..., 2] - g[..., 0])
    sy = vh / (g[..., 3] - g[..., 1])
    x1 = (boxes[..., 0] - g[..., 0]) * sx
    x2 = (boxes[..., 2] - g[..., 0]) * sx
    y1 = (boxes[..., 1] - g[..., 1]) * sy
    y2 = (boxes[..., 3] - g[..., 1]) * sy
    flip = g[..., 4] > 0.5
    x1, x2 = torch.where(flip, vw - x2, x1), torch.where(flip, vw - x1, x2)
    out = torch.stack([x1, y1, x2, y2], dim=-1)
    return clip_boxes(out, (vh, vw)) if clip else out


def map_boxes(
    boxes: torch.Tensor,
    src_geometry: torch.Tensor,
    dst_geometry: torch.Tensor,
    dst_size: int | Sequence[int],
    *,
    src_size: int | Sequence[int],
    clip: bool = False,
) -> torch.Tensor:
    """Map boxes from one view's pixels (side ``src_size``) into another view's pixels (side ``dst_size``)
    of the same image, through source coordinates (e.g. SCFS's RoI crop: a local crop's extent
    ``[0, 0, 96, 96]`` mapped into global crop 0).  ``src_size`` is keyword-only and required, so a call
    cannot silently assume both views have the same resolution."""
    return source_to_view(view_to_source(boxes, src_geometry, src_size), dst_geometry, dst_size, clip=clip)


def clip_boxes(boxes: torch.Tensor, view_size: int | Sequence[int]) -> torch.Tensor:
    """Clip xyxy boxes ``[..., 4]`` to ``[0, W] x [0, H]``."""
    vh, vw = _view_hw(view_size)
    return torch.stack(
        [
            boxes[..., 0].clamp(0.0, vw),
            boxes[..., 1].clamp(0.0, vh),
            boxes[..., 2].clamp(0.0, vw),
            boxes[..., 3].clamp(0.0, vh),
        ],
        dim=-1,
    )


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes ``[..., 4]`` (0 for degenerate ones)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
