"""InfoNCE with a queue of negatives (MoCo) and the queue itself."""

from __future__ import annotations

from typing import Optional

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

    Under gradient accumulation the engine calls :meth:`defer` before a step's micro-batches and :meth:`flush`
    after them: every micro-batch then sees the queue as it was before the step, and the step's keys are written
    once, in the order one pass over the whole batch writes them (so the queue is that of the larger batch).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._pending: Optional[list[list[Tensor]]] = None  # per micro-batch, this process's keys, while deferred

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def defer(self) -> None:
        """Hold the keys of the following :meth:`enqueue` calls until :meth:`flush`; :meth:`next_part` marks
        where the next micro-batch starts."""
        self._pending = [[]]

    def next_part(self) -> None:
        if self._pending is not None:
            self._pending.append([])

    def flush(self, apply: bool = True) -> None:
        """Write the held keys and stop holding (``apply=False`` drops them). The ``i``-th enqueue of every
        micro-batch is written as one, micro-batches in order: the rows and order of the ``i``-th enqueue of one
        pass over the whole batch (a method that enqueues per view, as SoCo does, keeps its order)."""
        pending, self._pending = self._pending, None
        if not apply or not pending or not any(pending):
            return
        calls = {len(part) for part in pending}
        groups = zip(*pending) if len(calls) == 1 else [[keys for part in pending for keys in part]]
        for group in groups:
            self.enqueue(torch.cat(list(group)))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        if self._pending is not None:
            self._pending[-1].append(keys.detach())
            return
        keys = concat_all_gather(keys.detach()).to(self.queue.dtype)
        n = keys.shape[0]
        if n >= self.size:
            self.queue.copy_(keys[-self.size:])
            self.ptr.zero_()
            return
        idx = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.queue[idx] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
