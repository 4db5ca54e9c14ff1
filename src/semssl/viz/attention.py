"""Attention maps of local crops over a global image (SCFS paper Fig. 3): ``semssl viz attention``.

For a global image (resized to ``size`` and centre-cropped) and its four 2x2 jigsaw local crops (the quadrants,
each resized to the local crop size), each local crop's pooled stage feature is the query of SCFS's search
(:func:`~semssl.losses.scfs.search_attention`: the cosine similarity with every position of the global image's
stage map, Eq. 6); the figure shows the four per-crop maps and the map of the mean query, over the image.

Decisions:

* The "mean attention map" is the attention of the **mean** of the four pooled local features (the figure's
  caption: "the mean globally average pooled feature map of the four local images"), not the mean of the four maps.
* Query and keys come from the same network, the evaluated branch (``--branch``, default the method's: the
  teacher for DINO/SCFS), as the caption describes one "encoder"; in training the query is the student's.
* All five maps share one colour scale (their joint min and max, printed in the title), so they are comparable.
* The local crop size defaults to the recipe's ratio of its second view to its first (SCFS: 96/224), else 96/224.

Works for every model exposing stage maps through ``features(images, branch, kind="layerN")``: any method, or a
plain torchvision ``state_dict``.

ViT checkpoints (docs/methods/vit.md §Figures): the searched stage is a token grid (``--stage block<i>``, default
the last block), and below the search maps the figure adds DINO's self-attention maps (``visualize_attention.py``):
for every head of the last block, the CLS token's attention over the patch tokens (:func:`self_attention_maps`),
upsampled by the patch size (nearest), with the outline of the mask that keeps ``--threshold`` of the attention
mass: the patches sorted by attention, normalised to sum 1, kept where the cumulative mass from the smallest
exceeds ``1 - threshold``. Decision: ``--threshold`` defaults to 0.6, the value of DINO's paper figures (the
script's own default draws no mask). For a ViT the image side and the local crop side are rounded down to whole
patches.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.data.augment import denormalize, normalize
from semssl.errors import ConfigError
from semssl.losses.scfs import search_attention
from semssl.models.backbones import STAGES
from semssl.viz import save_figure

LOCAL_RATIO = 96 / 224


def load_image(image: str | Path | PIL.Image.Image, size: int) -> Tensor:
    """An RGB image resized (shorter side, bicubic) and centre-cropped to ``size``: normalised ``[1, 3, S, S]``."""
    if size < 16:
        raise ConfigError(f"--size: must be >= 16, got {size}")
    if not isinstance(image, PIL.Image.Image):
        path = Path(image)
        if not path.is_file():
            raise ConfigError(f"--image: no such file '{path}'")
        try:
            image = PIL.Image.open(path)
            image.load()
        except (OSError, PIL.UnidentifiedImageError) as err:
            raise ConfigError(f"--image: cannot read '{path}' ({err})") from None
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), PIL.Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize(array).unsqueeze(0)


def jigsaw_crops(image: Tensor, local_size: int) -> Tensor:
    """The 2x2 jigsaw of ``image`` ``[1, 3, S, S]``: quadrants (top-left, top-right, bottom-left, bottom-right),
    each resized to ``local_size`` (bicubic, antialiased): ``[4, 3, local, local]``."""
    s = image.shape[-1]
    h = s // 2
    quads = [image[..., :h, :h], image[..., :h, h:2 * h], image[..., h:2 * h, :h], image[..., h:2 * h, h:2 * h]]
    return torch.cat([F.interpolate(q, size=(local_size, local_size), mode="bicubic", antialias=True,
                                    align_corners=False) for q in quads])


@torch.no_grad()
def attention_maps(model: Any, image: Tensor, crops: Tensor, stage: str = "layer4",
                   branch: str | None = None) -> tuple[Tensor, Tensor]:
    """(per-crop maps ``[n, h, w]``, mean-query map ``[h, w]``): cosine attention of each crop's pooled stage
    feature (and of their mean) over the global image's stage map ``[1, C, h, w]``."""
    key = model.features(image, branch, kind=stage).float()
    queries = model.features(crops, branch, kind=stage).float().mean(dim=(2, 3))
    maps = search_attention(queries, key.expand(1, -1, -1, -1))  # every query searches the one global image
    mean_map = search_attention(queries.mean(0, keepdim=True), key)[0]
    return maps, mean_map


