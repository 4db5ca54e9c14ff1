"""``semssl finetune``: the whole backbone plus a linear head, trained with labels, on a labelled image folder.

The semi-supervised protocol of SimCLR, as SCD (App. A.3) and SCFS (Sec. 4.1) use it on ImageNet with 1 % and 10 %
of the labels, and the fine-tuning transfer of SCFS Table 5, on any checkpoint (:mod:`semssl.transfer.common`).

Label fraction
    :func:`label_fraction` takes, per class, ``round(n_c x fraction)`` images from a permutation of that class's
    images drawn from ``seed`` — class-balanced, the same for the same seed and folder — and the run writes
    the list (``subset_<fraction>_seed<seed>.txt``: relative path and class per line) into its output folder.
    Decision: SimCLR's ImageNet 1 % / 10 % splits are fixed files; a folder has none, so the subset is drawn
    (pass ``subset_file`` to reuse a list, e.g. SimCLR's). A class left with 0 images is an error naming it.

Model and training
    ``backbone -> global average pool -> Linear(C, classes)``, the head zero-initialised (SimCLR's fine-tuning
    head), both trained. SGD with Nesterov momentum 0.9 and separate learning rates for the head and the
    backbone (SCD App. A.3), training views: random-resized crop of ``size`` and horizontal flip; test views:
    resize to ``size / 0.875``, centre crop ``size``. The run is iteration based (``epochs`` x the subset's full
    batches), resumable, with a progress bar and ETA. Reports top-1 and top-5 on the test folder, whose labels
    are matched to the training classes by name (as ``semssl eval``).

Recipes (:data:`RECIPES`): the papers' settings and small ones that finish on a CPU here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from semssl.errors import ConfigError, DataError
from semssl.transfer.common import (
    BackboneSource,
    as_dict,
    batches_from,
    load_backbone,
    lr_schedule,
    random_like,
    report,
    source_name,
    train_iterations,
)

log = logging.getLogger("semssl.transfer")


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning schedule (module docstring). ``milestones`` are fractions of the run (step schedule)."""

    fraction: float = 1.0
    epochs: int = 30
    batch_size: int = 256
    lr_backbone: float = 0.01
    lr_head: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.6, 0.8)
    warmup_epochs: float = 0.0
    size: int = 224


