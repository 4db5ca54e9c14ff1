"""Image decoding for the data sources: :func:`load_image` and the conversion of every Pillow mode to RGB.

A file that cannot be used raises :class:`ImageDecodeError` (path and reason); the sources turn that into a
counted, logged skip or re-raise it (see the package docstring).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semssl.errors import ImageDecodeError

__all__ = ["ImageDecodeError", "load_image"]


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DEEP_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file fully and return it as an RGB ``PIL.Image``.

    The file is decoded completely here (``img.load()``), so a truncated or corrupt file fails in this call
    and not later inside a transform. The EXIF orientation is applied (``ImageOps.exif_transpose``) so the
    pixels are the way a viewer shows them. Colour modes are converted as follows:

    - ``L``/``1``/``CMYK``/``YCbCr``/...: Pillow's own conversion to RGB.
    - ``P`` with a transparency entry, ``PA``, ``LA``, ``RGBA``: composited on black.
      Decision: black, because fully transparent pixels carry no content and their stored colour is often
      garbage; black is also what a premultiplied image shows, and it is the same for every file.
    - 16-bit greyscale (``I;16``, ``I;16B``, ``I``): rescaled by 255/65535 (65535 -> 255, 32768 -> 128),
      not clipped; see :func:`_deep_grey_to_rgb` for ``I`` and ``F`` images outside the 16-bit range.

    Decision: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left to the process; when something sets it to True,
    Pillow itself pads truncated files and this function cannot tell.

    Raises:
        ImageDecodeError: naming the file and the reason (missing file, unknown format, truncated data,
            zero-size image, unsupported mode, ...).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.width == 0 or img.height == 0:
                raise ImageDecodeError(path, f"image has zero size {img.width}x{img.height}")
            upright = ImageOps.exif_transpose(img)
            rgb = _to_rgb(upright)
            # The `with` block closes `img`; never hand that very object back.
            return rgb.copy() if rgb is img else rgb
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(path, "is a directory, not an image file") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(path, "not a recognised image format") from exc
    except Exception as exc:  # Decision: any failure of a decoder plugin means a bad file, never a crash.
        raise ImageDecodeError(path, f"{type(exc).__name__}: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB (see :func:`load_image` for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in _ALPHA_MODES:
        return _composite_on_black(img)
    if img.mode in _DEEP_INT_MODES or img.mode == "F":
        return _deep_grey_to_rgb(img)
    return img.convert("RGB")


def _composite_on_black(img: Image.Image) -> Image.Image:
    """Alpha-composite an image with an alpha channel over a black background."""
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _deep_grey_to_rgb(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or 32-bit float greyscale image to 8-bit RGB, without clipping.

    Integer modes (``I;16*``, ``I``) whose values lie in [0, 65535] are 16-bit data (Pillow opens 16-bit
    PNG/PGM/TIFF as ``I;16`` or ``I``): v -> round(v * 255 / 65535). Float (``F``) images take the smallest
    of the usual ranges [0, 1], [0, 255], [0, 65535] that holds their finite values. Decision: data outside
    those ranges (negative, or beyond 16 bit) has no known full scale, so it is min-max stretched to
    [0, 255]; non-finite float values become 0.
    """
    arr = np.asarray(img).astype(np.float64)
    finite = np.isfinite(arr)
    arr = np.where(finite, arr, 0.0)
    lo = float(arr[finite].min()) if finite.any() else 0.0
    hi = float(arr[finite].max()) if finite.any() else 0.0
    full_scale = _full_scale(img.mode, lo, hi)
    if full_scale is not None:
        scaled = arr * (255.0 / full_scale)
    elif hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    out = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def _full_scale(mode: str, lo: float, hi: float) -> float | None:
    """The value that maps to 255 for a deep greyscale image, or None when it must be min-max stretched."""
    if lo < 0:
        return None
    ranges = (65535.0,) if mode != "F" else (1.0, 255.0, 65535.0)
    for full in ranges:
        if hi <= full:
            return full
    return None
