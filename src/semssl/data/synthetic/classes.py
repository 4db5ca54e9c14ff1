"""The class lists of the built-in dataset, by class definition (``SynthConfig.class_def``).

* ``shape`` (the default since generator version 2): a class is a shape; the texture, like the colours, the
  pose and the background, is drawn per instance from one distribution shared by every class, so neither raw
  pixels nor a texture descriptor names the class — a representation that recognises shapes whatever their
  colour and texture does.
* ``shape_texture`` (version 1's definition, kept to reproduce older numbers): a class is a (shape, texture)
  pair; textures repeat across shapes and two classes are plain.

Kept free of heavy imports so that :class:`semssl.data.synthetic.SynthConfig` can validate ``num_classes``
without loading OpenCV.
"""

from __future__ import annotations

__all__ = ["CLASS_DEFS", "CLASS_NAMES", "SHAPES", "class_names", "class_spec"]

CLASS_DEFS: tuple[str, ...] = ("shape", "shape_texture")

#: class index -> shape (``num_classes`` takes the first ones)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "crescent", "heart",
                           "arrow", "semicircle", "hourglass")

# Version 1: the texture of each shape's class (stripes on circle and arrow, dots on square and crescent, ...).
_V1_TEXTURES: tuple[str, ...] = ("stripes", "dots", "checker", "solid", "solid", "grid", "waves", "dots",
                                 "concentric", "stripes", "checker", "waves")


def class_spec(class_def: str, cls: int) -> tuple[str, str | None]:
    """(shape, texture) of class ``cls``; texture None = drawn per instance (``class_def`` ``shape``)."""
    if class_def == "shape":
        return SHAPES[cls], None
    if class_def == "shape_texture":
        return SHAPES[cls], _V1_TEXTURES[cls]
    raise ValueError(f"class_def {class_def!r} is not one of {CLASS_DEFS}")


def class_names(class_def: str = "shape") -> tuple[str, ...]:
    """Folder / category names of every class under ``class_def``."""
    specs = [class_spec(class_def, k) for k in range(len(SHAPES))]
    return tuple(shape if texture is None else f"{shape}_{texture}" for shape, texture in specs)


#: the class names of the default definition (``shape``)
CLASS_NAMES: tuple[str, ...] = class_names("shape")
