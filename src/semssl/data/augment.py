"""Photometric augmentation recipes of the original methods, with their published parameters.

Every recipe is *photometric only* (colour jitter, grayscale, Gaussian blur, solarisation); geometry
(RandomResizedCrop, flip) lives in :mod:`semssl.data.views`, which records it.  The parameters of all
recipes sit in one table, :data:`RECIPES`, so they can be read at a glance and checked by tests against
the method notes (docs/methods/):

=============  ======================  ========  =========  ======  ==========  =========================
recipe         jitter (b, c, s, h)     jitter p  grayscale  blur p  solarize p  source (docs/methods/)
=============  ======================  ========  =========  ======  ==========  =========================
mocov2         (0.4, 0.4, 0.4, 0.1)    0.8       0.2        0.5     0.0         mocov2.md §Augmentations
mocov2_colour  (0.4, 0.4, 0.8, 0.5)    0.8       0.5        0.5     0.0         (project) main job, below
byol_view1     (0.4, 0.4, 0.2, 0.1)    0.8       0.2        1.0     0.0         byol.md §Augmentations
byol_view2     (0.4, 0.4, 0.2, 0.1)    0.8       0.2        0.1     0.2         byol.md §Augmentations
dino_global1   (0.4, 0.4, 0.2, 0.1)    0.8       0.2        1.0     0.0         dino.md §Augmentations
dino_global2   (0.4, 0.4, 0.2, 0.1)    0.8       0.2        0.1     0.2         dino.md §Augmentations
dino_local     (0.4, 0.4, 0.2, 0.1)    0.8       0.2        0.5     0.0         dino.md §Augmentations
weak           —                       0         0          0       0           byol.md §Augmentations
none           —                       0         0          0       0           identity
=============  ======================  ========  =========  ======  ==========  =========================

The blur sigma is drawn from U(0.1, 2.0) in every recipe (PIL ``GaussianBlur(radius=sigma)`` at 224 px in the
originals); solarisation inverts pixels >= 128 (PIL ``ImageOps.solarize`` threshold 128; 0.5 on float images).
The order of operations is the originals': jitter (its four factors in a random order, as torchvision's
``ColorJitter``), grayscale, blur, solarize.

``mocov2_colour`` is not from a paper: MoCo-v2's recipe with the colour identity of an image scrambled between
its views (full hue circle, stronger saturation jitter, grayscale half the time). The main job uses it on the
built-in objects, whose colour is drawn per instance: with MoCo-v2's mild hue jitter the colour is the cheapest
cue telling two instances apart and the first few hundred steps learn it instead of the shape
(docs/results.md section 4b).

Decision (blur scale): the originals blur 224 px crops with sigma in [0.1, 2.0] px.  With
``blur_reference_size=224`` (default) the sigma range is multiplied by ``crop size / 224`` so that the blur is
the same *relative to the image* at 64 px as at 224 px; ``blur_reference_size=None`` keeps absolute sigmas.
The kernel is odd, ``2 * ceil(3 * sigma_max) + 1`` for the scaled maximum sigma (capped so reflection
padding fits in the image).

Decision (speed): torchvision's tensor kernels for hue and Gaussian blur cost 200-350 us on a 64 px image on
this CPU (per-op dispatch and depthwise convolution overheads), which alone would cap a data loader at a few
hundred samples per second.  :class:`PhotometricTransform` therefore samples its random parameters with
torchvision's own samplers (``ColorJitter.make_params``, ``GaussianBlur.make_params``) and applies the same
formulas as torchvision's float kernels (``adjust_brightness/contrast/saturation/hue``, ``rgb_to_grayscale``,
``gaussian_blur`` with reflection padding, ``solarize``) on a float32 planar array, using OpenCV for the HSV
conversion and the separable blur.  Parity with ``torchvision.transforms.v2.functional`` is unit-tested.
The whole chain runs in float32 and is quantised back to the input dtype once at the end (the originals' PIL
pipeline rounds to 8 bits after every step; this keeps full precision until the end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from semssl.errors import RecipeError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GRAY_WEIGHTS",
    "RecipeError",
    "PhotometricRecipe",
    "RECIPES",
    "recipe_names",
    "get_recipe",
    "blur_sigma_range",
    "blur_kernel_size",
    "PhotometricTransform",
    "build_recipe",
    "normalize",
    "denormalize",
    "eval_transform",
    "interpolation_mode",
    "tensor_to_array",
    "array_to_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means (RGB, [0, 1] scale), used by every original recipe."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations (RGB, [0, 1] scale)."""
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)
"""Luma weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2), used by grayscale/contrast/saturation."""

