"""The built-in synthetic dataset: object images (classification) and cluttered scenes (COCO instances).

It is what ``semssl pretrain`` trains on when the user gives no data, so it must have structure that
self-supervised learning can find and a random network does not already capture:

* **Classes are defined by shape and texture together** (:data:`CLASS_NAMES`, e.g. ``circle_stripes``,
  ``square_dots``): the same texture appears on several shapes and two classes are textureless, so neither
  cue alone names every class.
* **Colour is a nuisance**: the object's base and pattern colours are drawn per instance from one
  distribution for every class, so the mean colour of an object says nothing about its class.
* **Pose is a nuisance**: random rotation, scale and aspect ratio per instance; textures are laid out in the
  object's own (rotated, stretched) frame, so they are scale-invariant.
* **Backgrounds are a nuisance**: colour gradients, smooth blotches, sensor noise, random lines, blobs and
  small polygons, all independent of the class.

Two splits, both written under one root:

``objects/{train,test}/<class_name>/<id>.png``
    one main object covering 15-60 % of the image (measured on its mask) and 0-2 distractors that are clearly
    smaller (at most 30 % of the main object's area): small objects of random classes or abstract polygons,
    painted *behind* the main object. Classes are balanced (index ``i`` has class ``i % K``).
``scenes/{train,test}/images/<id>.png``, ``annotations.json``, ``semantic/<id>.png``
    2-6 objects of random classes, some placed to overlap; paint order is z order and each instance mask is
    the object's visible pixels after occlusion. ``annotations.json`` is COCO instances (RLE segmentations,
    tight ``bbox`` of the visible mask, ``area`` = its pixel count, categories ``1..K``); ``semantic`` holds
    uint8 class-index masks (0 = background, k = category id).

Determinism: every image draws from its own generator seeded by ``(seed, split/part, index)``, so output is
byte-identical for the same config whatever the number of worker processes. ``manifest.json`` (the config,
class names, file counts and :data:`GENERATOR_VERSION`) is written last; :func:`ensure_synthetic` regenerates
only when it is missing or differs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_utils

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_NUM_CLASSES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "ObjectSample",
    "SceneSample",
    "SynthConfig",
    "SynthConfigError",
    "SyntheticDataError",
    "TEXTURES",
    "default_root",
    "ensure_synthetic",
    "generate",
    "load_manifest",
    "render_object_image",
    "render_object_sample",
    "render_scene",
]

GENERATOR_NAME = "semssl.synthetic"
#: Bump whenever the drawn pixels or the file layout change, so cached datasets are regenerated.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[str, ...] = ("objects", "scenes")
PARTS: tuple[str, ...] = ("train", "test")
DEFAULT_NUM_CLASSES = 10
_MARKER_NAME = ".semssl-synthetic"
_LOCK_NAME = ".lock"
_STAGING_PREFIX = ".staging-"
_TASK_CHUNK = 100  # images per worker task

# Object-split geometry (fractions of the image area).
MAIN_AREA_RANGE = (0.15, 0.60)  # accepted range of the main object's mask area
_MAIN_AREA_TARGET = (0.20, 0.50)  # sampled target, inside the accepted range so anti-aliasing cannot push it out
_DISTRACTOR_AREA = (0.015, 0.05)
DISTRACTOR_MAX_RATIO = 0.30  # a distractor's area is at most this fraction of the main object's area
# Scene geometry.
_SCENE_OBJECTS = (2, 6)
_SCENE_AREA = (0.025, 0.10)
_SCENE_OVERLAP_P = 0.5  # probability that a new object is placed next to (and overlapping) an earlier one
_SCENE_MIN_VISIBLE_SHARE = 0.45  # a placement may hide at most 55 % of any earlier object
SCENE_MIN_VISIBLE_FRAC = 0.004  # objects whose visible area is below this fraction of the image are dropped


class SyntheticDataError(RuntimeError):
    """The synthetic dataset cannot be generated or read (names the path at fault)."""


class SynthConfigError(ValueError):
    """A :class:`SynthConfig` field has an invalid value (names the field and the value)."""


# --------------------------------------------------------------------------------------------------------------
# Shapes and textures
# --------------------------------------------------------------------------------------------------------------
def _arc(radius: float, n: int = 48, start: float = 0.0, stop: float = 2 * math.pi,
         centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Points on a circle (full circle: ``n`` points without repeating the first; partial arc: both ends)."""
    full = math.isclose(stop - start, 2 * math.pi)
    t = np.linspace(start, stop, n, endpoint=not full)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    """Vertices of a regular ``n``-gon."""
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int, r_out: float, r_in: float) -> np.ndarray:
    """Vertices of a star with ``points`` tips, alternating outer and inner radius."""
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    """The classic parametric heart, centred and scaled to about unit radius."""
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - 2.5], axis=1) / 15.0


