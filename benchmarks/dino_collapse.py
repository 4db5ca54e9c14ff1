"""Why does a DINO recipe collapse? Statistics at initialisation and the first steps' collapse monitors.

DINO's teacher can fall into the uniform fixed point (teacher entropy = log out_dim, loss = log out_dim) within
its first hundred steps (docs/results.md section 7.3). This script measures, for a DINO/SCFS recipe:

1. **at initialisation** (teacher = student), on one training batch of the recipe's global crops:
   ``pooled cos`` / ``z cos`` — mean cosine between *different* images of the pooled backbone features and of the
   head's L2-normalised bottleneck (near 1 = every image looks alike to the head);
   ``view corr`` — the mean cosine between the batch-centred features of the two global crops of the *same*
   image (``other``: of different images, the chance level): how much one crop's deviation from the batch mean
   predicts the other's, which is what the student must learn from;
   ``target entropy`` — the mean entropy of ``softmax((h_t - mean_batch h_t) / teacher_temp)`` (the centred
   targets once the center has caught up; ``log out_dim`` = uniform);
2. **training** ``--steps`` steps with the recipe's own optimiser and schedules (the engine's step,
   :class:`semssl.bench.MethodStep`, one thread, fp32), printing every ``--every`` steps
   ``step:loss/teacher_entropy/embed_std`` (the two monitors the method logs).

    python benchmarks/dino_collapse.py --recipe configs/dino_resnet18-w16_1x64-1000it_cifar10-6k.yaml --steps 60
    python benchmarks/dino_collapse.py --recipe ... --steps 60 method.use_bn_in_head=true
    python benchmarks/dino_collapse.py --recipe ... --steps 80 --aug jitter_p=0,grayscale_p=0,blur_p=0,solarize_p=0

``--aug FIELD=VALUE,...`` replaces fields of the photometric recipe of every view for this run only (as in
``short_run_knn.py``). ``KEY=VALUE`` arguments are recipe overrides.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from semssl.bench import MethodStep, patch_view_recipes
from semssl.config import load_config
from semssl.engine.data import build_train_dataset, resolve_paths, train_loader
from semssl.methods import build_method


def mean_offdiag_cos(x: torch.Tensor) -> float:
    """Mean cosine between different rows of ``x`` ``[N, D]``."""
    x = F.normalize(x, dim=1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * n - n))


@torch.no_grad()
def init_statistics(cfg, batch: dict) -> dict[str, float]:
    """The statistics of item 1 of the module docstring, for the method's teacher at initialisation."""
    method = build_method(cfg).train()
    x = batch["views"][cfg.method.views[0]]
    b = x.shape[0] // cfg.method.global_crops
    out = method.teacher.backbone(x)
    z = method.teacher.head.bottleneck(out["pooled"])
    logits = method.teacher.head.last_layer(z)
    res = {"pooled cos": mean_offdiag_cos(out["pooled"][:b]), "z cos": mean_offdiag_cos(z[:b])}
    for name, feats in (("pooled", out["pooled"]), ("z", z)):
        c = feats - feats.mean(0, keepdim=True)
        res[f"{name} view corr"] = float(F.cosine_similarity(c[:b], c[b:2 * b]).mean())
        res[f"{name} view corr other"] = float(F.cosine_similarity(c[:b], c[b:2 * b].roll(1, 0)).mean())
    tau = cfg.method.warmup_teacher_temp
    t = F.softmax((logits - logits.mean(0, keepdim=True)) / tau, dim=-1)
    res["target entropy"] = float(-(t * t.clamp_min(1e-12).log()).sum(-1).mean())
    res["uniform entropy"] = math.log(logits.shape[1])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--aug", default="", help="FIELD=VALUE,... replacing fields of the views' photometric recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="recipe overrides")
    args = p.parse_args()

    cfg = load_config(args.recipe, ["data.num_workers=1", *args.overrides])
    if args.aug:
        patch_view_recipes(cfg, args.aug)  # before the loader's workers fork
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    loader = train_loader(build_train_dataset(cfg, resolve_paths(cfg)["train"]), cfg)
    first = next(iter(loader))
    torch.manual_seed(args.seed)
    stats = init_statistics(cfg, first)
    print("init: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)

    torch.manual_seed(args.seed)
    step_fn = MethodStep(cfg, first, steps_per_epoch=len(loader))
    start, epoch, line = time.time(), 0, []
    while step_fn.step < args.steps:
        loader.sampler.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            out = step_fn.run(batch)
            if step_fn.step % args.every == 0:
                line.append(f"{step_fn.step}:{out['loss'].item():.3f}/{float(out['teacher_entropy']):.3f}/"
                            f"{float(out['embed_std']):.2f}")
            if step_fn.step >= args.steps:
                break
    print("step:loss/teacher_entropy/embed_std " + " ".join(line) + f"  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