def vit_backbone(model: Any, branch: str | None = None) -> Any:
    """The ViT backbone (:class:`~semssl.models.vit.ViTBackbone`) behind ``model`` on ``branch``, or None."""
    if not hasattr(model, "backbone_for"):
        return None
    backbone = model.backbone_for(model.resolve_branch(branch) if hasattr(model, "resolve_branch") else branch)
    return backbone if hasattr(backbone, "last_selfattention") else None


def stage_names(model: Any) -> list[str]:
    """The stage maps ``model`` can search: its feature kinds that are stage maps (``layer<i>``, ``block<i>``)."""
    kinds = getattr(model, "feature_kinds", STAGES)
    return [k for k in kinds if k in STAGES or re.fullmatch(r"block\d+", k)]


def default_stage(model: Any, branch: str | None = None) -> str:
    """``layer4`` for a ResNet, the last block (``block12``) for a ViT."""
    vit = vit_backbone(model, branch)
    return vit.stage_names[-1] if vit is not None else "layer4"


@torch.no_grad()
def self_attention_maps(backbone: Any, image: Tensor, threshold: float | None = 0.6) -> tuple[Tensor, Tensor | None]:
    """DINO's self-attention maps of ``image`` ``[1, 3, H, W]`` (module docstring): the last block's CLS attention
    over the patches per head, ``[heads, h, w]``, and the masks keeping ``threshold`` of each head's mass
    (``[heads, h, w]`` of 0/1; None without a threshold)."""
    attn = backbone.last_selfattention(image)[0, :, 0, 1:].float()  # [heads, h*w]
    grid = (image.shape[-2] // backbone.patch_size, image.shape[-1] // backbone.patch_size)
    masks = None
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"--threshold: must be in (0, 1], got {threshold}")
        values, order = torch.sort(attn, dim=1)
        mass = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
        kept_sorted = (mass > 1 - threshold).float()
        masks = torch.zeros_like(attn).scatter_(1, order, kept_sorted).view(-1, *grid)
    return attn.view(-1, *grid), masks


