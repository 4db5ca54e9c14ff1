"""The losses' dtype policy (semssl.losses): every loss and search computes in ``promote_types(input dtype,
float32)`` — float64 for float64 inputs, float32 (never below) for bfloat16 ones — and the DINO and SoCo losses
equal float64 references written out from their formulas to 1e-12."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import semssl.losses
from semssl.losses import at_least_float32, compute_dtype
from semssl.losses.byol import byol_loss
from semssl.losses.dense import dense_correspondence, dense_info_nce
from semssl.losses.dense_semantic import (
    centroid_info_nce,
    hard_codes,
    neighbor_info_nce,
    neighbor_triplet,
    same_view_neighbors,
    swapped_prediction,
)
from semssl.losses.dino import Center, DINOLoss, dino_cross_entropy, dino_loss, entropy, teacher_targets
from semssl.losses.infonce import MemoryQueue, info_nce
from semssl.losses.kmeans import cluster_means, kmeans_init, spherical_kmeans
from semssl.losses.region import region_correspondence, region_nce, roi_features, soco_loss
from semssl.losses.scfs import feature_search, scfs_stage_loss, search_attention
from semssl.losses.sinkhorn import sinkhorn
from semssl.losses.triplet import fg_bg_triplet

TIGHT = {"atol": 1e-12, "rtol": 1e-12}


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _unit(g: torch.Generator, *shape: int) -> Tensor:
    return F.normalize(_randn(g, *shape), dim=-1)


def _probs(g: torch.Generator, *shape: int) -> Tensor:
    return torch.softmax(_randn(g, *shape), dim=-1)


# Regions: 2 rows, 3 slots per view; row 0 matches (0, 0), (1, 2) and a padding duplicate (2, 2) — id 5 twice —,
# row 1 one pair (2, 1) (slot 0 of view a invalid, id -1 never matches). A float32 mask, as region_correspondence
# returns it: the losses cast it to their compute dtype.
IDS_A, VALID_A = torch.tensor([[1, 5, 5], [4, -1, 9]]), torch.tensor([[True, True, True], [False, True, True]])
IDS_B, VALID_B = torch.tensor([[1, 7, 5], [4, 9, 8]]), torch.tensor([[True, True, True], [True, True, True]])
CORR = region_correspondence(IDS_A, VALID_A, IDS_B, VALID_B)
VALID5 = torch.tensor([True, True, False, True, True])
ASSIGN12 = torch.arange(12) % 3


def _dino_module(student: Tensor, teacher: Tensor, center: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DINOLoss as a run holds it: a float64 module in a float64 run (converted with the model), a float32 one under
    mixed precision; the center buffer is an output too."""
    module = DINOLoss(center.shape[1], student_temp=0.1).to(compute_dtype(center))
    module.center.center.copy_(center)
    loss, targets = module(student, teacher, 0.04)
    return loss, targets, module.center.center