_INTERPOLATIONS: dict[str, v2.InterpolationMode] = {
    "nearest": v2.InterpolationMode.NEAREST,
    "nearest-exact": v2.InterpolationMode.NEAREST_EXACT,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}



@dataclass(frozen=True)
class PhotometricRecipe:
    """Parameters of one photometric recipe (probabilities in [0, 1]).

    ``brightness``/``contrast``/``saturation`` are ColorJitter strengths s (factor ~ U(1-s, 1+s)) and ``hue``
    is h (shift ~ U(-h, h)), applied together with probability ``jitter_p``.  ``blur_sigma`` is the sigma range
    at 224 px; ``source`` names where the values come from.
    """

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    source: str = ""

    @property
    def jitter(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) strengths, in torchvision's ``ColorJitter`` order."""
        return (self.brightness, self.contrast, self.saturation, self.hue)

    @property
    def is_identity(self) -> bool:
        """True when the recipe never changes a pixel."""
        jitter_active = self.jitter_p > 0 and any(v > 0 for v in self.jitter)
        return not (jitter_active or self.grayscale_p > 0 or self.blur_p > 0 or self.solarize_p > 0)


_BYOL_DINO_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, jitter_p=0.8, grayscale_p=0.2)

RECIPES: dict[str, PhotometricRecipe] = {
    "mocov2": PhotometricRecipe(
        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
        source="docs/methods/mocov2.md §Augmentations: moco@132aea9 aug-plus",
    ),
    "mocov2_colour": PhotometricRecipe(
        brightness=0.4, contrast=0.4, saturation=0.8, hue=0.5, jitter_p=0.8, grayscale_p=0.5, blur_p=0.5,
        source="project: MoCo-v2 aug-plus with colour identity scrambled (main job, docs/results.md section 4b)",
    ),
    "byol_view1": PhotometricRecipe(
        **_BYOL_DINO_JITTER, blur_p=1.0, solarize_p=0.0,
        source="docs/methods/byol.md §Augmentations: BYOL view 1 (LEWEL, MSF strong view)",
    ),
    "byol_view2": PhotometricRecipe(
        **_BYOL_DINO_JITTER, blur_p=0.1, solarize_p=0.2,
        source="docs/methods/byol.md §Augmentations: BYOL view 2",
    ),
    "dino_global1": PhotometricRecipe(
        **_BYOL_DINO_JITTER, blur_p=1.0, solarize_p=0.0,
        source="docs/methods/dino.md §Augmentations: DINO global crop 1",
    ),
    "dino_global2": PhotometricRecipe(
        **_BYOL_DINO_JITTER, blur_p=0.1, solarize_p=0.2,
        source="docs/methods/dino.md §Augmentations: DINO global crop 2",
    ),
    "dino_local": PhotometricRecipe(
        **_BYOL_DINO_JITTER, blur_p=0.5, solarize_p=0.0,
        source="docs/methods/dino.md §Augmentations: DINO local crops",
    ),
    "weak": PhotometricRecipe(source="docs/methods/byol.md §Augmentations: MSF weak view = crop + flip only"),
    "none": PhotometricRecipe(source="identity"),
}
"""All named photometric recipes (see the module docstring for the table)."""


def recipe_names() -> list[str]:
    """Names of all recipes in :data:`RECIPES`."""
    return list(RECIPES)


def get_recipe(name: str) -> PhotometricRecipe:
    """Return the recipe called ``name``; an unknown name raises :class:`RecipeError` listing the valid ones."""
    if not isinstance(name, str) or name not in RECIPES:
        raise RecipeError(f"unknown augmentation recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def blur_sigma_range(
    sigma: tuple[float, float], size: int, blur_reference_size: int | None = 224
) -> tuple[float, float]:
    """Sigma range for a crop of side ``size``: ``sigma * size / blur_reference_size``, or ``sigma`` if None.

    Decision: scaling keeps the blur the same relative to the image at any resolution (see module docstring).
    """
    if blur_reference_size is None:
        return (float(sigma[0]), float(sigma[1]))
    if blur_reference_size <= 0:
        raise RecipeError(f"blur_reference_size must be positive or None, got {blur_reference_size}")
    factor = size / blur_reference_size
    return (float(sigma[0]) * factor, float(sigma[1]) * factor)


def blur_kernel_size(sigma_max: float, size: int) -> int:
    """Odd Gaussian kernel side ``2 * ceil(3 * sigma_max) + 1``, capped at ``2 * size - 1``.

    The cap keeps the reflection padding (kernel // 2) smaller than the image side, which reflection needs.
    """
    kernel = 2 * math.ceil(3.0 * sigma_max) + 1
    return max(1, min(kernel, 2 * size - 1))


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise RecipeError(f"crop size must be a positive int, got {size!r}")