def _poly(*pts: tuple[float, float]) -> np.ndarray:
    return np.asarray(pts, dtype=np.float64)


# Each shape is a list of (polygon in shape-local units, fill) drawn in order; fill=False cuts a hole.
_SHAPES: dict[str, tuple[tuple[np.ndarray, bool], ...]] = {
    "circle": ((_arc(1.0, 64), True),),
    "square": ((_poly((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)), True),),
    "triangle": ((_regular(3, 1.15), True),),
    "star": ((_star(5, 1.15, 0.5), True),),
    "ring": ((_arc(1.0, 64), True), (_arc(0.55, 48), False)),
    "cross": ((_poly((-0.32, -1), (0.32, -1), (0.32, -0.32), (1, -0.32), (1, 0.32), (0.32, 0.32),
                     (0.32, 1), (-0.32, 1), (-0.32, 0.32), (-1, 0.32), (-1, -0.32), (-0.32, -0.32)), True),),
    "hexagon": ((_regular(6, 1.0, phase=0.0), True),),
    "crescent": ((_arc(1.0, 64), True), (_arc(0.82, 64, centre=(0.5, 0.0)), False)),
    "heart": ((_heart(), True),),
    "arrow": ((_poly((-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25),
                     (-1, 0.25)), True),),
    "semicircle": ((_arc(1.15, 40, 0.0, math.pi, centre=(0.0, -0.45)), True),),
    "hourglass": ((_poly((-0.8, -1), (0.8, -1), (0.14, 0), (0.8, 1), (-0.8, 1), (-0.14, 0)), True),),
}

TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker", "grid", "waves", "concentric")

# Decision: 12 (shape, texture) classes; textures repeat across shapes (stripes on circle and arrow, dots on
# square and crescent, ...) and two classes are plain, so neither shape nor texture alone is the whole story.
_CLASS_SPECS: tuple[tuple[str, str], ...] = (
    ("circle", "stripes"),
    ("square", "dots"),
    ("triangle", "checker"),
    ("star", "solid"),
    ("ring", "solid"),
    ("cross", "grid"),
    ("hexagon", "waves"),
    ("crescent", "dots"),
    ("heart", "concentric"),
    ("arrow", "stripes"),
    ("semicircle", "checker"),
    ("hourglass", "waves"),
)
CLASS_NAMES: tuple[str, ...] = tuple(f"{shape}_{texture}" for shape, texture in _CLASS_SPECS)

# Texture frequency ranges in cycles per shape-local unit (a shape spans about two units).
_TEXTURE_FREQ: dict[str, tuple[float, float]] = {
    "solid": (1.0, 1.0),
    "stripes": (1.3, 2.0),
    "dots": (1.5, 2.1),
    "checker": (0.9, 1.3),
    "grid": (1.2, 1.7),
    "waves": (1.2, 1.7),
    "concentric": (1.4, 2.0),
}


