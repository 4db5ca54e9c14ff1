"""DenseCL's dense correspondence and dense InfoNCE (docs/methods/densecl.md §Correspondence, §Loss; DSC paper
Eqs. 3-4).

Layout: a dense embedding of a batch is ``[B, S, D]`` — image-major, then the ``S = h*w`` positions of the
map in row-major order (position ``y*w + x``), then the channels; :func:`flatten_map` turns a ``[B, C, h, w]``
stage or projection map into it. Query and key maps may have different sizes (``S_q``, ``S_k``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.losses import compute_dtype
from semssl.losses.infonce import info_nce


def flatten_map(fmap: Tensor) -> Tensor:
    """``[B, C, h, w]`` map -> ``[B, h*w, C]`` (positions row-major: index ``y*w + x``)."""
    if fmap.dim() != 4:
        raise ValueError(f"flatten_map: expected a [B, C, h, w] map, got shape {tuple(fmap.shape)}")
    return fmap.flatten(2).transpose(1, 2)


@torch.no_grad()
def dense_correspondence(f_q: Tensor, f_k: Tensor) -> Tensor:
    """For every query position, the key position of the same image with the highest cosine similarity
    (DenseCL; DSC Eq. 4 ``c_i = argmax_j s(v_i^a, v_j^b)``).

    DenseCL computes it on the L2-normalised *backbone* features (C5, not the projections) of the two views;
    the caller chooses the space (DSC ``match_on``).

    Args:
        f_q: ``[B, S_q, C]`` features of the query view (any scale: they are L2-normalised here).
        f_k: ``[B, S_k, C]`` features of the key view, same images in the same order.

    Returns:
        ``[B, S_q]`` long: index into the key positions (ties: the lowest index, as ``argmax``).
    """
    if f_q.dim() != 3 or f_k.dim() != 3 or f_q.shape[0] != f_k.shape[0] or f_q.shape[2] != f_k.shape[2]:
        raise ValueError(f"dense_correspondence: expected [B, S_q, C] and [B, S_k, C], got {tuple(f_q.shape)} and "
                         f"{tuple(f_k.shape)}")
    dtype = compute_dtype(f_q, f_k)  # the cosines in float64 for float64 features (float32 at least)
    sim = torch.bmm(F.normalize(f_q.to(dtype), dim=2), F.normalize(f_k.to(dtype), dim=2).transpose(1, 2))
    return sim.argmax(dim=2)


def gather_positions(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, i]]``: ``x`` ``[B, S, D]``, ``idx`` ``[B, S']`` (or ``[B, S', n]``) -> ``[B, S', D]``
    (or ``[B, S', n, D]``)."""
    b = torch.arange(x.shape[0], device=x.device).view(-1, *([1] * (idx.dim() - 1)))
    return x[b, idx]


def dense_info_nce(q_dense: Tensor, k_dense_matched: Tensor, queue2: Tensor,
                   temperature: float = 0.2) -> tuple[Tensor, Tensor]:
    """DenseCL's dense loss (DSC Eq. 3 ``L_pix``): every query position against its matched key position, with
    the dense queue (one L2-normalised pooled dense embedding per past key image) as negatives::

        L = mean_{b, i}  -log  exp(q_b(i).k_b(c_i)/t) / (exp(q_b(i).k_b(c_i)/t) + sum_n exp(q_b(i).queue2_n/t))

    Args:
        q_dense: ``[B, S, D]`` L2-normalised dense embeddings of the query view (gradient flows).
        k_dense_matched: ``[B, S, D]`` L2-normalised key embeddings at the matched positions
            (:func:`gather_positions` of the key map by :func:`dense_correspondence`); treated as constants.
        queue2: ``[K, D]`` L2-normalised negatives.
        temperature: tau (0.2 in DenseCL and DSC).

    Returns:
        The loss averaged over all ``B*S`` positions and the logits ``[B*S, 1 + K]`` (positive in column 0).
    """
    if q_dense.shape != k_dense_matched.shape or q_dense.dim() != 3:
        raise ValueError(f"dense_info_nce: q_dense {tuple(q_dense.shape)} and k_dense_matched "
                         f"{tuple(k_dense_matched.shape)} must both be [B, S, D]")
    d = q_dense.shape[2]
    return info_nce(q_dense.reshape(-1, d), k_dense_matched.reshape(-1, d), queue2, temperature)