class PhotometricTransform(v2.Transform):
    """A v2 transform applying one :class:`PhotometricRecipe` to an RGB image tensor (uint8 or float).

    Accepts ``[..., 3, H, W]`` tensors (a batch gets the same random parameters, as every v2 transform) and
    returns a tensor of the same shape and dtype.  :meth:`make_params` draws every random decision, so callers
    (and tests) can inspect or fix them; :meth:`apply_array` applies given parameters to a float32 ``[3, H, W]``
    array in [0, 1], which is what :class:`semssl.data.views.MultiViewTransform` uses to avoid tensor round trips.
    """

    def __init__(self, recipe: str | PhotometricRecipe, size: int, blur_reference_size: int | None = 224):
        super().__init__()
        _check_size(size)
        self.recipe_name = recipe if isinstance(recipe, str) else "custom"
        self.recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        self.size = size
        self.sigma = blur_sigma_range(self.recipe.blur_sigma, size, blur_reference_size)
        self.kernel_size = blur_kernel_size(self.sigma[1], size)
        r = self.recipe
        self._jitter = (
            v2.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue)
            if r.jitter_p > 0 and any(v > 0 for v in r.jitter)
            else None
        )
        self._blur = v2.GaussianBlur(self.kernel_size, self.sigma) if r.blur_p > 0 else None

    def extra_repr(self) -> str:
        return f"recipe={self.recipe_name!r}, size={self.size}, sigma={self.sigma}, kernel={self.kernel_size}"

    @staticmethod
    def _coin(p: float) -> bool:
        if p <= 0.0:
            return False
        if p >= 1.0:
            return True
        return bool(torch.rand(1).item() < p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the random decisions: ``jitter`` (ColorJitter params or None), ``grayscale`` (bool),
        ``blur_sigma`` (float or None), ``solarize`` (bool)."""
        r = self.recipe
        jitter = self._jitter.make_params([]) if self._jitter is not None and self._coin(r.jitter_p) else None
        grayscale = self._coin(r.grayscale_p)
        blur = self._blur is not None and self._coin(r.blur_p)
        blur_sigma = float(self._blur.make_params([])["sigma"][0]) if blur else None
        return dict(jitter=jitter, grayscale=grayscale, blur_sigma=blur_sigma, solarize=self._coin(r.solarize_p))

    def apply_array(self, x: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Apply ``params`` to a contiguous float32 ``[3, H, W]`` array in [0, 1]; may modify ``x`` in place."""
        jitter = params["jitter"]
        if jitter is not None:
            for fn_id in jitter["fn_idx"].tolist():
                x = _JITTER_OPS[fn_id](x, jitter)
        if params["grayscale"]:
            x = np.repeat(_gray(x)[None], 3, axis=0)
        if params["blur_sigma"] is not None:
            x = _blur(x, self.kernel_size, params["blur_sigma"])
        if params["solarize"]:
            x = np.minimum(x, 1.0 - x)  # == where(x >= 0.5, 1 - x, x): torchvision's solarize at 0.5
        return x

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor):
            raise RecipeError(f"recipe {self.recipe_name!r} expects an image tensor, got {type(inpt).__name__}")
        if inpt.ndim < 3 or inpt.shape[-3] != 3:
            raise RecipeError(
                f"recipe {self.recipe_name!r} expects an RGB tensor [..., 3, H, W], got shape {tuple(inpt.shape)}"
            )
        if not (inpt.dtype == torch.uint8 or inpt.is_floating_point()):
            raise RecipeError(f"recipe {self.recipe_name!r} expects uint8 or float pixels, got {inpt.dtype}")
        flat = inpt.reshape(-1, *inpt.shape[-3:])
        outs = [array_to_tensor(self.apply_array(tensor_to_array(image), params), inpt.dtype) for image in flat]
        out = torch.stack(outs).reshape(inpt.shape) if outs else inpt.clone()
        return _rewrap(out, inpt)


