"""Linear probes on a frozen backbone: a fast protocol on pre-computed features and the papers' standard one.

docs/design.md §Evaluation protocols: the *standard* protocol is the one of the method's paper (MoCo
``main_lincls.py``, docs/methods/mocov2.md §Linear protocol: lr 30 at batch 256, wd 0, momentum 0.9, 100 epochs,
x0.1 at epochs 60/80; SCFS / DINO ``eval_linear.py``, docs/methods/scfs.md §Evaluation: cosine to 0 per epoch,
lr base x batch/256); the train loader supplies RandomResizedCrop + flip, the test loader a centre crop. The
*fast* protocol for small data trains a linear classifier on centre-crop features computed once, with a small lr search
on a held-out part of the training split. Every result names its protocol.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from semssl.eval.features import (
    EvalInputError,
    batch_images_labels,
    check_features,
    check_labels,
    infer_num_classes,
    loader_sampler,
)

__all__ = ["FastLinearConfig", "LinearConfig", "linear_fast", "linear_standard"]

log = logging.getLogger(__name__)

_STD_FLOOR = 1e-6  # a dimension with a smaller train std is treated as constant (only centred)


# ----------------------------------------------------------------------------------------------- shared helpers
def _init_linear(in_dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """Linear layer with weight ~ N(0, 0.01) and zero bias (MoCo ``main_lincls.py``, DINO ``eval_linear.py``)."""
    layer = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, in_dim, generator=generator) * 0.01)
        layer.bias.zero_()
    return layer


def _topk_hits(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits); top-5 uses the min(5, C) highest logits."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == targets[:, None]
    return int(correct[:, 0].sum()), int(correct.any(dim=1).sum())


# ------------------------------------------------------------------------------------------------ fast protocol
@dataclass
class FastLinearConfig:
    """Fast linear probe on pre-computed features (docs/design.md §Evaluation protocols, fast protocol).

    Decision: ``standardize`` maps every feature dimension to zero mean and unit variance with the statistics
    of the rows the classifier is fit on, then scales by 1/sqrt(D) (see ``_Standardizer``), so one lr grid
    fits every backbone, width and feature scale. Decision: the searched ``lrs`` (0.3, 1, 3, 10) bracket the
    optima measured with this scaling (5000 train / 1000 test, 100 epochs, batch 256): 0.3-3 on random-init
    ResNet-18 features (512-d) and on raw pixels (3072-d) of the CIFAR-10 slice, 10 on well-separated
    Gaussian classes (512-d). With ``standardize=False`` the lrs must suit the raw feature scale.
    ``momentum`` is SGD's (0.9, as in every released linear-probe script).
    """

    epochs: int = 100
    batch_size: int = 256
    lrs: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    weight_decay: float = 0.0
    holdout: float = 0.1
    seed: int = 0
    standardize: bool = True
    momentum: float = 0.9

    def __post_init__(self) -> None:
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if self.epochs < 1:
            raise EvalInputError(f"FastLinearConfig.epochs: expected >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise EvalInputError(f"FastLinearConfig.batch_size: expected >= 1, got {self.batch_size}")
        if not self.lrs or any(not lr > 0 for lr in self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise EvalInputError(f"FastLinearConfig.lrs: expected one or more distinct positive lrs, got {self.lrs}")
        if self.weight_decay < 0:
            raise EvalInputError(f"FastLinearConfig.weight_decay: expected >= 0, got {self.weight_decay}")
        if len(self.lrs) > 1 and not 0 < self.holdout < 1:
            raise EvalInputError(
                f"FastLinearConfig.holdout: expected a fraction in (0, 1) to search {len(self.lrs)} lrs, "
                f"got {self.holdout}"
            )


@dataclass
class _Standardizer:
    """Per-dimension affine map x -> (x - mean) / scale fit on one set of rows (identity when disabled).

    Decision: scale = std * sqrt(D), i.e. per-dimension standardisation followed by one global 1/sqrt(D), so
    the mean squared feature norm is 1 whatever the width D. The softmax cross-entropy's Hessian is at most
    1/2 x E[x x^T] (plus the bias term), whose norm is then bounded by a constant independent of D and of the
    correlation between dimensions, so the same lrs suit 512-d and 2048-d backbones. A dimension that is
    constant on the fit rows is only centred.
    """

    mean: Tensor
    scale: Tensor

    @classmethod
    def fit(cls, x: Tensor, enabled: bool) -> _Standardizer:
        if not enabled:
            return cls(torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
        std = x.std(dim=0, correction=0)
        std = torch.where(std < _STD_FLOOR, torch.ones_like(std), std)
        return cls(x.mean(dim=0), std * math.sqrt(x.shape[1]))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices): per class, a seeded random ``fraction`` (rounded) is held out.

    A class keeps at least one sample on the fit side; a class with a single sample is never held out.
    """
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_held = min(round(fraction * members.numel()), members.numel() - 1)
        held.append(members[:n_held])
        fit.append(members[n_held:])
    fit_idx, held_idx = torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values
    if held_idx.numel() == 0:
        raise EvalInputError(
            f"train_labels: holdout fraction {fraction} of {labels.numel()} samples leaves no validation "
            "samples for the lr search; use more data, a larger holdout, or a single lr"
        )
    return fit_idx, held_idx


