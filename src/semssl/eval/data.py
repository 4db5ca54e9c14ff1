"""Loaders of labelled image folders for the evaluation protocols (centre-crop features, linear-probe training)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from semssl.data.sources import ImageFolderSource


class EvalDataset(Dataset):
    """A labelled source with the evaluation transform (resize, centre crop, normalise)."""

    def __init__(self, source: Dataset, size: int, resize_ratio: float) -> None:
        self.source = source
        self.transform = eval_transform(size, resize_ratio=resize_ratio)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = self.source[index]
        return {"image": self.transform(sample["image"]), "label": sample["label"], "index": index}


class AugmentedFolder(Dataset):
    """Labelled folder with the linear-probe training augmentation (RandomResizedCrop + flip, normalised)."""

    def __init__(self, path: str, size: int, on_error: str) -> None:
        from torchvision.transforms import v2

        self.source = ImageFolderSource(path, labels=True, on_error=on_error)
        self.transform = v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = self.source[index]
        return {"image": self.transform(sample["image"]), "label": sample["label"], "index": index}


def eval_loader(path: str, cfg: Any, world_size: int = 1, rank: int = 0, size: Optional[int] = None) -> DataLoader:
    """Loader over a labelled image folder with the evaluation transform, in dataset order (sharded under DDP)."""
    source = ImageFolderSource(path, labels=True, on_error=cfg.data.on_error)
    dataset = EvalDataset(source, size or cfg.data.eval_size, cfg.data.eval_resize_ratio)
    sampler = None
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=sampler, shuffle=False,
                      num_workers=cfg.data.num_workers)
