"""Feature extraction for the evaluation protocols (kNN, fast linear probe).

An evaluation sees a frozen encoder as a plain callable ``encoder(images) -> [B, D]`` and a loader whose items
are dicts with ``"image"`` (a normalised ``[C, H, W]`` float tensor after the evaluation transform),
``"label"`` (int) and, optionally, ``"index"`` (the sample's position in its dataset). This module turns such a
loader into one ``[N, D]`` float32 feature matrix and its ``[N]`` int64 labels, on one process or sharded over
the ranks of a ``torch.distributed`` job. It also holds what every evaluation protocol shares: the input error
class (``EvalInputError``, a ``ValueError``) and the checks of feature matrices, labels and batches.

Distributed extraction: when a process group with more than one rank is initialised and the loader's sampler
shards the dataset (a ``DistributedSampler``), every rank extracts its shard, the shards are all-gathered
(padded to equal length, gathered, padding dropped) and put back in dataset order by the samples' indices, so
that every rank returns the same full matrix. The indices come from the items' ``"index"`` key, or else from
iterating the ``DistributedSampler`` itself (its order is a deterministic function of seed and epoch). The
duplicates a ``DistributedSampler`` adds to make the shards equal are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from semssl.errors import EvalInputError

__all__ = [
    "EvalInputError",
    "batch_images_labels",
    "check_features",
    "check_labels",
    "extract_features",
    "infer_num_classes",
    "loader_sampler",
]



def check_features(features: Tensor, name: str) -> None:
    """Require a non-empty, finite, floating-point ``[N, D]`` matrix; ``name`` is the argument in errors."""
    if not isinstance(features, Tensor) or features.dim() != 2:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise EvalInputError(f"{name}: expected a [N, D] tensor, got {got}")
    if not features.is_floating_point():
        raise EvalInputError(f"{name}: expected float16/bfloat16/float32/float64 features, got {features.dtype}")
    if features.shape[0] == 0:
        raise EvalInputError(f"{name}: is empty (0 samples)")
    if features.shape[1] == 0:
        raise EvalInputError(f"{name}: has feature dimension 0")
    if not bool(torch.isfinite(features).all()):
        raise EvalInputError(f"{name}: contains NaN or infinite values")


def check_labels(labels: Tensor, name: str, length: int, num_classes: int) -> None:
    """Require an integer vector of ``length`` entries, each in [0, num_classes)."""
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise EvalInputError(f"{name}: expected a 1-D integer tensor, got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise EvalInputError(f"{name}: expected integer labels, got dtype {labels.dtype}")
    if labels.numel() != length:
        raise EvalInputError(f"{name}: has {labels.numel()} entries but the features have {length} rows")
    if length == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise EvalInputError(f"{name}: labels must lie in [0, {num_classes}), found values in [{low}, {high}]")


def infer_num_classes(train_labels: Tensor, test_labels: Tensor, num_classes: int | None = None) -> int:
    """``num_classes`` when given (checked positive), else max label + 1 over both splits."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise EvalInputError(f"num_classes: expected a positive int or None, got {num_classes!r}")
        return num_classes
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if not isinstance(labels, Tensor) or labels.numel() == 0:
            raise EvalInputError(f"{name}: expected a non-empty 1-D integer tensor")
    return int(max(int(train_labels.max()), int(test_labels.max()))) + 1


