"""Drawing one image of the built-in dataset: posed instances, painting, backgrounds and noise, and the
object-split and scene renderers (:func:`render_object_sample`, :func:`render_object_image`,
:func:`render_scene`) with their :class:`ObjectSample` / :class:`SceneSample` results."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from semssl.data.synthetic import DEFAULT_NUM_CLASSES
from semssl.data.synthetic.classes import CLASS_NAMES, class_names, class_spec
from semssl.data.synthetic.shapes import (
    _HULL,
    _SHAPES,
    _UNIT_AREA,
    TEXTURES,
    _cv_colour,
    _distinct_colour,
    _random_colours,
    _texture_params,
    _texture_weight,
    _unit_area,
)
from semssl.errors import SynthConfigError, SyntheticDataError

__all__ = ["STYLE_SPECS", "ObjectSample", "SceneSample", "StyleSpec", "render_object_image", "render_object_sample",
           "render_scene", "style_spec"]


@dataclass(frozen=True)
class StyleSpec:
    """How the pictures of one ``SynthConfig.style`` are drawn.

    ``main_area_range`` is the accepted range of the object split's main-object mask area (fraction of the
    image); ``main_area_target`` the sampled target, inside it so anti-aliasing cannot push the area out.
    """

    background: str  # "flat" (one colour + noise), "gradient" (gradient + blotches) or "clutter" (+ lines, blobs, ...)
    textured: bool  # False: every object is one solid (shaded) colour
    distractors: bool  # object split: 0-2 small objects / clutter polygons behind the main object
    main_area_range: tuple[float, float]
    main_area_target: tuple[float, float]


#: Decision (docs/results.md section 4b): ``plain`` is the default since version 3. In ``cluttered`` pictures
#: the textures and the background are per-instance cues that survive crops and colour jitter, so contrastive
#: learning spends its first few hundred steps telling instances apart by them rather than by shape; ``plain``
#: objects are mid-sized (6-35 % of the image, sampled around 10-25 %) so that their position varies enough
#: that raw pixels stay near chance while the shape stays legible at 32 px.
STYLE_SPECS: dict[str, StyleSpec] = {
    "plain": StyleSpec("flat", textured=False, distractors=False, main_area_range=(0.06, 0.35),
                       main_area_target=(0.10, 0.25)),
    "cluttered": StyleSpec("clutter", textured=True, distractors=True, main_area_range=(0.15, 0.60),
                           main_area_target=(0.20, 0.50)),
}
MAIN_AREA_RANGE = STYLE_SPECS["cluttered"].main_area_range  # version 2's range (kept for its tests and docs)


def style_spec(style: str) -> StyleSpec:
    """The :class:`StyleSpec` of ``style``; an unknown name is a :class:`SynthConfigError` listing the known ones."""
    try:
        return STYLE_SPECS[style]
    except KeyError:
        raise SynthConfigError(f"style {style!r} is not one of {sorted(STYLE_SPECS)}") from None


_DISTRACTOR_AREA = (0.015, 0.05)
DISTRACTOR_MAX_RATIO = 0.30  # a distractor's area is at most this fraction of the main object's area
# Scene geometry.
_SCENE_OBJECTS = (2, 6)
_SCENE_AREA = (0.025, 0.10)
_SCENE_OVERLAP_P = 0.5  # probability that a new object is placed next to (and overlapping) an earlier one
_SCENE_MIN_VISIBLE_SHARE = 0.45  # a placement may hide at most 55 % of any earlier object
SCENE_MIN_VISIBLE_FRAC = 0.004  # objects whose visible area is below this fraction of the image are dropped


# --------------------------------------------------------------------------------------------------------------
# Instances: pose, rasterisation, placement
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pose:
    """Placement of a shape: pixel = centre + R(angle) · diag(sx, sy) · local."""

    cx: float
    cy: float
    scale: float
    aspect: float
    angle: float

    def matrix(self) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        sx, sy = self.scale * math.sqrt(self.aspect), self.scale / math.sqrt(self.aspect)
        return np.array([[c * sx, -s * sy], [s * sx, c * sy]])


@dataclass
class _Instance:
    """One drawn thing: its polygons (shape-local), pose, texture and anti-aliased coverage (uint8, 0-255)."""

    cls: int | None  # None = abstract clutter
    ops: tuple[tuple[np.ndarray, bool], ...]
    texture: str
    pose: _Pose
    coverage: np.ndarray
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive, contains every covered pixel
    mask: np.ndarray = field(init=False)  # binary mask: pixels at least half covered

    def __post_init__(self) -> None:
        self.mask = self.coverage >= 128


def _rasterize(ops: Sequence[tuple[np.ndarray, bool]], matrix: np.ndarray, centre: tuple[float, float],
               size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage (uint8 0-255) of the posed polygons on a ``size`` x ``size`` canvas.

    Also returns a box ``(y0, y1, x0, x1)`` (end-exclusive) that contains every covered pixel.
    """
    canvas = np.zeros((size, size), np.uint8)
    offset = np.asarray(centre)
    lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
    for pts, fill in ops:
        px = pts @ matrix.T + offset
        cv2.fillPoly(canvas, [np.round(px * 16).astype(np.int32)], 255 if fill else 0, cv2.LINE_AA, shift=4)
        if fill:
            lo, hi = np.minimum(lo, px.min(axis=0)), np.maximum(hi, px.max(axis=0))
    x0, y0 = (max(0, int(math.floor(c)) - 1) for c in lo)
    x1, y1 = (min(size, int(math.ceil(c)) + 2) for c in hi)
    return canvas, (y0, y1, x0, x1)