# Decision: the papers' recipes hold the paper's numbers; a few open points are decided and marked.
RECIPES: dict[str, FinetuneConfig] = {
    # SimCLR App. B.5 (the protocol SCFS Sec. 4.1 follows): Nesterov SGD, lr 0.05 x batch/256 (batch 4096 -> 0.8) for
    # head and backbone alike, no weight decay, 60 epochs on 1 %, 30 on 10 %, crop + flip only, 224 px. Decision:
    # a constant lr (SimCLR fine-tunes without decay; its v2 code uses a cosine, not adopted).
    "simclr-semi_1pct": FinetuneConfig(fraction=0.01, epochs=60, batch_size=4096, lr_backbone=0.8, lr_head=0.8,
                                       schedule="constant", milestones=()),
    "simclr-semi_10pct": FinetuneConfig(fraction=0.1, epochs=30, batch_size=4096, lr_backbone=0.8, lr_head=0.8,
                                        schedule="constant", milestones=()),
    # SCD App. A.3 (SCD-MoCo): batch 256, wd 0, momentum 0.9, 50 epochs, head lr 0.5, backbone lr 0.0002, both x0.1
    # after epochs 30 and 40; the same for 1 % and 10 %. Decision: Nesterov momentum, as SimCLR's protocol that
    # the paper says it follows (A.3 says "SGD").
    "scd-mocov2-semi_1pct": FinetuneConfig(fraction=0.01, epochs=50, batch_size=256, lr_backbone=2e-4, lr_head=0.5,
                                           milestones=(0.6, 0.8)),
    "scd-mocov2-semi_10pct": FinetuneConfig(fraction=0.1, epochs=50, batch_size=256, lr_backbone=2e-4, lr_head=0.5,
                                            milestones=(0.6, 0.8)),
    # SCD App. A.3 (SCD-BYOL): head lr 20.0 (1 %) / 5.0 (10 %), backbone lr 1e-4, otherwise as SCD-MoCo.
    "scd-byol-semi_1pct": FinetuneConfig(fraction=0.01, epochs=50, batch_size=256, lr_backbone=1e-4, lr_head=20.0,
                                         milestones=(0.6, 0.8)),
    "scd-byol-semi_10pct": FinetuneConfig(fraction=0.1, epochs=50, batch_size=256, lr_backbone=1e-4, lr_head=5.0,
                                          milestones=(0.6, 0.8)),
    # SCFS Table 5 (CIFAR-10/100, CUB, Cars, Aircraft, Pets). The paper states no fine-tuning settings; its table
    # sets SCFS beside BYOL / DINO numbers measured with the transfer protocol of Kornblith et al. as BYOL App. C
    # runs it. Decision: that protocol — all labels, 224 px (CIFAR upsampled), Nesterov SGD 0.9, batch 256,
    # 20,000 steps, cosine; lr 0.01 and wd 1e-5 for head and backbone (the middle of BYOL's validation grid: set
    # --lr-backbone/--lr-head/--weight-decay from a validation search for a paper-grade number). 20,000 steps at
    # batch 256 = 102 epochs of CIFAR's 50,000 images.
    "scfs-table5": FinetuneConfig(fraction=1.0, epochs=102, batch_size=256, lr_backbone=0.01, lr_head=0.01,
                                  weight_decay=1e-5, schedule="cosine", milestones=()),
    # Small, for $SEMSSL_DATA_DIR/cifar10-6k (5,000 / 1,000 images, 32 px) and the 32 px small-input learning-check
    # backbones: 10 % (500 images, 50 per class) or 1 % (50 images), batch 64 (32 for 1 %), at the images' own
    # 32 px. The SCD head/backbone lr split, scaled for a short run: head 0.1, backbone 0.01, wd 5e-4 (the labels
    # are few), cosine with a 5 % warm-up. Measured time: docs/results.md, "Transfer".
    "cifar10-6k_10pct_small": FinetuneConfig(fraction=0.1, epochs=100, batch_size=64, lr_backbone=0.01, lr_head=0.1,
                                             weight_decay=5e-4, schedule="cosine", milestones=(), warmup_epochs=5,
                                             size=32),
    "cifar10-6k_1pct_small": FinetuneConfig(fraction=0.01, epochs=200, batch_size=32, lr_backbone=0.01, lr_head=0.1,
                                            weight_decay=5e-4, schedule="cosine", milestones=(), warmup_epochs=10,
                                            size=32),
}


def label_fraction(targets: list[int], fraction: float, seed: int = 0,
                   classes: Optional[list[str]] = None) -> list[int]:
    """Indices of a class-balanced subset: per class ``round(n_c x fraction)`` of its images, drawn from a
    permutation seeded by ``seed`` and the class (module docstring); sorted. A class left empty is a DataError."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction: expected a number in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        k = len(members) if fraction == 1 else int(math.floor(len(members) * fraction + 0.5))
        if k == 0:
            name = classes[label] if classes else label
            raise DataError(f"fraction {fraction}: class '{name}' has {len(members)} images, so its share rounds to "
                            f"0 (an empty subset); use a fraction of at least {1 / len(members):.3g}")
        g = torch.Generator().manual_seed(seed * 100_003 + label)
        order = torch.randperm(len(members), generator=g)[:k].tolist()
        chosen.extend(members[j] for j in order)
    return sorted(chosen)


class _Labelled(Dataset):
    """``{"image", "label"}`` from a labelled source, with a transform, over ``indices``."""

    def __init__(self, source: Any, indices: list[int], transform: Any, labels: Optional[list[int]] = None) -> None:
        self.source, self.indices, self.transform, self.labels = source, indices, transform, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.source[self.indices[i]]
        label = sample["label"] if self.labels is None else self.labels[self.indices[i]]
        return {"image": self.transform(sample["image"]), "label": int(label)}


def _collate(items: list[dict]) -> dict[str, Tensor]:
    return {"image": torch.stack([x["image"] for x in items]),
            "label": torch.tensor([x["label"] for x in items], dtype=torch.long)}


class FinetuneModel(nn.Module):
    """The backbone's pooled features into a zero-initialised linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images)["pooled"])