@dataclass
class _LinearStack:
    """L linear classifiers of the same shape, one per lr, side by side: weight ``[D, L, C]``, bias ``[L, C]``."""

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``[N, L, C]`` logits of ``[N, D]`` features (one matmul for all classifiers)."""
        dim, n_lrs, num_classes = self.weight.shape
        return (x @ self.weight.reshape(dim, n_lrs * num_classes)).view(-1, n_lrs, num_classes) + self.bias


def _softmax_(logits: Tensor) -> Tensor:
    """In-place softmax over the last dimension (torch.softmax is several times slower for C ~ 10 on CPU)."""
    logits -= logits.amax(dim=-1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def _fit_linear_stack(
    x: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float], config: FastLinearConfig
) -> _LinearStack:
    """Train one linear classifier per lr, all at once, on the same shuffled mini-batches.

    Each classifier is what ``nn.Linear`` + ``torch.optim.SGD(momentum, weight_decay)`` + a per-iteration
    cosine lr to 0 would give (same init N(0, 0.01) / bias 0, same mini-batch order; the test suite checks
    this parity). Decision: the cross-entropy gradient is written out, (softmax - onehot) / B, and the
    classifiers of the lr search sit side by side in one ``[D, L*C]`` matrix, so a step is two matmuls
    whatever the number of lrs: the cost of this probe is per-step overhead, not arithmetic. Mini-batches
    are whole-tensor indexing (no DataLoader). Deterministic: the init and the shuffles come from one
    generator seeded with ``config.seed``.
    """
    generator = torch.Generator().manual_seed(config.seed)
    n_lrs, dim = len(lrs), x.shape[1]
    init = torch.randn(num_classes, dim, generator=generator) * 0.01
    stack = _LinearStack(init.T[:, None, :].repeat(1, n_lrs, 1).contiguous(), torch.zeros(n_lrs, num_classes))
    weight_flat = stack.weight.view(dim, n_lrs * num_classes)
    velocity_w, velocity_b = torch.zeros_like(weight_flat), torch.zeros_like(stack.bias)
    base = torch.tensor(lrs, dtype=torch.float32)
    onehot_rows = torch.eye(num_classes)
    total_steps, step = config.epochs * math.ceil(x.shape[0] / config.batch_size), 0
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            xb = x[batch]
            residual = _softmax_(stack.logits(xb)).sub_(onehot_rows[y[batch]][:, None, :]).div_(batch.numel())
            grad_w = xb.T @ residual.view(batch.numel(), n_lrs * num_classes)
            grad_b = residual.sum(dim=0)
            if config.weight_decay:
                grad_w.add_(weight_flat, alpha=config.weight_decay)
                grad_b.add_(stack.bias, alpha=config.weight_decay)
            velocity_w.mul_(config.momentum).add_(grad_w)
            velocity_b.mul_(config.momentum).add_(grad_b)
            lr = base * (0.5 * (1.0 + math.cos(math.pi * step / total_steps)))
            weight_flat -= (velocity_w.view(dim, n_lrs, num_classes) * lr[:, None]).view(dim, -1)
            stack.bias -= velocity_b * lr[:, None]
            step += 1
    return stack


def _score(logits: Tensor, y: Tensor) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy of one classifier's ``[N, C]`` logits."""
    top1, top5 = _topk_hits(logits, y)
    n = y.numel()
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": float(F.cross_entropy(logits, y))}