def batch_images_labels(batch: Any, where: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unpack a loader batch into (images ``[B, C, H, W]``, labels int64 ``[B]``, indices int64 ``[B]`` or None).

    ``where`` names the batch in error messages (e.g. ``"loader batch 3"``).
    """
    if not isinstance(batch, Mapping):
        raise EvalInputError(
            f"{where}: expected a dict with keys 'image' and 'label', got {type(batch).__name__}"
        )
    for key in ("image", "label"):
        if key not in batch:
            raise EvalInputError(f"{where}: missing key {key!r} (keys present: {sorted(batch)})")
    images = batch["image"]
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise EvalInputError(f"{where}: 'image' must be a [B, C, H, W] tensor, got {shape}")
    labels = _as_index_vector(batch["label"], "label", where, images.shape[0])
    indices = None
    if batch.get("index") is not None:
        indices = _as_index_vector(batch["index"], "index", where, images.shape[0])
    return images, labels, indices


def _as_index_vector(value: Any, key: str, where: str, batch_size: int) -> Tensor:
    """Convert a batch's integer column (labels or indices) to an int64 CPU vector of length ``batch_size``."""
    vector = torch.as_tensor(value)
    if vector.is_floating_point() or vector.is_complex() or vector.dtype == torch.bool:
        raise EvalInputError(f"{where}: {key!r} must hold integers, got dtype {vector.dtype}")
    vector = vector.reshape(-1).to(device="cpu", dtype=torch.int64)
    if vector.numel() != batch_size:
        raise EvalInputError(
            f"{where}: {key!r} has {vector.numel()} entries for {batch_size} images"
        )
    return vector


def loader_sampler(loader: Iterable[dict]) -> Any:
    """The sampler that decides which samples a loader yields (``loader.sampler`` or ``batch_sampler.sampler``)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if isinstance(inner, DistributedSampler):
        return inner
    return getattr(loader, "sampler", None)


def _world_size() -> int:
    """Number of ranks of the default process group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _is_sharded(loader: Iterable[dict]) -> bool:
    """True when the loader yields only this rank's shard of a multi-rank ``DistributedSampler``."""
    sampler = loader_sampler(loader)
    return _world_size() > 1 and isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1


def _encode(encoder: Callable[[Tensor], Tensor], images: Tensor, where: str) -> Tensor:
    """Run the encoder on one batch and check it returns ``[B, D]`` features; returns float32 on CPU."""
    features = encoder(images)
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != images.shape[0]:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise EvalInputError(
            f"{where}: encoder must return [B, D] = [{images.shape[0]}, D] pooled features, got {got} "
            "(pass a callable that pools the backbone's last stage)"
        )
    return features.detach().to(device="cpu", dtype=torch.float32)


def _progress_wrap(loader: Iterable[dict], enabled: bool) -> Iterable[dict]:
    """Wrap the loader in a rich progress bar when asked (rank 0 only)."""
    rank = dist.get_rank() if _world_size() > 1 else 0
    if not enabled or rank != 0:
        return loader
    from rich.progress import track

    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    return track(loader, description="extracting features", total=total)


class _EvalMode:
    """Context manager: put an ``nn.Module`` encoder in eval mode and restore its mode afterwards.

    Decision: features are always taken in eval mode (BatchNorm running statistics, no dropout), as every
    released evaluation script does (DINO ``eval_knn.py``, MoCo ``main_lincls.py``).
    """

    def __init__(self, encoder: Callable[[Tensor], Tensor]) -> None:
        self.module = encoder if isinstance(encoder, nn.Module) else None
        self.was_training = False

    def __enter__(self) -> None:
        if self.module is not None:
            self.was_training = self.module.training
            self.module.eval()

    def __exit__(self, *exc: object) -> None:
        if self.module is not None:
            self.module.train(self.was_training)


@torch.no_grad()
def extract_features(
    encoder: Callable[[Tensor], Tensor],
    loader: Iterable[dict],
    device: str | torch.device = "cpu",
    channels_last: bool = False,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Encode every sample of ``loader``; return (features float32 ``[N, D]`` on CPU, labels int64 ``[N]``).

    Rows are in dataset order: sorted by the items' ``"index"`` when every batch carries one (so a shuffled
    loader still gives dataset order), else in the order the loader yields them. Under a multi-rank
    ``DistributedSampler`` the shards of all ranks are gathered and every rank returns the full, identical
    matrix (see the module docstring). An ``nn.Module`` encoder is run in eval mode and its mode restored.
    """
    device = torch.device(device)
    sharded = _is_sharded(loader)
    feats, labels, indices = [], [], []
    with _EvalMode(encoder):
        for step, batch in enumerate(_progress_wrap(loader, progress)):
            where = f"loader batch {step}"
            images, batch_labels, batch_indices = batch_images_labels(batch, where)
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            feats.append(_encode(encoder, images, where))
            labels.append(batch_labels)
            indices.append(batch_indices)
    local_feats, local_labels, local_index = _concat_local(feats, labels, indices, loader, sharded)
    if sharded:
        return _gather_in_dataset_order(local_feats, local_labels, local_index)
    if local_feats.shape[0] == 0:
        raise EvalInputError("loader: yielded no samples")
    return _order_single_process(local_feats, local_labels, local_index)


def _concat_local(
    feats: list[Tensor], labels: list[Tensor], indices: list[Tensor | None], loader: Iterable[dict], sharded: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Concatenate this process's batches; find the dataset indices (from items, or the sampler if sharded)."""
    dim = feats[0].shape[1] if feats else 0
    local_feats = torch.cat(feats) if feats else torch.empty(0, dim)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    dims = {f.shape[1] for f in feats}
    if len(dims) > 1:
        raise EvalInputError(f"encoder: returned features of different widths across batches: {sorted(dims)}")
    if indices and all(i is not None for i in indices):
        return local_feats, local_labels, torch.cat(indices)  # type: ignore[arg-type]
    if any(i is not None for i in indices):
        raise EvalInputError("loader: some batches carry 'index' and others do not")
    if not sharded:
        return local_feats, local_labels, None
    sampler_index = torch.as_tensor(list(iter(loader_sampler(loader))), dtype=torch.int64)
    if sampler_index.numel() != local_feats.shape[0]:
        raise EvalInputError(
            f"loader: items carry no 'index' and the DistributedSampler lists {sampler_index.numel()} indices "
            f"for {local_feats.shape[0]} samples yielded (drop_last on the loader?); add an 'index' key to items"
        )
    return local_feats, local_labels, sampler_index


def _order_single_process(feats: Tensor, labels: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sort one process's rows by dataset index (when known); a repeated index is an error."""
    if index is None:
        return feats, labels
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    repeated = sorted_index[1:][sorted_index[1:] == sorted_index[:-1]]
    if repeated.numel():
        raise EvalInputError(
            f"loader: sample index {int(repeated[0])} was yielded more than once (sampler with replacement?)"
        )
    return feats[order], labels[order]


def _gather_device() -> torch.device:
    """Device the collective runs on: CUDA for NCCL (it cannot move CPU tensors), else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_padded(tensor: Tensor, counts: list[int], device: torch.device) -> list[Tensor]:
    """All-gather a tensor whose first dimension differs across ranks (``counts``) by padding to the max."""
    max_n = max(counts)
    padded = torch.zeros((max_n, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [g[:n].cpu() for g, n in zip(gathered, counts)]


def _gather_in_dataset_order(feats: Tensor, labels: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gather all ranks' shards, restore dataset order, drop the sampler's padding duplicates."""
    assert index is not None  # _concat_local always finds indices when sharded
    device = _gather_device()
    shape = torch.tensor([feats.shape[0], feats.shape[1]], dtype=torch.int64, device=device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    counts = [int(s[0]) for s in shapes]
    dims = {int(s[1]) for s, n in zip(shapes, counts) if n > 0}
    if len(dims) > 1:
        raise EvalInputError(f"encoder: ranks returned features of different widths: {sorted(dims)}")
    if not dims:
        raise EvalInputError("loader: yielded no samples on any rank")
    if feats.shape[0] == 0:
        feats = feats.new_zeros(0, dims.pop())
    all_feats = torch.cat(_all_gather_padded(feats, counts, device))
    all_labels = torch.cat(_all_gather_padded(labels, counts, device))
    all_index = torch.cat(_all_gather_padded(index, counts, device))
    order = torch.argsort(all_index, stable=True)
    sorted_index = all_index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    order = order[keep]
    return all_feats[order], all_labels[order]
