"""The cases and the rank function of test_ddp_methods (torch and semssl only, no pytest: spawned ranks start fast).

A case is one method with its small recipe, shrunk (ResNet-18 at width 8 with 32 px views, or DINO's and SCFS's
ViT-Tiny recipes with 4 px patches on 16 px views; small heads, queues that wrap within the 2 steps) and made
independent of how the batch is split:

* a ResNet backbone uses GroupNorm (``model.norm=gn``: per-sample statistics, trainable affine terms; a ViT has
  LayerNorm, per token);
* every BatchNorm left in the heads (BYOL/SoCo projector and predictor, SCD's saliency net and H^s, SCFS's search
  heads) is put in eval mode: its statistics stay frozen at their initial values (mean 0, variance 1), so it is an
  affine layer whose weight and bias still train (:func:`freeze_batchnorm`).

:func:`run_case` drives the method through the engine's own per-step code: ``SSLModule.configure_optimizers`` for
the optimiser, ``engine.step.build_schedules`` / ``with_values`` for the schedules and
``engine.step.optimisation_step`` for the step (schedules -> ``training_step`` -> backward -> clipping ->
``on_after_backward`` -> optimiser step -> EMA), with a ``backward`` that does what DDP does during backward:
average every trainable parameter's gradient over the ranks (before clipping and ``on_after_backward``). Every
all-gather and all-reduce inside the methods (queues, shuffle-BN, DINO/SCFS centres, Sinkhorn, k-means) is the
real one. In float64, so argmax decisions (dense correspondence, k-means assignments) cannot flip on summation
order.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from semssl.distributed import all_reduce_mean
from semssl.schedules import Progress

WORLD = 2
GLOBAL_BATCH = 8  # images; 4 per rank
STEPS = 2
SIZE, SMALL_SIZE = 32, 16  # view sides (px): global / local (DINO, SCFS) and SoCo's small view (D3SSL's x2s)
SLOTS = 4  # region slots per row (SoCo's k = 4)

# the shrunk model and optimisation every case shares; lr 3.2 per 256 images = 0.1 at the global batch of 8, no
# warm-up (a warm-up from 0 would make step 0 a no-op), EMA momentum 0.9 (the teachers move visibly)
COMMON = ("model.arch=resnet18", "model.width=8", "model.norm=gn", "model.bn_splits=1", "model.small_input=true",
          "model.sync_bn=false", "model.zero_init_residual=false", "data.num_workers=0", "optim.warmup=0",
          "optim.lr=3.2", "optim.lr_scaling=linear", "method.momentum=0.9")
# the ViT recipes (vit_tiny, patch 4, AdamW): no drop path (it draws a mask per sample, which a rank draws for its own
# rows: a different random sample, not a different computation); lr 0.032 per 256 images = 1e-3 at batch 8
VIT_COMMON = ("model.drop_path=0", "data.num_workers=0", "optim.warmup=0", "optim.lr=0.032", "method.momentum=0.9")
BYOL_HEADS = ("method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32")
MOCO_HEADS = ("method.proj_hidden_dim=32", "method.proj_dim=16", "method.queue_size=12")
DINO_HEADS = ("method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16",
              "method.freeze_last_layer=1steps")  # the last layer frozen in step 0, trained in step 1
DENSE = ("method.dense_dim=16", "method.dense_hidden_dim=16", "method.dense_queue_size=12")
REGION = ("method.roi_size=4", "method.roi_size_small=2", "method.proj_hidden_dim=32", "method.proj_dim=16",
          "method.pred_hidden_dim=32")


@dataclass(frozen=True)
class Case:
    """One method's parity case: ``recipe`` + ``common`` (:data:`COMMON`) + ``overrides``; ``views``: name ->
    (side, crops per image) of the batch; ``regions``: the views that carry proposals; ``prepare``: applied to the
    built method (the same in every process); ``freeze_bn``: False keeps the heads' BatchNorm in training mode (the
    control case)."""

    method: str
    recipe: str
    overrides: tuple[str, ...]
    views: dict[str, tuple[int, int]]
    regions: tuple[str, ...] = ()
    prepare: Optional[Callable[[nn.Module], None]] = None
    freeze_bn: bool = True
    common: tuple[str, ...] = COMMON


def _warm_start_kmeans(method: nn.Module) -> None:
    """Start k-means from the (seeded, so identical) initial ``centroids`` buffer instead of drawing the first
    centroids from the batch: ``kmeans_init`` lets every rank draw ceil(k / world) of its own pixels, a draw that
    depends on the world size by design (a different random sample, not a different computation)."""
    method.centroids_ready.fill_(True)


TWO = {"q": (SIZE, 1), "k": (SIZE, 1)}
VIT_CROPS = {"global": (16, 2), "local": (8, 2)}  # 4 x 4 and 2 x 2 patches of 4 px (12 blocks of 192 channels)
CASES: dict[str, Case] = {
    "mocov2": Case("mocov2", "mocov2_resnet18_1x64-400it_synthetic", MOCO_HEADS, TWO),
    "byol": Case("byol", "byol_resnet18_1x64-400it_synthetic", BYOL_HEADS, TWO),
    "scd_mocov2": Case("scd_mocov2", "scd_mocov2_resnet18_1x64-400it_synthetic",
                       MOCO_HEADS + ("method.saliency_hidden_dim=16",), TWO),
    "scd_byol": Case("scd_byol", "scd_byol_resnet18_1x64-400it_synthetic",
                     BYOL_HEADS + ("method.saliency_hidden_dim=16",), {"strong": (SIZE, 1), "weak": (SIZE, 1)}),
    "dino": Case("dino", "dino_resnet18_1x64-200it_synthetic", DINO_HEADS,
                 {"global": (SIZE, 2), "local": (SMALL_SIZE, 2)}),
    "scfs": Case("scfs", "scfs_resnet18_1x64-200it_synthetic",
                 DINO_HEADS + ("method.stage_out_dim=16", "method.stage_hidden_dim=32",
                               "method.stage_mid_channels=8"),
                 {"global": (SIZE, 2), "local": (SMALL_SIZE, 2)}),
    "dino_vit": Case("dino", "dino_vit-t4_1x64-500it_cifar10-6k", DINO_HEADS,
                     VIT_CROPS, common=VIT_COMMON),
    "scfs_vit": Case("scfs", "scfs_vit-t4_1x64-500it_cifar10-6k",
                     DINO_HEADS + ("method.stage_out_dim=16", "method.stage_hidden_dim=32",
                                   "method.stage_mid_channels=8"),
                     VIT_CROPS, common=VIT_COMMON),
    "densecl": Case("densecl", "densecl_resnet18_1x32-600it_scenes", MOCO_HEADS + DENSE, TWO),
    "dsc": Case("dsc", "dsc_resnet18_1x32-600it_scenes",  # prototypes: frozen in step 0, trained in step 1
                MOCO_HEADS + DENSE + ("method.num_prototypes=8", "method.freeze_prototypes_iters=1"), TWO),
    "dsc_kmeans": Case("dsc", "dsc_resnet18_1x32-600it_scenes",
                       MOCO_HEADS + DENSE + ("method.semantic=kmeans", "method.num_clusters=6"), TWO,
                       prepare=_warm_start_kmeans),
    "soco": Case("soco", "soco_resnet18_1x32-300it_scenes", REGION,
                 {"x1": (SIZE, 1), "x2": (SIZE, 1)}, regions=("x1", "x2")),
    # the bank: 2 views x 8 rows x 4 slots = 64 keys per step into 100 slots (step 1 wraps)
    "d3ssl": Case("d3ssl", "d3ssl_resnet18_1x32-300it_scenes", REGION + ("method.bank_size=100",),
                  {"x1": (SIZE, 1), "x2": (SIZE, 1), "x2s": (SMALL_SIZE, 1), "x3": (SIZE, 1)},
                  regions=("x1", "x2", "x2s", "x3")),
    # control: BYOL with its heads' BatchNorm in training mode (batch statistics of 4 images per rank, not 8)
    "byol_train_bn": Case("byol", "byol_resnet18_1x64-400it_synthetic", BYOL_HEADS, TWO, freeze_bn=False),
}


def case_config(case: Case, per_rank_batch: int) -> Any:
    from semssl.config import load_config

    return load_config(case.recipe, [*case.common, *case.overrides, f"data.batch_size={per_rank_batch}"])


def freeze_batchnorm(method: nn.Module) -> list[str]:
    """Eval mode for every BatchNorm of ``method`` (frozen statistics, trainable affine); returns their names."""
    names = []
    for name, module in method.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            names.append(name)
    return names


# -- the global batch ------------------------------------------------------------------------------------------
def _boxes(g: torch.Generator, n: int, side: int) -> Tensor:
    """``[n, SLOTS, 4]`` boxes of at least a quarter of the side inside a ``side`` px view."""
    lo = torch.rand(n, SLOTS, 2, generator=g) * side * 0.6
    extent = (0.25 + torch.rand(n, SLOTS, 2, generator=g) * 0.4) * side
    return torch.cat([lo, (lo + extent).clamp(max=side)], dim=2)


def global_batch(case: Case, step: int) -> dict:
    """The step's batch of :data:`GLOBAL_BATCH` images in the Batch contract: ``views`` (crop-major ``[n * B, 3,
    s, s]``) and, for region views, ``proposals`` / ``proposal_ids`` / ``proposal_valid`` ``[B, SLOTS, ...]``: every
    slot valid (invalid slots get random bank fillers, see SoCo.enqueue), ids a permutation of the image's 4
    proposals per view, with one padding duplicate (a repeated id) in even rows."""
    g = torch.Generator().manual_seed(1000 * step + 7)
    batch: dict[str, Any] = {"views": {}, "index": torch.arange(GLOBAL_BATCH)}
    for name, (side, crops) in case.views.items():
        batch["views"][name] = torch.randn(crops * GLOBAL_BATCH, 3, side, side, generator=g, dtype=torch.float64)
    if case.regions:
        batch.update(proposals={}, proposal_ids={}, proposal_valid={})
        for name in case.regions:
            side = case.views[name][0]
            ids = torch.stack([torch.randperm(SLOTS, generator=g) for _ in range(GLOBAL_BATCH)])
            ids[::2, -1] = ids[::2, 0]
            batch["proposals"][name] = _boxes(g, GLOBAL_BATCH, side)
            batch["proposal_ids"][name] = ids
            batch["proposal_valid"][name] = torch.ones(GLOBAL_BATCH, SLOTS, dtype=torch.bool)
    return batch


def _rows(x: Tensor, images: slice) -> Tensor:
    """The rows of ``images`` in a crop-major ``[n * B, ...]`` tensor, still crop-major (what a rank's loader
    collates from its own images)."""
    crops = x.shape[0] // GLOBAL_BATCH
    return x.view(crops, GLOBAL_BATCH, *x.shape[1:])[:, images].reshape(-1, *x.shape[1:])


def local_batch(batch: dict, images: slice) -> dict:
    return {key: ({k: _rows(v, images) for k, v in value.items()} if isinstance(value, dict) else _rows(value, images))
            for key, value in batch.items()}


# -- one process's run -----------------------------------------------------------------------------------------
def run_case(name: str, rank: Optional[int]) -> dict[str, Any]:
    """``STEPS`` engine steps of case ``name`` on this rank's half of each global batch (all of it when ``rank`` is
    None). Returns ``loss<step>`` (averaged over the ranks, as DDP's logged mean), the final ``state.<key>`` of
    every parameter and buffer, ``initial.<key>`` (before step 0), ``unused``: trainable parameters that got no
    gradient in some step (DDP with ``find_unused_parameters=False``, Lightning's ``ddp``, stops on those), and
    ``frozen_bn``: the BatchNorm modules put in eval mode."""
    from semssl.engine.module import SSLModule
    from semssl.engine.step import build_schedules, optimisation_step, with_values

    case = CASES[name]
    images = slice(None) if rank is None else slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    per_rank = GLOBAL_BATCH if rank is None else GLOBAL_BATCH // WORLD
    cfg = case_config(case, per_rank)
    torch.manual_seed(0)  # the same initial weights, queues and centroids in every process
    module = SSLModule(cfg, global_batch=GLOBAL_BATCH)
    method = module.method.double()
    frozen = freeze_batchnorm(method) if case.freeze_bn else []
    if case.prepare is not None:
        case.prepare(method)
    optimizer = module.configure_optimizers()
    schedules = build_schedules(cfg, method, STEPS, STEPS, GLOBAL_BATCH)
    trainable = list(method.named_trainable_parameters())
    unused: set[str] = set()

    def backward(loss: Tensor) -> None:  # what DDP does: the mean of every rank's gradient, during backward
        loss.backward()
        for pname, p in trainable:
            if p.grad is None:
                unused.add(pname)
            else:
                p.grad.copy_(all_reduce_mean(p.grad))

    out: dict[str, Any] = {f"initial.{k}": v.clone() for k, v in method.state_dict().items()}
    for step in range(STEPS):
        batch = local_batch(global_batch(case, step), images)
        torch.manual_seed(100 + step)  # randomness inside a step (shuffle-BN's permutation): one stream everywhere
        progress = with_values(Progress(epoch=0, step=step, steps_per_epoch=STEPS, total_steps=STEPS), schedules)
        res = optimisation_step(method, optimizer, batch, progress, cfg, backward=backward)
        out[f"loss{step}"] = all_reduce_mean(res["loss"].detach())
    out.update({f"state.{k}": v.clone() for k, v in method.state_dict().items()})
    out["unused"] = sorted(unused)
    out["frozen_bn"] = frozen
    return out


def run_cases(names: list[str], rank: Optional[int]) -> dict[str, dict]:
    """Every case in turn; a case that raises records its traceback under ``error`` (the same error on both ranks,
    at the same collective, for a deterministic fault), so the other cases still run."""
    results = {}
    for name in names:
        try:
            results[name] = run_case(name, rank)
        except Exception:  # noqa: BLE001 - reported by the test of that case
            results[name] = {"error": traceback.format_exc()}
    return results


def rank_main(rank: int, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg_init", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(run_cases(names, rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