def _fit_and_score(
    x_fit: Tensor, y_fit: Tensor, x_eval: Tensor, y_eval: Tensor, num_classes: int, lrs: Sequence[float],
    config: FastLinearConfig,
) -> list[dict[str, float]]:
    """Standardise by the fit rows, train one classifier per lr, score each on the evaluation rows."""
    standardizer = _Standardizer.fit(x_fit, config.standardize)
    stack = _fit_linear_stack(standardizer(x_fit), y_fit, num_classes, lrs, config)
    logits = stack.logits(standardizer(x_eval))
    return [_score(logits[:, i], y_eval) for i in range(len(lrs))]


def _search_lr(x: Tensor, y: Tensor, num_classes: int, config: FastLinearConfig) -> tuple[float, dict, dict]:
    """Pick the lr with the best held-out top-1 (ties: lower held-out cross-entropy, then list order)."""
    if len(config.lrs) == 1:
        return config.lrs[0], {}, {}
    fit_idx, held_idx = _stratified_split(y, config.holdout, config.seed)
    scores = _fit_and_score(x[fit_idx], y[fit_idx], x[held_idx], y[held_idx], num_classes, config.lrs, config)
    top1 = {f"{lr:g}": s["top1"] for lr, s in zip(config.lrs, scores)}
    loss = {f"{lr:g}": s["loss"] for lr, s in zip(config.lrs, scores)}
    for lr, s in zip(config.lrs, scores):  # details: DEBUG, for a run's logs/semssl.log and `semssl -v`
        log.debug("fast linear probe: lr %g -> held-out top-1 %.2f %%, loss %.4f", lr, s["top1"], s["loss"])
    best = max(config.lrs, key=lambda lr: (top1[f"{lr:g}"], -loss[f"{lr:g}"]))
    return best, top1, loss


def linear_fast(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    config: FastLinearConfig | None = None,
) -> dict[str, Any]:
    """Fast linear probe: lr search on a stratified held-out part of the train split, refit, test.

    For each lr of ``config.lrs`` a linear classifier (an ``nn.Linear`` equivalent, N(0, 0.01) init) is
    trained for ``config.epochs`` epochs (SGD momentum 0.9, cosine lr per iteration, shuffled mini-batches) on
    the train split minus a seeded, stratified ``holdout`` fraction and scored on that fraction; the best lr
    is refit on the whole train split and evaluated on the test split. Returns percentages ``linear_top1`` /
    ``linear_top5``, ``best_lr``, ``val_top1_per_lr`` and ``val_loss_per_lr`` (keys are the lrs formatted
    with ``%g``, so the dict is JSON-ready), ``protocol: "fast"`` and the settings used (``epochs``,
    ``standardize``, ``seed``). Deterministic for ``config.seed``. Features may be float16/32/64, any device
    (the probe runs in float32 on CPU).
    """
    config = config or FastLinearConfig()
    num_classes = infer_num_classes(train_labels, test_labels, num_classes)
    check_features(train_features, "train_features")
    check_features(test_features, "test_features")
    if test_features.shape[1] != train_features.shape[1]:
        raise EvalInputError(
            f"test_features: feature dimension {test_features.shape[1]} differs from train_features' "
            f"{train_features.shape[1]}"
        )
    check_labels(train_labels, "train_labels", train_features.shape[0], num_classes)
    check_labels(test_labels, "test_labels", test_features.shape[0], num_classes)
    x_train, x_test = train_features.detach().cpu().float(), test_features.detach().cpu().float()
    y_train, y_test = train_labels.detach().cpu().long(), test_labels.detach().cpu().long()
    best_lr, val_top1, val_loss = _search_lr(x_train, y_train, num_classes, config)
    test = _fit_and_score(x_train, y_train, x_test, y_test, num_classes, [best_lr], config)[0]
    return {
        "linear_top1": test["top1"],
        "linear_top5": test["top5"],
        "best_lr": best_lr,
        "val_top1_per_lr": val_top1,
        "val_loss_per_lr": val_loss,
        "protocol": "fast",
        "epochs": config.epochs,
        "standardize": config.standardize,
        "seed": config.seed,
    }


