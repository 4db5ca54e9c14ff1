"""torch.distributed helpers that degrade to no-ops on one process.

Queues, centres, Sinkhorn, k-means and kNN call these so that the same code is correct on 1 or N processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, rank-major. No gradient."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over ranks (on a copy; ``x`` itself on one process)."""
    if not is_distributed():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks."""
    return all_reduce_sum(x) / world_size()


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor]:
    """Shuffle a batch across all ranks (MoCo's shuffle-BN). Returns this rank's shuffled slice and the
    index that undoes it (see :func:`batch_unshuffle`). On one process it is a plain permutation."""
    local = x.shape[0]
    gathered = concat_all_gather(x)
    perm = torch.randperm(gathered.shape[0], device=x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    mine = perm.view(world_size(), local)[rank()]
    return gathered[mine], unshuffle


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle` for the outputs computed on the shuffled slice."""
    local = x.shape[0]
    gathered = concat_all_gather(x)
    return gathered[unshuffle.view(world_size(), local)[rank()]]


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, queues, centres) to every rank, in place.

    DDP does this before every forward, so after the last step each rank's buffers hold its own last local
    update. Call it before evaluating a model that every rank evaluates a shard of, so all ranks use the
    buffers the checkpoint (written by rank 0) holds."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)