def _transforms(size: int) -> tuple[Any, Any]:
    from torchvision.transforms import v2

    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                        *norm])
    test = v2.Compose([v2.PILToTensor(), v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size),
                       *norm])
    return train, test


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 0,
             device: str = "cpu") -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``dataset``."""
    from torch.utils.data import DataLoader

    model.eval()
    correct1 = correct5 = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate):
        logits = model(batch["image"].to(device))
        labels = batch["label"].to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(1).sum())
        total += len(labels)
    model.train()
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def _write_subset(path: Path, source: Any, indices: list[int]) -> None:
    lines = [f"{Path(source.paths[i]).relative_to(source.root)}\t{source.classes[source.targets[i]]}"
             for i in indices]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _read_subset(path: Path, source: Any) -> list[int]:
    index = {str(Path(p).relative_to(source.root)): i for i, p in enumerate(source.paths)}
    chosen = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel = line.split("\t")[0]
        if rel not in index:
            raise DataError(f"{path}:{n}: '{rel}' is not an image of {source.root}")
        chosen.append(index[rel])
    if not chosen:
        raise DataError(f"{path}: lists no image (an empty subset)")
    return sorted(chosen)


def _run_one(source: BackboneSource, train_set: Dataset, test_set: Dataset, num_classes: int,
             cfg: FinetuneConfig, seed: int, out_dir: Optional[Path], resume: bool, workers: int, device: str,
             progress: bool, identity: dict[str, Any], description: str) -> dict[str, Any]:
    backbone, info = load_backbone(source)
    torch.manual_seed(seed)
    model = FinetuneModel(backbone, num_classes).to(device)
    per_epoch = len(train_set) // cfg.batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {len(train_set)} images of the subset; "
                          f"lower --batch-size")
    iterations = cfg.epochs * per_epoch
    optimizer = torch.optim.SGD(
        [{"params": model.backbone.parameters(), "lr": cfg.lr_backbone},
         {"params": model.head.parameters(), "lr": cfg.lr_head}],
        lr=cfg.lr_backbone, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(optimizer, iterations, cfg.schedule, warmup=int(round(cfg.warmup_epochs * per_epoch)),
                            milestones=cfg.milestones)

    def step(m: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = m(batch["image"].to(device))
        return {"loss": F.cross_entropy(logits, batch["label"].to(device))}

    result = train_iterations(model, optimizer, scheduler,
                              lambda first: batches_from(train_set, cfg.batch_size, seed, first, _collate, workers),
                              iterations, step, out_dir, identity, resume=resume,
                              save_every=max(50, iterations // 20), description=description, progress=progress)
    scores = accuracy(model, test_set, workers=workers, device=device)
    return {**scores, "iterations": result.iterations, "seconds": result.seconds, "backbone": info,
            "final_loss": result.history[-1]["loss"] if result.history else None}


def finetune(source: BackboneSource, train: str, test: str, recipe: Optional[str] = None,
             fraction: Optional[float] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
             lr_backbone: Optional[float] = None, lr_head: Optional[float] = None,
             weight_decay: Optional[float] = None, schedule: Optional[str] = None, size: Optional[int] = None,
             subset_file: Optional[str] = None, seed: int = 0, out_dir: Optional[str | Path] = None,
             resume: bool = False, compare_random_init: bool = False, workers: int = 0, device: str = "cpu",
             progress: bool = True, on_error: str = "skip") -> dict[str, Any]:
    """Fine-tune ``source``'s backbone with a linear head on the labelled folder ``train``; top-1/top-5 on ``test``.

    ``recipe`` names one of :data:`RECIPES` (default: the defaults of :class:`FinetuneConfig`); every other
    argument given overrides it. ``out_dir`` receives ``subset_*.txt``, ``state.pt`` (``random_init/state.pt``
    for the comparison run) and ``result.json``. Returns ``{"model": {...}, ["random_init": {...}], ...}``.
    """
    from semssl.eval.data import ClassMatched
    from semssl.data.sources import ImageFolderSource

    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"recipe: unknown '{recipe}' ({', '.join(RECIPES)})")
    cfg = RECIPES[recipe] if recipe else FinetuneConfig()
    given = {"fraction": fraction, "epochs": epochs, "batch_size": batch_size, "lr_backbone": lr_backbone,
             "lr_head": lr_head, "weight_decay": weight_decay, "schedule": schedule, "size": size}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    _check(cfg)
    out = Path(out_dir) if out_dir is not None else None
    train_source = ImageFolderSource(train, labels=True, on_error=on_error)
    test_source = ClassMatched(ImageFolderSource(test, labels=True, on_error=on_error), train_source.classes)
    if subset_file:
        indices = _read_subset(Path(subset_file), train_source)
    else:
        indices = label_fraction(train_source.targets, cfg.fraction, seed, train_source.classes)
    subset_path = None
    if out is not None:
        subset_path = out / f"subset_{cfg.fraction:g}_seed{seed}.txt"
        _write_subset(subset_path, train_source, indices)
    train_tf, test_tf = _transforms(cfg.size)
    train_set = _Labelled(train_source, indices, train_tf)
    test_set = _Labelled(test_source, list(range(len(test_source))), test_tf)
    num_classes = len(train_source.classes)
    # what a resumed state must share; not the length, so a finished run can be continued for more epochs
    identity = {"protocol": "finetune", "train": str(train), "seed": seed, "images": len(indices),
                "config": {k: v for k, v in as_dict(cfg).items() if k != "epochs"}}
    log.info("finetune: %d of %d training images (fraction %g, %d classes), %d test images", len(indices),
             len(train_source), cfg.fraction, num_classes, len(test_set))
    results: dict[str, Any] = {}
    results["model"] = _run_one(source, train_set, test_set, num_classes, cfg, seed, out, resume, workers, device,
                                progress, {**identity, "source": source_name(source)}, "finetune")
    if compare_random_init:
        baseline = random_like(results["model"]["backbone"], seed)
        results["random_init"] = _run_one(baseline, train_set, test_set, num_classes, cfg, seed,
                                          out / "random_init" if out else None, resume and out is not None and
                                          (out / "random_init" / "state.pt").exists(), workers, device, progress,
                                          {**identity, "source": "random init"}, "finetune (random init)")
    extra = {"protocol": "finetune", "recipe": recipe, "config": as_dict(cfg), "train": str(train),
             "test": str(test), "subset": str(subset_path) if subset_path else None, "subset_size": len(indices),
             "seed": seed}
    title = f"finetune: {cfg.fraction:g} of the labels, {cfg.epochs} epochs"
    payload = report(title, results, out, extra, ["top1", "top5", "iterations", "seconds"])
    return payload


def _check(cfg: FinetuneConfig) -> None:
    problems = []
    if not 0 < cfg.fraction <= 1:
        problems.append(f"fraction={cfg.fraction} (a number in (0, 1])")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("epochs", "batch_size", "size") and (not isinstance(value, int) or value < 1):
            problems.append(f"{f.name}={value} (an integer >= 1)")
        if f.name in ("lr_backbone", "lr_head", "weight_decay") and value < 0:
            problems.append(f"{f.name}={value} (>= 0)")
    if cfg.schedule not in ("cosine", "step", "constant"):
        problems.append(f"schedule={cfg.schedule} (cosine, step, constant)")
    if problems:
        raise ConfigError("finetune: " + "; ".join(problems))