def draw(image: Tensor, crops: Tensor, maps: Tensor, mean_map: Tensor, out: Path, title: str = "",
         self_attention: tuple[Tensor, Tensor | None] | None = None, patch_size: int = 1) -> Path:
    """Write the figure: top row the global image and the local crops; next row the mean-query map and the
    per-crop maps over the global image (bilinear upsampling, one shared colour scale); for a ViT
    (``self_attention`` = :func:`self_attention_maps`) further rows with each head's CLS self-attention over the
    image (upsampled by ``patch_size``, nearest) and its thresholded mask's outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = image.shape[-1]
    up = lambda m: F.interpolate(m[None, None], size=(size, size), mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
    picture = lambda x: denormalize(x).permute(1, 2, 0).numpy()
    vmin = float(torch.minimum(maps.min(), mean_map.min()))
    vmax = float(torch.maximum(maps.max(), mean_map.max()))
    n = crops.shape[0]
    heads = 0 if self_attention is None else self_attention[0].shape[0]
    head_rows = -(-heads // (n + 1))
    fig, axes = plt.subplots(2 + head_rows, n + 1, figsize=(2.2 * (n + 1), 2.3 * (2 + head_rows)), squeeze=False)
    axes[0, 0].imshow(picture(image[0]))
    axes[0, 0].set_title("global", fontsize=9)
    axes[1, 0].imshow(picture(image[0]))
    axes[1, 0].imshow(up(mean_map), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    axes[1, 0].set_title("mean query", fontsize=9)
    for i in range(n):
        axes[0, i + 1].imshow(picture(crops[i]))
        axes[0, i + 1].set_title(f"local {i + 1}", fontsize=9)
        axes[1, i + 1].imshow(picture(image[0]))
        axes[1, i + 1].imshow(up(maps[i]), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        axes[1, i + 1].set_title(f"attention {i + 1}", fontsize=9)
    if self_attention is not None:
        attn, masks = self_attention
        near = lambda m: F.interpolate(m[None, None], scale_factor=patch_size, mode="nearest")[0, 0].numpy()
        for h in range(heads):
            ax = axes[2 + h // (n + 1), h % (n + 1)]
            ax.imshow(picture(image[0]))
            ax.imshow(near(attn[h]), cmap="inferno", alpha=0.6)
            if masks is not None and 0 < float(masks[h].sum()) < masks[h].numel():
                ax.contour(near(masks[h]), levels=[0.5], colors="white", linewidths=1.0)
            ax.set_title(f"self-attn head {h}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{title}  cosine range [{vmin:.3f}, {vmax:.3f}]".strip(), fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def local_size_for(cfg: Any, size: int) -> int:
    """``size`` x (the recipe's second view size / first view size), or x 96/224 without a config or second view."""
    views = list(getattr(getattr(cfg, "data", None), "views", None) or [])
    ratio = views[1].size / views[0].size if len(views) > 1 else LOCAL_RATIO
    return max(16, round(size * ratio))


def draw_attention(model: Any, image: str | Path | PIL.Image.Image, out: str | Path, stage: str | None = None,
                   size: int = 224, local_size: int | None = None, branch: str | None = None,
                   cfg: Any = None, title: str = "", threshold: float | None = 0.6) -> Path:
    """The whole figure for ``model`` (anything with ``features(images, branch, kind)``) on one image; a ViT's
    adds DINO's self-attention maps (module docstring). ``stage`` defaults to :func:`default_stage`."""
    stage = stage or default_stage(model, branch)
    valid = stage_names(model)
    if stage not in valid:
        raise ConfigError(f"--stage: '{stage}' is not one of {valid}")
    vit = vit_backbone(model, branch)
    local = local_size or local_size_for(cfg, size)
    if vit is not None:  # whole patches only
        p = vit.patch_size
        size, local = max(p, size // p * p), max(p, local // p * p)
    x = load_image(image, size)
    crops = jigsaw_crops(x, local)
    maps, mean_map = attention_maps(model, x, crops, stage, branch)
    extra = self_attention_maps(vit, x, threshold) if vit is not None else None
    return draw(x, crops, maps, mean_map, Path(out), title or stage, self_attention=extra,
                patch_size=vit.patch_size if vit is not None else 1)


def figure_title(info: dict, cfg: Any, branch: str | None, stage: str) -> str:
    """``"<method> [(<variant>)] <branch> <stage>"``: SCFS's Table 7 variants (DINO*, DINO w ML, ...) share the
    method name ``scfs``, so the variant is named when it is not the method itself."""
    variant = getattr(getattr(cfg, "method", None), "variant", None)
    method = info.get("method", "")
    if variant and variant != method:
        method = f"{method} ({variant})"
    return f"{method} {branch} {stage}"


def run(args: argparse.Namespace) -> int:
    from semssl.checkpoints import load_model

    model, info, cfg = load_model(args.checkpoint)
    branch = args.branch or info.get("default_branch")
    stage = args.stage or default_stage(model, branch)
    out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_attention_{stage}.png")
    title = figure_title(info, cfg, branch, stage)
    draw_attention(model, args.image, out, stage=stage, size=args.size, local_size=args.local_size,
                   branch=args.branch, cfg=cfg, title=title, threshold=args.threshold)
    print(out)
    return 0


def during_training(method: Any, cfg: Any, paths: dict, out: Path, stage: str | None = None,
                    size: int | None = None, image: str | None = None, index: int = 0,
                    threshold: float | None = 0.6) -> None:
    """``trainer.figures: [{name: attention, every_n_epochs: N, stage: layer4, image: FILE}]``: the figure for the
    live method; without ``image``, sample ``index`` of the evaluation test set (else the training set), at the
    global view's size; ``stage`` defaults to :func:`default_stage` (a ViT: its last block)."""
    if image is None:
        from semssl.data.sources import build_source

        source_path = paths.get("eval_test") or paths.get("train")
        if not source_path:
            raise ConfigError("trainer.figures attention: no image given and no data path to take one from")
        image = build_source(source_path)[index]["image"]
    size = size or cfg.data.views[0].size
    stage = stage or default_stage(method)
    draw_attention(method, image, out, stage=stage, size=size, cfg=cfg, title=f"{cfg.method.name} {stage}",
                   threshold=threshold)