def _rewrap(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Keep the tv_tensor subclass of the input (e.g. ``tv_tensors.Image``)."""
    if isinstance(like, tv_tensors.TVTensor):
        return tv_tensors.wrap(out, like=like)
    return out


def tensor_to_array(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` uint8/float tensor -> new contiguous float32 ``[3, H, W]`` array in [0, 1]."""
    arr = image.detach().cpu().numpy()
    if image.dtype == torch.uint8:
        out = arr.astype(np.float32, order="C")  # torch may hand out channels-last strides: force planar
        out *= np.float32(1.0 / 255.0)
        return out
    return np.array(arr, dtype=np.float32, order="C", copy=True)


def array_to_tensor(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``[3, H, W]`` array in [0, 1] -> tensor of ``dtype`` (uint8: rounded to the nearest level)."""
    if dtype == torch.uint8:
        return torch.from_numpy(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


# Decision (layout): the kernels work on planar float32 [3, H, W] arrays.  NumPy broadcasting over a trailing
# axis of 3 (HWC) is several times slower.  OpenCV does the HSV conversion (on an HWC copy) and the blur (per plane).
_GRAY = np.asarray(GRAY_WEIGHTS, dtype=np.float32)


def _gray(x: np.ndarray) -> np.ndarray:
    """Luma plane ``[H, W]`` of a ``[3, H, W]`` array (torchvision's ``rgb_to_grayscale`` weights)."""
    return (_GRAY @ x.reshape(3, -1)).reshape(x.shape[1:])


def _clip01(x: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (two ufunc calls: ``np.clip``'s Python wrapper costs more than the work here)."""
    np.maximum(x, np.float32(0.0), out=x)
    return np.minimum(x, np.float32(1.0), out=x)


def _blend(x: np.ndarray, other: np.ndarray | np.float32, factor: float) -> np.ndarray:
    """torchvision's float ``_blend``: clamp(factor * x + (1 - factor) * other, 0, 1)."""
    out = x * np.float32(factor)
    out += np.float32(1.0 - factor) * other
    return _clip01(out)


def _brightness(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    f = p["brightness_factor"]
    if f is None:
        return x
    out = x * np.float32(f)
    return _clip01(out)


def _contrast(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    f = p["contrast_factor"]
    return x if f is None else _blend(x, np.float32(_gray(x).mean()), f)


def _saturation(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    f = p["saturation_factor"]
    return x if f is None else _blend(x, _gray(x)[None], f)


def _hue(x: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Hue rotation in HSV by ``hue_factor`` turns (torchvision: h = (h + f) mod 1); OpenCV float HSV uses degrees."""
    f = p["hue_factor"]
    if f is None or f == 0.0:
        return x
    hsv = cv2.cvtColor(np.ascontiguousarray(x.transpose(1, 2, 0)), cv2.COLOR_RGB2HSV)
    # Hue in degrees [0, 360); |f| <= 0.5 turn.  Shifting by f * 360 + 360 keeps it in [180, 900), and OpenCV's
    # float HSV2RGB reduces any non-negative hue modulo 360 (covered by the parity test with f < 0).
    hsv[..., 0] += np.float32(f * 360.0 + 360.0)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return _clip01(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _blur(x: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """Gaussian blur of each plane with reflection padding (``BORDER_REFLECT_101`` = torch ``reflect``)."""
    x = np.ascontiguousarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(x.shape[0]):
        cv2.GaussianBlur(
            x[c], (kernel_size, kernel_size), sigma, dst=out[c], sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101
        )
    return out


# fn_idx of torchvision's ColorJitter: 0 brightness, 1 contrast, 2 saturation, 3 hue.
_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def build_recipe(name: str, size: int, blur_reference_size: int | None = 224) -> PhotometricTransform:
    """The photometric transform of recipe ``name`` for crops of side ``size`` (see :data:`RECIPES`)."""
    return PhotometricTransform(name, size, blur_reference_size)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 or float ``[..., 3, H, W]`` image -> float32 normalised with ImageNet mean/std."""
    if not isinstance(image, torch.Tensor) or image.ndim < 3 or image.shape[-3] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise RecipeError(f"normalize expects an RGB tensor [..., 3, H, W], got {shape}")
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: ImageNet-normalised float ``[..., 3, H, W]`` -> float in [0, 1] (clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)


def interpolation_mode(name: str) -> v2.InterpolationMode:
    """``"bilinear" | "bicubic" | "nearest" | "nearest-exact"`` -> ``InterpolationMode`` (clear error otherwise)."""
    if name not in _INTERPOLATIONS:
        raise RecipeError(f"unknown interpolation {name!r}; valid: {', '.join(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def eval_transform(size: int, resize_ratio: float = 256 / 224, interpolation: str = "bicubic") -> v2.Compose:
    """Evaluation preprocessing of DINO/MoCo kNN and linear protocols (docs/methods/dino.md §Evaluation).

    Resize the shorter side to ``round(size * resize_ratio)`` (256 for 224), centre-crop ``size``, convert to
    float and normalise with ImageNet mean/std.  Accepts PIL images or uint8/float tensors.
    """
    _check_size(size)
    if not resize_ratio >= 1.0:
        raise RecipeError(f"resize_ratio must be >= 1 (resize, then centre-crop), got {resize_ratio}")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size * resize_ratio), interpolation=interpolation_mode(interpolation), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
        ]
    )

