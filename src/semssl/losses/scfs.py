"""SCFS's semantics-consistent feature search and per-stage loss (SCFS paper Eq. 5-10;
docs/methods/scfs.md §Feature search, §Losses).

Feature search, per stage l (layer2/3/4), for local crop i of image b (:func:`search_attention`,
:func:`feature_search`):

* query q = GAP of the *student* stage map of the local crop, L2-normalised over channels (Eq. 5; detached —
  the caller passes ``map.detach().mean((2, 3))``);
* keys K = the *teacher* stage map of a global crop of the same image, L2-normalised at every position;
* attention A(x, y) = <q, K(x, y)> — the raw cosine similarity of Eq. 6, in [-1, 1]: no softmax, no clamp, no
  division by sum(A), no temperature (the released code; docs/methods/scfs.md §Feature search step 3,
  docs/methods/scfs.md §Code vs paper item 4);
* searched map = A * F'_g (Eq. 7), F'_g the teacher's **un-normalised** map, kept at full H x W — the teacher
  stage head then runs its conv bottleneck on it and mean-pools over all H*W positions (so the paper's
  "attention-weighted average pooling" is really weight map -> bottleneck -> plain mean).

Per-stage loss (:func:`scfs_stage_loss`), head outputs are L2-normalised 256-d vectors:

* global term (the released code's multi-layer DINO term, not in the paper's equations; "DINO w ML" of Table 7):
  DINO's loss between teacher and student stage-head outputs of the global crops, centred with the stage's own
  center, cross-view pairs only (2 crops: ``1/2 [CE(t_0, s_1) + CE(t_1, s_0)]``);
* local term (Eq. 9): target of local crop i = ``softmax(teacher head(searched map i) / tau_t)`` — sharpened but
  **not centred** — against the student head output of local crop i (its own searched feature only), averaged
  over crops (released) rather than summed (paper);
* stage loss = ``weight * (global + local)`` with weight 1/2 (released); L = L_DINO + sum over stages.

Crop-major throughout: a batch of ``n_crops * B`` rows has index ``crop * B + image``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.losses import compute_dtype
from semssl.losses.dino import dino_cross_entropy, dino_loss, teacher_targets

__all__ = ["feature_search", "scfs_stage_loss", "search_attention"]


def _check_query_keys(query: Tensor, key_map: Tensor) -> None:
    if query.ndim != 2 or key_map.ndim != 4 or query.shape[1] != key_map.shape[1]:
        raise ValueError(f"expected query [N, C] and key map [M, C, H, W] with the same C, got "
                         f"{tuple(query.shape)} and {tuple(key_map.shape)}")
    if query.shape[0] % key_map.shape[0]:
        raise ValueError(f"query rows ({query.shape[0]}) must be a multiple of the key maps ({key_map.shape[0]}): "
                         f"crop-major, row n searches key map n % M")


def search_attention(query: Tensor, key_map: Tensor) -> Tensor:
    """Cosine attention of Eq. 6 (docs/methods/scfs.md §Feature search, steps 1-3).

    Args:
        query: ``[N, C]`` pooled student features of N = n_crops * M local crops (crop-major), any scale (they
            are L2-normalised here).
        key_map: ``[M, C, H, W]`` teacher stage maps of one global crop of each of the M images (normalised here
            per position).
    Returns:
        ``[N, H, W]``: ``A[n, y, x] = cos(query[n], key_map[n % M, :, y, x])`` in [-1, 1], in
        :func:`~semssl.losses.compute_dtype` of the query and keys.
    """
    _check_query_keys(query, key_map)
    m = key_map.shape[0]
    dtype = compute_dtype(query, key_map)
    q = F.normalize(query.to(dtype), dim=1).view(-1, m, query.shape[1])  # [n_crops, M, C]
    k = F.normalize(key_map.to(dtype), dim=1)  # [M, C, H, W]
    attn = torch.einsum("nmc,mchw->nmhw", q, k)
    return attn.reshape(query.shape[0], *key_map.shape[2:])


def feature_search(query: Tensor, key_map: Tensor, value_map: Tensor | None = None) -> Tensor:
    """Semantics-consistent feature augmentation of Eq. 7: ``A ⊙ F'_g`` (docs/methods/scfs.md §Feature search,
    step 4).

    Args:
        query: ``[N, C]`` pooled student local-crop features (crop-major, N = n_crops * M).
        key_map: ``[M, C, H, W]`` teacher stage maps of the searched global crop.
        value_map: the map the attention weights, ``[M, C', H, W]``; default ``key_map`` (the released code
            weights the un-normalised teacher map it searched).
    Returns:
        ``[N, C', H, W]``: ``searched[n] = search_attention(query, key_map)[n] * value_map[n % M]`` (broadcast over
        channels), in the value map's dtype.
    """
    value = key_map if value_map is None else value_map
    if value.shape[0] != key_map.shape[0] or value.shape[2:] != key_map.shape[2:]:
        raise ValueError(f"value map {tuple(value.shape)} must match the key map {tuple(key_map.shape)} in M, H, W")
    attn = search_attention(query, key_map).to(value.dtype)
    n_crops = query.shape[0] // key_map.shape[0]
    weighted = attn.view(n_crops, value.shape[0], 1, *value.shape[2:]) * value.unsqueeze(0)
    return weighted.reshape(query.shape[0], *value.shape[1:])


def scfs_stage_loss(student_global: Tensor | None, teacher_global: Tensor | None, center: Tensor | None,
                    student_local: Tensor | None, search_targets: Tensor | None, student_temp: float,
                    teacher_temp: float, weight: float = 0.5) -> dict[str, Tensor]:
    """One stage's SCFS loss (docs/methods/scfs.md §Losses; paper Eq. 9 plus the released global term).

    Args:
        student_global: ``[G, B, D]`` student stage-head outputs of the G global crops, or None (no global term).
        teacher_global: ``[G, B, D]`` teacher stage-head outputs of the same crops (centred with ``center``).
        center: ``[1, D]`` the stage's running center (the caller updates it from ``teacher_global`` afterwards).
        student_local: ``[L, B, D]`` student stage-head outputs of the L local crops, or None (no local term).
        search_targets: ``[S, L, B, D]`` teacher stage-head outputs of the searched maps of each local crop in S
            searched global crops (S = 1: global crop 0, released; S = 2: both, Eq. 9) — not centred; the local
            term is averaged over the S searches.
        student_temp, teacher_temp: tau_s, tau_t.
        weight: factor of the stage loss (1/2 released).
    Returns:
        ``{"loss": weight * (global + local), "global": ..., "local": ...}`` (absent terms are 0), in
        :func:`~semssl.losses.compute_dtype` of the given outputs.
    """
    given = [t for t in (student_global, teacher_global, center, student_local, search_targets) if t is not None]
    zero = torch.zeros((), dtype=compute_dtype(*given), device=given[0].device)
    glob, loc = zero, zero
    if student_global is not None:
        if teacher_global is None:
            raise ValueError("the global term needs the teacher's global outputs")
        glob = dino_loss(student_global, teacher_global, center, student_temp, teacher_temp)
    if student_local is not None:
        if search_targets is None or search_targets.ndim != 4:
            raise ValueError(f"search_targets must be [S, L, B, D], got "
                             f"{None if search_targets is None else tuple(search_targets.shape)}")
        loc = torch.stack([dino_cross_entropy(student_local, teacher_targets(t, None, teacher_temp), student_temp,
                                              pairs="matched") for t in search_targets]).mean()
    return {"loss": weight * (glob + loc), "global": glob.detach(), "local": loc.detach()}
