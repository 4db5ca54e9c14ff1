"""DSC's semantic terms ``L_sem`` (DSC paper §3.2, Eqs. 5-9; docs/methods/dsc.md §Semantic losses;
docs/design.md §DSC).

Pure functions on flattened dense embeddings. Layout as in :mod:`semssl.losses.dense`: a batch of dense
embeddings is ``[B, S, D]`` (image-major, positions row-major); the losses below take the ``B*S`` rows
flattened to ``[N, D]``. "s" is the cosine similarity (Eq. 2): inputs are L2-normalised, so it is a dot product.

* :func:`same_view_neighbors` + :func:`neighbor_info_nce` — ``L_nei`` (Eq. 5);
* :func:`neighbor_triplet` — ``L_tri`` (Eq. 6, as printed or with the corrected sign);
* :func:`centroid_info_nce` — ``L_KM`` (Eq. 7) over per-view cluster centroids (:mod:`semssl.losses.kmeans`);
* :func:`swapped_prediction` — ``L_PM`` (Eqs. 8-9) with Sinkhorn codes (:mod:`semssl.losses.sinkhorn`) or
  hard codes (:func:`hard_codes`, the "CE" variant of Table 4).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.losses import at_least_float32, compute_dtype


@torch.no_grad()
def same_view_neighbors(f: Tensor, n: int = 1) -> Tensor:
    """The ``n`` most similar *other* positions of the same image and view (DSC's neighbours ``n_i^j``, Eq. 5;
    N_i = 1 in the paper's ablation).

    Decision (docs/design.md §DSC): the pixel itself is excluded (the paper implies it: a pixel is trivially its
    own nearest neighbour); ranking by cosine of L2-normalised ``f``.

    Args:
        f: ``[B, S, C]`` features of one view used for the ranking (any scale).
        n: neighbours per position (``1 <= n < S``).

    Returns:
        ``[B, S, n]`` long: position indices, most similar first.
    """
    if f.dim() != 3:
        raise ValueError(f"same_view_neighbors: expected [B, S, C], got shape {tuple(f.shape)}")
    s = f.shape[1]
    if not 1 <= n < s:
        raise ValueError(f"same_view_neighbors: need 1 <= n < S = {s} positions, got n = {n}")
    f = F.normalize(at_least_float32(f), dim=2)
    sim = torch.bmm(f, f.transpose(1, 2))
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    return sim.topk(n, dim=2).indices


def neighbor_info_nce(q: Tensor, k_pos: Tensor, neighbors: Tensor, negatives: Tensor,
                      temperature: float = 0.2) -> Tensor:
    """``L_nei`` (DSC Eq. 5): the dense InfoNCE with the neighbours as extra positives::

        L = mean_i -log (exp(s(q_i, k_i)/t) + Nei_i) / (exp(s(q_i, k_i)/t) + Nei_i + sum_- exp(s(q_i, v_-)/t)),
        Nei_i = sum_j exp(s(q_i, n_i^j)/t)

    Args:
        q: ``[N, D]`` L2-normalised query embeddings (gradient flows).
        k_pos: ``[N, D]`` L2-normalised positives (the matched key embeddings; treated as constants).
        neighbors: ``[N, M, D]`` L2-normalised neighbour embeddings (treated as constants; M = 0 gives the
            plain dense InfoNCE).
        negatives: ``[K, D]`` L2-normalised negatives (DenseCL's dense queue).
        temperature: tau_pix (0.2).

    Returns:
        The mean loss (scalar).
    """
    if neighbors.dim() != 3 or neighbors.shape[0] != q.shape[0]:
        raise ValueError(f"neighbor_info_nce: neighbors must be [N, M, D] with N = {q.shape[0]}, got "
                         f"{tuple(neighbors.shape)}")
    dtype = compute_dtype(q, k_pos, neighbors, negatives)
    q, k_pos, neighbors, negatives = (t.to(dtype) for t in (q, k_pos.detach(), neighbors.detach(), negatives.detach()))
    pos = torch.cat([(q * k_pos).sum(dim=1, keepdim=True), torch.einsum("nd,nmd->nm", q, neighbors)],
                    dim=1) / temperature
    neg = q @ negatives.t() / temperature
    return (torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - torch.logsumexp(pos, dim=1)).mean()


def neighbor_triplet(anchor: Tensor, positive: Tensor, neighbors: Tensor, margin: float = 0.3,
                     sign: Literal["printed", "corrected"] = "printed") -> Tensor:
    """``L_tri`` (DSC Eq. 6), summed over the neighbours and averaged over the positions.

    As printed (``sign="printed"``, the default; docs/design.md §DSC — it reproduces Table 4's drop)::

        L = sum_j [ s(v_i^a, v_i^b) - s(v_i^a, n_i^j) + alpha ]_+

    which, with s a similarity, pushes the cross-view positive *below* the neighbour, against the text's stated
    intent (docs/methods/dsc.md §Triplet). ``sign="corrected"`` swaps the two similarities:
    ``[ s(v_i^a, n_i^j) - s(v_i^a, v_i^b) + alpha ]_+``.

    Args:
        anchor: ``[N, D]`` L2-normalised ``v_i^a`` (gradient flows).
        positive: ``[N, D]`` L2-normalised ``v_i^b`` (the matched key embedding; treated as a constant).
        neighbors: ``[N, M, D]`` L2-normalised neighbours ``n_i^j`` (treated as constants).
        margin: alpha (0.3 in the paper).
        sign: ``"printed"`` or ``"corrected"``.

    Returns:
        The loss (scalar).
    """
    if sign not in ("printed", "corrected"):
        raise ValueError(f"neighbor_triplet: sign must be 'printed' or 'corrected', got {sign!r}")
    dtype = compute_dtype(anchor, positive, neighbors)
    anchor, positive, neighbors = anchor.to(dtype), positive.detach().to(dtype), neighbors.detach().to(dtype)
    s_pos = (anchor * positive).sum(dim=1, keepdim=True)  # [N, 1]
    s_nei = torch.einsum("nd,nmd->nm", anchor, neighbors)  # [N, M]
    gap = s_pos - s_nei if sign == "printed" else s_nei - s_pos
    return F.relu(gap + margin).sum(dim=1).mean()


def centroid_info_nce(e_a: Tensor, e_b: Tensor, valid: Tensor, temperature: float = 0.2) -> Tensor:
    """``L_KM`` (DSC Eq. 7): InfoNCE between the two views' centroids of the same clusters::

        L = mean_{c valid} -log exp(s(e_c^a, e_c^b)/t) / sum_{c' valid} exp(s(e_c^a, e_{c'}^b)/t)

    A cluster is *valid* when it has members in both views. Decision: the negatives of ``e_c^a`` are the other
    valid clusters' centroids of the other view (the paper's ``e_-`` is not specified further).

    Args:
        e_a: ``[K, D]`` L2-normalised centroids of view a (gradient flows).
        e_b: ``[K, D]`` L2-normalised centroids of view b (treated as constants: the key view).
        valid: ``[K]`` bool, clusters present in both views.
        temperature: tau_KM (0.2).

    Returns:
        The mean loss; 0 (with a graph) when fewer than two clusters are valid — nothing to contrast.
    """
    if e_a.shape != e_b.shape or valid.shape != e_a.shape[:1]:
        raise ValueError(f"centroid_info_nce: e_a, e_b [K, D] and valid [K] expected, got {tuple(e_a.shape)}, "
                         f"{tuple(e_b.shape)}, {tuple(valid.shape)}")
    dtype = compute_dtype(e_a, e_b)
    a, b = e_a[valid].to(dtype), e_b[valid].detach().to(dtype)
    if a.shape[0] < 2:
        return e_a.to(dtype).sum() * 0.0
    logits = a @ b.t() / temperature
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


@torch.no_grad()
def hard_codes(scores: Tensor) -> Tensor:
    """One-hot code of the highest-scoring prototype, ``[N, K]`` in :func:`~semssl.losses.compute_dtype` of
    ``scores`` (the "CE" variant's target)."""
    return F.one_hot(scores.argmax(dim=1), scores.shape[1]).to(compute_dtype(scores))


def swapped_prediction(scores_a: Tensor, scores_b: Tensor, codes_a: Tensor, codes_b: Tensor,
                       temperature: float = 0.1) -> Tensor:
    """``L_PM`` (DSC Eqs. 8-9): each view predicts the other view's code from its prototype scores::

        L = l(v^a, q^b) + l(v^b, q^a),   l(v, q) = -mean_i sum_k q_ik log softmax(v_i.c / t)_k

    Eq. 9 is printed without the minus sign and without a temperature; the cross-entropy and SwAV's tau 0.1
    are used (docs/methods/dsc.md §Prototypes). Eq. 8 is a sum of the two directions (SwAV averages them: a
    factor 2, which the weight ``w_sem`` absorbs).

    Args:
        scores_a, scores_b: ``[N, K]`` cosines of the two views' embeddings of matched pixel pairs with the
            prototypes (gradient flows).
        codes_a, codes_b: ``[N, K]`` their codes (Sinkhorn or :func:`hard_codes`; constants).
        temperature: tau (0.1).

    Returns:
        The loss (scalar).
    """
    if not scores_a.shape == scores_b.shape == codes_a.shape == codes_b.shape:
        raise ValueError("swapped_prediction: scores and codes must all be [N, K]")
    dtype = compute_dtype(scores_a, scores_b, codes_a, codes_b)
    scores_a, scores_b = scores_a.to(dtype), scores_b.to(dtype)
    codes_a, codes_b = codes_a.detach().to(dtype), codes_b.detach().to(dtype)
    ce_a = -(codes_b * F.log_softmax(scores_a / temperature, dim=1)).sum(dim=1).mean()
    ce_b = -(codes_a * F.log_softmax(scores_b / temperature, dim=1)).sum(dim=1).mean()
    return ce_a + ce_b
