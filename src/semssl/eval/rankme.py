"""RankMe: the effective rank of a set of embeddings, a label-free collapse monitor.

Garrido, Balestriero, Najman and LeCun, "RankMe: Assessing the downstream performance of pretrained
self-supervised representations by their rank", ICML 2023, Eq. 1::

    RankMe(Z) = exp(-sum_k p_k log p_k),   p_k = sigma_k / ||sigma||_1 + eps,   eps = 1e-7

with sigma the singular values of the embedding matrix Z ``[N, D]`` (rows = embeddings, not centred, as in the
paper). It lies between 1 (every embedding on one line: dimensional collapse) and min(N, D) (singular values all
equal); the paper estimates it on N = 25,600 embeddings, so values measured on a batch of a few hundred are bounded
by the batch and compare across runs only at the same N and D.

Decision: a pure function here, not in the engine, because it is a property of any embedding matrix — the engine's
monitor (``monitor/rankme*``, :mod:`semssl.engine.module`) applies it to a training batch, and the same function
serves the features :func:`semssl.eval.evaluate.split_features` returns; it needs no Lightning and sits below
both the engine and the figures in the layering.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: the paper's eps
EPS = 1e-7


@torch.no_grad()
def rankme(z: Tensor, eps: float = EPS) -> float:
    """RankMe of ``z`` ``[N, D]`` (module docstring), computed in ``promote_types(z.dtype, float32)``.

    The dense and region variants are this same function on the matrix of every per-location or per-region
    embedding (``[B*h*w, C]``, ``[R, C]``). A matrix with no non-zero singular value (all zeros, or no row) has
    rank 0, where the formula is undefined."""
    if z.dim() != 2:
        raise ValueError(f"rankme: expected an [N, D] matrix, got shape {tuple(z.shape)}")
    if z.shape[0] == 0 or z.shape[1] == 0:
        return 0.0
    x = z.detach().to(torch.promote_types(z.dtype, torch.float32))
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum()
    if not torch.isfinite(total):
        return float("nan")
    if total <= 0:
        return 0.0
    p = sigma / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def subsample_rows(z: Tensor, max_rows: int) -> Tensor:
    """At most ``max_rows`` rows of ``z``, evenly spaced (first and last included), drawing no random number — so
    the monitor never changes the run's random stream."""
    n = z.shape[0]
    if n <= max_rows:
        return z
    idx = torch.linspace(0, n - 1, max_rows, device=z.device).round().long()
    return z[idx]