# name -> (float64 inputs from a generator, the function of them); non-tensor arguments are bound in the function
CASES: dict[str, tuple[Callable[[torch.Generator], tuple[Tensor, ...]], Callable[..., Any]]] = {
    "byol.byol_loss": (lambda g: (_randn(g, 4, 6), _randn(g, 4, 6)), byol_loss),
    "infonce.info_nce": (lambda g: (_unit(g, 4, 6), _unit(g, 4, 6), _unit(g, 10, 6)), info_nce),
    "dense.dense_info_nce": (lambda g: (_unit(g, 2, 3, 6), _unit(g, 2, 3, 6), _unit(g, 10, 6)), dense_info_nce),
    "dense_semantic.neighbor_info_nce": (lambda g: (_unit(g, 4, 6), _unit(g, 4, 6), _unit(g, 4, 2, 6),
                                                    _unit(g, 10, 6)), neighbor_info_nce),
    "dense_semantic.neighbor_triplet": (lambda g: (_unit(g, 4, 6), _unit(g, 4, 6), _unit(g, 4, 2, 6)),
                                        neighbor_triplet),
    "dense_semantic.centroid_info_nce": (lambda g: (_unit(g, 5, 6), _unit(g, 5, 6)),
                                         lambda a, b: centroid_info_nce(a, b, VALID5)),
    "dense_semantic.hard_codes": (lambda g: (_randn(g, 4, 5),), hard_codes),
    "dense_semantic.swapped_prediction": (lambda g: (_randn(g, 4, 5), _randn(g, 4, 5), _probs(g, 4, 5),
                                                     _probs(g, 4, 5)), swapped_prediction),
    "dino.teacher_targets": (lambda g: (_randn(g, 2, 3, 7), _randn(g, 1, 7)),
                             lambda t, c: teacher_targets(t, c, 0.04)),
    "dino.dino_cross_entropy": (lambda g: (_randn(g, 4, 3, 7), _probs(g, 2, 3, 7)),
                                lambda s, t: dino_cross_entropy(s, t, 0.1)),
    "dino.dino_loss": (lambda g: (_randn(g, 4, 3, 7), _randn(g, 2, 3, 7), _randn(g, 1, 7)),
                       lambda s, t, c: dino_loss(s, t, c, 0.1, 0.04)),
    "dino.entropy": (lambda g: (_probs(g, 3, 7),), entropy),
    "dino.DINOLoss": (lambda g: (_randn(g, 4, 3, 7), _randn(g, 2, 3, 7), _randn(g, 1, 7)), _dino_module),
    "kmeans.kmeans_init": (lambda g: (_unit(g, 12, 4),),
                           lambda x: kmeans_init(x, 3, generator=torch.Generator().manual_seed(0))),
    "kmeans.spherical_kmeans": (lambda g: (_unit(g, 12, 4), _unit(g, 3, 4)), spherical_kmeans),
    "kmeans.cluster_means": (lambda g: (_unit(g, 12, 4),), lambda x: cluster_means(x, ASSIGN12, 3)),
    "sinkhorn.sinkhorn": (lambda g: (_randn(g, 6, 4).tanh(),), sinkhorn),
    "triplet.fg_bg_triplet": (lambda g: tuple(_randn(g, 4, 6) for _ in range(4)), fg_bg_triplet),
    "region.soco_loss": (lambda g: (_randn(g, 2, 3, 6), _randn(g, 2, 3, 6)), lambda p, z: soco_loss(p, z, CORR)),
    "region.region_nce": (lambda g: (_randn(g, 2, 3, 6), _randn(g, 2, 3, 6), _unit(g, 10, 6)),
                          lambda q, k, n: region_nce(q, k, CORR, n)),
    "scfs.search_attention": (lambda g: (_randn(g, 4, 5), _randn(g, 2, 5, 3, 3)), search_attention),
    "scfs.feature_search": (lambda g: (_randn(g, 4, 5), _randn(g, 2, 5, 3, 3)), feature_search),
    "scfs.scfs_stage_loss": (lambda g: (_randn(g, 2, 3, 7), _randn(g, 2, 3, 7), _randn(g, 1, 7), _randn(g, 4, 3, 7),
                                        _randn(g, 1, 4, 3, 7)),
                             lambda sg, tg, c, sl, st: scfs_stage_loss(sg, tg, c, sl, st, 0.1, 0.04)),
}

# public names of semssl.losses' modules that are not losses on floating data, and where they are checked instead
NOT_CASES = {
    "dense.flatten_map": "a reshape",
    "dense.gather_positions": "an indexing",
    "dense.dense_correspondence": "a search returning indices: test_searches_rank_in_float64",
    "dense_semantic.same_view_neighbors": "a search returning indices: test_searches_rank_in_float64",
    "region.region_correspondence": "a float32 mask that the losses cast (the region cases)",
    "region.roi_features": "follows the model's dtype: test_roi_features_follow_a_float64_model",
    "infonce.MemoryQueue": "a buffer in the module's dtype: test_a_float64_queue_and_a_float32_one",
    "dino.Center": "a buffer in the module's dtype: test_dino_loss_and_center_match_a_float64_reference",
    "triplet.TripletTerms": "fg_bg_triplet's result type",
}
DISCRETE = {"dense_semantic.hard_codes"}  # one-hot outputs: exact in any dtype
KEEPS_VALUE_DTYPE = {"scfs.feature_search"}  # float32 attention x the value map, returned in the map's dtype


