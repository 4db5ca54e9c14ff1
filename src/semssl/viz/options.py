"""The command-line options of the figures, ``semssl viz NAME``: each figure's one-line help and
``add_<name>_arguments(parser)``, apart from the figure modules themselves (which import torch and matplotlib), so
that building the parser imports neither; ``semssl viz NAME`` imports ``semssl.viz.NAME`` only to run it.

:data:`FIGURES` lists every figure module of this package (:func:`semssl.viz.figure_modules`);
tests/test_cli_quick.py checks that the two agree, so a new figure is its module plus its entry here.
This module is light (standard library only).
"""

from __future__ import annotations

import argparse
from typing import Callable

HELP_ATTENTION = "attention maps of 2x2 jigsaw local crops over the global image's stage map (SCFS Fig. 3)"


def add_attention_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl viz attention`` (:func:`semssl.viz.attention.run`)."""
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint (or a torchvision state_dict)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--stage", help="stage map to search: layer1..layer4 of a ResNet (default layer4), block<i> "
                                        "of a ViT (default its last block)")
    parser.add_argument("--size", type=int, default=224, help="global image side in pixels (default 224)")
    parser.add_argument("--local-size", type=int,
                        help="local crop side (default: the recipe's local/global view ratio x --size, else 96/224)")
    parser.add_argument("--branch", help="network branch (default: the method's evaluated branch)")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="ViT only: the self-attention masks keep this share of the attention mass (default 0.6, "
                             "DINO's figures)")
    parser.add_argument("--out", help="PNG to write (default: <image stem>_attention_<stage>.png here)")


HELP_BIAS = ("coupling rate and positional bias (3x3 mean cosine) per stage from `semssl eval bias` JSON files, one "
             "line per checkpoint (D3SSL Figs. 3-4)")


def add_bias_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl viz bias`` (:func:`semssl.viz.bias.run`)."""
    parser.add_argument("--inputs", nargs="+", required=True, metavar="JSON",
                        help="outputs of `semssl eval bias --out` (one or several checkpoints)")
    parser.add_argument("--labels", nargs="+", help="one legend label per input (default: the file names)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--out", default="bias.png", help="PNG to write (default bias.png)")


HELP_CLUSTERS = "cluster maps: each pixel coloured by its k-means / prototype assignment (DSC Fig. 6 in spirit)"


def add_clusters_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl viz clusters`` (:func:`semssl.viz.clusters.run`)."""
    parser.add_argument("--checkpoint", required=True, help="run folder, semssl .ckpt, or torchvision state_dict")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                        help="image files and/or folders (recursive), a COCO JSON, or synthetic:scenes")
    parser.add_argument("--n", type=int, default=6, help="number of images (default 6)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--k", type=int, default=8, help="clusters of the on-the-fly k-means (default 8)")
    parser.add_argument("--stage", help="map clustered on the fly (default: dense if the model has it, else layer4)")
    parser.add_argument("--branch", help="online or teacher (default: the method's evaluated branch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the on-the-fly k-means (default 0)")
    parser.add_argument("--out", default="clusters.png", help="PNG file to write (default clusters.png)")


HELP_REGIONS = "D3SSL's region augmentations (proposals, PRC, PRM, RBJ, composite) on images"


def add_regions_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl viz regions`` (:func:`semssl.viz.regions.run`)."""
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--n", type=int, default=3, help="number of images, >= 2 (default 3)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--boxes", type=int, default=4, help="proposals per image augmented (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random augmentations (default 0)")
    parser.add_argument("--out", default="regions.png", help="PNG file to write (default regions.png)")


HELP_SALIENCY = "SCD saliency maps overlaid on images (paper Figs. 4-6)"


def add_saliency_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``semssl viz saliency`` (:func:`semssl.viz.saliency.run`)."""
    parser.add_argument("--checkpoint", required=True, help="an SCD run folder or checkpoint file")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_FILE",
                        help="image files and/or folders (recursive; a folder with an images/ sub-folder is "
                             "read through it), a COCO JSON, or synthetic:scenes")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the run's data.eval_size)")
    parser.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--branch", help="online or teacher (default: the method's evaluated branch)")
    parser.add_argument("--columns", type=int, default=8, help="images per row of the grid (default 8)")
    parser.add_argument("--out", default="saliency.png", help="PNG file to write (default saliency.png)")


#: ``{name: (help, add_arguments)}`` of every figure, in ``semssl viz --help`` order (by name)
FIGURES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "attention": (HELP_ATTENTION, add_attention_arguments),
    "bias": (HELP_BIAS, add_bias_arguments),
    "clusters": (HELP_CLUSTERS, add_clusters_arguments),
    "regions": (HELP_REGIONS, add_regions_arguments),
    "saliency": (HELP_SALIENCY, add_saliency_arguments),
}
