"""Weighted kNN (semssl.eval.knn): hand-computed votes, chunking, clipping, top-5, errors, 2-process gather."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from semssl.eval.features import EvalInputError, extract_features
from semssl.eval.knn import knn_evaluate, knn_predict

T = 0.07


def _unit(cos: float, sign: float = 1.0, scale: float = 1.0) -> list[float]:
    """A 2-D point whose cosine with (1, 0) is ``cos`` (length ``scale``)."""
    return [scale * cos, sign * scale * math.sqrt(1.0 - cos * cos)]


@pytest.fixture()
def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """5 memory points, 2 classes: class 0 at cosines 1.0 and 0.9 with (1, 0); class 1 three times at 0.8.

    Lengths differ on purpose: only the direction may matter (features are L2-normalised).
    """
    memory = torch.tensor(
        [_unit(1.0, scale=2.0), _unit(0.9, scale=0.5), _unit(0.8), _unit(0.8, sign=-1.0), _unit(0.8, scale=3.0)]
    )
    labels = torch.tensor([0, 0, 1, 1, 1])
    return memory, labels


def test_hand_case_weighted_vote_beats_majority(hand_case):
    memory, labels = hand_case
    query = torch.tensor([[5.0, 0.0]])
    scores = knn_predict(memory, labels, query, num_classes=2, k=5, temperature=T)
    expected = [math.exp(1.0 / T) + math.exp(0.9 / T), 3 * math.exp(0.8 / T)]
    assert scores.shape == (1, 2)
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-4)
    # majority vote (3 of 5 neighbours) says class 1, the exp(s/T)-weighted vote says class 0
    assert int(scores.argmax()) == 0
    assert torch.bincount(labels).argmax() == 1


def test_hand_case_k3_and_second_query(hand_case):
    memory, labels = hand_case
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_predict(memory, labels, queries, num_classes=2, k=3, temperature=T)
    # query 1: nearest three are cos 1.0, 0.9 (class 0) and one of the 0.8 (class 1)
    assert scores[0].tolist() == pytest.approx([math.exp(1 / T) + math.exp(0.9 / T), math.exp(0.8 / T)], rel=1e-4)
    # query 2 = (0, 1): cosines 0, sin(acos .9) = .436, .6, -.6, .6 -> top 3 = .6 (c1), .6 (c1), .436 (c0)
    s09 = math.sqrt(1 - 0.81)
    assert scores[1].tolist() == pytest.approx([math.exp(s09 / T), 2 * math.exp(0.6 / T)], rel=1e-4)
    result = knn_evaluate(memory, labels, queries, torch.tensor([0, 0]), ks=(3,), temperature=T)
    assert result["knn_top1"] == pytest.approx(50.0)
    assert result["k3_top1"] == result["knn_top1"]
    assert result["knn_k"] == 3


def _reference_scores(train, train_labels, query, num_classes, k, temperature):
    """Independent brute force: full similarity matrix, Python loop over neighbours."""
    sims = torch.nn.functional.normalize(query.double(), dim=1) @ torch.nn.functional.normalize(
        train.double(), dim=1
    ).T
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    k = min(k, train.shape[0])
    for row in range(query.shape[0]):
        order = torch.argsort(sims[row], descending=True)[:k]
        for j in order.tolist():
            out[row, train_labels[j]] += math.exp(sims[row, j] / temperature)
    return out


def _random_split(seed: int, n_train=120, n_test=37, dim=16, num_classes=6, spread=1.0):
    """Gaussian classes around random centres; ``spread`` = 0 makes the labels independent of the features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * spread
    y_train = torch.randint(0, num_classes, (n_train,), generator=g)
    y_test = torch.randint(0, num_classes, (n_test,), generator=g)
    x_train = centres[y_train] + torch.randn(n_train, dim, generator=g)
    x_test = centres[y_test] + torch.randn(n_test, dim, generator=g)
    return x_train, y_train, x_test, y_test


def test_matches_brute_force_for_several_k():
    x_train, y_train, x_test, y_test = _random_split(0)
    for k in (1, 7, 20):
        ours = knn_predict(x_train, y_train, x_test, num_classes=6, k=k, chunk_size=5)
        ref = _reference_scores(x_train, y_train, x_test, 6, k, T)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=0.0)
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=(7, 1, 20), chunk_size=5)
    for k in (1, 7, 20):
        ref = _reference_scores(x_train, y_train, x_test, 6, k, T)
        expected_top1 = 100.0 * float((ref.argmax(1) == y_test).double().mean())
        assert result[f"k{k}_top1"] == pytest.approx(expected_top1)
    assert result["knn_top1"] == result["k7_top1"]
    assert 0.0 < result["knn_top1"] <= result["knn_top5"] <= 100.0


def test_chunked_equals_unchunked():
    x_train, y_train, x_test, y_test = _random_split(1)
    full = knn_predict(x_train, y_train, x_test, num_classes=6, k=10, chunk_size=10_000)
    for chunk in (1, 4, 36):
        chunked = knn_predict(x_train, y_train, x_test, num_classes=6, k=10, chunk_size=chunk)
        torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0.0)
    ev_full = knn_evaluate(x_train, y_train, x_test, y_test, chunk_size=10_000)
    assert knn_evaluate(x_train, y_train, x_test, y_test, chunk_size=3) == ev_full