def _floats(out: Any) -> list[Tensor]:
    """The floating tensors of a result (tensor, tuple, NamedTuple or dict, nested)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    return [t for o in (out.values() if isinstance(out, dict) else out) for t in _floats(o)]


def _run(name: str, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """The case's floating outputs on its inputs cast to ``dtype``, and on those same values in float32."""
    make, fn = CASES[name]
    args = [a.to(dtype) for a in make(torch.Generator().manual_seed(0))]
    return _floats(fn(*args)), _floats(fn(*[a.float() for a in args]))


def test_every_loss_of_the_package_is_a_case_or_named_with_its_check() -> None:
    found = set()
    for info in pkgutil.iter_modules(semssl.losses.__path__):
        module = importlib.import_module(f"semssl.losses.{info.name}")
        found |= {f"{info.name}.{name}" for name, obj in vars(module).items()
                  if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                  and obj.__module__ == module.__name__}
    assert not set(CASES) & set(NOT_CASES)
    assert found == set(CASES) | set(NOT_CASES), (sorted(found - set(CASES) - set(NOT_CASES)),
                                                  sorted(set(CASES) | set(NOT_CASES) - found))


def test_compute_dtype_promotes_with_float32() -> None:
    assert compute_dtype() == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float64)) == torch.float64
    x = torch.zeros(2)
    assert at_least_float32(x) is x
    assert at_least_float32(x, torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    h = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    at_least_float32(h).sum().backward()  # the cast passes gradients back in the input's dtype
    assert h.grad is not None and h.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_inputs_give_float64_results(name: str) -> None:
    outs, _ = _run(name, torch.float64)
    assert outs and all(t.dtype == torch.float64 for t in outs), [t.dtype for t in outs]
    if name not in DISCRETE:  # computed in float64, not in float32 and cast back: more digits than float32 holds
        assert any((t != t.float().double()).any() for t in outs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_inputs_are_computed_in_float32(name: str) -> None:
    outs, as_float32 = _run(name, torch.bfloat16)
    expected = torch.bfloat16 if name in KEEPS_VALUE_DTYPE else torch.float32
    assert all(t.dtype == expected for t in outs), [t.dtype for t in outs]
    # never below float32: the same result as on the bfloat16 values given in float32 (up to the final rounding of
    # a result kept in the value map's bfloat16)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if name in KEEPS_VALUE_DTYPE else {"atol": 0, "rtol": 0}
    for got, ref in zip(outs, as_float32, strict=True):
        torch.testing.assert_close(got, ref.to(expected), **tolerance)


def test_searches_rank_in_float64() -> None:
    """Two keys whose cosines with the query differ by 1e-11 (equal once rounded to float32): in float64 the
    closer one (index 1) wins; a float32 search would tie and pick index 0."""
    near = torch.tensor([[1.0, 0.0], [1.0, 1e-5], [1.0, 0.9e-5]], dtype=torch.float64)
    assert dense_correspondence(near[None, :1], near[None, 1:]).tolist() == [[1]]
    assert F.normalize(near[1:].float(), dim=1).matmul(near[0].float()).unique().numel() == 1  # a float32 tie
    assert same_view_neighbors(near[None], n=1)[0, 0].tolist() == [2]


def test_roi_features_follow_a_float64_model() -> None:
    g = torch.Generator().manual_seed(0)
    fmap = _randn(g, 2, 4, 8, 8)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [8.0, 16.0, 40.0, 56.0]]] * 2)
    valid = torch.tensor([[True, True], [True, False]])
    feats = roi_features(fmap, boxes, valid, nn.Conv2d(4, 6, 1).double(), out=4, spatial_scale=1 / 8)
    assert feats.dtype == torch.float64 and (feats[1, 1] == 0).all()


def test_a_float64_queue_and_a_float32_one() -> None:
    g = torch.Generator().manual_seed(0)
    queue = MemoryQueue(8, 4).double()
    keys = _unit(g, 3, 4)
    queue.enqueue(keys)
    assert queue.queue.dtype == torch.float64 and torch.equal(queue.queue[:3], keys)
    q = _unit(g, 3, 4)
    loss, logits = info_nce(q, keys, queue.queue)
    assert loss.dtype == logits.dtype == torch.float64
    # a float32 queue beside float64 embeddings: computed in float64, not a dtype mismatch
    loss32, _ = info_nce(q, keys, MemoryQueue(8, 4).queue)
    assert loss32.dtype == torch.float64


