"""Multi-view / multi-crop sampling that records each crop's geometry, and the Batch collate.

A :class:`MultiViewTransform` turns one source sample (``{"image": PIL RGB, "label", "index", optional
"boxes", "box_labels", "masks", "proposals", "seed"}``) into several named views (docs/design.md §Batch,
the Batch contract):

* every crop is a RandomResizedCrop (torchvision's sampling algorithm, ``v2.RandomResizedCrop.make_params``,
  with the spec's scale/ratio) or the whole image (SoCo view 1, docs/methods/soco.md §Views: resized to a
  square, aspect not kept), followed by a horizontal flip with probability ``flip_p``, applied with
  ``torchvision.transforms.v2.functional`` to the image, to the boxes and proposals
  (``tv_tensors.BoundingBoxes``) and to the instance masks; then the crop's photometric recipe
  (:mod:`semssl.data.augment`), normalisation, and the view's box-aware augmentations (cutout in boxes, box
  jitter: :mod:`semssl.data.regions`, off by default);
* a view may reuse the crops of another (``ViewSpec.geometry_from``: SoCo/D3SSL's x2-s, a small copy of x2);
* every crop records its **geometry**, a float tensor ``[5] = (x1, y1, x2, y2, flip)``: the crop box in
  source-image pixels in continuous coordinates (a crop covering pixel columns ``[x, x + w)`` has
  ``x1 = x, x2 = x + w``) and the flip flag (the flip is applied after the resize, horizontally).  With it
  :func:`view_to_source`, :func:`source_to_view` and :func:`map_boxes` relate any two views of an image (e.g.
  SCFS's RoI crop: where a local crop lies inside global crop 0, docs/methods/scfs.md §Variants);
* ground-truth ``boxes`` (with labels and masks) and unsupervised ``proposals`` (no labels, no masks) are two
  separate region sets, transformed identically; with a :class:`~semssl.data.regions.RegionSampling` the
  proposals are sampled as SoCo does (k per image visible in two views, crops re-drawn when too few are).

Coordinates are continuous pixel coordinates throughout (pixel ``i`` covers ``[i, i + 1)``, its centre is
``i + 0.5``): torchvision's box kernels and its ``align_corners=False`` resampling both follow this
convention, so boxes mapped with the recorded geometry land on the same pixels as the resampled image.
Proposals in SoCo's inclusive convention (``x2 = x1 + w - 1``) must get ``+1`` on x2 and y2 before coming here.

:func:`collate_views` stacks per-sample outputs into the Batch dict, **crop-major** (index = crop * B + image),
the order DINO/SCFS use (``torch.cat`` of a list of crops; docs/methods/dino.md §Views).  :class:`Collate` does
the same and then runs batch transforms (augmentations mixing the images of a batch) with a generator seeded from the
samples.
"""

from __future__ import annotations

import dataclasses
import numbers
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
from semssl.data.regions import (
    MIN_VALID_BOX_AREA,
    BatchTransform,
    RegionSampling,
    _is_int,
    box_area,
    box_cutout,
    box_jitter,
    build_batch_transform,
    clip_boxes,
    select_regions,
    view_hw,
)
from semssl.errors import SampleError, ViewError

__all__ = [
    "ViewError",
    "SampleError",
    "ViewSpec",
    "CropParams",
    "MultiViewTransform",
    "RegionSampling",
    "Collate",
    "batch_seed",
    "render_crop",
    "transform_boxes",
    "collate_views",
    "view_to_source",
    "source_to_view",
    "map_boxes",
    "clip_boxes",
    "box_area",
    "MIN_VALID_BOX_AREA",
]

_VIEW_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

_REGION_KEYS = {"boxes": ("box_ids", "box_valid"), "proposals": ("proposal_ids", "proposal_valid")}
"""Region set -> (its ids key, its validity key), in the sample outputs and in the batch."""