def test_k_larger_than_memory_is_clipped(hand_case):
    memory, labels = hand_case
    query = torch.tensor([[1.0, 0.2], [0.1, 1.0]])
    torch.testing.assert_close(
        knn_predict(memory, labels, query, num_classes=2, k=500), knn_predict(memory, labels, query, 2, k=5)
    )
    result = knn_evaluate(memory, labels, query, torch.tensor([0, 1]), ks=(20, 200))
    assert result["knn_k"] == 5
    assert result["k20_top1"] == result["k200_top1"] == result["knn_top1"]


def test_top5_with_fewer_than_five_classes():
    x_train, y_train, x_test, y_test = _random_split(2, num_classes=3, spread=0.0)
    # every class gets a vote with k = all memory: top-5 over 3 classes is then 100 %
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=(120,))
    assert result["knn_top5"] == 100.0
    assert result["knn_top1"] < 100.0
    # with k = 1 only one class is voted for: a class without a vote is not a top-5 prediction
    result = knn_evaluate(x_train, y_train, x_test, y_test, ks=(1,))
    assert result["knn_top5"] == result["knn_top1"] < 100.0


def test_float16_features_match_float32():
    x_train, y_train, x_test, y_test = _random_split(3)
    half = knn_predict(x_train.half(), y_train, x_test.half(), num_classes=6, k=10)
    full = knn_predict(x_train, y_train, x_test, num_classes=6, k=10)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.0)
    assert torch.equal(half.argmax(1), full.argmax(1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"train_labels": torch.tensor([0, 1, 1])}, "train_labels"),
        ({"train_labels": torch.tensor([0, 1, 2, 1, 0])}, "train_labels"),
        ({"train_labels": torch.tensor([0.0, 1, 1, 1, 0])}, "train_labels"),
        ({"train_features": torch.zeros(0, 2), "train_labels": torch.zeros(0, dtype=torch.long)}, "train_features"),
        ({"train_features": torch.tensor([[1.0, 0.0]] * 4 + [[float("nan"), 0.0]])}, "train_features"),
        ({"query_features": torch.ones(2, 3)}, "query_features"),
        ({"query_features": torch.ones(2)}, "query_features"),
        ({"k": 0}, "k"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_predict_errors_name_the_argument(hand_case, kwargs, name):
    memory, labels = hand_case
    args = {"train_features": memory, "train_labels": labels, "query_features": torch.ones(2, 2), "num_classes": 2}
    args.update(kwargs)
    with pytest.raises(EvalInputError, match=name) as info:
        knn_predict(**args)
    assert isinstance(info.value, ValueError)


def test_evaluate_errors_name_the_argument(hand_case):
    memory, labels = hand_case
    with pytest.raises(ValueError, match="test_labels"):
        knn_evaluate(memory, labels, torch.ones(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="test_labels"):
        knn_evaluate(memory, labels, torch.ones(2, 2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="test_features"):
        knn_evaluate(memory, labels, torch.ones(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ks"):
        knn_evaluate(memory, labels, torch.ones(2, 2), torch.tensor([0, 1]), ks=())


# ------------------------------------------------------------------------ distributed: 2 real gloo processes
class _Items(Dataset):
    """7 samples (odd, so a 2-rank DistributedSampler pads one duplicate); label = index % 3."""

    def __init__(self, with_index: bool) -> None:
        self.images = torch.arange(7 * 3 * 4 * 4, dtype=torch.float32).reshape(7, 3, 4, 4).sin()
        self.with_index = with_index

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "label": i % 3}
        if self.with_index:
            item["index"] = i
        return item


def _encoder(images: torch.Tensor) -> torch.Tensor:
    """A fixed feature map [B, 3, 4, 4] -> [B, 6]."""
    return torch.cat([images.mean(dim=(2, 3)), images.amax(dim=(2, 3))], dim=1)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {}
        for with_index in (True, False):
            data = _Items(with_index)
            sampler = DistributedSampler(data, shuffle=True, seed=3)
            loader = DataLoader(data, batch_size=2, sampler=sampler)
            features, labels = extract_features(_encoder, loader)
            results[with_index] = (features, labels)
        knn = knn_evaluate(results[True][0], results[True][1], results[True][0], results[True][1], ks=(1, 3))
        torch.save({"results": results, "knn": knn}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_extraction_and_knn_are_identical_on_every_rank(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = _encoder(_Items(True).images)
    outputs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for out in outputs:
        for features, labels in out["results"].values():
            assert features.shape == (7, 6)  # the sampler's padding duplicate is dropped
            torch.testing.assert_close(features, expected)
            assert labels.tolist() == [i % 3 for i in range(7)]
    assert outputs[0]["knn"] == outputs[1]["knn"]
    assert outputs[0]["knn"]["k1_top1"] == 100.0  # each query finds itself