# -------------------------------------------------------------------------------------------- standard protocol
_SCHEDULES = ("step", "cosine")


@dataclass
class LinearConfig:
    """Standard frozen-backbone linear protocol; defaults are MoCo's ``main_lincls.py``
    (docs/methods/mocov2.md §Linear protocol).

    ``lr`` is the base lr for batch 256, scaled by the loader's batch size / 256. ``schedule="step"`` multiplies
    the lr by 0.1 at each of ``milestones`` (epochs; a float strictly between 0 and 1 is a fraction of the
    run, so short runs keep the shape, as docs/design.md §Schedules allows for every schedule length);
    ``"cosine"`` anneals it to 0, set per epoch like DINO/SCFS ``eval_linear.py``. ``feature_bn`` puts a BatchNorm1d
    without affine parameters in front of the linear layer. ``num_workers`` is for the caller building the loaders.
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"
    milestones: Sequence[float] = field(default_factory=lambda: (60, 80))
    num_workers: int = 2
    feature_bn: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise EvalInputError(f"LinearConfig.schedule: expected one of {_SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1:
            raise EvalInputError(f"LinearConfig.epochs: expected >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise EvalInputError(f"LinearConfig.lr: expected > 0, got {self.lr}")
        if any(m <= 0 for m in self.milestones):
            raise EvalInputError(
                f"LinearConfig.milestones: expected positive epochs or fractions, got {self.milestones}"
            )

    def milestone_epochs(self) -> list[float]:
        """Milestones in epochs (fractions converted)."""
        return [m * self.epochs if isinstance(m, float) and m < 1 else float(m) for m in self.milestones]

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """The lr of a whole epoch (both schedules are per epoch in the released code)."""
        if self.schedule == "cosine":
            return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        passed = sum(epoch >= m for m in self.milestone_epochs())
        return base_lr * 0.1**passed


class _Frozen:
    """Context manager: encoder in eval mode with no trainable parameter; restores mode and flags after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.was_training = module.training
        self.flags = [p.requires_grad for p in module.parameters()]

    def __enter__(self) -> nn.Module:
        self.module.eval()
        self.module.requires_grad_(False)
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)
        for param, flag in zip(self.module.parameters(), self.flags):
            param.requires_grad_(flag)


def _check_single_process(loader: Iterable[dict], name: str) -> None:
    """The standard protocol has no gradient sync: a rank-sharded loader would train on part of the data."""
    sampler = loader_sampler(loader)
    if isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1:
        raise EvalInputError(
            f"{name}: uses a DistributedSampler over {sampler.num_replicas} ranks, but linear_standard is "
            "single-process only; run it on one process with a plain sampler"
        )


def _frozen_features(encoder: nn.Module, images: Tensor, where: str) -> Tensor:
    """Pooled ``[B, D]`` features of the frozen encoder (no graph)."""
    with torch.no_grad():
        features = encoder(images)
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != images.shape[0]:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise EvalInputError(f"{where}: encoder_module must return [B, D] pooled features, got {got}")
    return features.float()


def _build_head(feature_dim: int, num_classes: int, feature_bn: bool) -> nn.Module:
    """Linear layer (N(0, 0.01), bias 0), optionally behind a non-affine BatchNorm1d of the features."""
    linear = _init_linear(feature_dim, num_classes)
    if not feature_bn:
        return linear
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear)


def _train_epoch(
    encoder: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[dict],
    num_classes: int, device: torch.device, epoch: int,
) -> dict[str, float]:
    """One epoch over the (augmented) train loader; returns mean loss and top-1 of the epoch."""
    head.train()
    total_loss, hits, seen = 0.0, 0, 0
    for step, batch in enumerate(loader):
        where = f"train_loader batch {step} (epoch {epoch})"
        images, labels, _ = batch_images_labels(batch, where)
        _check_batch_labels(labels, num_classes, where)
        labels = labels.to(device)
        logits = head(_frozen_features(encoder, images.to(device, non_blocking=True), where))
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * labels.numel()
        hits += int((logits.argmax(dim=1) == labels).sum())
        seen += labels.numel()
    if seen == 0:
        raise EvalInputError("train_loader: yielded no samples")
    return {"loss": total_loss / seen, "top1": 100.0 * hits / seen}


