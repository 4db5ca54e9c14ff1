"""Loaders of labelled image folders for the evaluation protocols (centre-crop features, linear-probe training)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from semssl.data.sources import ImageFolderSource
from semssl.errors import EvalInputError

log = logging.getLogger("semssl.eval")


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


class ClassMatched(Dataset):
    """A labelled source relabelled by class *name* onto another split's class list (the training split's).

    Decision: evaluation labels are matched by class name, never by each folder's own sorted order, so a test
    folder with a subset of the classes (or extra ones) is scored against the right labels. A test class absent
    from the training split is an error naming it — or, with ``drop_unknown``, its images are left out and
    counted (``dropped``). Training classes absent from the test split are fine."""

    def __init__(self, source: Any, classes: list[str], drop_unknown: bool = False) -> None:
        self.source, self.classes = source, list(classes)
        where = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in source.classes if name not in where]
        if unknown and not drop_unknown:
            raise EvalInputError(f"'{source.location}': classes {unknown} are not in the training split "
                                 f"(which has {len(self.classes)}: {self.classes[:8]}"
                                 f"{', ...' if len(self.classes) > 8 else ''}); pass --drop-unknown-classes to "
                                 f"leave their images out")
        mapping = [where.get(name, -1) for name in source.classes]
        self.indices = [i for i, t in enumerate(source.targets) if mapping[t] >= 0]
        self.targets = [mapping[source.targets[i]] for i in self.indices]
        self.dropped = len(source.targets) - len(self.indices)
        if not self.indices:
            raise EvalInputError(f"'{source.location}': no image of a class of the training split")
        if self.dropped:
            log.warning("%s: left out %d images of %d classes absent from the training split (%s)",
                        source.location, self.dropped, len(unknown), ", ".join(unknown))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.source[self.indices[index]])
        sample["label"] = self.targets[index]
        return sample


def folder_classes(path: str, cfg: Any) -> list[str]:
    """The class names of a labelled image folder (its sub-folders holding images, sorted)."""
    return list(ImageFolderSource(path, labels=True, on_error=cfg.data.on_error).classes)


def eval_loader(path: str, cfg: Any, world_size: int = 1, rank: int = 0, size: Optional[int] = None,
                classes: Optional[list[str]] = None, drop_unknown: bool = False) -> DataLoader:
    """Loader over a labelled image folder with the evaluation transform, in dataset order (sharded under DDP).

    ``classes``: label the images by these class names (the training split's; :class:`ClassMatched`)."""
    source = ImageFolderSource(path, labels=True, on_error=cfg.data.on_error)
    if classes is not None:
        source = ClassMatched(source, classes, drop_unknown)
    dataset = EvalDataset(source, size or cfg.data.eval_size, cfg.data.eval_resize_ratio)
    sampler = None
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=sampler, shuffle=False,
                      num_workers=cfg.data.num_workers)