def _feasible(low: float, high: float) -> tuple[float, float]:
    """A (low, high) interval, collapsed to its midpoint when rounding made it empty."""
    return (float(low), float(high)) if high >= low else ((low + high) / 2.0,) * 2


def _sample_pose(rng: np.random.Generator, hull: np.ndarray, unit_area: float, area_px: float, size: int,
                 hint: tuple[float, float] | None = None) -> _Pose:
    """Random rotation and aspect, scale for ``area_px``, and a centre that keeps the shape inside the image.

    The scale shrinks if the posed shape would not fit; ``hint`` (if given) is the wanted centre, clipped to
    the feasible range.
    """
    angle = rng.uniform(0.0, 2 * math.pi)
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    scale = math.sqrt(area_px / unit_area)
    pts = hull @ _Pose(0, 0, scale, aspect, angle).matrix().T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    fit = min(1.0, (size - 2) / float((hi - lo).max()))
    scale, lo, hi = scale * fit, lo * fit, hi * fit
    x_range = _feasible(-lo[0] + 0.5, size - 1.5 - hi[0])
    y_range = _feasible(-lo[1] + 0.5, size - 1.5 - hi[1])
    cx, cy = rng.uniform(*x_range), rng.uniform(*y_range)
    if hint is not None:
        cx, cy = float(np.clip(hint[0], *x_range)), float(np.clip(hint[1], *y_range))
    return _Pose(cx, cy, scale, aspect, angle)


def _make_instance(rng: np.random.Generator, cls: int | None, area_px: float, size: int,
                   hint: tuple[float, float] | None = None, class_def: str = "shape",
                   textured: bool = True) -> _Instance:
    """A class object (``cls`` >= 0) or an abstract clutter polygon (``cls`` None) of about ``area_px``.

    With ``class_def`` ``shape`` the texture is drawn uniformly from :data:`TEXTURES` for every instance, or is
    ``solid`` when ``textured`` is False."""
    if cls is None:
        n = int(rng.integers(4, 8))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        ops: tuple[tuple[np.ndarray, bool], ...] = ((np.stack([r * np.cos(t), r * np.sin(t)], axis=1), True),)
        texture, unit_area = "solid", max(_unit_area(ops), 1e-3)
    else:
        shape, texture = class_spec(class_def, cls)
        if texture is None:
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))] if textured else "solid"
        ops, unit_area = _SHAPES[shape], _UNIT_AREA[shape]
    hull = _HULL[shape] if cls is not None else ops[0][0]
    pose = _sample_pose(rng, hull, unit_area, area_px, size, hint)
    coverage, box = _rasterize(ops, pose.matrix(), (pose.cx, pose.cy), size)
    return _Instance(cls, ops, texture, pose, coverage, box)