@dataclass
class ViewSpec:
    """One named view: ``n_crops`` square crops of side ``size``, each with its photometric recipe.

    ``recipe`` is one recipe name for all crops or a list with one name per crop (DINO: global crop 0 ->
    ``dino_global1``, crop 1 -> ``dino_global2``, docs/methods/dino.md §Augmentations).  ``whole_image=True``
    resizes the whole image to ``size x size`` without keeping its aspect (SoCo view 1,
    docs/methods/soco.md §Views); ``scale``/``ratio`` are then unused.  ``interpolation`` is ``"bilinear"``
    (MoCo/BYOL/SoCo) or ``"bicubic"`` (DINO/SCFS).

    ``geometry_from`` names another view whose crop rectangles and flips this view reuses (crop ``i`` here =
    crop ``i`` there, so ``n_crops`` must match), rendered at this view's ``size`` with this view's recipe and
    interpolation: SoCo/D3SSL's x2-s, a 112 px copy of x2 (docs/methods/d3ssl.md §Views).  Its
    ``whole_image``, ``scale``, ``ratio`` and ``flip_p`` are then unused and its recorded geometry equals the
    other view's.  Decisions: it is rendered from the source pixels with the same rectangle (antialiased), not by
    resizing the other view's pixels, and its photometric randomness is its own; the flip is shared, as a
    downsampled copy's is (SoCo*'s code flips its 112 px view 4 independently, docs/methods/soco.md §Variants).

    Box-aware augmentations, applied after the recipe and normalisation on the view's regions — the
    proposals when the sample has them, else its ground-truth boxes (:mod:`semssl.data.regions`); 0 = off, the
    default: ``box_cutout_p``/``box_cutout_area`` (SoCo's cutout in boxes, on view 2 in SoCo C4: p 0.5, area
    (0.1, 0.3), docs/methods/soco.md §Box cutout) and ``box_jitter_p``/``box_jitter_range``/``box_jitter_grow``
    (SoCo FPN's jitter p 0.5, r 0.1; D3SSL's RBJ is ``box_jitter_grow=False``, docs/methods/d3ssl.md §RBJ).  The
    cutout uses the boxes before the jitter; jittered boxes replace the view's boxes (the same id keeps its
    un-jittered box in other views) and count as valid when their clipped area is still >= :data:`MIN_VALID_BOX_AREA`.
    """

    name: str
    size: int = 224
    n_crops: int = 1
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    recipe: str | list[str] = "mocov2"
    whole_image: bool = False
    flip_p: float = 0.5
    interpolation: str = "bilinear"
    geometry_from: str | None = None
    box_cutout_p: float = 0.0
    box_cutout_area: tuple[float, float] = (0.1, 0.3)
    box_jitter_p: float = 0.0
    box_jitter_range: float = 0.1
    box_jitter_grow: bool = True

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
        for what in ("flip_p", "box_cutout_p", "box_jitter_p"):
            _check_unit(getattr(self, what), what, where)
        if self.interpolation not in _VIEW_INTERPOLATIONS:
            raise ViewError(
                f"{where}: unknown interpolation {self.interpolation!r}; valid: {', '.join(_VIEW_INTERPOLATIONS)}"
            )
        if self.geometry_from is not None and (not isinstance(self.geometry_from, str) or not self.geometry_from):
            raise ViewError(f"{where}: geometry_from must be a view name or None, got {self.geometry_from!r}")
        if self.geometry_from == self.name:
            raise ViewError(f"{where}: geometry_from names the view itself")
        self.box_cutout_area = _check_range(self.box_cutout_area, "box_cutout_area", where, upper=1.0)
        if not isinstance(self.box_jitter_range, numbers.Real) or not 0.0 <= self.box_jitter_range < 1.0:
            raise ViewError(f"{where}: box_jitter_range must be in [0, 1), got {self.box_jitter_range!r}")
        if not isinstance(self.box_jitter_grow, bool):
            raise ViewError(f"{where}: box_jitter_grow must be true or false, got {self.box_jitter_grow!r}")
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