# ------------------------------------------------------------------------------------------- float64 references
def _softmax(x: Tensor) -> Tensor:
    e = (x - x.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _log_softmax(x: Tensor) -> Tensor:
    shifted = x - x.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _dino_reference(student: Tensor, teacher: Tensor, center: Tensor, tau_s: float, tau_t: float) -> Tensor:
    """DINO (docs/methods/dino.md §Loss): targets ``softmax((h_t - c) / tau_t)`` per teacher crop i, CE against
    ``log_softmax(h_s / tau_s)`` of every other student crop v != i, batch-mean, then the mean over the pairs."""
    log_q = [_log_softmax(student[v] / tau_s) for v in range(student.shape[0])]
    pairs = []
    for i in range(teacher.shape[0]):
        p = _softmax((teacher[i] - center) / tau_t)
        for v in range(student.shape[0]):
            if v != i:
                ce = [-sum(p[b, j] * log_q[v][b, j] for j in range(p.shape[1])) for b in range(p.shape[0])]
                pairs.append(sum(ce) / len(ce))
    assert len(pairs) == teacher.shape[0] * student.shape[0] - teacher.shape[0]
    return sum(pairs) / len(pairs)


def test_dino_loss_and_center_match_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    n_global, n_crops, b, k, tau_s, tau_t = 2, 5, 3, 7, 0.1, 0.04
    student, teacher = 3 * _randn(g, n_crops, b, k), 3 * _randn(g, n_global, b, k)
    center = 0.5 * _randn(g, 1, k)
    expected = _dino_reference(student, teacher, center, tau_s, tau_t)
    got = dino_loss(student, teacher, center, tau_s, tau_t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, **TIGHT)
    # the float32 computation of the same values is off by far more than 1e-12: the policy is what passes
    in_float32 = dino_loss(student.float(), teacher.float(), center.float(), tau_s, tau_t)
    assert abs(float(in_float32) - float(expected)) > 1e-9
    # the module in a float64 run (converted with the model): the same loss, then the EMA of the teacher rows
    module = DINOLoss(k, student_temp=tau_s, center_momentum=0.9).double()
    module.center.center.copy_(center)
    loss, targets = module(student, teacher, tau_t)
    torch.testing.assert_close(loss, expected, **TIGHT)
    torch.testing.assert_close(targets[1], _softmax((teacher[1] - center) / tau_t), **TIGHT)
    rows = teacher.reshape(-1, k)
    ema = 0.9 * center + 0.1 * sum(rows[r] for r in range(rows.shape[0])) / rows.shape[0]
    assert module.center.center.dtype == torch.float64
    torch.testing.assert_close(module.center.center, ema, **TIGHT)
    alone = Center(k, momentum=0.9).double()
    alone.update(rows)
    torch.testing.assert_close(alone.center, 0.1 * rows.mean(0, keepdim=True), **TIGHT)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt())


def test_soco_loss_matches_a_float64_reference() -> None:
    """SoCo's region loss (docs/methods/soco.md §Loss): per row the matched pairs' ``2 - 2 cos(p^_i, z^_j)``
    weighted by C and divided by ``sum C + 1e-6``, averaged over the rows; the code's value drops BYOL's constant
    2 (``-2 cos`` per pair), so the reference subtracts it with the same weights."""
    g = torch.Generator().manual_seed(2)
    p, z = _randn(g, 2, 3, 6), _randn(g, 2, 3, 6)
    corr = CORR.double()
    assert corr.sum(dim=(1, 2)).tolist() == [3.0, 1.0]  # a duplicate pair counts twice
    rows, constants = [], []
    for n in range(p.shape[0]):
        weights = [(i, j, float(corr[n, i, j])) for i in range(3) for j in range(3) if corr[n, i, j]]
        denominator = sum(w for _, _, w in weights) + 1e-6
        rows.append(sum(w * (2 - 2 * _cos(p[n, i], z[n, j])) for i, j, w in weights) / denominator)
        constants.append(sum(2 * w for _, _, w in weights) / denominator)
    expected = sum(rows) / len(rows) - sum(constants) / len(constants)
    for mask in (CORR, corr):  # the float32 mask of region_correspondence, or one in float64
        got = soco_loss(p, z, mask)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, **TIGHT)
