"""Does an SCD saliency map M^fg light the objects? Measured against the instance masks of a COCO-style JSON.

For every image of the JSON (the built-in scenes' ``annotations.json``, or coco128's instances with polygons),
resized to ``size x size`` (aspect not kept, as in the dense probe) and normalised, the model's ``M^fg`` is
upsampled to the image and compared with the union of the image's instance masks (object pixels) and the rest
(background pixels). Printed, as one markdown table row per checkpoint:

* mean M on object pixels and on background pixels (all images' pixels pooled);
* the share of images whose object pixels have a higher mean M than their background;
* AUROC of M as a per-pixel object detector: the chance that a random object pixel has a higher M than a random
  background pixel (0.5 = M ignores objects; below 0.5 = M lights the background instead).

    python benchmarks/saliency_overlap.py --checkpoint runs/scd_mocov2_w16_3600_alone \\
        --json /tmp/synth3/scenes/test/annotations.json --size 96

Images with no instance or no background pixel are skipped (counted in the output).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from semssl.checkpoints import load_model
from semssl.data.sources import CocoSource
from semssl.viz.images import square_tensor
from semssl.viz.saliency import saliency_maps


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a random positive score > a random negative one), ties counted half (Mann-Whitney U / (n_p n_n))."""
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # average tied ranks
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_p, n_n = len(positive), len(negative)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def measure(checkpoint: str, json_path: str, size: int | None, branch: str | None, batch: int = 32) -> dict:
    model, info, cfg = load_model(checkpoint)
    size = size or (cfg.data.eval_size if cfg is not None else 224)
    branch = model.resolve_branch(branch) if hasattr(model, "resolve_branch") else None
    source = CocoSource(json_path, load_masks=True)
    obj_scores, bg_scores, wins, used, skipped = [], [], 0, 0, 0
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal wins, used
        if not pending:
            return
        images = torch.stack([x for x, _ in pending])
        maps = saliency_maps(model, images, branch)
        for m, (_, fg) in zip(maps, pending):
            o, b = m[fg], m[~fg]
            obj_scores.append(o)
            bg_scores.append(b)
            wins += int(o.mean() > b.mean())
            used += 1
        pending.clear()

    for i in range(len(source)):
        sample = source[i]
        masks = sample.get("masks")
        if masks is None or len(masks) == 0:
            skipped += 1
            continue
        fg = F.interpolate(masks.amax(0)[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0
        if fg.all() or not fg.any():
            skipped += 1
            continue
        pending.append((square_tensor(sample["image"], size), fg))
        if len(pending) == batch:
            flush()
    flush()
    if not used:
        sys.exit(f"saliency_overlap: no image of {json_path} has both object and background pixels")
    o, b = torch.cat(obj_scores), torch.cat(bg_scores)
    return {"checkpoint": checkpoint, "step": info.get("global_step"), "size": size, "images": used,
            "skipped": skipped, "m_objects": float(o.mean()), "m_background": float(b.mean()),
            "images_objects_higher": wins / used, "auroc": auroc(o, b)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", required=True, help="SCD run folders or checkpoint files")
    parser.add_argument("--json", required=True, help="COCO-style JSON with instance segmentations")
    parser.add_argument("--size", type=int, help="image side (default: the run's data.eval_size)")
    parser.add_argument("--branch", help="online or teacher (default: the method's evaluated branch)")
    args = parser.parse_args(argv)
    print("| checkpoint | step | px | images (skipped) | mean M, objects | mean M, background "
          "| images with objects higher | AUROC (objects vs background) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ckpt in args.checkpoint:
        r = measure(ckpt, args.json, args.size, args.branch)
        print(f"| {r['checkpoint']} | {r['step']} | {r['size']} | {r['images']} ({r['skipped']}) "
              f"| {r['m_objects']:.3f} | {r['m_background']:.3f} | {100 * r['images_objects_higher']:.1f} % "
              f"| {r['auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
