"""Evaluate a model on labelled folders with the kNN and linear protocols — the one driver behind the online
kNN monitor, the end of a pre-training run (trained vs random init) and ``semssl eval``.

A *model* is anything with ``features(images, branch=None, kind="pooled")``: a :class:`~semssl.methods.Method`
(trained, or a copy taken before training for the random-init baseline) or a
:class:`~semssl.models.backbones.BackboneModel` around a plain torchvision ``state_dict``. Every path reads
features through that one method, so the branch and the kind of feature are the same on all of them.

Random init is always reported as three baselines (docs/design.md §Random-init baselines; :func:`baseline_models`):
``random_init`` (the untrained network as it is), ``random_init_bn`` (the same weights with BatchNorm statistics
re-estimated on the evaluation-train images, :func:`reestimate_bn`) and ``pixels`` (the images themselves,
centred and L2-normalised, :class:`PixelModel`). "Beats random init" means beats the best of the three.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from semssl.distributed import rank, world_size
from semssl.errors import ConfigError
from semssl.eval.data import AugmentedFolder, eval_loader, folder_classes
from semssl.eval.features import EvalInputError, extract_features
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
                    device: Any = "cpu", classes: Optional[list[str]] = None,
                    drop_unknown: bool = False) -> tuple[Tensor, Tensor]:
    """Features of every image of a labelled folder (all ranks get all of them under DDP), labelled by the
    class names ``classes`` (the training split's; default: the folder's own)."""
    loader = eval_loader(path, cfg, world_size(), rank(), classes=classes, drop_unknown=drop_unknown)
    return extract_features(FeatureEncoder(model, branch, kind), loader, device=device)


def split_features(model: nn.Module, cfg: Any, train_path: str, test_path: str, branch: Optional[str] = None,
                   kind: str = "pooled", device: Any = "cpu", drop_unknown: bool = False) -> tuple:
    """(train_x, train_y, test_x, test_y): both splits labelled by the training split's class names."""
    classes = folder_classes(train_path, cfg)
    train_x, train_y = folder_features(model, train_path, cfg, branch, kind, device, classes)
    test_x, test_y = folder_features(model, test_path, cfg, branch, kind, device, classes, drop_unknown)
    return train_x, train_y, test_x, test_y


def evaluate(model: nn.Module, cfg: Any, train_path: str, test_path: str, linear: bool = True,
             branch: Optional[str] = None, kind: str = "pooled", device: Any = "cpu",
             drop_unknown: bool = False) -> dict[str, Any]:
    """kNN (k = cfg.eval.knn_k, T = cfg.eval.knn_temperature) and, if asked, the fast linear probe; percent."""
    feats = split_features(model, cfg, train_path, test_path, branch, kind, device, drop_unknown)
    return evaluate_features(*feats, cfg, linear=linear)


def evaluate_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cfg: Any,
                      linear: bool = True) -> dict[str, Any]:
    """The protocols of :func:`evaluate` on feature matrices already computed."""
    out: dict[str, Any] = dict(knn_evaluate(train_x, train_y, test_x, test_y, ks=tuple(cfg.eval.knn_k),
                                            temperature=cfg.eval.knn_temperature))
    if linear:
        lin = cfg.eval.linear
        out.update(linear_fast(train_x, train_y, test_x, test_y,
                               config=FastLinearConfig(epochs=lin.epochs, lrs=tuple(lin.lrs), holdout=lin.holdout,
                                                       seed=cfg.trainer.seed)))
    return out


# ------------------------------------------------------------------------------------------------ baselines
#: the random-init baselines (metrics.json keys) and their labels in printed tables
BASELINE_LABELS = {"random_init": "random init", "random_init_bn": "random init, BN re-estimated",
                   "pixels": "pixels (centred)"}
BASELINES = tuple(BASELINE_LABELS)