def _unit_area(ops: Sequence[tuple[np.ndarray, bool]], px_per_unit: int = 64) -> float:
    """Area of a shape in squared shape-local units, measured by rasterising it once."""
    size = 5 * px_per_unit
    canvas = np.zeros((size, size), np.uint8)
    for pts, fill in ops:
        cv2.fillPoly(canvas, [np.round(pts * px_per_unit + size / 2).astype(np.int32)], 1 if fill else 0)
    return float(canvas.sum()) / px_per_unit**2


_UNIT_AREA: dict[str, float] = {name: _unit_area(ops) for name, ops in _SHAPES.items()}
_HULL: dict[str, np.ndarray] = {name: np.concatenate([p for p, fill in ops if fill]) for name, ops in _SHAPES.items()}


# --------------------------------------------------------------------------------------------------------------
# Geometry, colour and drawing primitives
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


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) to RGB in 0-255, shape ``(..., 3)`` float32."""
    k = np.mod(np.asarray([5.0, 3.0, 1.0]) + h[..., None] * 6.0, 6.0)
    rgb = v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (rgb * 255.0).astype(np.float32)


def _random_colours(rng: np.random.Generator, n: int, sat: tuple[float, float] = (0.25, 1.0),
                    val: tuple[float, float] = (0.3, 1.0)) -> np.ndarray:
    """``n`` random RGB colours (0-255, ``(n, 3)`` float32): uniform hue, saturation and value in the ranges."""
    hsv = rng.random((3, n))
    return _hsv_to_rgb(hsv[0], sat[0] + (sat[1] - sat[0]) * hsv[1], val[0] + (val[1] - val[0]) * hsv[2])


def _cv_colour(colour: np.ndarray) -> tuple[float, float, float]:
    return (float(colour[0]), float(colour[1]), float(colour[2]))


def _distinct_colour(rng: np.random.Generator, ref: np.ndarray, min_dist: float, tries: int = 8) -> np.ndarray:
    """The first of ``tries`` random colours at least ``min_dist`` (RGB Euclidean) from ``ref``, else the farthest.

    Decision: the same rule for every class, so the colour distribution stays class-independent while objects
    stay visible against what lies under them and patterns stay visible on their objects.
    """
    candidates = _random_colours(rng, tries)
    dist = np.linalg.norm(candidates - ref, axis=1)
    ok = np.flatnonzero(dist >= min_dist)
    return candidates[ok[0] if ok.size else int(np.argmax(dist))]


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
                   hint: tuple[float, float] | None = None) -> _Instance:
    """A class object (``cls`` >= 0) or an abstract clutter polygon (``cls`` None) of about ``area_px``."""
    if cls is None:
        n = int(rng.integers(4, 8))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.45, 1.0, n)
        ops: tuple[tuple[np.ndarray, bool], ...] = ((np.stack([r * np.cos(t), r * np.sin(t)], axis=1), True),)
        texture, unit_area = "solid", max(_unit_area(ops), 1e-3)
    else:
        shape, texture = _CLASS_SPECS[cls]
        ops, unit_area = _SHAPES[shape], _UNIT_AREA[shape]
    hull = _HULL[shape] if cls is not None else ops[0][0]
    pose = _sample_pose(rng, hull, unit_area, area_px, size, hint)
    coverage, box = _rasterize(ops, pose.matrix(), (pose.cx, pose.cy), size)
    return _Instance(cls, ops, texture, pose, coverage, box)


def _soft(signed: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased indicator of ``signed > 0`` with a ramp of ``width`` (about one pixel)."""
    return np.clip(0.5 + signed / width, 0.0, 1.0)


def _frac_dist(x: np.ndarray) -> np.ndarray:
    """Distance of the fractional part of ``x`` from 0.5 (0 at cell centres, 0.5 at cell borders)."""
    return np.abs(np.mod(x, 1.0) - 0.5)


