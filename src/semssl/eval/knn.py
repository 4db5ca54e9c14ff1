"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018; DINO ``eval_knn.py``).

Protocol (docs/methods/dino.md §Evaluation; docs/design.md §Evaluation protocols): features are L2-normalised,
similarity is the cosine, each query takes its k most similar memory (training) samples, and every neighbour votes for
its class with weight exp(s / T), T = 0.07. The class scores are the summed votes; top-1 / top-5 accuracies are
reported in percent. DINO's code default is k = 20 (listed first); Wu et al.'s canonical k is 200, so both
are reported by default.

Memory: queries are processed in chunks, so only a ``[chunk_size, N]`` similarity block exists at a time (a
100k x 2048 memory never needs the 100k x 100k matrix). One top-k with the largest k is taken per chunk and
reused for every k (the k nearest are a prefix of the k_max nearest, sorted by similarity).

Distributed use: ``extract_features`` gives every rank the full, identical feature matrices, so this
computation is deterministic and identical on every rank; nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.eval.features import (
    EvalInputError,
    check_features,
    check_labels,
    infer_num_classes,
)

__all__ = ["knn_evaluate", "knn_predict"]


def _check_args(num_classes: int, ks: Sequence[int], temperature: float, chunk_size: int) -> None:
    """Scalar arguments: positive class count, ks, temperature and chunk size."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise EvalInputError(f"num_classes: expected a positive int, got {num_classes!r}")
    if len(ks) == 0:
        raise EvalInputError("ks: expected at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EvalInputError(f"k: expected positive ints, got {k!r}")
    if not temperature > 0:
        raise EvalInputError(f"temperature: expected > 0, got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise EvalInputError(f"chunk_size: expected a positive int, got {chunk_size!r}")


def _compute_dtype(features: Tensor) -> torch.dtype:
    """Decision: similarities in float32 on CPU (half matmuls there are slow and coarse); the input's own
    dtype on accelerators, where float16 memory of a large train set saves space and matmuls are fast."""
    if features.dtype == torch.float64 or features.device.type != "cpu":
        return features.dtype
    return torch.float32


def _chunk_votes(
    memory: Tensor,
    memory_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int,
) -> Iterator[tuple[slice, dict[int, Tensor]]]:
    """Yield, per chunk of queries, (row slice, {k: class scores [m, C] float32}) for every requested k.

    ``memory`` is L2-normalised ``[N, D]``; k is clipped to N. One top-k with the largest k per chunk.
    """
    n_memory = memory.shape[0]
    clipped = {k: min(k, n_memory) for k in ks}
    k_max = max(clipped.values())
    for start in range(0, queries.shape[0], chunk_size):
        rows = slice(start, min(start + chunk_size, queries.shape[0]))
        chunk = F.normalize(queries[rows].to(memory.device, memory.dtype), dim=1)
        sims, nearest = (chunk @ memory.T).topk(k_max, dim=1, largest=True, sorted=True)
        weights = (sims.float() / temperature).exp()
        votes_for = memory_labels[nearest]
        scores = {}
        for k, k_eff in clipped.items():
            class_scores = torch.zeros(chunk.shape[0], num_classes, device=memory.device)
            scores[k] = class_scores.scatter_add_(1, votes_for[:, :k_eff], weights[:, :k_eff])
        yield rows, scores


def _prepare_memory(train_features: Tensor, train_labels: Tensor) -> tuple[Tensor, Tensor]:
    """L2-normalise the memory in the compute dtype; labels as int64 on the memory's device."""
    memory = F.normalize(train_features.to(_compute_dtype(train_features)), dim=1)
    return memory, train_labels.to(memory.device, torch.int64)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> Tensor:
    """Class scores ``[M, C]`` (float32, on the memory's device) of each query: sum of exp(cos/T) over the
    query's k nearest memory samples of that class. k is clipped to the memory size."""
    _check_args(num_classes, [k], temperature, chunk_size)
    check_features(train_features, "train_features")
    check_features(query_features, "query_features")
    check_labels(train_labels, "train_labels", train_features.shape[0], num_classes)
    _check_same_dim(train_features, query_features, "query_features")
    memory, memory_labels = _prepare_memory(train_features, train_labels)
    out = torch.empty(query_features.shape[0], num_classes, device=memory.device)
    for rows, scores in _chunk_votes(memory, memory_labels, query_features, num_classes, [k], temperature,
                                     chunk_size):
        out[rows] = scores[k]
    return out


def _check_same_dim(train_features: Tensor, other: Tensor, name: str) -> None:
    """Query features must have the memory's width."""
    if other.shape[1] != train_features.shape[1]:
        raise EvalInputError(
            f"{name}: feature dimension {other.shape[1]} differs from train_features' {train_features.shape[1]}"
        )


def _hits(scores: Tensor, targets: Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of class scores against targets.

    Top-1 = argmax (first class on ties). Top-5 = target among the min(5, C) highest scores **and** it received
    a vote. Decision: a class with no neighbour is not a prediction; DINO's ``eval_knn.py`` narrows top-5 to
    min(5, k) for the same reason. With fewer than 5 classes top-5 is therefore not trivially 100 %.
    """
    top1 = int((scores.argmax(dim=1) == targets).sum())
    top_values, top_classes = scores.topk(min(5, scores.shape[1]), dim=1)
    in_top = (top_classes == targets[:, None]) & (top_values > 0)
    return top1, int(in_top.any(dim=1).sum())


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> dict[str, float]:
    """kNN accuracy (percent) of the test split against the train split as memory.

    Returns ``knn_top1`` / ``knn_top5`` for ``ks[0]`` and ``k{k}_top1`` / ``k{k}_top5`` for every k (keys
    use the requested k; the k actually used is clipped to the memory size and reported as ``knn_k``).
    The number of classes is max(label) + 1 over both splits.
    """
    ks = list(ks)
    check_features(train_features, "train_features")
    check_features(test_features, "test_features")
    _check_same_dim(train_features, test_features, "test_features")
    num_classes = infer_num_classes(train_labels, test_labels)
    _check_args(num_classes, ks, temperature, chunk_size)
    check_labels(train_labels, "train_labels", train_features.shape[0], num_classes)
    check_labels(test_labels, "test_labels", test_features.shape[0], num_classes)
    memory, memory_labels = _prepare_memory(train_features, train_labels)
    targets = test_labels.to(memory.device, torch.int64)
    hits = {k: [0, 0] for k in ks}
    for rows, scores in _chunk_votes(memory, memory_labels, test_features, num_classes, ks, temperature,
                                     chunk_size):
        for k, class_scores in scores.items():
            top1, top5 = _hits(class_scores, targets[rows])
            hits[k][0] += top1
            hits[k][1] += top5
    return _format(hits, ks, test_features.shape[0], memory.shape[0], temperature)


def _format(hits: dict[int, list[int]], ks: list[int], n_test: int, n_memory: int,
            temperature: float) -> dict[str, float]:
    """Percentages keyed as documented in ``knn_evaluate``."""
    result: dict[str, float] = {}
    for k in ks:
        result[f"k{k}_top1"] = 100.0 * hits[k][0] / n_test
        result[f"k{k}_top5"] = 100.0 * hits[k][1] / n_test
    return {
        "knn_top1": result[f"k{ks[0]}_top1"],
        "knn_top5": result[f"k{ks[0]}_top5"],
        **result,
        "knn_k": min(ks[0], n_memory),
        "knn_temperature": temperature,
    }
