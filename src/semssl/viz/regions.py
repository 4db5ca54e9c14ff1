"""D3SSL's region augmentations on real images (paper 003, Fig. 5 in spirit): one row per image with its
proposals, PRC, PRM, RBJ and the de-positioning composite.

``semssl viz regions --images DIR_OR_FILES... [--n 3] [--size 224] [--seed 0] [--out regions.png]``

Columns: (1) the image with its selective-search proposals (SoCo's configuration and filters,
:func:`semssl.data.proposals.compute_image_proposals`, computed here, not read from a cache); (2) PRC
(:func:`~semssl.data.regions.proposal_cutout`: aspect-preserving cut-outs from large to small proposals);
(3) PRM (:func:`~semssl.data.regions.proposal_mask`: the proposals plus partial background in random directions);
(4) RBJ (:func:`~semssl.data.regions.box_jitter` with ``grow=False``, p 1: original boxes dashed, jittered solid);
(5) the composite (:func:`~semssl.data.regions.composite`: the proposals' pixels shifted by one offset, PRC-cut,
pasted onto the next image of the figure — the row below, the first for the last row).

Decisions: each image is resized to ``size`` x ``size`` (aspect not kept, as SoCo's view 1) and its boxes scaled
with it; the hidden pixels are the ImageNet mean colour (:func:`~semssl.data.regions.region_fill`); at most
``--boxes`` (default 4, SoCo's k) of the proposals, the largest first, go through the augmentations, so the
picture stays readable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from semssl.errors import ConfigError, DataError
from semssl.viz import save_figure
from semssl.viz.images import image_files

COLUMNS = ("proposals", "PRC", "PRM", "RBJ", "composite")


def load_with_proposals(path: Path, size: int, max_boxes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image uint8 [3, size, size], boxes float [P, 4] in its pixels)``: the largest ``max_boxes`` proposals."""
    from PIL import Image

    from semssl.data.proposals import compute_image_proposals

    entry = compute_image_proposals(path)
    if "error" in entry:
        raise DataError(f"--images: cannot read '{path}': {entry['error']}")
    w, h = entry["wh"]
    boxes = torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4)
    boxes = boxes * torch.tensor([size / w, size / h, size / w, size / h])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    boxes = boxes[areas.argsort(descending=True)[:max_boxes]]
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1), boxes


def augment_row(image: torch.Tensor, boxes: torch.Tensor, background: torch.Tensor,
                generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{column: (image [3, H, W], boxes to draw [P, 4])}`` for one image (RBJ also keeps the originals)."""
    from semssl.data.regions import (
        box_jitter,
        composite,
        depositioning_offset,
        proposal_cutout,
        proposal_mask,
    )

    size = image.shape[-2:]
    prc, _ = proposal_cutout(image, boxes, generator=generator)
    prm, _ = proposal_mask(image, boxes, generator=generator)
    jittered = box_jitter(boxes, size, p=1.0, grow=False, generator=generator)
    offset = depositioning_offset(boxes, size, generator=generator)
    comp, shifted, _ = composite(image, boxes, background, offset, generator=generator)
    return {"proposals": (image, boxes), "PRC": (prc, boxes), "PRM": (prm, boxes), "RBJ": (image, jittered),
            "composite": (comp, shifted)}


def run(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ConfigError(f"--n must be >= 2 (the composite pastes onto another image), got {args.n}")
    print(draw_regions(image_files(args.images, args.n), Path(args.out), args.size, args.boxes, args.seed))
    return 0


def draw_regions(files: list[Path], out: Path, size: int = 224, boxes: int = 4, seed: int = 0) -> Path:
    """The figure (module docstring) for the image ``files`` (at least 2), written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    max_boxes = boxes
    if size < 32 or max_boxes < 1:
        raise ConfigError(f"--size must be >= 32 and --boxes >= 1, got {size} and {max_boxes}")
    if len(files) < 2:
        raise DataError(f"--images: need at least 2 images, found {len(files)}")
    loaded = [load_with_proposals(f, size, max_boxes) for f in files]
    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(len(loaded), len(COLUMNS), figsize=(2.6 * len(COLUMNS), 2.6 * len(loaded)),
                             squeeze=False)
    for r, (image, boxes) in enumerate(loaded):
        row = augment_row(image, boxes, loaded[(r + 1) % len(loaded)][0], generator)
        for c, name in enumerate(COLUMNS):
            ax = axes[r][c]
            shown, drawn = row[name]
            ax.imshow(shown.permute(1, 2, 0).numpy())
            if name == "RBJ":
                for x1, y1, x2, y2 in boxes.tolist():
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ls="--", lw=1, ec="white"))
            for i, (x1, y1, x2, y2) in enumerate(drawn.tolist()):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=f"C{i % 10}"))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
        axes[r][0].set_ylabel(files[r].name[:20], fontsize=8)
    fig.suptitle(f"D3SSL region augmentations, {size} px, {max_boxes} largest proposals, seed {seed}")
    fig.tight_layout()
    return save_figure(fig, Path(out))
