"""Regions (ground-truth boxes and unsupervised proposals) inside one view, and the batch-level transform stage.

Everything here works in **one view's pixel coordinates** (continuous xyxy: pixel ``i`` covers ``[i, i + 1)``, as
in :mod:`semssl.data.views`), so it depends on no geometry between views: :mod:`semssl.data.views` maps boxes
into each view and then calls these pieces.

* box helpers: :func:`clip_boxes`, :func:`box_area`, :func:`boxes_to_mask`, :data:`MIN_VALID_BOX_AREA`;
* SoCo's proposal sampling (docs/methods/soco.md §Box sampling): the :class:`RegionSampling`
  settings that :class:`semssl.data.views.MultiViewTransform` applies, and :func:`select_regions`;
* box-aware augmentations, pure functions on tensors: :func:`box_cutout` (SoCo's ``RandomCutoutInBbox``,
  docs/methods/soco.md §Box cutout) and :func:`box_jitter` (SoCo's FPN jitter, docs/methods/soco.md §Box jitter;
  D3SSL's RBJ with ``grow=False``, docs/methods/d3ssl.md §RBJ);
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
    """SoCo's proposal sampling (docs/methods/soco.md §Box sampling), applied by
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
    * **Fallbacks** (SoCo, docs/methods/soco.md §Proposal filters): an image with no proposal at all gets the
      whole source image as its single proposal (id 0).  Decision: when proposals exist but none is visible in
      both views after all draws, the whole source image is appended as one more proposal (id = number of
      proposals), rather than SoCo's "whole view" box per view, so the fallback covers the same pixels in every
      view.

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
    random from the chosen ones (docs/methods/soco.md §Box sampling).  Returns int64 ``[k]`` (or fewer without
    ``pad``), empty when there is no candidate."""
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
    """SoCo's ``RandomCutoutInBbox`` (docs/methods/soco.md §Box cutout): for each valid box, with probability
    ``p``, a square of area ``U(area) x box area`` centred at a uniform random point inside the box is set to
    ``fill`` (clipped to the image).  Returns a new image; ``image`` ``[C, H, W]`` is not modified.

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

    SoCo's FPN jitter (docs/methods/soco.md §Box jitter, p 0.5, r 0.1) draws the same four numbers but offsets
    the top-left corner; decision: the centre is offset, so a jitter with no scale change is a pure shift.
    ``grow=False`` draws the scales from ``U(-r, 0)``, so the jittered box is never larger than the original in
    either side — D3SSL's RBJ (docs/methods/d3ssl.md §RBJ: "never larger than the original").  Four numbers plus
    one are drawn per box whether or not it is valid.  Returns new float boxes ``[P, 4]``; invalid boxes are
    unchanged.
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
    """An augmentation over a whole collated batch (the Batch dict of docs/design.md §Batch).

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
    crop), so the regions are seen on a foreign background — the "disturbed" context of the disturbed
    O-KNN of docs/design.md §O-KNN, used as an augmentation (the context-decoupling idea of D3SSL,
    docs/methods/d3ssl.md §De-coupling).

    ``regions``: ``"proposals"``, ``"boxes"`` or ``"auto"`` (proposals when the batch has them, else boxes).
    ``views``: the view names to change (empty = every view).  Decisions: the other image is ``(b + s) mod B``
    with one random shift ``s`` in ``[1, B)`` per view (a derangement, never the image itself; the same for all
    crops of the view); its own objects come along (the background is a whole other image, as the
    de-positioning background of docs/design.md §D3SSL); a batch of one image, or a view with no regions, is
    left unchanged; regions and ids are unchanged, and images with no valid region are entirely replaced (when
    drawn).
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


# ================================================================================================================
# D3SSL's region augmentations (docs/methods/d3ssl.md §Region augmentations, §Successor code;
# docs/design.md §D3SSL): PRC, PRM, the de-positioning composite, and their batch transforms. Pure functions on
# one image ``[C, H, W]`` and its boxes ``[P, 4]`` (view pixels, continuous xyxy) with an explicit ``generator``;
# a pixel belongs to a box or rectangle when its centre does (:func:`boxes_to_mask`). RBJ is :func:`box_jitter`
# with ``grow=False`` (ViewSpec ``box_jitter_grow: false``).
# ================================================================================================================
__all__ += [
    "prc_mask",
    "prm_mask",
    "proposal_cutout",
    "proposal_mask",
    "depositioning_offset",
    "composite",
    "region_fill",
    "ProposalCutout",
    "ProposalMask",
    "Depositioning",
]


def _rect_mask(x1: float, y1: float, x2: float, y2: float, height: int, width: int) -> torch.Tensor:
    """Bool ``[H, W]``: pixels whose centre lies in ``[x1, x2) x [y1, y2)``."""
    cx = torch.arange(width, dtype=torch.float64) + 0.5
    cy = torch.arange(height, dtype=torch.float64) + 0.5
    return ((cy >= y1) & (cy < y2))[:, None] & ((cx >= x1) & (cx < x2))[None, :]


def _check_pair(value: Sequence[float], what: str, lo: float, hi: float | None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ViewError(f"{what} must be a pair (min, max), got {value!r}") from None
    if not (lo < a <= b) or (hi is not None and b > hi):
        top = f" <= {hi}" if hi is not None else ""
        raise ViewError(f"{what} must satisfy {lo} < min <= max{top}, got {value!r}")
    return a, b


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixels ``[a, b)`` whose centre lies in ``[lo, hi)``, within ``[0, size)``."""
    a = min(max(math.ceil(lo - 0.5), 0), size)
    b = min(max(math.ceil(hi - 0.5), a), size)
    return a, b


