"""Online spherical k-means over the pixel embeddings of a batch (DSC-KM, DSC paper §3.2 and Eq. 7,
docs/methods/dsc.md §K-means), distributed-aware.

Points are L2-normalised embeddings ``[N, D]``; the similarity is the cosine (a dot product), a centroid is
the L2-normalised mean of its members. Under DDP only per-cluster sums and counts cross ranks (all-reduced),
so N processes give the single-process result on the concatenated batch. The paper does not say how many
iterations, how clusters are initialised or what happens to empty ones: those decisions are written at
:func:`spherical_kmeans` and :func:`kmeans_init`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.distributed import all_reduce_sum, concat_all_gather, world_size
from semssl.losses import at_least_float32, compute_dtype


@torch.no_grad()
def kmeans_init(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` initial centroids drawn from the points of all ranks.

    Every rank draws ``ceil(k / world)`` of its own points at random (without replacement when it has enough,
    with replacement otherwise); the draws are gathered rank-major and the first ``k`` kept, so every rank gets
    the same centroids.

    Args:
        x: ``[N_local, D]`` points (L2-normalised).
        k: number of clusters.
        generator: optional RNG for the draw.

    Returns:
        ``[k, D]`` L2-normalised centroids, in :func:`~semssl.losses.compute_dtype` of ``x``.
    """
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"kmeans_init: expected points [N >= 1, D], got shape {tuple(x.shape)}")
    per_rank = math.ceil(k / world_size())
    n = x.shape[0]
    if n >= per_rank:
        idx = torch.randperm(n, generator=generator)[:per_rank]
    else:
        idx = torch.randint(n, (per_rank,), generator=generator)
    picked = concat_all_gather(x.detach()[idx.to(x.device)].contiguous())
    return F.normalize(at_least_float32(picked[:k]), dim=1)


@torch.no_grad()
def spherical_kmeans(x: Tensor, centroids: Tensor, n_iters: int = 3) -> tuple[Tensor, Tensor]:
    """``n_iters`` Lloyd iterations of spherical k-means from ``centroids``, over the points of all ranks.

    Each iteration assigns every point to the centroid of highest cosine, then sets each centroid to the
    L2-normalised sum of its members (sums and counts all-reduced across ranks). Decision: a cluster left empty
    keeps its previous centroid (it may collect points again in a later iteration or step). The returned
    assignment is that of the points to the *returned* centroids.

    Args:
        x: ``[N_local, D]`` L2-normalised points (no gradient is taken).
        centroids: ``[K, D]`` L2-normalised starting centroids, identical on every rank.
        n_iters: Lloyd iterations (>= 0; 0 only assigns).

    Returns:
        ``(centroids [K, D], assign [N_local] long)``, the centroids (and the cosines behind both) in
        :func:`~semssl.losses.compute_dtype` of the points and starting centroids.
    """
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"spherical_kmeans: points [N, D] and centroids [K, D] expected, got {tuple(x.shape)} "
                         f"and {tuple(centroids.shape)}")
    dtype = compute_dtype(x, centroids)
    x = x.detach().to(dtype)
    c = centroids.detach().to(dtype).clone()
    k = c.shape[0]
    for _ in range(n_iters):
        assign = (x @ c.t()).argmax(dim=1)
        sums = all_reduce_sum(torch.zeros_like(c).index_add_(0, assign, x))
        counts = all_reduce_sum(torch.bincount(assign, minlength=k).to(x.dtype))
        c = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=1), c)
    return c, (x @ c.t()).argmax(dim=1)


def cluster_means(x: Tensor, assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster L2-normalised means of ``x`` over the points of all ranks (DSC Eq. 7's centroids ``e_c``),
    differentiable in ``x``.

    Decision (DDP): the global sum is ``all_reduce(local sum)`` in value, with gradient ``world_size`` times the
    local one. Every rank computes the same global loss from these centroids and DDP *averages* the ranks'
    gradients, so scaling each rank's share by the world size makes the averaged gradient exactly that of the
    global loss (on one process nothing changes).

    Args:
        x: ``[N_local, D]`` embeddings (gradient flows unless detached by the caller).
        assign: ``[N_local]`` cluster index of every point.
        k: number of clusters.

    Returns:
        ``(centroids [k, D], counts [k])`` in :func:`~semssl.losses.compute_dtype` of ``x``: an empty cluster has
        a zero centroid and count 0.
    """
    if x.dim() != 2 or assign.shape != x.shape[:1]:
        raise ValueError(f"cluster_means: x [N, D] and assign [N] expected, got {tuple(x.shape)} and "
                         f"{tuple(assign.shape)}")
    x = at_least_float32(x)
    local = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, assign, x)
    counts = all_reduce_sum(torch.bincount(assign, minlength=k).to(x.dtype))
    total = all_reduce_sum(local.detach()) + world_size() * (local - local.detach())
    return F.normalize(total, dim=1), counts
