"""InfoNCE with a queue of negatives (MoCo) and the queue itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.distributed import concat_all_gather
from semssl.losses import compute_dtype


def info_nce(query: Tensor, key: Tensor, negatives: Tensor, temperature: float = 0.2) -> tuple[Tensor, Tensor]:
    """MoCo's InfoNCE (MoCo paper Eq. 1; SCD Eq. 1 L_ncc; DSC Eq. 1 L_ins): ``-log exp(q.k+/t) / sum exp(q.k/t)``.

    Args:
        query: ``[N, D]`` L2-normalised queries (gradient flows).
        key: ``[N, D]`` L2-normalised positive keys (treated as constants).
        negatives: ``[K, D]`` L2-normalised negatives (the queue).
        temperature: tau (0.2 for MoCo-v2).

    Returns:
        The mean loss and the logits ``[N, 1 + K]`` (positive in column 0) for accuracy logging, in
        :func:`~semssl.losses.compute_dtype` of the three inputs.
    """
    dtype = compute_dtype(query, key, negatives)
    query, key, negatives = query.to(dtype), key.detach().to(dtype), negatives.detach().to(dtype)
    pos = torch.einsum("nd,nd->n", query, key).unsqueeze(1)
    neg = query @ negatives.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels), logits


class MemoryQueue(nn.Module):
    """A FIFO queue of L2-normalised embeddings ``[size, dim]`` (MoCo's ``queue``), DDP-aware.

    ``enqueue`` all-gathers the keys of every rank (rank-major, so the queue is identical on all ranks) and
    writes them at the pointer, wrapping around. Initialised with random unit vectors as in MoCo.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        keys = concat_all_gather(keys.detach()).to(self.queue.dtype)
        n = keys.shape[0]
        if n >= self.size:
            self.queue.copy_(keys[-self.size:])
            self.ptr.zero_()
            return
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.queue[idx] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