def _images_of(batch: Any) -> Tensor:
    """The image tensor of a loader batch: a dict's ``image``, a tuple's first item, or the tensor itself."""
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable, batches: Optional[int] = None, branch: Optional[str] = None,
                  kind: str = "pooled", device: Any = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on the images of ``loader``.

    ``model`` is anything with ``features(images, branch, kind)`` (a method, a :class:`BackboneModel`) — the
    passes go through that, so exactly the BatchNorms the evaluated features use are re-estimated — or a plain
    module called on the images (a backbone). The copy runs in train mode without gradients over the first
    ``batches`` batches of ``loader`` (all by default; evaluation loaders give centre crops with the eval
    transform). Each BatchNorm the passes reach has its running statistics reset when first reached and
    ``momentum=None``, so they end as torch's cumulative average over the batches: the mean of the batch means
    and of the (unbiased) batch variances. :class:`~semssl.models.backbones.SplitBatchNorm2d` is treated as plain
    BatchNorm here (``num_splits=1``). The other BatchNorms (another branch, a head the features skip) keep
    their statistics; each re-estimated one gets its ``momentum``/``num_splits`` back afterwards. The copy is
    returned in eval mode; ``model`` is not changed.

    Decision: one pass over the whole evaluation-train split by default, in its batches (``eval.batch_size``),
    in dataset order — identical on every rank under DDP (every rank reads the full split, unsharded).
    """
    model = copy.deepcopy(model).to(device)
    saved: dict[nn.Module, tuple[Any, Optional[int]]] = {}

    def reset(module: nn.Module, inputs: Any) -> None:
        if module not in saved:
            saved[module] = (module.momentum, getattr(module, "num_splits", None))
            module.reset_running_stats()
            module.momentum = None  # cumulative average
            if hasattr(module, "num_splits"):
                module.num_splits = 1

    hooks = [m.register_forward_pre_hook(reset) for m in model.modules() if isinstance(m, _BatchNorm)]
    run = (lambda x: model.features(x, branch=branch, kind=kind)) if hasattr(model, "features") else model
    model.train()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if batches is not None and i >= batches:
                break
            images = _images_of(batch)
            if images.shape[0] < 2:
                continue  # a batch of one has no variance (torch's BatchNorm refuses it in train mode)
            run(images.to(device))
            seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    if seen == 0:
        raise EvalInputError("reestimate_bn: the loader yielded no batch of 2 or more images")
    for module, (momentum, splits) in saved.items():
        module.momentum = momentum
        if splits is not None:
            module.num_splits = splits
    return model.eval()


class PixelModel(nn.Module):
    """The raw-pixel baseline behind the ``features`` interface: an image (after the evaluation transform:
    resized, centre-cropped to the evaluation size, normalised) flattened, centred by the training split's mean
    pixel vector and L2-normalised. ``mean`` is a buffer; :meth:`fit` sets it from a loader.

    Decision (docs/design.md §Random-init baselines): centred is the stronger floor (kNN 38.3 vs 28.6 uncentred on the
    CIFAR-10 slice), and the floor must not be weakened.
    """

    branches = ("online",)
    default_branch = "online"
    feature_kinds = ("pooled",)

    def __init__(self, mean: Optional[Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean if mean is not None else torch.zeros(0))

    def resolve_branch(self, branch: Optional[str] = None) -> str:
        if branch not in (None, "online"):
            raise ConfigError(f"branch '{branch}': the pixel baseline has only the 'online' branch")
        return "online"

    @torch.no_grad()
    def fit(self, loader: Iterable) -> "PixelModel":
        """Set ``mean`` to the mean flattened image of ``loader`` (float64 accumulation); returns self."""
        total, count = None, 0
        for batch in loader:
            x = _images_of(batch).flatten(1).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            count += x.shape[0]
        if count == 0:
            raise EvalInputError("PixelModel.fit: the loader yielded no images")
        self.mean = (total / count).float().to(self.mean.device)
        return self

    @torch.no_grad()
    def features(self, images: Tensor, branch: Optional[str] = None, kind: str = "pooled") -> Tensor:
        self.resolve_branch(branch)
        if kind != "pooled":
            raise ConfigError(f"feature kind '{kind}': the pixel baseline has only 'pooled' (the flattened image)")
        x = images.flatten(1).float()
        if self.mean.numel():
            if self.mean.numel() != x.shape[1]:
                raise EvalInputError(f"PixelModel: images of {x.shape[1]} values, the mean was fit on "
                                     f"{self.mean.numel()} (another evaluation size?)")
            x = x - self.mean.to(x.device)
        return F.normalize(x, dim=1)


def baseline_models(random_model: nn.Module, cfg: Any, train_path: str, device: Any = "cpu",
                    branch: Optional[str] = None, kind: str = "pooled") -> dict[str, nn.Module]:
    """The three random-init baselines, ready to evaluate like a trained model: ``random_init`` (``random_model``
    itself: the method copied before training, or a random backbone), ``random_init_bn`` (a copy with BatchNorm
    statistics re-estimated on ``train_path``, :func:`reestimate_bn`) and ``pixels`` (:class:`PixelModel`
    centred on ``train_path``). Both use the evaluation loader of ``train_path`` (eval transform, full split on
    every rank)."""
    random_model = random_model.to(device)
    return {
        "random_init": random_model,
        "random_init_bn": reestimate_bn(random_model, eval_loader(train_path, cfg), branch=branch, kind=kind,
                                        device=device),
        "pixels": PixelModel().fit(eval_loader(train_path, cfg)).to(device).eval(),
    }


def linear_standard_on_folders(model: nn.Module, args: Any, cfg: Any, branch: Optional[str] = None,
                               kind: str = "pooled") -> dict:
    """The standard frozen-backbone protocol on two labelled folders (single process)."""
    config = LinearConfig(epochs=args.epochs or 100, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, schedule=args.schedule, milestones=(0.6, 0.8),
                          num_workers=args.workers)
    train_set = AugmentedFolder(args.train, cfg.data.eval_size, cfg.data.on_error)
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                        num_workers=args.workers)
    test = eval_loader(args.test, cfg, classes=list(train_set.source.classes),
                       drop_unknown=getattr(args, "drop_unknown_classes", False))
    return linear_standard(FeatureEncoder(model, branch, kind), train, test, len(train_set.source.classes), config)


def describe(res: dict, keys: tuple[str, ...] = ("knn_top1", "linear_top1")) -> dict[str, Optional[float]]:
    return {k: (round(float(res[k]), 2) if k in res else None) for k in keys}
