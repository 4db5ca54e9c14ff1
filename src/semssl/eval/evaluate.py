"""Evaluate a model on labelled folders with the kNN and linear protocols — the one driver behind the online
kNN monitor, the end of a pre-training run (trained vs random init) and ``semssl eval``.

A *model* is anything with ``features(images, branch=None, kind="pooled")``: a :class:`~semssl.methods.Method`
(trained, or a copy taken before training for the random-init baseline) or a
:class:`~semssl.models.backbones.BackboneModel` around a plain torchvision ``state_dict``. Every path reads
features through that one method, so the branch and the kind of feature are the same on all of them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from semssl.distributed import rank, world_size
from semssl.eval.data import AugmentedFolder, eval_loader
from semssl.eval.features import extract_features
from semssl.eval.knn import knn_evaluate
from semssl.eval.linear import (
    FastLinearConfig,
    LinearConfig,
    linear_fast,
    linear_standard,
)


class FeatureEncoder(nn.Module):
    """``images -> model.features(images, branch, kind)`` as a module (what the protocols consume).

    Its train/eval mode starts as the model's, so the protocols' "evaluate in eval mode, then restore the mode"
    gives the model back in the mode it had."""

    def __init__(self, model: nn.Module, branch: Optional[str] = None, kind: str = "pooled") -> None:
        super().__init__()
        self.model, self.branch, self.kind = model, branch, kind
        self.training = model.training

    def forward(self, images: Tensor) -> Tensor:
        return self.model.features(images, branch=self.branch, kind=self.kind)


def folder_features(model: nn.Module, path: str, cfg: Any, branch: Optional[str] = None, kind: str = "pooled",
                    device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """Features of every image of a labelled folder (all ranks get all of them under DDP)."""
    loader = eval_loader(path, cfg, world_size(), rank())
    return extract_features(FeatureEncoder(model, branch, kind), loader, device=device)


def evaluate(model: nn.Module, cfg: Any, train_path: str, test_path: str, linear: bool = True,
             branch: Optional[str] = None, kind: str = "pooled", device: Any = "cpu") -> dict[str, Any]:
    """kNN (k = cfg.eval.knn_k, T = cfg.eval.knn_temperature) and, if asked, the fast linear probe; percent."""
    train_x, train_y = folder_features(model, train_path, cfg, branch, kind, device)
    test_x, test_y = folder_features(model, test_path, cfg, branch, kind, device)
    out: dict[str, Any] = dict(knn_evaluate(train_x, train_y, test_x, test_y, ks=tuple(cfg.eval.knn_k),
                                            temperature=cfg.eval.knn_temperature))
    if linear:
        lin = cfg.eval.linear
        out.update(linear_fast(train_x, train_y, test_x, test_y,
                               config=FastLinearConfig(epochs=lin.epochs, lrs=tuple(lin.lrs), holdout=lin.holdout,
                                                       seed=cfg.trainer.seed)))
    return out


def linear_standard_on_folders(model: nn.Module, args: Any, cfg: Any, branch: Optional[str] = None,
                               kind: str = "pooled") -> dict:
    """The standard frozen-backbone protocol on two labelled folders (single process)."""
    config = LinearConfig(epochs=args.epochs or 100, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, schedule=args.schedule, milestones=(0.6, 0.8),
                          num_workers=args.workers)
    train_set = AugmentedFolder(args.train, cfg.data.eval_size, cfg.data.on_error)
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                        num_workers=args.workers)
    test = eval_loader(args.test, cfg)
    return linear_standard(FeatureEncoder(model, branch, kind), train, test, len(train_set.source.classes), config)


def describe(res: dict, keys: tuple[str, ...] = ("knn_top1", "linear_top1")) -> dict[str, Optional[float]]:
    return {k: (round(float(res[k]), 2) if k in res else None) for k in keys}