# --------------------------------------------------------------------------------------------------------------
# Painting, backgrounds and noise
# --------------------------------------------------------------------------------------------------------------
def _paint(canvas: np.ndarray, inst: _Instance, rng: np.random.Generator) -> None:
    """Alpha-blend a textured, shaded instance onto ``canvas`` (float32 HxWx3, RGB) in place."""
    y0, y1, x0, x1 = inst.box
    region = canvas[y0:y1, x0:x1]
    inside = inst.mask[y0:y1, x0:x1]
    under = region[inside].mean(axis=0) if inside.any() else region.reshape(-1, 3).mean(axis=0)
    base = _distinct_colour(rng, under, 60.0)
    pattern = _distinct_colour(rng, base, 90.0)
    params = _texture_params(rng, inst.texture)
    shade, shade_dir = rng.uniform(0.05, 0.2), rng.uniform(0.0, 2 * math.pi)

    (m00, m01), (m10, m11) = inst.pose.matrix()
    det = m00 * m11 - m01 * m10
    gx = (np.arange(x0, x1, dtype=np.float32) - np.float32(inst.pose.cx))[None, :]
    gy = (np.arange(y0, y1, dtype=np.float32) - np.float32(inst.pose.cy))[:, None]
    u = np.float32(m11 / det) * gx + np.float32(-m01 / det) * gy  # shape-local coordinates of each pixel
    v = np.float32(-m10 / det) * gx + np.float32(m00 / det) * gy
    weight = _texture_weight(inst.texture, u, v, params, pix=1.0 / inst.pose.scale)[..., None]
    shading = (1.0 + np.float32(shade) * (np.float32(math.cos(shade_dir)) * u
                                          + np.float32(math.sin(shade_dir)) * v))[..., None]
    colour = np.minimum((base + (pattern - base) * weight) * shading, 255.0)
    alpha = inst.coverage[y0:y1, x0:x1, None] * np.float32(1.0 / 255.0)
    region += (colour - region) * alpha


@functools.lru_cache(maxsize=8)
def _upsample_matrix(size: int, cells: int = 4) -> np.ndarray:
    """``(size, cells)`` matrix of OpenCV's bicubic 1-D upsampling, so a 2-D resize is two small products.

    Decision: cv2.resize of a 4x4 grid measured ~0.25 ms per call here (it rebuilds its tables every call).
    """
    eye = np.eye(cells, dtype=np.float32)
    return cv2.resize(eye, (cells, size), interpolation=cv2.INTER_CUBIC)


def _flat_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """One random colour (the ``plain`` style's background; :func:`_finish` adds the sensor noise)."""
    colour = _random_colours(rng, 1, sat=(0.05, 0.6), val=(0.2, 0.95))[0]
    return np.broadcast_to(colour.astype(np.float32), (size, size, 3)).copy()


def _style_background(rng: np.random.Generator, size: int, spec: StyleSpec) -> np.ndarray:
    if spec.background == "flat":
        return _flat_background(rng, size)
    if spec.background == "gradient":  # version 2's gradient without its clutter (benchmarks/synth_variants.py)
        return _gradient_background(rng, size).astype(np.float32)
    return _background(rng, size)


