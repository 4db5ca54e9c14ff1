"""The class list of the built-in dataset: each class is a (shape, texture) pair.

Kept free of heavy imports so that :class:`semssl.data.synthetic.SynthConfig` can validate ``num_classes``
without loading OpenCV.
"""

from __future__ import annotations

__all__ = ["CLASS_NAMES"]

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