def _check_batch_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Labels of a batch must lie in [0, num_classes)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise EvalInputError(
            f"{where}: 'label' values must lie in [0, {num_classes}), found [{int(labels.min())}, "
            f"{int(labels.max())}]"
        )


@torch.no_grad()
def _evaluate(encoder: nn.Module, head: nn.Module, loader: Iterable[dict], num_classes: int,
              device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) of the probe on the (centre-crop) test loader."""
    head.eval()
    top1 = top5 = seen = 0
    for step, batch in enumerate(loader):
        where = f"test_loader batch {step}"
        images, labels, _ = batch_images_labels(batch, where)
        _check_batch_labels(labels, num_classes, where)
        logits = head(_frozen_features(encoder, images.to(device, non_blocking=True), where))
        hit1, hit5 = _topk_hits(logits, labels.to(device))
        top1, top5, seen = top1 + hit1, top5 + hit5, seen + labels.numel()
    if seen == 0:
        raise EvalInputError("test_loader: yielded no samples")
    return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}


def _infer_feature_dim(encoder: nn.Module, loader: Iterable[dict], device: torch.device) -> int:
    """Width of the encoder's pooled features, from the first train batch."""
    for batch in loader:
        images, _, _ = batch_images_labels(batch, "train_loader batch 0")
        return _frozen_features(encoder, images.to(device), "train_loader batch 0").shape[1]
    raise EvalInputError("train_loader: yielded no samples")


def linear_standard(
    encoder_module: nn.Module,
    train_loader: Iterable[dict],
    test_loader: Iterable[dict],
    num_classes: int,
    config: LinearConfig | None = None,
    device: str | torch.device = "cpu",
    feature_dim: int | None = None,
) -> dict[str, Any]:
    """Standard linear probe: train a linear layer on a frozen backbone with the paper's schedule, then test.

    ``encoder_module(images) -> [B, D]`` is moved to ``device``, frozen and kept in eval mode during the run
    (its mode and ``requires_grad`` flags are restored afterwards). The train loader supplies the augmentation
    (RandomResizedCrop + flip), the test loader the centre crop. SGD(momentum, weight decay) with lr =
    ``config.lr`` x batch/256, where batch is the train loader's ``batch_size`` (``config.batch_size`` if the
    loader has none). Single-process only: a loader sharded by a multi-rank DistributedSampler is refused
    (there is no gradient synchronisation of the head). ``feature_dim`` None = inferred from one batch.
    Returns ``linear_top1`` / ``linear_top5`` (percent, test), ``protocol: "standard"``, ``epochs``, ``lr``
    (scaled), ``schedule``, ``train_loss`` / ``train_top1`` of the last epoch.
    """
    config = config or LinearConfig()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EvalInputError(f"num_classes: expected a positive int, got {num_classes!r}")
    _check_single_process(train_loader, "train_loader")
    _check_single_process(test_loader, "test_loader")
    device = torch.device(device)
    encoder_module.to(device)
    batch_size = getattr(train_loader, "batch_size", None) or config.batch_size
    base_lr = config.lr * batch_size / 256
    with _Frozen(encoder_module) as encoder:
        dim = feature_dim or _infer_feature_dim(encoder, train_loader, device)
        head = _build_head(dim, num_classes, config.feature_bn).to(device)
        optimizer = torch.optim.SGD(
            head.parameters(), lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        last: dict[str, float] = {}
        for epoch in range(config.epochs):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(epoch, base_lr)
            last = _train_epoch(encoder, head, optimizer, train_loader, num_classes, device, epoch)
            log.info("linear probe epoch %d/%d: loss %.4f, train top-1 %.2f %%",
                     epoch + 1, config.epochs, last["loss"], last["top1"])
        test = _evaluate(encoder, head, test_loader, num_classes, device)
    return {
        "linear_top1": test["top1"],
        "linear_top5": test["top5"],
        "protocol": "standard",
        "epochs": config.epochs,
        "lr": base_lr,
        "schedule": config.schedule,
        "train_loss": last["loss"],
        "train_top1": last["top1"],
    }