def _texture_weight(name: str, u: np.ndarray, v: np.ndarray, p: dict[str, float], pix: float) -> np.ndarray:
    """Weight of the pattern colour (0-1) at shape-local coordinates ``(u, v)``; ``pix`` = one pixel in units.

    Patterns are functions of the shape's own frame, so they rotate and stretch with it. Each one is written as
    a signed distance (in shape units) to the pattern's edge, which makes anti-aliasing a clipped ramp.
    """
    if name == "solid":
        return np.zeros_like(u)
    c, s = math.cos(p["angle"]), math.sin(p["angle"])
    a, b = c * u + s * v, -s * u + c * v
    f = p["freq"]
    if name == "stripes":  # stripes fill half of each period
        return _soft((0.25 - _frac_dist(a * f + p["phase"])) / f, pix)
    if name == "dots":
        da, db = _frac_dist(a * f + p["phase"]), _frac_dist(b * f + p["phase2"])
        return _soft((p["radius"] - np.hypot(0.5 - da, 0.5 - db)) / f, pix)
    if name == "checker":  # cells of half a period; sign flips across every cell border
        da = np.mod(a * f + p["phase"], 1.0) - 0.5
        db = np.mod(b * f + p["phase2"], 1.0) - 0.5
        edge = np.minimum(0.25 - np.abs(np.abs(da) - 0.25), 0.25 - np.abs(np.abs(db) - 0.25))
        return _soft(np.sign(da * db) * edge / f, pix)
    if name == "grid":  # lines of half-width 0.12 periods along both axes
        d = np.minimum(0.5 - _frac_dist(a * f + p["phase"]), 0.5 - _frac_dist(b * f + p["phase2"]))
        return _soft((0.12 - d) / f, pix)
    if name == "waves":  # stripes bent by a sine along the other axis
        bend = p["amp"] * np.sin(2 * math.pi * (b * p["freq2"] + p["phase2"]))
        return _soft((0.25 - _frac_dist(a * f + p["phase"] + bend)) / f, pix)
    if name == "concentric":
        r = np.hypot(u - p["cx"], v - p["cy"])
        return _soft((0.25 - _frac_dist(r * f + p["phase"])) / f, pix)
    raise SyntheticDataError(f"unknown texture {name!r}; known: {', '.join(TEXTURES)}")


