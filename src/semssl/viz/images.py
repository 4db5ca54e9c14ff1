"""The images a figure is drawn on, gathered one way for every ``semssl viz`` command.

``--images`` takes any mix of

* image files;
* folders, searched recursively, images in sorted order — except that a folder holding an ``images/``
  sub-folder (the built-in scenes' and COCO's layout: ``images/`` beside class-index masks in ``semantic/`` or
  ``masks/``) is read through ``images/`` only, so the masks are never drawn as if they were pictures;
* a COCO instances JSON (its images, ordered by id as `CocoSource` reads them);
* ``synthetic:scenes`` — the built-in scenes of the run's ``data.synthetic`` section (training split).

When more than ``n`` images are found they are taken evenly spread over the list (first and last included).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semssl.errors import ConfigError, DataError

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def spread(items: list, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them when there are at most ``n``)."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / max(1, n - 1))] for i in range(n)]


def folder_images(folder: Path) -> list[Path]:
    """The sorted image files under ``folder`` (through its ``images/`` sub-folder when it has one)."""
    if (folder / "images").is_dir():
        folder = folder / "images"
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_files(items: Sequence[str | Path], n: int) -> list[Path]:
    """Up to ``n`` image paths from files and folders (no COCO JSON / synthetic source: callers that need the
    file itself, e.g. to compute proposals on it)."""
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files.extend(folder_images(path))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"--images: '{path}' is neither an image file nor a folder")
    if not files:
        raise DataError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in items]}")
    return spread(files, n)


def gather(items: Sequence[str | Path], n: int, cfg: Any = None) -> list[tuple[str, Any]]:
    """Up to ``n`` ``(name, PIL image)`` pairs from files, folders, COCO JSONs and ``synthetic:scenes``."""
    from semssl.data.sources import CocoSource, load_image

    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    found: list[tuple[str, Any]] = []   # (name, PIL image or a Path loaded once chosen)
    for item in items:
        text = str(item)
        if text.startswith("synthetic") or text.lower().endswith(".json"):
            from semssl.eval.dense import synthetic_scenes_json

            path = synthetic_scenes_json("train", cfg) if text.startswith("synthetic") else text
            if not Path(path).is_file():
                raise DataError(f"--images: COCO JSON '{path}' does not exist")
            source = CocoSource(path, load_masks=False)
            found += [(source.paths[i].name, source[i]["image"]) for i in spread(list(range(len(source))), n)]
            continue
        for f in image_files([item], 10 ** 9):
            found.append((f.name, f))
    if not found:
        raise DataError(f"--images: no images found in {[str(i) for i in items]}")
    return [(name, load_image(x) if isinstance(x, Path) else x) for name, x in spread(found, n)]


def square_tensor(image: Image.Image, size: int) -> Tensor:
    """``[3, size, size]`` ImageNet-normalised float tensor of a PIL image resized to a square (aspect not kept, as
    in the dense probe; bilinear with antialiasing)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    x = F.interpolate(x[None].float() / 255, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