def prc_mask(
    boxes: torch.Tensor,
    view_size: int | Sequence[int],
    valid: torch.Tensor | None = None,
    *,
    area: tuple[float, float] = (0.2, 0.5),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """PRC, proposal-based random cutout (D3SSL §4.1; docs/methods/d3ssl.md §PRC, §Successor code): the cut-out
    pixels ``[H, W]`` (bool) for the valid ``boxes`` ``[P, 4]``, and a trace for inspection.

    Boxes are processed **from large to small** (pixel area, ties by index).  A box covers the ``w x h`` pixels
    whose centres it contains.  For box ``i`` with its ratio ``r_i ~ U(area)``: ``r_cur`` = fraction of its
    pixels already cut by larger boxes' cut-outs; if ``r_cur > r_i`` (the box is over-cut: the threshold is its
    own ratio, as in the authors' later ``RCC``, docs/methods/d3ssl.md §Successor code) its pixels are
    **restored** and ``r_cur = 0``; then a rectangle with the **box's aspect ratio** and at most
    ``(r_i - r_cur) w h`` pixels — sides ``floor(sqrt(r_i - r_cur) * (w, h))`` — is cut at a uniform random pixel
    position inside the box.

    Bound: right after its own turn a box has at most ``r_i <= area[1]`` of its pixels cut (exactly, in
    pixels); a smaller box processed later can add cut pixels inside a larger one only within its own cut
    rectangle, and restores its own pixels when over-cut.

    Decisions: ``area`` = the paper's [0.2, 0.5] per box (RCC draws one ratio per image); cut-outs snap to the
    pixel grid (floor of the sides, so the bound holds exactly and the aspect within one pixel).  Three numbers
    are drawn per box (ratio, x, y) in index order whether or not the box is valid, so the stream does not
    depend on validity.

    Trace: ``order`` (box indices processed), ``ratios`` ``[P]``, ``restored`` (indices restored),
    ``fraction_after`` ``{index: cut fraction of its pixels right after its turn}``, ``rects`` ``{index: (x1,
    y1, x2, y2) of its cut-out in pixels}``, ``box_pixels`` ``{index: (w, h)}``.
    """
    vh, vw = view_hw(view_size)
    height, width = int(vh), int(vw)
    valid = _default_valid(boxes, valid)
    lo, hi = _check_pair(area, "prc: area", 0.0, 1.0)
    n = boxes.shape[0]
    draws = torch.rand((n, 3), generator=generator, dtype=torch.float64)
    ratios = lo + (hi - lo) * draws[:, 0]
    b = boxes.detach().to("cpu", torch.float64)
    spans = {}
    for i in range(n):
        if bool(valid[i]):
            x1, y1, x2, y2 = b[i].tolist()
            (c0, c1), (r0, r1) = _pixel_span(x1, x2, width), _pixel_span(y1, y2, height)
            if c1 > c0 and r1 > r0:
                spans[i] = (c0, r0, c1, r1)
    order = sorted(spans, key=lambda i: (-(spans[i][2] - spans[i][0]) * (spans[i][3] - spans[i][1]), i))
    cut = torch.zeros((height, width), dtype=torch.bool)
    trace: dict[str, Any] = {"order": order, "ratios": ratios, "restored": [], "fraction_after": {}, "rects": {},
                             "box_pixels": {}}
    for i in order:
        c0, r0, c1, r1 = spans[i]
        w, h = c1 - c0, r1 - r0
        trace["box_pixels"][i] = (w, h)
        r_i = float(ratios[i])
        r_cur = int(cut[r0:r1, c0:c1].sum()) / (w * h)
        if r_cur > r_i:
            cut[r0:r1, c0:c1] = False
            r_cur = 0.0
            trace["restored"].append(i)
        s = math.sqrt(max(r_i - r_cur, 0.0))
        cw, ch = math.floor(s * w + 1e-9), math.floor(s * h + 1e-9)
        if cw > 0 and ch > 0:
            left = c0 + min(int(float(draws[i, 1]) * (w - cw + 1)), w - cw)
            top = r0 + min(int(float(draws[i, 2]) * (h - ch + 1)), h - ch)
            cut[top : top + ch, left : left + cw] = True
            trace["rects"][i] = (left, top, left + cw, top + ch)
        trace["fraction_after"][i] = int(cut[r0:r1, c0:c1].sum()) / (w * h)
    return cut.to(boxes.device), trace


_PRM_SIDES = ("left", "right", "top", "bottom")


def prm_mask(
    boxes: torch.Tensor,
    view_size: int | Sequence[int],
    valid: torch.Tensor | None = None,
    *,
    scale: tuple[float, float] = (0.2, 0.6),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """PRM, proposal-based random mask (D3SSL §4.1; docs/methods/d3ssl.md §PRM; docs/design.md §D3SSL): the
    pixels ``[H, W]`` (bool) that stay **visible** — every valid box, plus for each box a few rectangles of its
    surroundings on random sides; the caller masks every other pixel.  Returns ``(visible, trace)``.

    The exact geometry (the paper gives only the ranges; decision, documented here):

    * **sides**: each of left, right, top, bottom is chosen independently with probability 1/2; when none is,
      one side is chosen uniformly — so a box gets 1-4 directions of context (2.06 on average);
    * **rectangle** per chosen side: area ``s * w h`` with ``s ~ U(scale)`` ([0.2, 0.6]) and aspect
      ``a = width / height ~ log-U(aspect)`` ([3/4, 4/3]): sides ``(sqrt(s w h a), sqrt(s w h / a))``;
    * **placement**: adjacent to the chosen side, outside the box — left: ``[x1 - rw, x1]``, right:
      ``[x2, x2 + rw]`` in x, and in y centred at a uniform point of ``[y1, y2]`` (top/bottom likewise with the
      axes swapped) — then clipped to the view.

    So the context around each proposal is a random, partial, direction-dependent part of its surroundings,
    while the rest of the image (including other objects outside every box and rectangle) is hidden.  Drawn per
    box in index order whether or not it is valid: 4 side flags, 1 fallback side, and (s, a, centre) for each of
    the 4 sides.  Trace: ``sides`` ``{index: [side names]}``, ``rects`` ``{index: [(x1, y1, x2, y2), ...]}``
    (before clipping to the view).
    """
    vh, vw = view_hw(view_size)
    height, width = int(vh), int(vw)
    valid = _default_valid(boxes, valid)
    s_lo, s_hi = _check_pair(scale, "prm: scale", 0.0, None)
    a_lo, a_hi = _check_pair(aspect, "prm: aspect", 0.0, None)
    n = boxes.shape[0]
    draws = torch.rand((n, 17), generator=generator, dtype=torch.float64)
    b = boxes.detach().to("cpu", torch.float64)
    visible = boxes_to_mask(b, (height, width), valid.cpu())
    trace: dict[str, Any] = {"sides": {}, "rects": {}}
    for i in range(n):
        if not bool(valid[i]):
            continue
        x1, y1, x2, y2 = b[i].tolist()
        w, h = x2 - x1, y2 - y1
        chosen = [k for k in range(4) if float(draws[i, k]) < 0.5]
        if not chosen:
            chosen = [min(int(float(draws[i, 4]) * 4), 3)]
        rects = []
        for k in chosen:
            s = s_lo + (s_hi - s_lo) * float(draws[i, 5 + 3 * k])
            a = math.exp(math.log(a_lo) + (math.log(a_hi) - math.log(a_lo)) * float(draws[i, 6 + 3 * k]))
            u = float(draws[i, 7 + 3 * k])
            rw, rh = math.sqrt(s * w * h * a), math.sqrt(s * w * h / a)
            if _PRM_SIDES[k] in ("left", "right"):
                cy = y1 + u * h
                rx1 = x1 - rw if _PRM_SIDES[k] == "left" else x2
                rect = (rx1, cy - rh / 2, rx1 + rw, cy + rh / 2)
            else:
                cx = x1 + u * w
                ry1 = y1 - rh if _PRM_SIDES[k] == "top" else y2
                rect = (cx - rw / 2, ry1, cx + rw / 2, ry1 + rh)
            rects.append(rect)
            visible |= _rect_mask(*rect, height, width)  # pixel centres outside the view are simply not there
        trace["sides"][i] = [_PRM_SIDES[k] for k in chosen]
        trace["rects"][i] = rects
    return visible.to(boxes.device), trace


def region_fill(image: torch.Tensor, fill: float | Sequence[float] | None = None) -> torch.Tensor:
    """The colour ``[C, 1, 1]`` that hides pixels: ``fill`` if given, else 0 for a float (normalised) view — the
    mean colour, as SoCo's cutout — and the ImageNet mean in 0..255 for a uint8 view (the same colour)."""
    if fill is None:
        if image.dtype == torch.uint8:
            from semssl.data.augment import IMAGENET_MEAN

            fill = tuple(round(255 * m) for m in IMAGENET_MEAN)
        else:
            fill = 0.0
    return torch.as_tensor(fill, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)


def proposal_cutout(
    image: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    area: tuple[float, float] = (0.2, 0.5),
    fill: float | Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRC on an image ``[C, H, W]``: the cut pixels of :func:`prc_mask` set to :func:`region_fill`.  Returns
    ``(new image, cut mask [H, W])``; ``image`` is not modified."""
    if image.ndim != 3:
        raise ViewError(f"proposal_cutout expects an image [C, H, W], got shape {tuple(image.shape)}")
    cut, _ = prc_mask(boxes, image.shape[-2:], valid, area=area, generator=generator)
    return torch.where(cut.to(image.device), region_fill(image, fill), image), cut


def proposal_mask(
    image: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    scale: tuple[float, float] = (0.2, 0.6),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
    fill: float | Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRM on an image ``[C, H, W]``: every pixel outside the visible region of :func:`prm_mask` set to
    :func:`region_fill`.  Returns ``(new image, visible mask [H, W])``; an image without a valid box is
    returned unchanged (nothing to give context to)."""
    if image.ndim != 3:
        raise ViewError(f"proposal_mask expects an image [C, H, W], got shape {tuple(image.shape)}")
    visible, _ = prm_mask(boxes, image.shape[-2:], valid, scale=scale, aspect=aspect, generator=generator)
    if not bool(_default_valid(boxes, valid).any()):
        return image.clone(), torch.ones_like(visible)
    return torch.where(visible.to(image.device), image, region_fill(image, fill)), visible


def depositioning_offset(
    boxes: torch.Tensor,
    view_size: int | Sequence[int],
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """D3SSL's common shift ``t`` (Eq. 8, ``b^_i = b_i + t``): integer ``(tx, ty)`` uniform over the shifts that keep
    every valid box inside the view (``-min x1 <= tx <= W - max x2``, rounded inwards); ``(0, 0)`` without a
    valid box.  Integer, so shifted pixels are copied exactly.  Two numbers are drawn either way."""
    vh, vw = view_hw(view_size)
    valid = _default_valid(boxes, valid)
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    if not bool(valid.any()):
        return 0, 0
    b = boxes.detach().to("cpu", torch.float64)[valid.cpu()]
    lo_x, hi_x = math.ceil(-float(b[:, 0].min()) - 1e-9), math.floor(vw - float(b[:, 2].max()) + 1e-9)
    lo_y, hi_y = math.ceil(-float(b[:, 1].min()) - 1e-9), math.floor(vh - float(b[:, 3].max()) + 1e-9)
    tx = lo_x + min(int(float(u[0]) * (hi_x - lo_x + 1)), hi_x - lo_x) if hi_x >= lo_x else 0
    ty = lo_y + min(int(float(u[1]) * (hi_y - lo_y + 1)), hi_y - lo_y) if hi_y >= lo_y else 0
    return tx, ty


def composite(
    foreground: torch.Tensor,
    boxes: torch.Tensor,
    background: torch.Tensor,
    offset: tuple[int, int],
    valid: torch.Tensor | None = None,
    *,
    cut: bool = True,
    area: tuple[float, float] = (0.2, 0.5),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D3SSL's de-positioning composite ``x3 = C(x2, m, x_b, m^)`` (Eqs. 6-8): the pixels of ``foreground``
    ``[C, H, W]`` under the union ``m`` of the valid ``boxes`` are pasted onto ``background`` (same shape) shifted
    by the integer ``offset = (tx, ty)``; the pasted mask ``m^`` (union of the shifted boxes) is first **cut again
    with PRC** (Eq. 7, ``cut=True``, ratios ``U(area)``), so the cut-out parts of each shifted box show the
    background.  Returns ``(x3, shifted boxes [P, 4], pasted mask m^ [H, W])``; invalid boxes are shifted too
    (their validity does not change: shifted valid boxes stay inside the view)."""
    if foreground.shape != background.shape or foreground.ndim != 3:
        raise ViewError(f"composite: foreground {tuple(foreground.shape)} and background {tuple(background.shape)} "
                        "must be images [C, H, W] of the same shape")
    valid = _default_valid(boxes, valid)
    tx, ty = int(offset[0]), int(offset[1])
    shifted = boxes.to(torch.float32) + torch.tensor([tx, ty, tx, ty], dtype=torch.float32, device=boxes.device)
    height, width = foreground.shape[-2:]
    pasted = boxes_to_mask(shifted, (height, width), valid)
    if cut:
        cut_mask, _ = prc_mask(shifted, (height, width), valid, area=area, generator=generator)
        pasted &= ~cut_mask.to(pasted.device)
    moved = torch.roll(foreground, shifts=(ty, tx), dims=(-2, -1))  # pixels under m^ come from inside m
    return torch.where(pasted.to(foreground.device), moved, background), shifted, pasted


def _region_keys(batch: dict, regions: str, who: str) -> tuple[str, str, str]:
    key = regions
    if key == "auto":
        key = "proposals" if "proposals" in batch else "boxes"
    if key not in batch:
        raise SampleError(f"{who}: the batch has no {key!r} (keys: {sorted(batch)})")
    return (key, "proposal_ids", "proposal_valid") if key == "proposals" else (key, "box_ids", "box_valid")


def _check_views(batch: dict, names: Sequence[str], who: str) -> None:
    missing = [n for n in names if n not in batch["views"]]
    if missing:
        raise SampleError(f"{who}: no view {missing[0]!r} in the batch (views: {sorted(batch['views'])})")


@register_batch_transform("prc")
@dataclass
class ProposalCutout:
    """Batch transform ``prc``: :func:`proposal_cutout` on every image (row) of each listed view, with
    probability ``p`` per row, from its valid proposals (``regions``: proposals / boxes / auto).  D3SSL's
    de-coupling views: ``{name: prc, views: [x1, x2s]}`` then ``{name: prm, views: [x1, x2s]}`` gives
    ``x^ = PRM o PRC(x)`` (Eq. 2; the two commute: PRC changes pixels inside boxes only, PRM outside).
    ``fill``: None = the mean colour (:func:`region_fill`)."""

    views: tuple[str, ...] = ("x1", "x2s")
    area: tuple[float, float] = (0.2, 0.5)
    p: float = 1.0
    fill: float | None = None
    regions: str = "auto"

    def __post_init__(self) -> None:
        _check_probability(self.p, "prc")
        self.area = _check_pair(self.area, "prc: area", 0.0, 1.0)
        self.views = tuple(self.views)
        if self.regions not in ("auto", "proposals", "boxes"):
            raise ViewError(f"prc: regions must be auto, proposals or boxes, got {self.regions!r}")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        return _per_row(batch, self.views, self.regions, self.p, "prc", generator,
                        lambda x, boxes, valid: proposal_cutout(x, boxes, valid, area=self.area, fill=self.fill,
                                                                generator=generator)[0])


@register_batch_transform("prm")
@dataclass
class ProposalMask:
    """Batch transform ``prm``: :func:`proposal_mask` on every image (row) of each listed view, with probability
    ``p`` per row (see :class:`ProposalCutout`)."""

    views: tuple[str, ...] = ("x1", "x2s")
    scale: tuple[float, float] = (0.2, 0.6)
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    p: float = 1.0
    fill: float | None = None
    regions: str = "auto"

    def __post_init__(self) -> None:
        _check_probability(self.p, "prm")
        self.scale = _check_pair(self.scale, "prm: scale", 0.0, None)
        self.aspect = _check_pair(self.aspect, "prm: aspect", 0.0, None)
        self.views = tuple(self.views)
        if self.regions not in ("auto", "proposals", "boxes"):
            raise ViewError(f"prm: regions must be auto, proposals or boxes, got {self.regions!r}")

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        return _per_row(batch, self.views, self.regions, self.p, "prm", generator,
                        lambda x, boxes, valid: proposal_mask(x, boxes, valid, scale=self.scale, aspect=self.aspect,
                                                              fill=self.fill, generator=generator)[0])


def _per_row(batch: dict, views: tuple[str, ...], regions: str, p: float, what: str, generator: torch.Generator,
             fn: Any) -> dict:
    """Apply ``fn(image, boxes, valid) -> image`` to every image (row) of each listed view with probability
    ``p`` per row, on the regions ``regions`` names; the rest of the batch is shared, not copied. The
    transform is still computed for a row that is not kept, so the random stream does not depend on ``p``."""
    key, _, valid_key = _region_keys(batch, regions, what)
    _check_views(batch, views, what)
    out = dict(batch)
    out["views"] = dict(batch["views"])
    for name in views:
        x = batch["views"][name]
        apply = torch.rand(x.shape[0], generator=generator) < p
        rows = [fn(x[r], batch[key][name][r], batch[valid_key][name][r]) for r in range(x.shape[0])]
        out["views"][name] = torch.stack([rows[r] if bool(apply[r]) else x[r] for r in range(x.shape[0])])
    return out


@register_batch_transform("depositioning")
@dataclass
class Depositioning:
    """Batch transform ``depositioning``: D3SSL's de-positioning view as a new view (Eqs. 6-8,
    docs/methods/d3ssl.md §De-positioning).

    For every row ``r`` of view ``source`` (``x2``): a common integer shift ``t`` of all its valid proposals
    (:func:`depositioning_offset`), the foreground (union of its proposals) pasted at the shifted place onto the
    ``source`` view of another image of the batch, the pasted mask cut again with PRC (``cut``, ratios
    ``U(area)``), by :func:`composite`.  Output: view ``out`` (``x3``) with ``proposals[out]`` = the shifted boxes,
    the same ``proposal_ids`` and ``proposal_valid`` as ``source``, and ``geometry[out]`` = the crop of ``source``
    translated by ``-t`` (exact for the pasted pixels, not for the background).

    Decisions: the background image (unspecified in the paper) is **another image of the batch**
    (docs/design.md §D3SSL), in its ``source`` view, un-augmented: row ``r`` takes row ``(b + s_b) mod B`` of the
    same crop with ``s_b ~ U{1..B-1}`` drawn per image (never itself; a batch of one image is its own background).
    Ground-truth ``boxes`` present in the batch are shifted too but marked invalid in ``out`` (only proposals' pixels
    are pasted) and their masks are empty.  Run it before any transform that changes ``source``.
    """

    source: str = "x2"
    out: str = "x3"
    cut: bool = True
    area: tuple[float, float] = (0.2, 0.5)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not isinstance(self.out, str) or self.source == self.out:
            raise ViewError(f"depositioning: source and out must be two different view names, got "
                            f"{self.source!r}, {self.out!r}")
        if not isinstance(self.cut, bool):
            raise ViewError(f"depositioning: cut must be true or false, got {self.cut!r}")
        self.area = _check_pair(self.area, "depositioning: area", 0.0, 1.0)

    def __call__(self, batch: dict, generator: torch.Generator) -> dict:
        who = "depositioning"
        if "proposals" not in batch:
            raise SampleError(f"{who}: the batch has no 'proposals' (keys: {sorted(batch)}); set data.proposals")
        _check_views(batch, [self.source], who)
        if self.out in batch["views"]:
            raise SampleError(f"{who}: the batch already has a view {self.out!r}")
        x = batch["views"][self.source]
        boxes, valid = batch["proposals"][self.source], batch["proposal_valid"][self.source]
        n_images = int(batch["index"].shape[0])
        rows_total = x.shape[0]
        vh, vw = x.shape[-2:]
        shifts = torch.randint(1, max(n_images, 2), (n_images,), generator=generator)
        images, shifted, offsets = [], [], []
        for r in range(rows_total):
            b = r % n_images
            partner = r - b + ((b + int(shifts[b])) % n_images if n_images > 1 else b)
            t = depositioning_offset(boxes[r], x.shape[-2:], valid[r], generator=generator)
            image, moved, _ = composite(x[r], boxes[r], x[partner], t, valid[r], cut=self.cut, area=self.area,
                                        generator=generator)
            images.append(image)
            shifted.append(moved)
            offsets.append(t)
        t_all = torch.tensor(offsets, dtype=torch.float32)  # [R, 2]
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
        out["views"][self.out] = torch.stack(images)
        out["proposals"][self.out] = torch.stack(shifted).to(boxes.dtype)
        out["proposal_ids"][self.out] = batch["proposal_ids"][self.source].clone()
        out["proposal_valid"][self.out] = valid.clone()
        if "geometry" in batch and self.source in batch["geometry"]:
            g = batch["geometry"][self.source].clone()
            sx, sy = (g[:, 2] - g[:, 0]) / vw, (g[:, 3] - g[:, 1]) / vh
            dx = torch.where(g[:, 4] > 0.5, t_all[:, 0] * sx, -t_all[:, 0] * sx)
            g[:, 0] += dx
            g[:, 2] += dx
            g[:, 1] -= t_all[:, 1] * sy
            g[:, 3] -= t_all[:, 1] * sy
            out["geometry"][self.out] = g
        if "boxes" in batch and self.source in batch["boxes"]:
            gt = batch["boxes"][self.source]
            move = torch.cat([t_all, t_all], dim=1)[:, None, :].to(gt.dtype)
            out["boxes"][self.out] = clip_boxes(gt + move, (float(vh), float(vw)))
            out["box_ids"][self.out] = batch["box_ids"][self.source].clone()
            out["box_valid"][self.out] = torch.zeros_like(batch["box_valid"][self.source])
            if "masks" in batch and self.source in batch["masks"]:
                out["masks"][self.out] = torch.zeros_like(batch["masks"][self.source])
        return out