def _texture_params(rng: np.random.Generator, name: str) -> dict[str, float]:
    """Per-instance pattern parameters (all drawn for every texture, so the draw count never varies)."""
    lo, hi = _TEXTURE_FREQ[name]
    return {
        "freq": rng.uniform(lo, hi),
        "angle": rng.uniform(0.0, math.pi),
        "phase": rng.random(),
        "phase2": rng.random(),
        "radius": rng.uniform(0.26, 0.34),
        "amp": rng.uniform(0.2, 0.35),
        "freq2": rng.uniform(0.6, 1.0),
        "cx": rng.uniform(-0.15, 0.15),
        "cy": rng.uniform(-0.15, 0.15),
    }


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


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Class-independent clutter: colour gradient, smooth blotches, lines, translucent blobs, small polygons.

    Decision: clutter is kept thin (lines), translucent (blobs) or small (polygons of 4-9 % of the image side),
    so it is visible but objects stay the dominant structure. The gradient and the blotches are one 4x4 grid
    of colours upsampled bicubically (cheap, and smooth at every image size).
    """
    ends = _random_colours(rng, 2, sat=(0.05, 0.6), val=(0.2, 0.95))
    psi = rng.uniform(0.0, 2 * math.pi)
    cells = np.linspace(0.0, 1.0, 4)
    g = math.cos(psi) * cells[None, :] + math.sin(psi) * cells[:, None]
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    grid = ends[0] + (ends[1] - ends[0]) * g[..., None] + rng.normal(0.0, rng.uniform(6.0, 20.0), (4, 4, 3))
    up = _upsample_matrix(size)
    rows = np.tensordot(up, grid.astype(np.float32), axes=(1, 0))  # (size, 4, 3): upsampled along y
    smooth = np.matmul(up, rows)  # (size, size, 3): then along x
    img8 = np.clip(smooth, 0, 255).astype(np.uint8)

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
                         num_classes: int = DEFAULT_NUM_CLASSES) -> ObjectSample:
    """Draw one object-split image: background clutter, 0-2 small distractors, then the main object on top.

    The main object's mask covers :data:`MAIN_AREA_RANGE` of the image; each distractor covers at most
    :data:`DISTRACTOR_MAX_RATIO` of the main object's area and is painted behind it, so the main mask is whole.
    """
    _check_class(cls, num_classes)
    canvas = _background(rng, size)
    area = float(size * size)
    for _ in range(100):
        main = _make_instance(rng, cls, rng.uniform(*_MAIN_AREA_TARGET) * area, size)
        main_frac = float(main.mask.sum()) / area
        if MAIN_AREA_RANGE[0] <= main_frac <= MAIN_AREA_RANGE[1]:
            break
    else:
        raise SyntheticDataError(f"could not place a {CLASS_NAMES[cls]} of 15-60 % area in a {size} px image")

    classes: list[int | None] = []
    areas: list[int] = []
    max_frac = min(_DISTRACTOR_AREA[1], DISTRACTOR_MAX_RATIO * main_frac)
    for _ in range(int(rng.integers(0, 3))):
        d_cls = int(rng.integers(num_classes)) if rng.random() < 0.5 else None
        target = rng.uniform(_DISTRACTOR_AREA[0], max_frac) * area
        # Decision: the least-hidden of three candidate placements, so distractors are usually visible.
        candidates = [_make_instance(rng, d_cls, target, size) for _ in range(3)]
        best = min(candidates, key=lambda c: int((c.mask & main.mask).sum()))
        if best.mask.sum() > DISTRACTOR_MAX_RATIO * main.mask.sum():
            continue  # anti-aliasing made it too big for a tiny main object: leave it out
        _paint(canvas, best, rng)
        classes.append(d_cls)
        areas.append(int(best.mask.sum()))
    _paint(canvas, main, rng)
    return ObjectSample(_finish(canvas, rng), main.mask, cls, classes, areas)


def render_object_image(rng: np.random.Generator, size: int, cls: int,
                        num_classes: int = DEFAULT_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """One object-split image (HxWx3 uint8 RGB) of class ``cls`` and its main object's mask (HxW bool)."""
    sample = render_object_sample(rng, size, cls, num_classes)
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


def _place_scene_objects(rng: np.random.Generator, size: int, num_classes: int) -> list[_Instance]:
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
        inst = _make_instance(rng, cls, target, size, hint)
        masks = [p.mask for p in placed] + [inst.mask]
        vis = _visible(masks)
        if all(v.sum() >= _SCENE_MIN_VISIBLE_SHARE * m.sum() for v, m in zip(vis, masks)):
            placed.append(inst)
    if len(placed) < _SCENE_OBJECTS[0]:
        raise SyntheticDataError(f"could not place {_SCENE_OBJECTS[0]} objects in a {size} px scene")
    return placed


def render_scene(rng: np.random.Generator, size: int, num_classes: int = DEFAULT_NUM_CLASSES) -> SceneSample:
    """Draw one scene: clutter, then 2-6 objects in z order; masks are the visible pixels after occlusion.

    Objects whose visible area is below :data:`SCENE_MIN_VISIBLE_FRAC` of the image are dropped *before*
    painting, so every painted object is annotated and the image matches the masks exactly.
    """
    _check_class(0, num_classes)
    canvas = _background(rng, size)
    placed = _place_scene_objects(rng, size, num_classes)
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


