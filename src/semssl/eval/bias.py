"""Coupling rate (CR) and positional bias (MCS) per stage (D3SSL §3.1-3.2, Figs. 3-4; docs/methods/d3ssl.md §Metrics;
docs/design.md §CR and MCS).

Both measures use ground-truth object crops of a COCO-style split, stage features post-ReLU (a ResNet stage's
output already is), RoIAlign 7x7 of the object's box on each stage and average pooling
(:func:`semssl.eval.objects.roi_features`), read through ``model.features(images, branch, kind=stage)`` — so
any method (DINO, MoCo, DenseCL, SoCo, D3SSL ...) and a random network are measured alike.

* **CR** (:func:`pair_canvases`, :func:`coupling_rate`): on a black canvas of the evaluated resolution, object A
  and object B (crops of different classes), each resized to a third of the canvas side, side by side with no
  gap (image 1); image 2 has A alone at the same place. CR = mean over pairs of cos(A₁, B) / cos(A₂, B), B's
  feature taken in image 1 (the only image that has B). Ideal 1; larger = A's feature takes in more of B.
* **MCS** (:func:`tile_canvas`, :func:`positional_mcs`): one object crop tiled 3x3 to fill the canvas; the mean
  cosine between the centre cell's feature and each of the 8 others, averaged over objects. Ideal 1; smaller =
  more position (zero-padding) in the feature.

Deterministic given ``seed`` (objects and pairs are drawn by a seeded generator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from semssl.data.sources.coco import CocoSource
from semssl.errors import ConfigError, DataError
from semssl.eval.features import EvalInputError
from semssl.eval.objects import normalize, roi_features
from semssl.models.backbones import STAGES

__all__ = [
    "BiasConfig",
    "ObjectRef",
    "canvas_geometry",
    "collect_objects",
    "coupling_rate",
    "crop_object",
    "evaluate_bias",
    "pair_canvases",
    "positional_mcs",
    "sample_objects",
    "sample_pairs",
    "tile_canvas",
]

log = logging.getLogger("semssl.eval")

#: a cosine this small in a CR denominator makes the ratio meaningless: the pair is left out (and counted)
MIN_DENOMINATOR = 1e-6


# ------------------------------------------------------------------------------------------------ geometry
def canvas_geometry(size: int) -> tuple[int, int]:
    """(canvas side, cell side) for an evaluated resolution ``size``: the cell is ``size // 3`` and the canvas
    three cells, ``3 * (size // 3)``.

    Decision: the canvas is rounded down to a multiple of 3 (224 -> 222, cells of 74) so the 3x3 tiling fills it
    exactly with equal cells, and the CR pair uses the same cell size (a third of the canvas)."""
    if size < 3:
        raise ConfigError(f"size: expected >= 3 pixels for a 3x3 canvas, got {size}")
    cell = size // 3
    return 3 * cell, cell


def crop_object(image: Image.Image, box: Sequence[float], side: int) -> Tensor:
    """The box ``(x1, y1, x2, y2)`` of ``image`` resized to ``side`` x ``side`` (bicubic, antialiased; the aspect
    ratio is not kept, so every object fills its cell), as ``[3, side, side]`` in [0, 1] (not normalised).

    Decision: objects fill the cell ("resized to a third of" the canvas), so the boxes of A and B are exactly
    cells and the composition has no gap, whatever the objects' aspect ratios."""
    crop = image.convert("RGB").resize((side, side), Image.BICUBIC, box=tuple(float(v) for v in box))
    pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(side, side, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def pair_canvases(crop_a: Tensor, crop_b: Tensor, canvas: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CR's two images (``[3, canvas, canvas]`` in [0, 1], black = 0) and the boxes of A and B.

    Image 1: A and B (``[3, c, c]`` each) side by side, A left, B right, no gap; the pair is centred on the
    canvas (A's left edge at ``(canvas - 2c) // 2``, top edge at ``(canvas - c) // 2``). Image 2: A alone at the
    same place. Boxes ``[4]`` (x1, y1, x2, y2) in pixels.
    """
    c = crop_a.shape[-1]
    if crop_a.shape != (3, c, c) or crop_b.shape != (3, c, c) or 2 * c > canvas:
        raise EvalInputError(f"pair_canvases: crops {tuple(crop_a.shape)} / {tuple(crop_b.shape)} must be equal "
                             f"[3, c, c] squares with 2c <= canvas {canvas}")
    x0, y0 = (canvas - 2 * c) // 2, (canvas - c) // 2
    alone = torch.zeros(3, canvas, canvas)
    alone[:, y0:y0 + c, x0:x0 + c] = crop_a
    both = alone.clone()
    both[:, y0:y0 + c, x0 + c:x0 + 2 * c] = crop_b
    box_a = torch.tensor([x0, y0, x0 + c, y0 + c], dtype=torch.float32)
    box_b = torch.tensor([x0 + c, y0, x0 + 2 * c, y0 + c], dtype=torch.float32)
    return both, alone, box_a, box_b


def tile_canvas(crop: Tensor) -> tuple[Tensor, Tensor]:
    """MCS's image: ``crop`` ``[3, c, c]`` tiled 3x3 -> ``[3, 3c, 3c]``, and the 9 cell boxes ``[9, 4]`` in
    row-major order (index 4 = the centre)."""
    c = crop.shape[-1]
    if crop.dim() != 3 or crop.shape[-2] != c:
        raise EvalInputError(f"tile_canvas: expected a [3, c, c] crop, got {tuple(crop.shape)}")
    canvas = crop.repeat(1, 3, 3)
    boxes = torch.tensor([[j * c, i * c, (j + 1) * c, (i + 1) * c] for i in range(3) for j in range(3)],
                         dtype=torch.float32)
    return canvas, boxes


# ------------------------------------------------------------------------------------------------ sampling
@dataclass(frozen=True)
class ObjectRef:
    """One ground-truth object: its image's index in the source, its box (source pixels) and class index."""

    image: int
    box: tuple[float, float, float, float]
    label: int


def collect_objects(source: CocoSource, min_side: float = 16.0) -> list[ObjectRef]:
    """Every object of ``source`` whose box has both sides >= ``min_side`` source pixels (smaller ones would be
    blown up from a few pixels). Undecodable images are skipped (the source logs them)."""
    objects = []
    for index in range(len(source)):
        sample = source[index]
        if sample["index"] != index:
            continue
        for box, label in zip(sample["boxes"].tolist(), sample["box_labels"].tolist()):
            if box[2] - box[0] >= min_side and box[3] - box[1] >= min_side:
                objects.append(ObjectRef(index, tuple(box), int(label)))
    return objects


def sample_pairs(labels: Sequence[int], n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (A, B) index pairs into ``labels`` with different classes: A uniform over the objects, B uniform over
    the objects of another class (seeded; pairs may repeat when the objects are few)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise DataError("coupling rate: needs objects of at least 2 classes, found "
                        f"{len(np.unique(labels))} class(es) among {len(labels)} objects")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        a = int(rng.integers(len(labels)))
        others = np.flatnonzero(labels != labels[a])
        pairs.append((a, int(others[rng.integers(len(others))])))
    return pairs


def sample_objects(count: int, n: int, seed: int = 0) -> list[int]:
    """``min(n, count)`` distinct object indices out of ``count`` (seeded)."""
    rng = np.random.default_rng(seed + 1)
    return sorted(rng.choice(count, size=min(n, count), replace=False).tolist())


# ------------------------------------------------------------------------------------------------ measures
def _stage_features(model: nn.Module, images: Tensor, boxes: list[Tensor], stages: Sequence[str],
                    branch: str | None, output_size: int, device: Any) -> dict[str, Tensor]:
    """{stage: RoIAlign-average features ``[sum K_i, C]``} of normalised ``images`` (one forward per stage)."""
    images = normalize(images).to(device)
    return {stage: roi_features(model.features(images, branch=branch, kind=stage), boxes,
                                tuple(images.shape[-2:]), output_size).cpu()
            for stage in stages}


@torch.no_grad()
def coupling_rate(model: nn.Module, crops_a: Tensor, crops_b: Tensor, canvas: int,
                  stages: Sequence[str] = STAGES, branch: str | None = None, output_size: int = 7,
                  batch_size: int = 32, device: Any = "cpu") -> dict[str, dict[str, float]]:
    """CR per stage of the pairs ``crops_a[i]``, ``crops_b[i]`` (``[P, 3, c, c]`` in [0, 1]).

    Returns ``{"coupling_rate": {stage: mean ratio}, "coupling_rate_std": {...}, "cos_a1_b": {stage: mean},
    "cos_a2_b": {...}, "excluded": {stage: pairs left out}}``; a pair whose cos(A₂, B) is below
    :data:`MIN_DENOMINATOR` (e.g. an all-zero feature) is left out of that stage's mean and counted.
    """
    num: dict[str, list[Tensor]] = {s: [] for s in stages}
    den: dict[str, list[Tensor]] = {s: [] for s in stages}
    for start in range(0, crops_a.shape[0], batch_size):
        made = [pair_canvases(a, b, canvas) for a, b in zip(crops_a[start:start + batch_size],
                                                             crops_b[start:start + batch_size])]
        n = len(made)
        images = torch.stack([m[0] for m in made] + [m[1] for m in made])
        boxes = [torch.stack([m[2], m[3]]) for m in made] + [m[2][None] for m in made]
        feats = _stage_features(model, images, boxes, stages, branch, output_size, device)
        for stage, f in feats.items():
            a1, b = f[0:2 * n:2], f[1:2 * n:2]
            a2 = f[2 * n:]
            c1 = F.cosine_similarity(a1, b, dim=1, eps=1e-12)
            c2 = F.cosine_similarity(a2, b, dim=1, eps=1e-12)
            num[stage].append(c1)
            den[stage].append(c2)
    out: dict[str, dict[str, float]] = {"coupling_rate": {}, "coupling_rate_std": {}, "cos_a1_b": {},
                                        "cos_a2_b": {}, "excluded": {}}
    for stage in stages:
        c1, c2 = torch.cat(num[stage]).double(), torch.cat(den[stage]).double()
        ok = c2 > MIN_DENOMINATOR
        ratio = c1[ok] / c2[ok]
        out["coupling_rate"][stage] = float(ratio.mean()) if ok.any() else float("nan")
        out["coupling_rate_std"][stage] = float(ratio.std(unbiased=False)) if ok.any() else float("nan")
        out["cos_a1_b"][stage] = float(c1.mean())
        out["cos_a2_b"][stage] = float(c2.mean())
        out["excluded"][stage] = int((~ok).sum())
        if (~ok).any():
            log.warning("coupling rate, %s: %d pair(s) with cos(A2, B) ~ 0 left out", stage, int((~ok).sum()))
    return out


@torch.no_grad()
def positional_mcs(model: nn.Module, crops: Tensor, stages: Sequence[str] = STAGES, branch: str | None = None,
                   output_size: int = 7, batch_size: int = 32, device: Any = "cpu") -> dict[str, dict[str, float]]:
    """MCS per stage of the objects ``crops`` ``[N, 3, c, c]`` (in [0, 1]), each tiled 3x3 (canvas 3c).

    Returns ``{"positional_mcs": {stage: mean over objects of the mean cosine centre vs the 8 others},
    "positional_mcs_std": {...}}``.
    """
    per_object: dict[str, list[Tensor]] = {s: [] for s in stages}
    for start in range(0, crops.shape[0], batch_size):
        made = [tile_canvas(c) for c in crops[start:start + batch_size]]
        images = torch.stack([m[0] for m in made])
        boxes = [m[1] for m in made]
        for stage, f in _stage_features(model, images, boxes, stages, branch, output_size, device).items():
            f = f.view(len(made), 9, -1)
            cos = F.cosine_similarity(f[:, 4:5], f, dim=2, eps=1e-12)  # [n, 9]
            others = torch.cat([cos[:, :4], cos[:, 5:]], dim=1)
            per_object[stage].append(others.mean(1))
    out: dict[str, dict[str, float]] = {"positional_mcs": {}, "positional_mcs_std": {}}
    for stage in stages:
        values = torch.cat(per_object[stage]).double()
        out["positional_mcs"][stage] = float(values.mean())
        out["positional_mcs_std"][stage] = float(values.std(unbiased=False))
    return out


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class BiasConfig:
    """Settings of :func:`evaluate_bias` (defaults: docs/design.md §CR and MCS, at the paper's 224 px)."""

    size: int = 224
    pairs: int = 100
    objects: int = 100
    stages: tuple[str, ...] = field(default_factory=lambda: tuple(STAGES))
    min_side: float = 16.0
    output_size: int = 7
    seed: int = 0
    batch_size: int = 32


def _crops(source: CocoSource, objects: list[ObjectRef], which: Sequence[int], side: int) -> Tensor:
    """``[len(which), 3, side, side]`` crops of the chosen objects, each image decoded once."""
    by_image: dict[int, list[int]] = {}
    for position, i in enumerate(which):
        by_image.setdefault(objects[i].image, []).append(position)
    out = torch.empty(len(which), 3, side, side)
    for image_index, positions in by_image.items():
        image = source[image_index]["image"]
        for position in positions:
            out[position] = crop_object(image, objects[which[position]].box, side)
    return out


def prepare_crops(source: CocoSource, cfg: BiasConfig) -> dict[str, Any]:
    """The objects of ``source``, the sampled pairs and MCS objects, and their crops (model-independent, so
    several models are measured on the very same images)."""
    canvas, cell = canvas_geometry(cfg.size)
    if cfg.pairs < 1 or cfg.objects < 1:
        raise ConfigError(f"pairs / objects: expected >= 1, got {cfg.pairs} / {cfg.objects}")
    objects = collect_objects(source, cfg.min_side)
    if not objects:
        raise DataError(f"'{source.location}': no object with both box sides >= {cfg.min_side} px")
    pairs = sample_pairs([o.label for o in objects], cfg.pairs, cfg.seed)
    chosen = sample_objects(len(objects), cfg.objects, cfg.seed)
    if len(chosen) < cfg.objects:
        log.warning("positional bias: only %d objects available (%d asked)", len(chosen), cfg.objects)
    return {"canvas": canvas, "cell": cell, "n_available": len(objects),
            "crops_a": _crops(source, objects, [a for a, _ in pairs], cell),
            "crops_b": _crops(source, objects, [b for _, b in pairs], cell),
            "crops_mcs": _crops(source, objects, chosen, cell)}


def evaluate_bias(model: nn.Module, source: CocoSource | None = None, cfg: BiasConfig | None = None,
                  branch: str | None = None, device: Any = "cpu",
                  prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """CR and MCS of ``model`` per stage on the objects of ``source`` (or on ``prepared`` crops of
    :func:`prepare_crops`). ``model`` runs in eval mode (its mode is restored).

    Returns ``{"coupling_rate": {stage: ...}, "positional_mcs": {stage: ...}}`` plus the spreads, the mean
    cosines, the counts and the settings."""
    cfg = cfg or BiasConfig()
    for stage in cfg.stages:
        if stage not in getattr(model, "feature_kinds", STAGES):
            raise ConfigError(f"stages: '{stage}' is not a feature kind of this model "
                              f"({list(getattr(model, 'feature_kinds', STAGES))})")
    if prepared is None:
        if source is None:
            raise EvalInputError("evaluate_bias: give a source or prepared crops")
        prepared = prepare_crops(source, cfg)
    was_training = model.training
    model.eval()
    try:
        cr = coupling_rate(model, prepared["crops_a"], prepared["crops_b"], prepared["canvas"], cfg.stages,
                           branch, cfg.output_size, cfg.batch_size, device)
        mcs = positional_mcs(model, prepared["crops_mcs"], cfg.stages, branch, cfg.output_size, cfg.batch_size,
                             device)
    finally:
        model.train(was_training)
    return {"coupling_rate": cr["coupling_rate"], "positional_mcs": mcs["positional_mcs"],
            "coupling_rate_std": cr["coupling_rate_std"], "positional_mcs_std": mcs["positional_mcs_std"],
            "cos_a1_b": cr["cos_a1_b"], "cos_a2_b": cr["cos_a2_b"], "cr_excluded_pairs": cr["excluded"],
            "n_pairs": int(prepared["crops_a"].shape[0]), "n_objects": int(prepared["crops_mcs"].shape[0]),
            "n_available_objects": prepared["n_available"], "canvas": prepared["canvas"], "cell": prepared["cell"],
            "stages": list(cfg.stages), "seed": cfg.seed, "min_side": cfg.min_side,
            "roi": f"RoIAlign {cfg.output_size}x{cfg.output_size} per stage, average-pooled"}


# ------------------------------------------------------------------------------------------------ command line
# (its options: semssl.eval.options.add_bias_arguments)
def measure(args: Any) -> dict[str, Any]:
    """``semssl eval bias`` without its figures: measure, print the table, write ``--out``; returns the payload,
    the prepared crops, the curve label and the title, which the command line hands to
    :mod:`semssl.viz.bias` for ``--plot`` / ``--examples`` (figures sit above evaluation, not inside it)."""
    from semssl.eval.evaluate import reestimate_bn
    from semssl.eval.objects import (
        SceneObjects,
        open_coco,
        scene_loader,
    )
    from semssl.eval.report import models_for_eval, payload_of, print_table

    source = open_coco(args.data, args.images)
    cfg = BiasConfig(size=args.size, pairs=args.pairs, objects=args.objects, stages=tuple(args.stages),
                     min_side=args.min_side, seed=args.seed, batch_size=args.batch_size)
    if cfg.pairs < 100 or cfg.objects < 100:
        log.warning("the definition averages over >= 100 pairs / objects; measuring %d / %d", cfg.pairs,
                    cfg.objects)

    def calibrate(random_model: nn.Module) -> dict[str, nn.Module]:
        # Decision: no pixel baseline here — RoIAlign of the image itself is local and position-free by
        # construction (CR and MCS would be 1 up to RoIAlign's edge interpolation).
        loader = scene_loader(SceneObjects(source, cfg.size, "pad", 0.0), cfg.batch_size)
        deepest = max(cfg.stages, key=lambda s: STAGES.index(s) if s in STAGES else -1)
        return {"random_init": random_model,
                "random_init_bn": reestimate_bn(random_model, loader, kind=deepest)}

    models, _ = models_for_eval(args, calibrate)
    prepared = prepare_crops(source, cfg)
    results, columns = {}, {}
    for name, (model, info) in models.items():
        res = evaluate_bias(model, cfg=cfg, branch=info.get("branch"), prepared=prepared)
        results[name] = {**res, "model": info}
        columns[name] = {**{f"CR {s}": v for s, v in res["coupling_rate"].items()},
                         **{f"MCS {s}": v for s, v in res["positional_mcs"].items()}}
    single = set(models) == {"model"}
    source_name = models["model"][1]["source"] if single else \
        f"random-init baselines, {args.arch or 'resnet50'}, seed {args.seed}"
    payload = payload_of(results, data=str(args.data), size=args.size)
    print_table(f"coupling rate / positional bias, canvas {prepared['canvas']} px, {res['n_pairs']} pairs, "
                f"{res['n_objects']} objects ({source_name})", columns, args.out, payload, digits=3)
    label = str(models["model"][1].get("method") or Path(str(args.checkpoint)).stem) if single else ""
    return {"payload": payload, "prepared": prepared, "label": label, "title": source_name}