def _check_unit(value: Any, what: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ViewError(f"{where}: {what} must be in [0, 1], got {value!r}")


def _check_range(value: Any, what: str, where: str, upper: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ViewError(f"{where}: {what} must be a pair (min, max), got {value!r}") from None
    if not (0.0 < lo <= hi) or (upper is not None and hi > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ViewError(f"{where}: {what} must satisfy 0 < min <= max{bound}, got {value!r}")
    return (lo, hi)


def _geometry_roots(specs: Sequence[ViewSpec]) -> dict[str, str]:
    """View name -> the view whose crops it uses (itself, or the end of its ``geometry_from`` chain)."""
    by_name = {s.name: s for s in specs}
    roots = {}
    for spec in specs:
        chain, current = [spec.name], spec
        while current.geometry_from is not None:
            ref = current.geometry_from
            if ref not in by_name:
                raise ViewError(
                    f"view spec {current.name!r}: geometry_from {ref!r} is not a view (views: {', '.join(by_name)})"
                )
            if by_name[ref].n_crops != current.n_crops:
                raise ViewError(
                    f"view spec {current.name!r}: geometry_from {ref!r} has n_crops {by_name[ref].n_crops} but "
                    f"this view has {current.n_crops}; they must match"
                )
            if ref in chain:
                raise ViewError(f"geometry_from forms a cycle: {' -> '.join(chain + [ref])}")
            chain.append(ref)
            current = by_name[ref]
        roots[spec.name] = current.name
    return roots


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
    box_ids: torch.Tensor | None = None  # int64 [N]: the source box index
    box_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None  # uint8 [N, H, W]
    proposals: tv_tensors.BoundingBoxes | None = None
    proposal_ids: torch.Tensor | None = None  # int64 [N]: the source proposal index
    seed: int | None = None


class MultiViewTransform:
    """Sample named multi-crop views of one sample and record their geometry (see module docstring).

    Args:
        specs: the views; names must be unique; ``geometry_from`` must name another view with the same
            ``n_crops``, without cycles.
        blur_reference_size: blur sigma scaling reference (see :mod:`semssl.data.augment`), None = absolute.
        normalize: True -> float32 views normalised with ImageNet mean/std; False -> uint8 views (raw pixels,
            for visualisation or on-device normalisation).
        region_sampling: SoCo's proposal sampling (:class:`~semssl.data.regions.RegionSampling`), applied to
            samples that carry ``"proposals"``; None = every proposal of the sample is kept in every view.

    Calling it returns ``{"views": {name: [n_crops tensors C,H,W]}, "geometry": {name: Tensor[n_crops,5]},
    "label", "index", "source_size": (H, W)}``, ``"seed"`` when the source sample has one (for
    :class:`Collate`), plus, per region set present in the sample — ``"boxes"`` (ground truth) and/or
    ``"proposals"`` — ``{set}: {name: Tensor[n_crops,P,4]}`` (in each crop's pixels, clipped to it), ids
    ``{name: int64 Tensor[n_crops,P]}`` (``"box_ids"`` / ``"proposal_ids"``: the source index; the same id in
    every view = the same object/proposal) and validity ``{name: BoolTensor[n_crops,P]}`` (``"box_valid"`` /
    ``"proposal_valid"``: clipped area >= :data:`MIN_VALID_BOX_AREA` px^2 in the view), and for the boxes
    ``"box_labels": Tensor[P]`` and ``"masks": {name: Tensor[n_crops,P,H,W]}`` when given.  With
    ``region_sampling`` the proposals are the ``k`` sampled ones (ids repeat for padding duplicates).
    """

    def __init__(
        self,
        specs: Sequence[ViewSpec],
        blur_reference_size: int | None = 224,
        normalize: bool = True,
        region_sampling: RegionSampling | None = None,
    ):
        specs = list(specs)
        if not specs:
            raise ViewError("MultiViewTransform needs at least one ViewSpec")
        for spec in specs:
            if not isinstance(spec, ViewSpec):
                raise ViewError(f"specs must be ViewSpec instances, got {type(spec).__name__}")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ViewError(f"view names must be unique; repeated: {', '.join(duplicates)}")
        self._geometry_root = _geometry_roots(specs)
        if region_sampling is not None:
            if not isinstance(region_sampling, RegionSampling):
                raise ViewError(
                    f"region_sampling must be a RegionSampling or None, got {type(region_sampling).__name__}"
                )
            for name in region_sampling.views:
                if name not in names:
                    raise ViewError(f"region sampling: views names {name!r}, which is not a view ({', '.join(names)})")
        self.specs = specs
        self.region_sampling = region_sampling
        self.normalize = bool(normalize)
        self.blur_reference_size = blur_reference_size
        self._spec = {s.name: s for s in specs}
        self._photometric = {
            s.name: [PhotometricTransform(r, s.size, blur_reference_size) for r in s.recipes()] for s in specs
        }
        self._rrc = {s.name: v2.RandomResizedCrop(s.size, scale=s.scale, ratio=s.ratio) for s in specs}
        self._interp = {s.name: interpolation_mode(s.interpolation) for s in specs}
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self._inv_std = (np.float32(1.0) / np.asarray(IMAGENET_STD, dtype=np.float32)).reshape(3, 1, 1)
        # the colour of 0 in a normalised view, for the box cutout of a uint8 view (see regions.box_cutout)
        self._cutout_fill = 0.0 if self.normalize else tuple(round(255 * m) for m in IMAGENET_MEAN)

    @property
    def recipe_names(self) -> dict[str, list[str]]:
        """View name -> the recipe name of each crop."""
        return {s.name: s.recipes() for s in self.specs}

    def __repr__(self) -> str:
        views = ", ".join(
            f"{s.name}: {s.n_crops}x{s.size}" + (f" (crops of {s.geometry_from})" if s.geometry_from else "")
            for s in self.specs
        )
        sampling = f"; {self.region_sampling}" if self.region_sampling is not None else ""
        return f"MultiViewTransform({views}; normalize={self.normalize}{sampling})"

    # ---------------------------------------------------------------- sampling
    def sample_params(self, height: int, width: int) -> dict[str, list[CropParams]]:
        """Draw the crop rectangle and flip of every crop for a ``height x width`` source image.

        Uses torch's global RNG (seeded per sample by the dataset), exactly as torchvision's transforms do.  Views
        with ``geometry_from`` draw nothing: they get the crops of the view they name.
        """
        probe = torch.empty((0, height, width))  # query_size() only reads the shape
        params: dict[str, list[CropParams]] = {}
        for spec in self.specs:
            if spec.geometry_from is not None:
                continue
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
        return {s.name: list(params[self._geometry_root[s.name]]) for s in self.specs}

    # ---------------------------------------------------------------- apply
    def __call__(self, sample: dict, params: dict[str, list[CropParams]] | None = None) -> dict:
        """Transform one source sample; ``params`` (from :meth:`sample_params`) fixes the geometry if given (then
        region sampling selects among the proposals of those crops without re-drawing them)."""
        src = _validate_sample(sample)
        height, width = src.image.shape[-2:]
        drawn = params is None
        params = self.sample_params(height, width) if drawn else self._resolve_params(params, src.index)
        if self.region_sampling is not None and src.proposals is not None:
            params, src = self._sample_regions(src, params, redraw=drawn)
        out: dict[str, Any] = {
            "views": {},
            "geometry": {},
            "label": src.label,
            "index": src.index,
            "source_size": (int(height), int(width)),
        }
        if src.seed is not None:
            out["seed"] = src.seed
        for kind, (ids_key, valid_key) in _REGION_KEYS.items():
            if getattr(src, kind) is not None:
                out.update({kind: {}, ids_key: {}, valid_key: {}})
        if src.box_labels is not None:
            out["box_labels"] = src.box_labels
        if src.masks is not None:
            out["masks"] = {}
        for spec in self.specs:
            self._render_view(spec, src, params[spec.name], out)
        return out

    def _resolve_params(self, params: dict[str, list[CropParams]], index: int) -> dict[str, list[CropParams]]:
        """Check explicit params; views with ``geometry_from`` get (or must already have) their source's."""
        if not isinstance(params, dict):
            raise ViewError(f"sample index {index}: params must be a dict view name -> list of CropParams")
        for spec in self.specs:
            root = self._geometry_root[spec.name]
            crops = params.get(root)
            if crops is None or len(crops) != spec.n_crops:
                got = "none" if crops is None else len(crops)
                raise ViewError(
                    f"sample index {index}: params for view {root!r} must list {spec.n_crops} CropParams, got {got}"
                )
            if root != spec.name and spec.name in params and list(params[spec.name]) != list(crops):
                raise ViewError(
                    f"sample index {index}: params for view {spec.name!r} differ from those of {root!r}, "
                    "whose crops it reuses (geometry_from); give only those of the source view"
                )
        return {s.name: list(params[self._geometry_root[s.name]]) for s in self.specs}

    def _sample_regions(
        self, src: _Source, params: dict[str, list[CropParams]], redraw: bool
    ) -> tuple[dict[str, list[CropParams]], _Source]:
        """SoCo's proposal sampling (docs/methods/soco.md §Box sampling; the rules are in :class:`RegionSampling`'s
        docstring)."""
        rs = self.region_sampling
        assert rs is not None and src.proposals is not None and src.proposal_ids is not None
        height, width = src.image.shape[-2:]
        whole = torch.tensor([[0.0, 0.0, float(width), float(height)]])
        proposals, ids = src.proposals.as_subclass(torch.Tensor), src.proposal_ids
        if proposals.shape[0] == 0:  # no proposal at all: the whole image is the single proposal (SoCo)
            proposals, ids = whole, torch.zeros(1, dtype=torch.int64)
        least = rs.first_least_common
        visible = self._visible(proposals, params, (height, width))
        for _ in range(rs.max_tries - 1):
            if not redraw or int(visible.sum()) >= least:
                break
            least = max(least // 2, 1)
            params = self.sample_params(height, width)
            visible = self._visible(proposals, params, (height, width))
        if not visible.any():  # none visible in both views after every draw: add the whole image (decision)
            proposals = torch.cat([proposals, whole])
            ids = torch.cat([ids, torch.tensor([src.proposal_ids.numel()])])
            visible = torch.cat([visible, torch.ones(1, dtype=torch.bool)])
        chosen = select_regions(visible, rs.k, pad=rs.pad)
        src = dataclasses.replace(
            src, proposals=_bounding_boxes(proposals[chosen], (height, width)), proposal_ids=ids[chosen]
        )
        return params, src

    def _visible(
        self, proposals: torch.Tensor, params: dict[str, list[CropParams]], canvas: tuple[int, int]
    ) -> torch.Tensor:
        """Bool ``[N]``: visible in every crop of both sampling views (same kernels as the rendered boxes)."""
        rs = self.region_sampling
        assert rs is not None
        boxes = _bounding_boxes(proposals, canvas)
        visible = torch.ones(proposals.shape[0], dtype=torch.bool)
        for name in rs.views:
            for crop in params[name]:
                visible &= box_area(transform_boxes(boxes, crop, self._spec[name].size)) >= rs.min_visible
        return visible

    def _render_view(self, spec: ViewSpec, src: _Source, crops: list[CropParams], out: dict) -> None:
        kinds = [kind for kind in _REGION_KEYS if getattr(src, kind) is not None]
        target = "proposals" if src.proposals is not None else ("boxes" if src.boxes is not None else None)
        images, masks = [], []
        regions: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        valid: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
        for crop, photometric in zip(crops, self._photometric[spec.name]):
            image, crop_boxes, crop_masks = render_crop(
                src.image, crop, spec.size, self._interp[spec.name], src.boxes, src.masks
            )
            image = self._finish_image(image, photometric)
            found = {"boxes": crop_boxes}
            if src.proposals is not None:
                found["proposals"] = transform_boxes(src.proposals, crop, spec.size)
            found_valid = {kind: box_area(found[kind]) >= MIN_VALID_BOX_AREA for kind in kinds}
            if target is not None:
                image, found[target], found_valid[target] = self._box_augment(
                    spec, image, found[target], found_valid[target]
                )
            images.append(image)
            for kind in kinds:
                regions[kind].append(found[kind])  # type: ignore[arg-type]
                valid[kind].append(found_valid[kind])
            if crop_masks is not None:
                masks.append(crop_masks)
        out["views"][spec.name] = images
        out["geometry"][spec.name] = torch.tensor([c.geometry_list() for c in crops], dtype=torch.float32)
        for kind in kinds:
            ids_key, valid_key = _REGION_KEYS[kind]
            out[kind][spec.name] = torch.stack(regions[kind])
            out[valid_key][spec.name] = torch.stack(valid[kind])
            out[ids_key][spec.name] = getattr(src, ids_key).repeat(spec.n_crops, 1)
        if src.masks is not None:
            out["masks"][spec.name] = torch.stack(masks)

    def _box_augment(
        self, spec: ViewSpec, image: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The view's box cutout (on the un-jittered boxes), then its box jitter (see :class:`ViewSpec`)."""
        if spec.box_cutout_p > 0:
            image = box_cutout(
                image, boxes, valid, p=spec.box_cutout_p, area=spec.box_cutout_area, fill=self._cutout_fill
            )
        if spec.box_jitter_p > 0:
            boxes = box_jitter(
                boxes, spec.size, valid, p=spec.box_jitter_p, max_ratio=spec.box_jitter_range,
                grow=spec.box_jitter_grow,
            )
            valid = valid & (box_area(boxes) >= MIN_VALID_BOX_AREA)
        return image, boxes, valid

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

    Boxes go through :func:`transform_boxes`; they come back as a plain float32 ``[P, 4]`` tensor in view
    pixels.  Decision: masks are resampled with ``nearest-exact`` (pixel-centre sampling, consistent with the
    continuous-coordinate geometry) rather than torchvision's mask default ``nearest`` (which samples at pixel
    corners and shifts masks by up to half an output pixel towards the top-left).
    """
    args = (crop.top, crop.left, crop.height, crop.width, [size, size])
    out_image = F.resized_crop(image, *args, interpolation=interpolation, antialias=True)
    out_boxes = transform_boxes(boxes, crop, size) if boxes is not None else None
    out_masks = None
    if masks is not None:
        out_masks = F.resized_crop(masks, *args, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    if crop.flip:
        out_image = F.horizontal_flip(out_image)
        out_masks = F.horizontal_flip(out_masks) if out_masks is not None else None
    return out_image, out_boxes, out_masks


def transform_boxes(boxes: tv_tensors.BoundingBoxes, crop: CropParams, size: int) -> torch.Tensor:
    """Boxes (source pixels, ``tv_tensors.BoundingBoxes``) into a crop's view: torchvision's BoundingBoxes
    kernels (shifted, clamped to the crop, scaled to ``size x size``, flipped); plain float32 ``[P, 4]``.  The
    rendered boxes and proposals and the visibility test of region sampling all go through here."""
    out = F.resized_crop(boxes, crop.top, crop.left, crop.height, crop.width, [size, size])
    if crop.flip:
        out = F.horizontal_flip(out)
    return out.as_subclass(torch.Tensor).to(torch.float32)


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
    canvas = tuple(image.shape[-2:])
    src = _Source(image=image, label=label, index=index)
    if sample.get("seed") is not None:
        src.seed = _as_int(sample["seed"], "seed", index)
    if sample.get("boxes") is not None:
        src.boxes = _boxes(sample["boxes"], canvas, where, "boxes", "box")
        src.box_ids = torch.arange(src.boxes.shape[0], dtype=torch.int64)
    if sample.get("proposals") is not None:
        src.proposals = _boxes(sample["proposals"], canvas, where, "proposals", "proposal")
        src.proposal_ids = torch.arange(src.proposals.shape[0], dtype=torch.int64)
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
        src.masks = _masks(sample["masks"], n, canvas, where)
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


def _bounding_boxes(boxes: torch.Tensor, canvas: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=canvas)


def _boxes(boxes: Any, canvas: tuple[int, int], where: str, key: str, item: str) -> tv_tensors.BoundingBoxes:
    """``key`` ("boxes"/"proposals") of a sample as BoundingBoxes, or a SampleError naming the entry at fault."""
    try:
        t = torch.as_tensor(boxes, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise SampleError(f"{where}: {key!r} must be a [N, 4] array of numbers, got {type(boxes).__name__}") from None
    if t.ndim == 1 and t.numel() == 0:
        t = t.reshape(0, 4)
    if t.ndim != 2 or t.shape[1] != 4:
        raise SampleError(f"{where}: {key!r} must be [N, 4] (x1, y1, x2, y2), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise SampleError(f"{where}: {key!r} contains non-finite values")
    bad = (t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1])
    if bad.any():
        i = int(bad.nonzero()[0])
        raise SampleError(f"{where}: {item} {i} {t[i].tolist()} has x2 < x1 or y2 < y1 (expected xyxy pixels)")
    return _bounding_boxes(t, canvas)


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
    ``[n_crops*B, 5]``; ``label``/``index``: int64 ``[B]``; ``source_size``: int64 ``[B, 2]`` (H, W).

    Regions, padded to the batch's largest P (per region set), all crop-major like the images:

    * ground truth: ``boxes[name]`` float ``[n_crops*B, P, 4]`` (0 for padding), ``box_ids[name]`` int64
      ``[n_crops*B, P]`` (-1 for padding), ``box_valid[name]`` bool ``[n_crops*B, P]`` (False for padding),
      ``masks[name]`` uint8 ``[n_crops*B, P, H, W]`` (0 for padding), and ``box_labels`` int64 ``[B, P]``
      (-1 for padding) — per *image*, not per view: ``box_labels[b, i]`` is the label of the box with id ``i``;
      ground-truth ids are the source box indices and boxes are never re-ordered, so it is also the label at
      position ``i`` in every view;
    * proposals (unsupervised, no labels or masks): ``proposals[name]``, ``proposal_ids[name]`` and
      ``proposal_valid[name]``, same shapes and padding.

    The same id in two views (or crops) is the same object/proposal; a sampled proposal repeated as padding
    (:class:`~semssl.data.regions.RegionSampling`) has its id repeated.

    Decision: a sample without boxes (proposals) in a batch where others have them counts as having none (all
    padding); masks, which carry pixel data, must be present in every sample with boxes or in none.
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
    for kind in _REGION_KEYS:
        if any(kind in s for s in samples):
            _collate_regions(samples, layout, batch, kind)
    return batch


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Split a Batch dict into ``parts`` batches of consecutive images (micro-batches for gradient accumulation).

    Micro-batch ``j`` holds images ``[j * m, (j + 1) * m)`` with ``m = B / parts``, ``B = len(batch["label"])``,
    in every key: per-image tensors (``label``, ``index``, ``source_size``, ``box_labels``: leading dim ``B``) are
    sliced; the per-view dicts (``views``, ``geometry``, region sets: leading dim ``n_crops * B``, crop-major) keep
    their layout, so each micro-batch is itself a Batch, crop-major, as :func:`collate_views` would have built
    from its images. Anything without a batch dimension (non-tensors) is shared.
    """
    if parts == 1:
        return [batch]
    labels = batch.get("label")
    if not torch.is_tensor(labels):
        raise SampleError("split_batch: the batch has no 'label' tensor, so its number of images is unknown")
    n = int(labels.shape[0])
    if parts < 1 or n % parts:
        raise SampleError(f"split_batch: a batch of {n} images does not split into {parts} equal micro-batches")
    m = n // parts

    def part(value: Any, j: int, key: str) -> Any:
        if isinstance(value, dict):
            return {name: part(v, j, f"{key}[{name!r}]") for name, v in value.items()}
        if not torch.is_tensor(value) or value.ndim == 0:
            return value
        rows = int(value.shape[0])
        if rows % n:
            raise SampleError(f"split_batch: batch key {key} has {rows} rows, not a multiple of the {n} images")
        crops = value.reshape(rows // n, n, *value.shape[1:])  # crop-major: row = crop * B + image
        return crops[:, j * m:(j + 1) * m].flatten(0, 1)

    return [{key: part(value, j, key) for key, value in batch.items()} for j in range(parts)]


def _crop_major(per_sample: list[list[torch.Tensor]], name: str) -> torch.Tensor:
    """``per_sample[b][c]`` -> tensor indexed ``c * B + b``."""
    n_crops = len(per_sample[0])
    try:
        stacked = [torch.stack([crops[c] for crops in per_sample]) for c in range(n_crops)]
        return torch.cat(stacked)
    except RuntimeError as err:
        raise SampleError(f"collate_views: crops of view {name!r} differ in shape or dtype ({err})") from None


def _collate_regions(samples: list[dict], layout: dict[str, int], batch: dict, kind: str) -> None:
    """Pad and stack one region set (``"boxes"`` with its labels and masks, or ``"proposals"``) crop-major."""
    ids_key, valid_key = _REGION_KEYS[kind]
    n_images = len(samples)
    for i, s in enumerate(samples):
        if kind in s and not isinstance(s.get(ids_key), dict):
            raise SampleError(
                f"collate_views: item {i} {ids_key!r} must be a dict view -> int64 [n_crops, P] "
                f"(a MultiViewTransform output), got {type(s.get(ids_key)).__name__}"
            )
    p_max = max((int(t.shape[1]) for s in samples if kind in s for t in s[kind].values()), default=0)
    with_masks = kind == "boxes" and any("masks" in s for s in samples)
    if with_masks and not all("masks" in s for s in samples if kind in s):
        raise SampleError("collate_views: some samples have 'masks' and others not; masks must be all or none")
    regions, ids, valid, masks = {}, {}, {}, {}
    for name, n_crops in layout.items():
        regions[name] = torch.zeros((n_crops, n_images, p_max, 4), dtype=torch.float32)
        ids[name] = torch.full((n_crops, n_images, p_max), -1, dtype=torch.int64)
        valid[name] = torch.zeros((n_crops, n_images, p_max), dtype=torch.bool)
        if with_masks:
            masks[name] = torch.zeros((n_crops, n_images, p_max, *_mask_size(samples, name)), dtype=torch.uint8)
    labels = None
    if kind == "boxes" and any("box_labels" in s for s in samples):
        labels = torch.full((n_images, p_max), -1, dtype=torch.int64)
    for b, s in enumerate(samples):
        if kind not in s:
            continue
        for name in layout:
            p = s[kind][name].shape[1]
            regions[name][:, b, :p] = s[kind][name]
            ids[name][:, b, :p] = s[ids_key][name]
            valid[name][:, b, :p] = s[valid_key][name]
            if with_masks:
                masks[name][:, b, :p] = s["masks"][name]
        if labels is not None and "box_labels" in s:
            labels[b, : s["box_labels"].shape[0]] = s["box_labels"]
    batch[kind] = {n: t.flatten(0, 1) for n, t in regions.items()}
    batch[ids_key] = {n: t.flatten(0, 1) for n, t in ids.items()}
    batch[valid_key] = {n: t.flatten(0, 1) for n, t in valid.items()}
    if labels is not None:
        batch["box_labels"] = labels
    if with_masks:
        batch["masks"] = {n: t.flatten(0, 1) for n, t in masks.items()}


def _mask_size(samples: list[dict], name: str) -> tuple[int, int]:
    for s in samples:
        if "masks" in s:
            return tuple(s["masks"][name].shape[-2:])  # type: ignore[return-value]
    raise SampleError(f"collate_views: no masks for view {name!r}")


def batch_seed(samples: Sequence[dict], seed: int = 0) -> int:
    """The seed of one batch's batch transforms: a hash (NumPy ``SeedSequence``) of ``seed`` and, for each sample
    in batch order, its ``"seed"`` (the per-sample seed the dataset put in the source sample, carried through by
    :class:`MultiViewTransform`) or, for a sample without one, its ``"index"``.

    So the same samples in the same order give the same randomness, whichever worker collates them and whether
    or not the run was resumed.  Decision: without per-sample seeds the batch transforms depend on the indices
    only (identical in every epoch for the same batch); datasets should pass ``"seed"`` (e.g. the per-epoch
    sample seed that also seeds the sample's augmentations).
    """
    mask = 2**64 - 1
    entropy = [int(seed) & mask]
    for i, s in enumerate(samples):
        if s.get("seed") is not None:
            entropy += [1, int(s["seed"]) & mask]
        elif "index" in s:
            entropy += [0, int(s["index"]) & mask]
        else:
            raise SampleError(f"batch_seed: item {i} has neither 'seed' nor 'index'")
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class Collate:
    """DataLoader ``collate_fn``: :func:`collate_views`, then each batch transform (augmentations that mix the
    images of a batch; :mod:`semssl.data.regions`, e.g. ``"shuffle_backgrounds"``) in order, all drawing from one
    ``torch.Generator`` seeded with :func:`batch_seed` (``samples``, ``seed``).  Items of ``batch_transforms`` are
    :class:`~semssl.data.regions.BatchTransform` objects or registered names (built with default arguments).
    Picklable when its transforms are, so workers can run it.
    """

    def __init__(self, batch_transforms: Sequence[BatchTransform | str] = (), seed: int = 0):
        if isinstance(batch_transforms, str):
            batch_transforms = (batch_transforms,)
        built = []
        for t in batch_transforms:
            if isinstance(t, str):
                t = build_batch_transform(t)
            elif not callable(t):
                raise ViewError(f"Collate: a batch transform must be callable or a registered name, got {t!r}")
            built.append(t)
        if not _is_int(seed):
            raise ViewError(f"Collate: seed must be an int, got {seed!r}")
        self.batch_transforms = tuple(built)
        self.seed = int(seed)

    def __call__(self, samples: list[dict]) -> dict:
        batch = collate_views(samples)
        if not self.batch_transforms:
            return batch
        generator = torch.Generator().manual_seed(batch_seed(samples, self.seed))
        for transform in self.batch_transforms:
            batch = transform(batch, generator)
            if not isinstance(batch, dict):
                raise SampleError(f"batch transform {transform!r} returned {type(batch).__name__}, not a batch dict")
        return batch

    def __repr__(self) -> str:
        return f"Collate(batch_transforms={list(self.batch_transforms)!r}, seed={self.seed})"


# ----------------------------------------------------------------- geometry
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
    vh, vw = view_hw(view_size)
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
    vh, vw = view_hw(view_size)
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
