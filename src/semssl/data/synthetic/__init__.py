"""The built-in synthetic dataset: object images (classification) and multi-object scenes (COCO instances).

It is what ``semssl pretrain`` trains on when the user gives no data, so it must have structure that
self-supervised learning can find and a random network does not already capture:

* **Classes are shapes** (:data:`CLASS_NAMES`: ``circle``, ``square``, ... ; ``class_def: shape``, generator
  version 2). Version 1 defined a class as a (shape, texture) pair, which a random network's texture
  statistics already separate about as well as raw pixels do (docs/results.md section 3); ``class_def:
  shape_texture`` still generates it.
* **Colour, pose and position are nuisances**: the object's colour and the background's are drawn per
  instance from one distribution for every class; rotation, scale, aspect ratio and position too.
* **Two styles** (``style``, generator version 3). ``plain`` (the default): one flat background colour plus
  sensor noise, solid (shaded) objects, no distractors, the main object 6-35 % of the image — the class is the
  only thing that two crops of one image share besides colour and pose, so contrastive learning reaches shape
  within the main job's few hundred steps, while raw pixels and a random network stay near chance (their
  numbers: docs/results.md section 4b). ``cluttered`` (version 2's pictures): colour gradients, smooth blotches,
  random lines, blobs and small polygons behind the objects, a texture (solid, stripes, dots, checker, grid,
  waves, concentric) drawn per instance and laid out in the object's own frame, 0-2 distractors, main object
  15-60 % of the image.

Two splits, both written under one root:

``objects/{train,test}/<class_name>/<id>.png``
    one main object (6-35 % of the image measured on its mask; ``cluttered``: 15-60 %, with 0-2 distractors
    that are clearly smaller — at most 30 % of the main object's area —, small objects of random classes or
    abstract polygons painted *behind* the main object). Classes are balanced (index ``i`` has class ``i % K``).
``scenes/{train,test}/images/<id>.png``, ``annotations.json``, ``semantic/<id>.png``
    2-6 objects of random classes, some placed to overlap; paint order is z order and each instance mask is
    the object's visible pixels after occlusion. ``annotations.json`` is COCO instances (RLE segmentations,
    tight ``bbox`` of the visible mask, ``area`` = its pixel count, categories ``1..K``); ``semantic`` holds
    uint8 class-index masks (0 = background, k = category id).

Determinism: every image draws from its own generator seeded by ``(seed, split/part, index)``, so output is
byte-identical for the same config whatever the number of worker processes. ``manifest.json`` (the config,
class names, file counts and :data:`GENERATOR_VERSION`) is written last; :func:`ensure_synthetic` regenerates
only when it is missing or differs.

This package module is light (no OpenCV, no pycocotools): it holds :class:`SynthConfig`,
:func:`default_root` (``<data root>/synthetic``, see :mod:`semssl.data.root`) and the generator constants. The
rest lives in submodules: ``classes`` (:data:`CLASS_NAMES`), ``shapes`` (shape geometry, colours, textures),
``render`` (drawing one image: :func:`~semssl.data.synthetic.render.render_object_sample`, ``render_scene``, ...)
and ``build`` (writing the dataset: :func:`~semssl.data.synthetic.build.generate`, ``ensure_synthetic``,
``load_manifest``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from semssl.data.root import data_root
from semssl.data.synthetic.classes import CLASS_DEFS, CLASS_NAMES
from semssl.errors import SynthConfigError, SyntheticDataError

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_NUM_CLASSES",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SPLITS",
    "STYLES",
    "SynthConfig",
    "SynthConfigError",
    "SyntheticDataError",
    "default_root",
]

GENERATOR_NAME = "semssl.synthetic"
#: Bump whenever the drawn pixels or the file layout change, so cached datasets are regenerated.
#: 3: ``style`` (default ``plain``: flat backgrounds, solid objects, no distractors; ``cluttered`` = version 2's
#: pictures); 2: classes are shapes by default (``class_def``); 1: (shape, texture) classes.
GENERATOR_VERSION = 3
#: how the pictures are drawn (``SynthConfig.style``); see :data:`semssl.data.synthetic.render.STYLE_SPECS`
STYLES: tuple[str, ...] = ("plain", "cluttered")
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[str, ...] = ("objects", "scenes")
PARTS: tuple[str, ...] = ("train", "test")
DEFAULT_NUM_CLASSES = 10


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
    class_def: str = "shape"  # "shape" (version 2) or "shape_texture" (version 1's classes)
    style: str = "plain"  # "plain" (version 3) or "cluttered" (version 2's backgrounds, textures, distractors)

    def validate(self) -> None:
        """Raise :class:`SynthConfigError` naming the first field with an invalid value."""
        if self.class_def not in CLASS_DEFS:
            raise SynthConfigError(f"SynthConfig.class_def = {self.class_def!r}: must be one of {list(CLASS_DEFS)}")
        if self.style not in STYLES:
            raise SynthConfigError(f"SynthConfig.style = {self.style!r}: must be one of {list(STYLES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("class_def", "style"):
                continue
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


def synth_config(cfg: Any) -> SynthConfig:
    """The generator's config of a run config: its ``data.synthetic`` section without ``root``."""
    names = {f.name for f in fields(SynthConfig)}
    return SynthConfig(**{k: v for k, v in vars(cfg.data.synthetic).items() if k in names})


def default_root() -> Path:
    """``<data root>/synthetic``: ``$SEMSSL_DATA_DIR/synthetic`` if the variable is set, else
    ``~/.cache/semssl/synthetic``. The data root holds every dataset, this one included (the rule and its reason:
    :mod:`semssl.data.root`)."""
    return data_root() / "synthetic"
