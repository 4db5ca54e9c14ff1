"""Regions (ground-truth boxes and unsupervised proposals) inside one view, and the batch-level transform stage.

Everything here works in **one view's pixel coordinates** (continuous xyxy: pixel ``i`` covers ``[i, i + 1)``, as
in :mod:`semssl.data.views`), so it depends on no geometry between views: :mod:`semssl.data.views` maps boxes
into each view and then calls these pieces.

* box helpers: :func:`clip_boxes`, :func:`box_area`, :func:`boxes_to_mask`, :data:`MIN_VALID_BOX_AREA`;
* SoCo's proposal sampling (METHODS.md §5.1 "Views and box sampling (C4 variant)"): the :class:`RegionSampling`
  settings that :class:`semssl.data.views.MultiViewTransform` applies, and :func:`select_regions`;
* box-aware augmentations, pure functions on tensors: :func:`box_cutout` (SoCo's ``RandomCutoutInBbox``,
  METHODS.md §5.1) and :func:`box_jitter` (SoCo's FPN jitter, METHODS.md §5.1; D3SSL's RBJ with ``grow=False``,
  METHODS.md §5.2);
* batch transforms — augmentations that mix the images of a batch, run after collation by
  :class:`semssl.data.views.Collate` with a generator seeded from the samples: the :class:`BatchTransform`
  protocol, :func:`register_batch_transform` / :func:`build_batch_transform`, and one example,
  ``shuffle_backgrounds`` (:class:`ShuffleBackgrounds`).

Randomness: every random function takes ``generator`` (a ``torch.Generator``; ``None`` = torch's global RNG,
which the dataset seeds per sample, so per-sample augmentations are reproducible).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from semssl.errors import SampleError, ViewError

__all__ = [
    "MIN_VALID_BOX_AREA",
    "view_hw",
    "clip_boxes",
    "box_area",
    "boxes_to_mask",
    "RegionSampling",
    "select_regions",
    "box_cutout",
    "box_jitter",
    "BatchTransform",
    "register_batch_transform",
    "build_batch_transform",
    "batch_transform_names",
    "ShuffleBackgrounds",
]

MIN_VALID_BOX_AREA = 1.0
"""A box is valid in a crop when its clipped area there is at least this many squared view pixels."""


# ------------------------------------------------------------------------------------------------ box helpers
def view_hw(view_size: int | Sequence[int]) -> tuple[float, float]:
    """``(H, W)`` as floats from a square side ``S`` or a pair ``(H, W)``; :class:`ViewError` otherwise."""
    if isinstance(view_size, numbers.Integral):
        return float(view_size), float(view_size)
    try:
        h, w = (float(v) for v in view_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ViewError(f"view_size must be an int or (H, W), got {view_size!r}") from None
    return h, w


def clip_boxes(boxes: torch.Tensor, view_size: int | Sequence[int]) -> torch.Tensor:
    """Clip xyxy boxes ``[..., 4]`` to ``[0, W] x [0, H]``."""
    vh, vw = view_hw(view_size)
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


def boxes_to_mask(
    boxes: torch.Tensor, view_size: int | Sequence[int], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Union of boxes ``[..., P, 4]`` as a bool mask ``[..., H, W]``: a pixel is inside a box when its centre is
    (``x1 <= j + 0.5 < x2`` and likewise in y), the convention of the resampled images.  ``valid`` ``[..., P]``
    leaves out the boxes that are False (padding, boxes outside the view)."""
    vh, vw = view_hw(view_size)
    h, w = int(vh), int(vw)
    if boxes.ndim < 2 or boxes.shape[-1] != 4:
        raise ViewError(f"boxes must be [..., P, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if valid is not None and valid.shape != boxes.shape[:-1]:
        raise ViewError(f"valid must be {tuple(boxes.shape[:-1])} (one flag per box), got {tuple(valid.shape)}")
    cx = torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5
    cy = torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5
    mask = torch.zeros((*boxes.shape[:-2], h, w), dtype=torch.bool, device=boxes.device)
    for i in range(boxes.shape[-2]):  # one box at a time: memory [..., H, W], not [..., P, H, W]
        b = boxes[..., i, :]
        inside_x = (cx >= b[..., 0:1]) & (cx < b[..., 2:3])  # [..., W]
        inside_y = (cy >= b[..., 1:2]) & (cy < b[..., 3:4])  # [..., H]
        inside = inside_y[..., :, None] & inside_x[..., None, :]
        if valid is not None:
            inside &= valid[..., i, None, None]
        mask |= inside
    return mask


# ------------------------------------------------------------------------------------------- proposal sampling
@dataclass
class RegionSampling:
    """SoCo's proposal sampling (METHODS.md §5.1 "Views and box sampling (C4 variant)"), applied by
    :class:`semssl.data.views.MultiViewTransform` to samples that carry ``"proposals"``.

    * **Visibility** (decision): a proposal is visible in a view when its clipped area in *every* crop of that
      view is at least ``min_visible`` squared pixels of that view.  The default, :data:`MIN_VALID_BOX_AREA`, is
      the threshold of ``proposal_valid``, so every selected proposal is valid in both ``views``.  (SoCo keeps
      proposals with any positive overlap with view1 ∩ view2, which is the limit ``min_visible -> 0``;
      ``min_visible`` may not go below :data:`MIN_VALID_BOX_AREA` so "selected" always implies "valid".)
    * **Retries**: while fewer than ``least_common`` proposals are visible in both ``views``, all crops are drawn
      again, at most ``max_tries`` draws in all (SoCo's count); ``least_common`` (default ``max(k // 2, 1)`` as
      SoCo) is halved after each failed draw.  When every draw fails the last one is kept.  Retries only happen
      when the transform draws the crops itself (not with explicit ``params``).
    * **Selection**: ``k`` of the visible proposals chosen at random without replacement (all, if fewer), in
      ascending id order; with ``pad`` the list is then padded to exactly ``k`` by duplicating proposals drawn at
      random (with replacement) from the selected ones, which are all visible in both views — the duplicate
      keeps its id (SoCo's ``pad_bboxs_with_common``), so a correspondence by id counts it several times.
    * **Fallbacks** (SoCo, METHODS.md §5.1): an image with no proposal at all gets the whole source image as its
      single proposal (id 0).  Decision: when proposals exist but none is visible in both views after all
      draws, the whole source image is appended as one more proposal (id = number of proposals), rather than
      SoCo's "whole view" box per view, so the fallback covers the same pixels in every view.

    Every view of the transform then carries the same selected proposals (validity per view and crop), so
    ``proposal_ids`` are identical across views.
    """

    views: tuple[str, str] = ("x1", "x2")
    k: int = 4
    max_tries: int = 5
    least_common: int | None = None
    pad: bool = True
    min_visible: float = MIN_VALID_BOX_AREA

    def __post_init__(self) -> None:
        where = "region sampling"
        views = tuple(self.views) if isinstance(self.views, (list, tuple)) else None
        if views is None or len(views) != 2 or not all(isinstance(v, str) and v for v in views):
            raise ViewError(f"{where}: views must be two view names, e.g. ('x1', 'x2'), got {self.views!r}")
        if views[0] == views[1]:
            raise ViewError(f"{where}: views must name two different views, got {self.views!r}")
        self.views = views  # type: ignore[assignment]
        if not _is_int(self.k) or self.k < 1:
            raise ViewError(f"{where}: k must be an int >= 1, got {self.k!r}")
        if not _is_int(self.max_tries) or self.max_tries < 1:
            raise ViewError(f"{where}: max_tries must be an int >= 1, got {self.max_tries!r}")
        if self.least_common is not None and (
            not _is_int(self.least_common) or not 1 <= self.least_common <= self.k
        ):
            raise ViewError(
                f"{where}: least_common must be None or an int in [1, k={self.k}], got {self.least_common!r}"
            )
        if not isinstance(self.pad, bool):
            raise ViewError(f"{where}: pad must be true or false, got {self.pad!r}")
        if not isinstance(self.min_visible, numbers.Real) or not self.min_visible >= MIN_VALID_BOX_AREA:
            raise ViewError(
                f"{where}: min_visible must be a number >= {MIN_VALID_BOX_AREA} (squared view pixels), "
                f"got {self.min_visible!r}"
            )

    @property
    def first_least_common(self) -> int:
        """The number of proposals the first draw must make visible: ``least_common`` or ``max(k // 2, 1)``."""
        return self.least_common if self.least_common is not None else max(self.k // 2, 1)


def select_regions(
    candidates: torch.Tensor, k: int, pad: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of ``k`` of the True entries of ``candidates`` ``[N]`` (bool), chosen at random without
    replacement and sorted (all of them, if fewer); with ``pad``, padded to exactly ``k`` by duplicates drawn at
    random from the chosen ones (METHODS.md §5.1).  Returns int64 ``[k]`` (or fewer without ``pad``), empty when
    there is no candidate."""
    idx = torch.as_tensor(candidates, dtype=torch.bool).flatten().nonzero().flatten()
    if idx.numel() == 0:
        return idx
    chosen = idx[torch.randperm(idx.numel(), generator=generator)[:k]].sort().values
    if pad and chosen.numel() < k:
        extra = chosen[torch.randint(chosen.numel(), (k - chosen.numel(),), generator=generator)]
        chosen = torch.cat([chosen, extra])
    return chosen


# ------------------------------------------------------------------------------------- box-aware augmentations
def _default_valid(boxes: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ViewError(f"boxes must be [P, 4] (x1, y1, x2, y2) in view pixels, got shape {tuple(boxes.shape)}")
    if valid is None:
        return box_area(boxes) > 0
    if valid.shape != boxes.shape[:1]:
        raise ViewError(f"valid must be [{boxes.shape[0]}] (one flag per box), got {tuple(valid.shape)}")
    return valid.to(torch.bool)


def _check_probability(p: float, what: str) -> None:
    if not 0.0 <= float(p) <= 1.0:
        raise ViewError(f"{what}: p must be in [0, 1], got {p!r}")


def box_cutout(
    image: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    p: float = 0.5,
    area: tuple[float, float] = (0.1, 0.3),
    fill: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SoCo's ``RandomCutoutInBbox`` (METHODS.md §5.1): for each valid box, with probability ``p``, a square of
    area ``U(area) x box area`` centred at a uniform random point inside the box is set to ``fill`` (clipped to
    the image).  Returns a new image; ``image`` ``[C, H, W]`` is not modified.

    ``fill`` is 0 for a normalised view (SoCo zeroes the normalised tensor, i.e. paints the mean colour);
    :class:`semssl.data.views.MultiViewTransform` passes the ImageNet mean in 0..255 for uint8 views, the same
    colour.  Decisions: the square has an integer side ``max(1, round(sqrt(area)))`` and its left/top edge is
    ``round(centre - side / 2)`` (SoCo: side ``2 * (round(sqrt(area)) // 2) + 1`` around an integer centre); as
    in SoCo it may extend past the box (not past the image).  Four numbers are drawn per box (apply, area,
    centre x, centre y) whether or not the box is valid, so the stream does not depend on validity.
    """
    if image.ndim != 3:
        raise ViewError(f"box_cutout expects an image [C, H, W], got shape {tuple(image.shape)}")
    valid = _default_valid(boxes, valid)
    _check_probability(p, "box_cutout")
    lo, hi = (float(a) for a in area)
    if not 0.0 < lo <= hi <= 1.0:
        raise ViewError(f"box_cutout: area must satisfy 0 < min <= max <= 1, got {area!r}")
    out = image.clone()
    n = boxes.shape[0]
    if n == 0:
        return out
    draws = torch.rand((n, 4), generator=generator, dtype=torch.float64)
    apply = (draws[:, 0] < p) & valid.cpu()
    height, width = image.shape[-2:]
    fill_value = torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
    b = boxes.detach().to("cpu", torch.float64)
    for i in apply.nonzero().flatten().tolist():
        x1, y1, x2, y2 = b[i].tolist()
        w, h = x2 - x1, y2 - y1
        side = max(1, round(math.sqrt((lo + (hi - lo) * float(draws[i, 1])) * w * h)))
        cx, cy = x1 + float(draws[i, 2]) * w, y1 + float(draws[i, 3]) * h
        left, top = round(cx - side / 2), round(cy - side / 2)
        out[:, max(top, 0) : min(top + side, height), max(left, 0) : min(left + side, width)] = fill_value
    return out


def box_jitter(
    boxes: torch.Tensor,
    view_size: int | Sequence[int],
    valid: torch.Tensor | None = None,
    *,
    p: float = 0.5,
    max_ratio: float = 0.1,
    grow: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Box jitter: each valid box, with probability ``p``, has its centre moved by ``U(-r, r) x (w, h)`` and its
    width and height scaled by ``1 + U(-r, r)``, then is clipped to the view (``r = max_ratio``).

    SoCo's FPN jitter (METHODS.md §5.1, p 0.5, r 0.1) draws the same four numbers but offsets the top-left corner;
    decision: the centre is offset, so a jitter with no scale change is a pure shift.  ``grow=False`` draws the
    scales from ``U(-r, 0)``, so the jittered box is never larger than the original in either side — D3SSL's RBJ
    (METHODS.md §5.2: "constrained so the jittered box is never larger than the original").  Four numbers plus one
    are drawn per box whether or not it is valid.  Returns new float boxes ``[P, 4]``; invalid boxes are unchanged.
    """
    valid = _default_valid(boxes, valid)
    _check_probability(p, "box_jitter")
    if not 0.0 <= float(max_ratio) < 1.0:
        raise ViewError(f"box_jitter: max_ratio must be in [0, 1), got {max_ratio!r}")
    n = boxes.shape[0]
    if n == 0:
        return boxes.clone()
    draws = torch.rand((n, 5), generator=generator, dtype=torch.float64).to(boxes.device)
    apply = (draws[:, 0] < p) & valid
    r = float(max_ratio)
    shift = (2 * draws[:, 1:3] - 1) * r  # U(-r, r) for the centre, in units of w and h
    scale = (2 * draws[:, 3:5] - 1) * r if grow else -draws[:, 3:5] * r  # U(-r, r) or U(-r, 0)
    b = boxes.to(torch.float64)
    wh = b[:, 2:] - b[:, :2]
    centre = (b[:, :2] + b[:, 2:]) / 2 + shift * wh
    half = wh * (1 + scale) / 2
    jittered = clip_boxes(torch.cat([centre - half, centre + half], dim=1), view_size)
    return torch.where(apply[:, None], jittered, b).to(boxes.dtype if boxes.is_floating_point() else torch.float32)


# ------------------------------------------------------------------------------------------- batch transforms
class BatchTransform(Protocol):
    """An augmentation over a whole collated batch (the Batch dict of DESIGN.md "Key abstractions").

    It returns a batch with the same keys and shapes (a new dict; tensors it changes are new tensors, the input
    batch is left as it was), and draws all its randomness from ``generator``, which
    :class:`semssl.data.views.Collate` seeds from the batch's samples, so a resumed run gets the same result.
    """

    def __call__(self, batch: dict, generator: torch.Generator) -> dict: ...


_BATCH_TRANSFORMS: dict[str, Callable[..., BatchTransform]] = {}


def register_batch_transform(name: str) -> Callable[[Callable[..., BatchTransform]], Callable[..., BatchTransform]]:
    """Class/factory decorator: ``build_batch_transform(name, **kwargs)`` will call ``factory(**kwargs)``.
    Registered factories should build picklable objects (DataLoader workers receive a pickled collate)."""
    if not isinstance(name, str) or not name:
        raise ViewError(f"a batch transform name must be a non-empty string, got {name!r}")

    def register(factory: Callable[..., BatchTransform]) -> Callable[..., BatchTransform]:
        if name in _BATCH_TRANSFORMS and _BATCH_TRANSFORMS[name] is not factory:
            raise ViewError(f"batch transform {name!r} is already registered ({_BATCH_TRANSFORMS[name]!r})")
        _BATCH_TRANSFORMS[name] = factory
        return factory

    return register


def batch_transform_names() -> list[str]:
    """The registered batch transform names, sorted."""
    return sorted(_BATCH_TRANSFORMS)


def build_batch_transform(name: str, **kwargs: Any) -> BatchTransform:
    """The batch transform registered as ``name``, built with ``kwargs``; a clear :class:`ViewError` for an unknown
    name or a bad argument."""
    if name not in _BATCH_TRANSFORMS:
        raise ViewError(f"unknown batch transform {name!r}; valid: {', '.join(batch_transform_names()) or 'none'}")
    try:
        return _BATCH_TRANSFORMS[name](**kwargs)
    except TypeError as err:
        raise ViewError(f"batch transform {name!r}: {err}") from None


@register_batch_transform("shuffle_backgrounds")
@dataclass
class ShuffleBackgrounds:
    """Background swap: in each listed view, with probability ``p`` per image, every pixel outside the image's
    valid regions is replaced by the pixel at the same place in another image of the batch (same view, same
    crop), so the regions are seen on a foreign background — the "disturbed" context of DESIGN.md's disturbed
    O-KNN, used as an augmentation (the context-decoupling idea of D3SSL, METHODS.md §5.2).

    ``regions``: ``"proposals"``, ``"boxes"`` or ``"auto"`` (proposals when the batch has them, else boxes).
    ``views``: the view names to change (empty = every view).  Decisions: the other image is ``(b + s) mod B``
    with one random shift ``s`` in ``[1, B)`` per view (a derangement, never the image itself; the same for all
    crops of the view); its own objects come along (the background is a whole other image, as DESIGN.md's
    de-positioning background); a batch of one image, or a view with no regions, is left unchanged; regions
    and ids are unchanged, and images with no valid region are entirely replaced (when drawn).
    """

    views: tuple[str, ...] = ()
    p: float = 1.0
    regions: str = "auto"

    def __post_init__(self) -> None:
        _check_probability(self.p, "shuffle_backgrounds")
        if self.regions not in ("auto", "proposals", "boxes"):
            raise ViewError(f"shuffle_backgrounds: regions must be auto, proposals or boxes, got {self.regions!r}")
        self.views = tuple(self.views)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        key = self.regions
        if key == "auto":
            key = "proposals" if "proposals" in batch else "boxes"
        if key not in batch:
            raise SampleError(f"shuffle_backgrounds: the batch has no {key!r} (keys: {sorted(batch)})")
        valid_key = "proposal_valid" if key == "proposals" else "box_valid"
        n_images = int(batch["index"].shape[0])
        names = self.views or tuple(batch["views"])
        missing = [n for n in names if n not in batch["views"]]
        if missing:
            raise SampleError(
                f"shuffle_backgrounds: no view {missing[0]!r} in the batch (views: {sorted(batch['views'])})"
            )
        out = dict(batch)
        out["views"] = dict(batch["views"])
        if n_images < 2:
            return out
        for name in names:
            x = batch["views"][name]
            shift = int(torch.randint(1, n_images, (1,), generator=generator))
            apply = torch.rand(n_images, generator=generator) < self.p
            rows = torch.arange(x.shape[0])
            partner = rows - rows % n_images + (rows % n_images + shift) % n_images
            keep = boxes_to_mask(batch[key][name], x.shape[-2:], batch[valid_key][name])
            keep |= ~apply.repeat(x.shape[0] // n_images).to(keep.device)[:, None, None]
            out["views"][name] = torch.where(keep[:, None], x, x[partner.to(x.device)])
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