def _gradient_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient with smooth blotches (float32, clipped to 0-255): one 4x4 grid of colours upsampled
    bicubically (cheap, and smooth at every image size)."""
    ends = _random_colours(rng, 2, sat=(0.05, 0.6), val=(0.2, 0.95))
    psi = rng.uniform(0.0, 2 * math.pi)
    cells = np.linspace(0.0, 1.0, 4)
    g = math.cos(psi) * cells[None, :] + math.sin(psi) * cells[:, None]
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    grid = ends[0] + (ends[1] - ends[0]) * g[..., None] + rng.normal(0.0, rng.uniform(6.0, 20.0), (4, 4, 3))
    up = _upsample_matrix(size)
    rows = np.tensordot(up, grid.astype(np.float32), axes=(1, 0))  # (size, 4, 3): upsampled along y
    smooth = np.matmul(up, rows)  # (size, size, 3): then along x
    return np.clip(smooth, 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Class-independent clutter: colour gradient, smooth blotches, lines, translucent blobs, small polygons.

    Decision: clutter is kept thin (lines), translucent (blobs) or small (polygons of 4-9 % of the image side),
    so it is visible but objects stay the dominant structure. The gradient and the blotches are one 4x4 grid
    of colours upsampled bicubically (cheap, and smooth at every image size).
    """
    img8 = _gradient_background(rng, size).astype(np.uint8)

    thick = max(1, size // 64)
    n_lines, n_blobs, n_polys = int(rng.integers(1, 5)), int(rng.integers(0, 3)), int(rng.integers(0, 4))
    colours = _random_colours(rng, n_lines + n_blobs + n_polys, sat=(0.0, 1.0), val=(0.1, 1.0))
    for colour in colours[:n_lines]:
        (ax, ay), (bx, by) = np.round(rng.uniform(-0.1, 1.1, (2, 2)) * size * 16).astype(np.int64).tolist()
        cv2.line(img8, (ax, ay), (bx, by), _cv_colour(colour), thick * int(rng.integers(1, 3)), cv2.LINE_AA,
                 shift=4)
    for colour in colours[n_lines:n_lines + n_blobs]:
        overlay = img8.copy()
        centre = tuple(rng.integers(0, size, 2).tolist())
        axes = tuple(rng.integers(max(2, size // 25), max(3, size // 7), 2).tolist())
        cv2.ellipse(overlay, centre, axes, float(rng.uniform(0, 180)), 0, 360, _cv_colour(colour), -1, cv2.LINE_AA)
        alpha = float(rng.uniform(0.3, 0.6))
        img8 = cv2.addWeighted(overlay, alpha, img8, 1.0 - alpha, 0.0)
    for colour in colours[n_lines + n_blobs:]:
        n = int(rng.integers(3, 7))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.4, 1.0, n) * size * rng.uniform(0.04, 0.09)
        cx, cy = rng.uniform(0, size, 2)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
        cv2.fillPoly(img8, [np.round(pts * 16).astype(np.int32)], _cv_colour(colour), cv2.LINE_AA, shift=4)
    return img8.astype(np.float32)


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor noise to the whole image (objects included, so noise is no figure/ground cue); to uint8.

    Decision: uniform noise of standard deviation 2-6 levels; Gaussian samples cost 6x more here and look alike.
    """
    noise = rng.random(canvas.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(rng.uniform(2.0, 6.0) * math.sqrt(12.0))
    noise += canvas
    noise += np.float32(0.5)  # round to nearest on the truncating cast below
    return np.clip(noise, 0.0, 255.0, out=noise).astype(np.uint8)


def _check_class(cls: int, num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise SynthConfigError(f"num_classes = {num_classes!r}: must be in 2..{len(CLASS_NAMES)}")
    if not 0 <= cls < num_classes:
        raise SynthConfigError(f"cls = {cls!r}: must be in 0..{num_classes - 1} (num_classes = {num_classes})")


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ObjectSample:
    """An object-split image with its main object's mask and what was drawn besides it."""

    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW bool, the main object
    cls: int
    distractor_classes: list[int | None]  # None = abstract clutter polygon
    distractor_areas: list[int]  # full (unoccluded) mask areas in pixels


@dataclass
class SceneSample:
    """A scene with its semantic mask and visible instance masks in paint (z) order, bottom first."""

    image: np.ndarray  # HxWx3 uint8 RGB
    semantic: np.ndarray  # HxW uint8, 0 = background, k = class index + 1
    classes: list[int]
    masks: list[np.ndarray]  # HxW bool, visible pixels, pairwise disjoint


def render_object_sample(rng: np.random.Generator, size: int, cls: int,
                         num_classes: int = DEFAULT_NUM_CLASSES, class_def: str = "shape",
                         style: str = "plain") -> ObjectSample:
    """Draw one object-split image: the background, (``cluttered``) 0-2 small distractors, then the main object.

    The main object's mask covers the style's ``main_area_range`` of the image; each distractor covers at most
    :data:`DISTRACTOR_MAX_RATIO` of the main object's area and is painted behind it, so the main mask is whole.
    """
    _check_class(cls, num_classes)
    spec = style_spec(style)
    canvas = _style_background(rng, size, spec)
    area = float(size * size)
    lo, hi = spec.main_area_range
    for _ in range(100):
        main = _make_instance(rng, cls, rng.uniform(*spec.main_area_target) * area, size, class_def=class_def,
                              textured=spec.textured)
        main_frac = float(main.mask.sum()) / area
        if lo <= main_frac <= hi:
            break
    else:
        raise SyntheticDataError(f"could not place a {class_names(class_def)[cls]} of {lo:.0%}-{hi:.0%} area in a "
                                 f"{size} px image")

    classes: list[int | None] = []
    areas: list[int] = []
    max_frac = min(_DISTRACTOR_AREA[1], DISTRACTOR_MAX_RATIO * main_frac)
    for _ in range(int(rng.integers(0, 3)) if spec.distractors else 0):
        d_cls = int(rng.integers(num_classes)) if rng.random() < 0.5 else None
        target = rng.uniform(_DISTRACTOR_AREA[0], max_frac) * area
        # Decision: the least-hidden of three candidate placements, so distractors are usually visible.
        candidates = [_make_instance(rng, d_cls, target, size, class_def=class_def) for _ in range(3)]
        best = min(candidates, key=lambda c: int((c.mask & main.mask).sum()))
        if best.mask.sum() > DISTRACTOR_MAX_RATIO * main.mask.sum():
            continue  # anti-aliasing made it too big for a tiny main object: leave it out
        _paint(canvas, best, rng)
        classes.append(d_cls)
        areas.append(int(best.mask.sum()))
    _paint(canvas, main, rng)
    return ObjectSample(_finish(canvas, rng), main.mask, cls, classes, areas)


def render_object_image(rng: np.random.Generator, size: int, cls: int, num_classes: int = DEFAULT_NUM_CLASSES,
                        class_def: str = "shape", style: str = "plain") -> tuple[np.ndarray, np.ndarray]:
    """One object-split image (HxWx3 uint8 RGB) of class ``cls`` and its main object's mask (HxW bool)."""
    sample = render_object_sample(rng, size, cls, num_classes, class_def, style)
    return sample.image, sample.mask


def _visible(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when painted in order (later masks occlude earlier ones)."""
    if not masks:
        return []
    out: list[np.ndarray] = [masks[0]] * len(masks)
    covered = np.zeros_like(masks[0])
    for i in range(len(masks) - 1, -1, -1):
        out[i] = masks[i] & ~covered
        covered = covered | masks[i]
    return out


def _place_scene_objects(rng: np.random.Generator, size: int, num_classes: int,
                         class_def: str = "shape", textured: bool = True) -> list[_Instance]:
    """Place 2-6 objects; about half of them next to an earlier one so that they overlap.

    A placement is rejected if it would hide more than 55 % of an earlier object, so occlusion is partial.
    """
    area = float(size * size)
    wanted = int(rng.integers(_SCENE_OBJECTS[0], _SCENE_OBJECTS[1] + 1))
    placed: list[_Instance] = []
    for _ in range(20 * wanted):
        if len(placed) == wanted:
            break
        cls = int(rng.integers(num_classes))
        target = rng.uniform(*_SCENE_AREA) * area
        hint = None
        if placed and rng.random() < _SCENE_OVERLAP_P:
            other = placed[int(rng.integers(len(placed)))]
            reach = (math.sqrt(other.mask.sum() / math.pi) + math.sqrt(target / math.pi)) * rng.uniform(0.35, 0.8)
            theta = rng.uniform(0.0, 2 * math.pi)
            hint = (other.pose.cx + reach * math.cos(theta), other.pose.cy + reach * math.sin(theta))
        inst = _make_instance(rng, cls, target, size, hint, class_def, textured)
        masks = [p.mask for p in placed] + [inst.mask]
        vis = _visible(masks)
        if all(v.sum() >= _SCENE_MIN_VISIBLE_SHARE * m.sum() for v, m in zip(vis, masks)):
            placed.append(inst)
    if len(placed) < _SCENE_OBJECTS[0]:
        raise SyntheticDataError(f"could not place {_SCENE_OBJECTS[0]} objects in a {size} px scene")
    return placed


def render_scene(rng: np.random.Generator, size: int, num_classes: int = DEFAULT_NUM_CLASSES,
                 class_def: str = "shape", style: str = "plain") -> SceneSample:
    """Draw one scene: the style's background, then 2-6 objects in z order; masks are the visible pixels after
    occlusion.

    Objects whose visible area is below :data:`SCENE_MIN_VISIBLE_FRAC` of the image are dropped *before*
    painting, so every painted object is annotated and the image matches the masks exactly.
    """
    _check_class(0, num_classes)
    spec = style_spec(style)
    canvas = _style_background(rng, size, spec)
    placed = _place_scene_objects(rng, size, num_classes, class_def, spec.textured)
    min_px = SCENE_MIN_VISIBLE_FRAC * size * size
    vis = _visible([p.mask for p in placed])
    # Dropping an object only uncovers objects below it, so one filtering pass suffices.
    kept = [p for p, v in zip(placed, vis) if v.sum() >= min_px]
    masks = _visible([p.mask for p in kept])
    classes = [int(p.cls) for p in kept if p.cls is not None]  # scene objects always have a class
    semantic = np.zeros((size, size), np.uint8)
    for inst, cls, m in zip(kept, classes, masks):
        _paint(canvas, inst, rng)
        semantic[m] = cls + 1
    return SceneSample(_finish(canvas, rng), semantic, classes, masks)
