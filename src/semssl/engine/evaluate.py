"""Evaluate a backbone with the kNN and fast linear protocols — shared by the online monitor, the end of a
pre-training run (trained vs random init) and ``semssl eval``."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from semssl.distributed import broadcast_buffers, rank, world_size
from semssl.engine.data import eval_loader
from semssl.eval.features import extract_features
from semssl.eval.knn import knn_evaluate
from semssl.eval.linear import FastLinearConfig, linear_fast


class PooledEncoder(nn.Module):
    """``images -> backbone(images)["pooled"]`` as a module (what the evaluation protocols consume)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)["pooled"]


def pooled_encoder(backbone: nn.Module) -> PooledEncoder:
    return PooledEncoder(backbone)


def backbone_features(backbone: nn.Module, path: str, cfg: Any, device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """Pooled features of every image of a labelled folder (all ranks get all of them under DDP)."""
    loader = eval_loader(path, cfg, world_size(), rank())
    was_training = backbone.training
    backbone.eval()
    try:
        return extract_features(pooled_encoder(backbone), loader, device=device)
    finally:
        backbone.train(was_training)


def evaluate_backbone(backbone: nn.Module, cfg: Any, train_path: str, test_path: str, linear: bool = True,
                      device: Any = "cpu") -> dict[str, Any]:
    """kNN (k = cfg.eval.knn_k, T = cfg.eval.knn_temperature) and, if asked, the fast linear probe; percent."""
    train_x, train_y = backbone_features(backbone, train_path, cfg, device)
    test_x, test_y = backbone_features(backbone, test_path, cfg, device)
    ks = tuple(cfg.eval.knn_k)
    out: dict[str, Any] = dict(knn_evaluate(train_x, train_y, test_x, test_y, ks=ks,
                                            temperature=cfg.eval.knn_temperature))
    if linear:
        lin = cfg.eval.linear
        res = linear_fast(train_x, train_y, test_x, test_y,
                          config=FastLinearConfig(epochs=lin.epochs, lrs=tuple(lin.lrs), holdout=lin.holdout,
                                                  seed=cfg.trainer.seed))
        out.update({k: v for k, v in res.items()})
    return out


class KNNMonitor(pl.Callback):
    """Online kNN accuracy of the evaluated branch every ``every`` epochs (and after the last epoch)."""

    def __init__(self, cfg: Any, train_path: str, test_path: str, every: int) -> None:
        self.cfg, self.train_path, self.test_path, self.every = cfg, train_path, test_path, every
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every and not last and not trainer.should_stop:
            return
        broadcast_buffers(pl_module.method)  # rank 0's BatchNorm statistics on every rank (what is checkpointed)
        backbone = pl_module.method.backbone_for(None)
        res = evaluate_backbone(backbone, self.cfg, self.train_path, self.test_path, linear=False,
                                device=pl_module.device)
        self.history.append({"epoch": epoch, "knn_top1": res["knn_top1"]})
        pl_module.log("monitor/knn_top1", float(res["knn_top1"]), on_epoch=True, sync_dist=False,
                      prog_bar=True, rank_zero_only=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(res: dict, keys: tuple[str, ...] = ("knn_top1", "linear_top1")) -> dict[str, Optional[float]]:
    return {k: (round(float(res[k]), 2) if k in res else None) for k in keys}


class _AugmentedFolder(torch.utils.data.Dataset):
    """Labelled folder with the linear-probe training augmentation (RandomResizedCrop + flip, normalised)."""

    def __init__(self, path: str, size: int, on_error: str) -> None:
        from torchvision.transforms import v2

        from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD
        from semssl.data.sources import ImageFolderSource

        self.source = ImageFolderSource(path, labels=True, on_error=on_error)
        self.transform = v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = self.source[index]
        return {"image": self.transform(sample["image"]), "label": sample["label"], "index": index}


def linear_standard_on_folders(backbone: nn.Module, args: Any, cfg: Any) -> dict:
    """The standard frozen-backbone protocol on two labelled folders (single process)."""
    from semssl.engine.data import eval_loader
    from semssl.eval.linear import LinearConfig, linear_standard

    epochs = args.epochs or 100
    config = LinearConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          schedule=args.schedule, milestones=(0.6, 0.8), num_workers=args.workers)
    train_set = _AugmentedFolder(args.train, cfg.data.eval_size, cfg.data.on_error)
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                        num_workers=args.workers)
    test = eval_loader(args.test, cfg)
    num_classes = len(train_set.source.classes)
    return linear_standard(pooled_encoder(backbone), train, test, num_classes, config)
