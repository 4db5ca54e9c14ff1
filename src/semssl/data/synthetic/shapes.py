"""Shapes, colours and textures of the built-in dataset: the shape polygons and their areas, the random
colour draws, and the texture patterns (as anti-aliased weights in the shape's own frame)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from semssl.errors import SyntheticDataError

__all__ = ["TEXTURES"]


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
# Colours
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Textures
# --------------------------------------------------------------------------------------------------------------
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
