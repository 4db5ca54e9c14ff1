"""Sinkhorn-Knopp codes (SwAV; DSC-PM, DSC paper Eqs. 8-9, docs/methods/dsc.md §Prototypes), distributed-aware.

The codes are an equipartitioned soft assignment of the *global* batch (every rank's samples) to the K
prototypes: each sample's code sums to 1 and every prototype receives about ``N/K`` of the total mass. Under
DDP only the per-prototype sums (and the global total and maximum) cross ranks, so the result on N processes
equals the single-process result on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from semssl.distributed import all_reduce_sum, concat_all_gather
from semssl.losses import at_least_float32


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, n_iters: int = 3) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes of this rank's samples, computed over the samples of all ranks.

    ``Q = exp(scores / epsilon)`` (``[K, N]``, N = all ranks' samples), then ``n_iters`` times: rows
    (prototypes) scaled to equal mass (row sums over all ranks), columns (samples) to equal mass; finally each
    column sums to 1. SwAV also divides by the total and by K and N on the way; those scalars cancel in the next
    normalisation and do not change the result. With SwAV's settings: epsilon 0.05, 3 iterations.

    Decision: computed in the log domain (row and column log-sum-exps; the rows' across ranks from the gathered
    per-row maxima and all-reduced sums), which gives SwAV's multiplicative result without over- or underflow
    for small epsilon or unnormalised scores.

    Args:
        scores: ``[N_local, K]`` prototype scores (SwAV: cosines of L2-normalised embeddings and prototypes).
        epsilon: entropic regularisation (0.05).
        n_iters: Sinkhorn iterations (3; at least 1).

    Returns:
        ``[N_local, K]`` codes in :func:`~semssl.losses.compute_dtype` of ``scores`` (float32 for half-precision
        scores, float64 for float64 ones), each row summing to 1.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: expected scores [N, K], got shape {tuple(scores.shape)}")
    if epsilon <= 0 or n_iters < 1:
        raise ValueError(f"sinkhorn: epsilon must be > 0 and n_iters >= 1, got {epsilon} and {n_iters}")
    log_q = at_least_float32(scores.detach()) / epsilon  # [N_local, K]: a sample per row here, a prototype per column
    for _ in range(n_iters):
        log_q = log_q - _global_logsumexp_over_samples(log_q)  # each prototype: the same total mass
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # each sample: mass 1
    return log_q.exp()


def _global_logsumexp_over_samples(log_q: Tensor) -> Tensor:
    """``[1, K]``: log of each prototype's total ``sum_n exp(log_q[n, k])`` over every rank's samples."""
    top = concat_all_gather(log_q.max(dim=0, keepdim=True).values).max(dim=0, keepdim=True).values
    return top + torch.log(all_reduce_sum((log_q - top).exp().sum(dim=0, keepdim=True)))
