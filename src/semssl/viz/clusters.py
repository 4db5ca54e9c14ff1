"""Cluster maps (DSC, paper 002 — Fig. 6 in spirit): every position of the last stage map of a few images
coloured by its cluster, one column per image (top: the image, bottom: the map over a faded copy of it).

``semssl viz clusters --checkpoint RUN --images DIR_OR_FILE... [--n 6] [--size 128] [--out PNG]``

* a DSC checkpoint with ``semantic: kmeans`` colours each position by its nearest current centroid (the
  buffer the online k-means keeps), with ``prototypes`` / ``ce`` by its highest-scoring prototype
  (``DSC.cluster_map``);
* any other model (DenseCL, MoCo-v2, a plain backbone, DSC's neighbour/triplet strategies) gets a spherical
  k-means (``--k`` clusters, 10 iterations, seeded) of the L2-normalised dense features of the shown images,
  computed on the fly: DenseCL/DSC's ``dense`` projection map when the model has one, else ``layer4``
  (``--stage`` chooses).

The same cluster has the same colour in every image (a fixed palette indexed by cluster id). Images: files,
folders, a COCO JSON or ``synthetic:scenes``, gathered as for every figure (``semssl.viz.images``); each resized
to ``size x size`` (aspect not kept, as in the dense probe) and normalised.
``trainer.figures: [{name: clusters, every_n_epochs: 5}]`` draws it during training from the training images.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from semssl.viz import save_figure
from semssl.viz.images import gather, square_tensor


# -- images ------------------------------------------------------------------------------------------------
def load_images(items: Sequence[str], n: int, size: int, cfg: Any = None) -> Tensor:
    """Up to ``n`` images ``[n, 3, size, size]`` (normalised, resized to a square) gathered from files, folders,
    a COCO JSON or ``synthetic:scenes`` (``semssl.viz.images.gather``)."""
    return torch.stack([square_tensor(image, size) for _, image in gather(items, n, cfg)])


# -- clusters ----------------------------------------------------------------------------------------------
@torch.no_grad()
def cluster_maps(model: Any, images: Tensor, k: int = 8, stage: str | None = None, branch: str | None = None,
                 seed: int = 0) -> tuple[Tensor, str]:
    """``([N, h, w] cluster ids, description)``: the model's own clusters when it has them (DSC kmeans /
    prototypes / ce), else a spherical k-means of its dense features over all positions of ``images``."""
    from semssl.losses.kmeans import kmeans_init, spherical_kmeans

    was_training = getattr(model, "training", False)
    model.eval()
    try:
        own = model.cluster_map(images, branch) if hasattr(model, "cluster_map") and stage is None else None
        if own is not None:
            semantic = model.cfg.semantic
            what = "k-means centroids" if semantic == "kmeans" else "prototypes"
            return own, f"{what} of the model ({semantic})"
        kind = stage or ("dense" if "dense" in getattr(model, "feature_kinds", ()) else "layer4")
        fmap = model.features(images, branch=branch, kind=kind)
        b, c, h, w = fmap.shape
        x = F.normalize(fmap.permute(0, 2, 3, 1).reshape(-1, c).float(), dim=1)
        g = torch.Generator().manual_seed(seed)
        _, assign = spherical_kmeans(x, kmeans_init(x, min(k, x.shape[0]), generator=g), n_iters=10)
        return assign.reshape(b, h, w), f"k-means (k={k}) of the {kind} features of these images"
    finally:
        if was_training:
            model.train()


def palette(n: int) -> np.ndarray:
    """``[n, 3]`` fixed, well-spread RGB colours in [0, 1] (tab20 first, then seeded random ones)."""
    from matplotlib import colormaps

    base = np.array([colormaps["tab20"](i)[:3] for i in range(20)])
    if n <= 20:
        return base[:n]
    extra = np.random.default_rng(0).uniform(0.15, 0.95, size=(n - 20, 3))
    return np.concatenate([base, extra])


def draw(images: Tensor, maps: Tensor, out: Path, title: str = "") -> Path:
    """Write the grid: row 1 the images, row 2 each map (nearest-upsampled) over the faded image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, size = images.shape[0], images.shape[-1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    up = F.interpolate(maps[:, None].float().cpu(), size=(size, size), mode="nearest")[:, 0].long().numpy()
    colours = palette(int(up.max()) + 1)
    fig = Figure(figsize=(2.2 * n, 4.8))
    FigureCanvasAgg(fig)
    for i in range(n):
        top, bottom = fig.add_subplot(2, n, i + 1), fig.add_subplot(2, n, n + i + 1)
        top.imshow(rgb[i])
        bottom.imshow(0.35 * rgb[i] + 0.65 * colours[up[i]])
        bottom.set_xlabel(f"{len(np.unique(up[i]))} clusters", fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


# -- entry points ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from semssl.checkpoints import load_model

    model, info, cfg = load_model(args.checkpoint)
    images = load_images(args.images, args.n, args.size, cfg)
    maps, what = cluster_maps(model, images, k=args.k, stage=args.stage, branch=args.branch, seed=args.seed)
    out = draw(images, maps, Path(args.out), f"{info.get('method')}: {what}")
    print(f"wrote {out}")
    return 0


def during_training(method: Any, cfg: Any, paths: dict, out: Path, n: int = 6, size: int | None = None,
                    k: int = 8) -> None:
    """The grid for the live ``method`` on ``n`` of the run's training images (``paths["train"]``)."""
    size = size or max(v.size for v in cfg.data.views)
    images = load_images([paths["train"]], n, size, cfg)
    maps, what = cluster_maps(method, images, k=k)
    draw(images, maps, out, f"{cfg.method.name}: {what}")
