"""DSC: the semantic losses by hand, Sinkhorn marginals, k-means on separable points, every strategy training,
and the distributed k-means / Sinkhorn in 2 real gloo processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_testing import spawn

from semssl.bench import MethodStep
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.errors import ConfigError
from semssl.losses.dense_semantic import (
    centroid_info_nce,
    hard_codes,
    neighbor_info_nce,
    neighbor_triplet,
    same_view_neighbors,
    swapped_prediction,
)
from semssl.losses.infonce import info_nce
from semssl.losses.kmeans import cluster_means, kmeans_init, spherical_kmeans
from semssl.losses.sinkhorn import sinkhorn
from semssl.methods import build_method
from semssl.methods.dsc import STRATEGIES
from semssl.schedules import Progress

TINY = ["method.name=dsc", "model.arch=resnet18", "model.width=64", "model.small_input=false", "method.queue_size=16",
        "model.bn_splits=2", "data.batch_size=4", "data.views.0.size=64", "data.views.1.size=64", "optim.warmup=0",
        "method.num_clusters=6", "method.num_prototypes=10", "trainer.max_steps=3"]


# ----------------------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_codes_sum_to_one_per_sample_and_equipartition_the_prototypes() -> None:
    torch.manual_seed(0)
    n, k = 60, 6
    scores = F.normalize(torch.randn(n, 8), dim=1) @ F.normalize(torch.randn(k, 8), dim=1).t()
    codes = sinkhorn(scores, epsilon=0.05, n_iters=3)
    assert codes.shape == (n, k) and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(n))
    converged = sinkhorn(scores, epsilon=0.05, n_iters=300)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), n / k), rtol=1e-3, atol=1e-3)
    # 3 iterations already move the prototype masses most of the way from the raw softmax towards n/k
    raw = torch.softmax(scores / 0.05, dim=1).sum(0)
    # seed 0: 0.25 of the raw softmax's largest deviation
    assert (codes.sum(0) - n / k).abs().max() < 0.5 * (raw - n / k).abs().max()


def test_sinkhorn_by_hand_and_its_stability() -> None:
    # equal scores: the uniform code
    torch.testing.assert_close(sinkhorn(torch.zeros(4, 2), 0.05, 3), torch.full((4, 2), 0.5))
    # one iteration by hand: Q = exp(s/eps)^T, rows to 1/K, columns to 1
    s = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]])
    q = torch.exp(s / 0.5).t()
    q = q / q.sum(1, keepdim=True)
    expected = (q / q.sum(0, keepdim=True)).t()
    torch.testing.assert_close(sinkhorn(s, epsilon=0.5, n_iters=1), expected)
    # no overflow for a tiny epsilon or large scores (the global maximum is subtracted)
    assert torch.isfinite(sinkhorn(torch.randn(10, 4) * 50, epsilon=0.01, n_iters=3)).all()
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(s, 0.05, 0)


# ----------------------------------------------------------------------------------------- k-means
def _separable(n_per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from dsc_ddp_worker import separable

    return separable(n_per, seed)


def test_kmeans_finds_well_separated_clusters() -> None:
    points, labels = _separable()
    init = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.1], [0.0, 1.0, 1.0, 0.1], [1.0, 0.0, 1.0, 0.1]]), dim=1)
    centroids, assign = spherical_kmeans(points, init, n_iters=5)
    # one cluster per group: the assignment is the labels up to a permutation
    pairs = {(int(a), int(b)) for a, b in zip(labels, assign)}
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3
    for c in range(3):
        members = points[assign == assign[labels == c][0]]
        torch.testing.assert_close(centroids[assign[labels == c][0]], F.normalize(members.sum(0), dim=0))
    # the method's first step starts from points of the data, drawn without replacement
    start = kmeans_init(points, 3, generator=torch.Generator().manual_seed(1))
    dist_to_points = torch.cdist(start, points, compute_mode="donot_use_mm_for_euclid_dist")  # exact, not via matmul
    assert start.shape == (3, 4) and dist_to_points.min(1).values.max() < 1e-6
    assert len(set(dist_to_points.argmin(1).tolist())) == 3


def test_kmeans_empty_cluster_keeps_its_centroid_and_cluster_means_by_hand() -> None:
    points = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # the third wins nothing
    centroids, assign = spherical_kmeans(points, init, n_iters=2)
    assert assign.tolist() == [0, 0, 1]
    torch.testing.assert_close(centroids[2], init[2])
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    means, counts = cluster_means(x, torch.tensor([0, 0, 2]), 3)
    torch.testing.assert_close(means, torch.tensor([[0.8, 0.8], [0.0, 0.0], [0.0, 1.0]]) /
                               torch.tensor([[math.hypot(0.8, 0.8)], [1.0], [1.0]]))
    assert counts.tolist() == [2.0, 0.0, 1.0]
    means.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- semantic losses
def test_neighbour_selection_excludes_the_pixel_itself() -> None:
    f = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    idx = same_view_neighbors(f, n=1)
    assert idx[0, :, 0].tolist() == [1, 0, 3, 2]
    two = same_view_neighbors(f, n=2)
    assert all(i not in two[0, i].tolist() for i in range(4))
    with pytest.raises(ValueError, match="n < S"):
        same_view_neighbors(f, n=4)


def test_neighbor_info_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.0, 1.0]])
    nei = torch.tensor([[[1.0, 0.0]]])
    neg = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    t = 0.5
    num = math.exp(0.0) + math.exp(1 / t)
    den = num + math.exp(-1 / t) + math.exp(0.0)
    assert neighbor_info_nce(q, k, nei, neg, t).item() == pytest.approx(-math.log(num / den), rel=1e-6)
    # no neighbours: the plain dense InfoNCE
    torch.manual_seed(0)
    q, k, neg = (F.normalize(torch.randn(5, 3), dim=1) for _ in range(3))
    torch.testing.assert_close(neighbor_info_nce(q, k, torch.zeros(5, 0, 3), neg, 0.2), info_nce(q, k, neg, 0.2)[0])


def test_triplet_sign_as_printed_and_corrected() -> None:
    anchor, pos, nei = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[[0.0, 1.0]]])
    # s(a, pos) = 1, s(a, n) = 0, alpha 0.3
    assert neighbor_triplet(anchor, pos, nei, 0.3, "printed").item() == pytest.approx(1.3)
    assert neighbor_triplet(anchor, pos, nei, 0.3, "corrected").item() == pytest.approx(0.0)
    # printed: minimising it lowers s(anchor, positive) — the gradient pulls the anchor away from the positive
    a = torch.tensor([[0.8, 0.6]], requires_grad=True)
    neighbor_triplet(a, pos, nei, 0.3, "printed").backward()
    assert a.grad[0, 0] > 0  # descent decreases a . pos
    two = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # summed over neighbours: 1.3 + 0.3
    assert neighbor_triplet(anchor, pos, two, 0.3, "printed").item() == pytest.approx(1.6)


def test_centroid_info_nce_by_hand() -> None:
    e_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    e_b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    t = 0.2
    per = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1.0))
    assert centroid_info_nce(e_a, e_b, valid, t).item() == pytest.approx(per, rel=1e-6)
    assert centroid_info_nce(e_a, e_b, torch.tensor([True, False, False]), t).item() == 0.0


def test_swapped_prediction_and_hard_codes_by_hand() -> None:
    s_a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    s_b = torch.tensor([[0.0, 1.0]])
    q_a, q_b = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.5]])
    t = 0.1
    la = -(0.5 * math.log(math.exp(10) / (math.exp(10) + 1)) + 0.5 * math.log(1 / (math.exp(10) + 1)))
    lb = -(0.75 * math.log(1 / (1 + math.exp(10))) + 0.25 * math.log(math.exp(10) / (1 + math.exp(10))))
    assert swapped_prediction(s_a, s_b, q_a, q_b, t).item() == pytest.approx(la + lb, rel=1e-5)
    assert hard_codes(torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.0, 0.0]])).tolist() == [[0, 1, 0], [1, 0, 0]]


# ----------------------------------------------------------------------------------------- the method
def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    return {"views": {"q": x, "k": x.flip(-1) + 0.1 * torch.randn(4, 3, 64, 64, generator=g)}}


@pytest.mark.parametrize("semantic", STRATEGIES)
def test_every_strategy_trains_a_few_steps(semantic: str) -> None:
    cfg = load_config(DEFAULT_RECIPE, [*TINY, f"method.semantic={semantic}", "method.freeze_prototypes_iters=1",
                                       "method.w_ins=0.5", "method.w_pix=1.5", "method.w_sem=2.0"])
    torch.manual_seed(0)
    step = MethodStep(cfg, _batch(), steps_per_epoch=3)
    method = step.method
    protos = method.prototypes.layer.weight.detach().clone() if hasattr(method, "prototypes") else None
    outs = [step.run()]
    if protos is not None:  # frozen in iteration 0: only the normalisation touched them
        torch.testing.assert_close(method.prototypes.layer.weight.detach(), F.normalize(protos, dim=1))
    outs += [step.run() for _ in range(2)]
    for out in outs:
        assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_sem"])
        total = 0.5 * out["loss_ins"] + 1.5 * out["loss_pix"] + 2.0 * out["loss_sem"]  # Eq. 10, each term weighted
        assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    if protos is not None:
        assert not torch.allclose(method.prototypes.layer.weight.detach(), F.normalize(protos, dim=1))
        torch.testing.assert_close(method.prototypes.layer.weight.norm(dim=1), torch.ones(10), atol=0.05, rtol=0)
    if semantic == "kmeans":
        assert bool(method.centroids_ready) and 0 < outs[0]["clusters"] <= 6
        torch.testing.assert_close(method.centroids.norm(dim=1), torch.ones(6))
    method.eval()
    maps = method.cluster_map(_batch()["views"]["q"])
    if semantic in ("kmeans", "prototypes", "ce"):
        assert maps.shape == (4, 2, 2) and maps.max() < (6 if semantic == "kmeans" else 10)
    else:
        assert maps is None


def _sinkhorn_by_hand(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's multiplicative Sinkhorn-Knopp, written out: Q = exp(s / eps)^T [K, N]; per iteration the rows
    (prototypes) to mass 1/K, the columns (samples) to mass 1/N; finally each sample's code sums to 1."""
    q = torch.exp(scores.double() / eps).t()
    q = q / q.sum()
    k, n = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def _info_nce_by_hand(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> torch.Tensor:
    """-mean_i log exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_m exp(q_i.n_m / t))."""
    pos = torch.exp((q * k).sum(1) / t)
    return -torch.log(pos / (pos + torch.exp(q @ negatives.t() / t).sum(1))).mean()


def test_weights_scale_each_term_and_the_prototype_term_by_hand() -> None:
    """Eq. 10 with non-unit weights, L = w_ins L_ins + w_pix L_pix + w_sem L_PM, every term computed here from
    the encoders' outputs: MoCo's InfoNCE against the queue, DenseCL's dense InfoNCE over the argmax
    correspondence of the backbone maps against queue2, and the swapped prediction of Sinkhorn codes over the
    matched pixel pairs with the normalised prototypes."""
    cfg = load_config(DEFAULT_RECIPE, [*TINY, "method.semantic=prototypes", "method.w_ins=0.3", "method.w_pix=0.7",
                                       "method.w_sem=2.0"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    batch = _batch()
    queue, queue2 = method.queue.queue.clone(), method.queue2.queue.clone()
    # at 2x2 cells a random network matches every position with itself; mirroring the key's backbone map (the
    # correspondence's feature space only) makes the matching a permutation, so the pairing is checked too
    plain_keys = method.keys

    def mirrored_keys(x: torch.Tensor) -> dict:
        out = plain_keys(x)
        return {**out, "layer4": out["layer4"].flip(-1)}

    method.keys = mirrored_keys
    torch.manual_seed(4)  # the key shuffle's permutation is the step's first random draw
    out = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=3, total_steps=3))
    torch.manual_seed(4)
    with torch.no_grad():
        q = method.encoder_q(batch["views"]["q"])
        k = method.keys(batch["views"]["k"])
    b = q["layer4"].shape[0]
    fq = F.normalize(q["layer4"].flatten(2).transpose(1, 2), dim=2)  # [B, S, C], row-major positions
    fk = F.normalize(k["layer4"].flatten(2).transpose(1, 2), dim=2)
    match = torch.einsum("bic,bjc->bij", fq, fk).argmax(dim=2)
    assert (match != torch.arange(4)).any()
    k_matched = torch.stack([k["dense"][i, match[i]] for i in range(b)]).reshape(-1, 128)
    q_dense = q["dense"].reshape(-1, 128)
    l_ins = _info_nce_by_hand(q["z"], k["z"], queue, 0.2)
    l_pix = _info_nce_by_hand(q_dense, k_matched, queue2, 0.2)
    protos = F.normalize(method.prototypes.layer.weight.detach(), dim=1)
    s_a, s_b = q_dense @ protos.t(), k_matched @ protos.t()
    codes_a, codes_b = _sinkhorn_by_hand(s_a, 0.05, 3), _sinkhorn_by_hand(s_b, 0.05, 3)
    l_sem = (-(codes_b * F.log_softmax(s_a.double() / 0.1, dim=1)).sum(1).mean()
             - (codes_a * F.log_softmax(s_b.double() / 0.1, dim=1)).sum(1).mean())
    assert float(out["loss_ins"]) == pytest.approx(float(l_ins), rel=1e-5)
    assert float(out["loss_pix"]) == pytest.approx(float(l_pix), rel=1e-5)
    assert float(out["loss_sem"]) == pytest.approx(float(l_sem), rel=1e-4)
    expected = 0.3 * float(l_ins) + 0.7 * float(l_pix) + 2.0 * float(l_sem)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)