# --------------------------------------------------------------------------------------------------------------
# Configuration and files
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """What to generate. ``workers`` only changes speed, never the output (it is not part of the manifest)."""

    seed: int = 0
    object_size: int = 64
    scene_size: int = 128
    n_train_objects: int = 5000
    n_test_objects: int = 1000
    n_train_scenes: int = 1000
    n_test_scenes: int = 200
    num_classes: int = DEFAULT_NUM_CLASSES  # <= len(CLASS_NAMES)
    workers: int = 2

    def validate(self) -> None:
        """Raise :class:`SynthConfigError` naming the first field with an invalid value."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise SynthConfigError(f"SynthConfig.{f.name} = {value!r}: must be an integer")
        limits = {
            "seed": (0, None),
            "object_size": (32, 1024),
            "scene_size": (64, 2048),
            "num_classes": (2, len(CLASS_NAMES)),
            "n_train_objects": (self.num_classes, None),
            "n_test_objects": (self.num_classes, None),
            "n_train_scenes": (1, None),
            "n_test_scenes": (1, None),
            "workers": (1, None),
        }
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if value < lo or (hi is not None and value > hi):
                bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
                why = " (at least one image per class)" if name.endswith("_objects") else ""
                raise SynthConfigError(f"SynthConfig.{name} = {value!r}: must be {bound}{why}")


def default_root() -> Path:
    """``$SEMSSL_DATA_DIR`` if set, else ``~/.cache/semssl/synthetic``."""
    env = os.environ.get("SEMSSL_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "semssl" / "synthetic"


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


def _run_task(task: _Task) -> list[dict[str, Any]]:
    """Draw and write the task's images; scenes return their COCO image/annotation records (without ids)."""
    out = Path(task.out_dir)
    records: list[dict[str, Any]] = []
    for index in range(task.start, task.stop):
        rng = _rng_for(task.seed, task.split, task.part, index)
        name = f"{index:06d}.png"
        if task.split == "objects":
            cls = index % task.num_classes
            image, _ = render_object_image(rng, task.size, cls, task.num_classes)
            _write_png(out / CLASS_NAMES[cls] / name, image)
            continue
        scene = render_scene(rng, task.size, task.num_classes)
        _write_png(out / "images" / name, scene.image)
        _write_png(out / "semantic" / name, scene.semantic)
        records.append({"index": index, "file_name": name,
                        "annotations": [_coco_annotation(c, m) for c, m in zip(scene.classes, scene.masks)]})
    return records


def _coco_annotation(cls: int, mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of one visible mask: RLE (counts as str), tight bbox [x, y, w, h], pixel area."""
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


def _coco_document(records: list[dict[str, Any]], size: int, num_classes: int) -> dict[str, Any]:
    """Assemble the COCO instances file of one scene split (image ids = index + 1, annotation ids from 1)."""
    images, annotations = [], []
    for rec in records:
        image_id = rec["index"] + 1
        images.append({"id": image_id, "file_name": rec["file_name"], "width": size, "height": size})
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": k + 1, "name": CLASS_NAMES[k], "supercategory": "shape"} for k in range(num_classes)]
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
            subdirs = CLASS_NAMES[: config.num_classes] if split == "objects" else ("images", "semantic")
            for sub in subdirs:
                (out / sub).mkdir(parents=True, exist_ok=True)
            n = counts[(split, part)]
            for start in range(0, n, _TASK_CHUNK):
                tasks.append(_Task(split, part, start, min(start + _TASK_CHUNK, n), str(out), config.seed, size,
                                   config.num_classes))
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
    cfg = {k: int(v) for k, v in asdict(config).items() if k != "workers"}  # int(): numpy ints are not JSON
    return {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "config": cfg,
            "class_names": list(CLASS_NAMES[: config.num_classes]), "splits": list(splits)}


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
            per_class = {CLASS_NAMES[k]: len(range(k, n, config.num_classes)) for k in range(config.num_classes)}
            files[f"objects/{part}"] = {"images": n, "per_class": per_class}
        if "scenes" in splits:
            records = [r for t, res in zip(tasks, results) if (t.split, t.part) == ("scenes", part) for r in res]
            doc = _coco_document(records, config.scene_size, config.num_classes)
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
