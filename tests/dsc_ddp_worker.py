"""The rank function of test_dsc's 2-process test (torch and the pure losses only, so spawned ranks start fast)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from semssl.distributed import all_reduce_mean
from semssl.losses.kmeans import cluster_means, kmeans_init, spherical_kmeans
from semssl.losses.sinkhorn import sinkhorn

WORLD = 2


def separable(n_per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``3 * n_per`` unit vectors in 3 tight groups around the first three axes of R^4, and their group."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per)
    points = F.normalize(torch.eye(4)[:3][labels] + 0.05 * torch.randn(3 * n_per, 4, generator=g), dim=1)
    return points, labels


def distributed_work(rank: int | None) -> dict[str, torch.Tensor]:
    """Sinkhorn, k-means and centroid gradients on this rank's half of fixed data (all of it when rank is None)."""
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(12, 5, generator=g), dim=1)
    points, _ = separable(n_per=4, seed=1)  # 12 points
    init = F.normalize(torch.randn(3, 4, generator=g), dim=1)
    weight = torch.randn(3, 4, generator=g)
    rows = slice(None) if rank is None else slice(6 * rank, 6 * rank + 6)
    out = {"codes": sinkhorn(scores[rows], 0.05, 3)}
    out["centroids"], out["assign"] = spherical_kmeans(points[rows], init, 3)
    # a centroid loss through a shared "parameter" (DDP averages the ranks' gradients)
    param = torch.nn.Parameter(torch.eye(4))
    means, counts = cluster_means(points[rows] @ param, out["assign"], 3)
    (means * weight).sum().backward()
    out["grad"] = all_reduce_mean(param.grad)
    out["counts"] = counts
    out["init"] = kmeans_init(points[rows], 3, generator=torch.Generator().manual_seed(rank or 0))
    return out


def distributed_rank(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg_init", rank=rank, world_size=WORLD)
    try:
        torch.save(distributed_work(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