def test_kmeans_on_backbone_features_and_warm_start() -> None:
    cfg = load_config(DEFAULT_RECIPE, [*TINY, "method.semantic=kmeans", "method.cluster_on=backbone",
                                       "method.match_on=projection"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    assert "layer4" in method.key_outputs and method.centroids.shape == (6, 512)
    progress = Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=2)
    method.training_step(_batch(), progress)
    first = method.centroids.clone()
    method.training_step(_batch(), progress)  # same batch, warm start: the centroids barely move
    # measured 0.9999998
    assert (method.centroids * first).sum(1).min() > 0.99


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="method.num_clusters"):
        build_method(load_config(DEFAULT_RECIPE, [*TINY, "method.num_clusters=0"]))
    with pytest.raises(ConfigError, match="semantic"):
        load_config(DEFAULT_RECIPE, [*TINY, "method.semantic=kmean"])


# ----------------------------------------------------------------------------------------- 2 processes (gloo)
def test_distributed_kmeans_and_sinkhorn_equal_one_process(tmp_path: Path) -> None:
    """Each rank holds half of fixed data: Sinkhorn codes, k-means centroids/assignments and the centroid loss's
    gradient (averaged over ranks, as DDP does) equal one process on all of it; kmeans_init gives both ranks the
    centroids one process computes from the two halves' draws. The ranks run ``dsc_ddp_worker`` (light imports:
    spawned processes start faster)."""
    from dsc_ddp_worker import WORLD, distributed_rank, distributed_work, separable

    spawn(distributed_rank, str(tmp_path), timeout_s=90, nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = distributed_work(None)
    torch.testing.assert_close(torch.cat([r["codes"] for r in ranks]), single["codes"])
    torch.testing.assert_close(torch.cat([r["assign"] for r in ranks]), single["assign"])
    for r in ranks:
        torch.testing.assert_close(r["centroids"], single["centroids"])
        torch.testing.assert_close(r["counts"], single["counts"])
        torch.testing.assert_close(r["grad"], single["grad"])  # x world size, then averaged: the global gradient
    # kmeans_init: every rank gets the same centroids, the ones one process computes from the two halves: each
    # rank draws ceil(3 / 2) = 2 of its own points (its generator), gathered rank-major, the first 3 kept
    points, _ = separable(n_per=4, seed=1)
    draws = [points[6 * r: 6 * r + 6][torch.randperm(6, generator=torch.Generator().manual_seed(r))[:2]]
             for r in range(WORLD)]
    expected = F.normalize(torch.cat(draws)[:3], dim=1)
    for r in ranks:
        torch.testing.assert_close(r["init"], expected)
