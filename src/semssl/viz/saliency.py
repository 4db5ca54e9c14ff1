"""SCD's saliency maps (paper 001, Figs. 4-6): the foreground map ``M^fg`` of an SCD model, upsampled to the
image and overlaid on it, one column per image (top: the image, bottom: the overlay, with the map's mean).

``semssl viz saliency --checkpoint RUN_OR_CKPT --images DIR_OR_FILES... [--size N] [--n 8] [--out PNG]`` draws it
for any SCD checkpoint (``scd_mocov2``, ``scd_byol``); ``trainer.figures: [{name: saliency, every_n_epochs: 5}]``
draws the same grid during training from the run's evaluation images (Fig. 6: the maps forming).

Decisions: images are resized (shorter side to ``size``) and centre-cropped to ``size`` x ``size``, normalised as
for evaluation; ``size`` defaults to the run's ``data.eval_size`` (a larger one gives a finer map: the map has
size/32 cells on a ResNet); the map is upsampled bilinearly; the branch is the model's evaluated one unless
``--branch`` says otherwise; ``--images`` are gathered as for every figure (``semssl.viz.images``: files,
folders, a COCO JSON or ``synthetic:scenes``, spread evenly when there are more than ``n``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.errors import ConfigError
from semssl.viz import save_figure
from semssl.viz.images import gather


def load_images(pictures: Sequence[Any], size: int) -> Tensor:
    """``[n, 3, size, size]`` normalised images (resize shorter side, centre crop) from PIL images."""
    from semssl.data.augment import eval_transform

    transform = eval_transform(size, resize_ratio=1.0)
    return torch.stack([transform(p) for p in pictures])


def saliency_maps(model: Any, images: Tensor, branch: Optional[str] = None) -> Tensor:
    """``M^fg`` of ``model`` upsampled to the images: ``[n, H, W]`` in (0, 1)."""
    if not hasattr(model, "saliency"):
        name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
        raise ConfigError(f"method '{name}' has no saliency network (SCD checkpoints have one: scd_mocov2, "
                          f"scd_byol)")
    device = next(model.parameters()).device
    with torch.no_grad():
        maps = model.saliency(images.to(device), branch).float().cpu()
    return F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def draw(images: Tensor, maps: Tensor, out: Path, title: str = "", columns: int = 8,
         labels: Optional[Sequence[str]] = None) -> Path:
    """Write the grid: per image its picture above its overlay (``jet``, alpha 0.5, colour scale [0, 1])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from semssl.data.augment import denormalize

    n = images.shape[0]
    cols = max(1, min(columns, n))
    blocks = -(-n // cols)
    fig = Figure(figsize=(1.6 * cols + 0.6, 3.3 * blocks + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    last = None
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        picture = denormalize(images[i]).permute(1, 2, 0).numpy()
        axes[r, c].imshow(picture)
        if labels is not None:
            axes[r, c].set_title(labels[i], fontsize=7)
        axes[r + 1, c].imshow(picture)
        last = axes[r + 1, c].imshow(maps[i].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        axes[r + 1, c].set_title(f"M mean {float(maps[i].mean()):.2f}", fontsize=7)
    if last is not None:
        fig.colorbar(last, ax=axes.ravel().tolist(), shrink=0.6, label="M^fg")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, out, dpi=100)


def run(args: argparse.Namespace) -> int:
    from semssl.checkpoints import load_model

    model, info, cfg = load_model(args.checkpoint)
    size = args.size or (cfg.data.eval_size if cfg is not None else 224)
    names, pictures = zip(*gather(args.images, args.n, cfg))
    images = load_images(pictures, size)
    branch = model.resolve_branch(args.branch) if hasattr(model, "resolve_branch") else None
    maps = saliency_maps(model, images, branch)
    title = f"{info['method']} ({branch} branch), step {info.get('global_step')}, {size} px: saliency M^fg"
    out = draw(images, maps, Path(args.out), title, args.columns, [name[:18] for name in names])
    print(out)
    return 0


def during_training(method: Any, cfg: Any, paths: dict, out: Path, n: int = 8, size: Optional[int] = None,
                    branch: Optional[str] = None, columns: int = 8) -> None:
    """The same grid for the live ``method`` on ``n`` images of the run's evaluation test split (spread over it),
    into ``out``."""
    folder = paths.get("eval_test") or paths.get("eval_train")
    if not folder:
        raise ConfigError("trainer.figures saliency: the run has no evaluation images (data.eval_test)")
    size = size or cfg.data.eval_size
    images = load_images([picture for _, picture in gather([folder], n, cfg)], size)
    maps = saliency_maps(method, images, branch)
    draw(images, maps, out, f"{cfg.method.name} {out.stem}, {size} px: saliency M^fg", columns)
