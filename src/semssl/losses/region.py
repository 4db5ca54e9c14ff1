"""Region-level features and losses of SoCo (docs/methods/soco.md §Network, §Loss) and D3SSL (paper 003 §4.2,
docs/methods/d3ssl.md §Loss).

Shapes: a view's regions are ``[N, P, ...]`` — ``N`` = rows of the view (``n_crops * B``, crop-major as the
images), ``P`` = region slots per row (the sampled proposals, padded); ``valid`` ``[N, P]`` marks the slots
that exist in that view; ``ids`` ``[N, P]`` name the proposal of each slot (the same id in two views = the same
proposal; SoCo's padding duplicates repeat an id).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from semssl.losses import compute_dtype

__all__ = ["roi_features", "region_correspondence", "soco_loss", "region_nce"]


def _check_regions(boxes: Tensor, valid: Tensor, n: int, where: str) -> None:
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != n:
        raise ValueError(f"{where}: boxes must be [N={n}, P, 4] (x1, y1, x2, y2 view pixels), got "
                         f"{tuple(boxes.shape)}")
    if valid.shape != boxes.shape[:2]:
        raise ValueError(f"{where}: valid must be {tuple(boxes.shape[:2])}, got {tuple(valid.shape)}")


def roi_features(layer3_map: Tensor, boxes: Tensor, valid: Tensor, stage4: nn.Module, out: int = 14,
                 spatial_scale: float = 1 / 16) -> Tensor:
    """SoCo-C4's region features (docs/methods/soco.md §Network; D3SSL Eq. 1 ``f^H(RoIAlign(f^E(x), b))``
    before the projector): RoIAlign ``out x out`` on the stage-3 map (torchvision ``roi_align``,
    ``aligned=True``, adaptive sampling), then ``stage4`` (the C5 block), then global average pooling.

    Args:
        layer3_map: ``[N, C3, h, w]`` stage-3 maps of one view.
        boxes: ``[N, P, 4]`` boxes in that view's pixels (continuous xyxy, pixel ``i`` covers ``[i, i+1)`` —
            the convention of ``aligned=True``).
        valid: ``[N, P]`` bool; the features of invalid slots are set to 0.
        stage4: the last stage (``backbone.stage("layer4")``), applied to the ``[N*P, C3, out, out]`` RoIs.
        out: RoIAlign output side (SoCo: 14 for 224 px views, 7 for its 112 px view).
        spatial_scale: map pixels per view pixel (``h / H``; 1/16 for a ResNet's layer3).

    Returns:
        ``[N, P, C4]``.  With the whole view as the box and ``out`` = the map's side, RoIAlign returns the map
        itself, so the feature equals the backbone's pooled feature of the view.

    Decision: every slot is run through C5, valid or not (the RoI count is always ``N * P``, so BatchNorm over
    sub-batches and DDP see fixed shapes; region sampling pads every image to exactly ``k`` valid slots, so
    invalid slots are rare), and the invalid ones are zeroed after pooling.
    """
    n, p = layer3_map.shape[0], boxes.shape[1]
    _check_regions(boxes, valid, n, "roi_features")
    rows = torch.arange(n, device=layer3_map.device).repeat_interleave(p)
    rois = torch.cat([rows[:, None].to(layer3_map.dtype), boxes.reshape(-1, 4).to(layer3_map.dtype)], dim=1)
    aligned = roi_align(layer3_map, rois, output_size=out, spatial_scale=spatial_scale, sampling_ratio=-1,
                        aligned=True)
    feats = stage4(aligned).mean(dim=(2, 3)).reshape(n, p, -1)
    return feats * valid[..., None].to(feats.dtype)


def region_correspondence(ids_a: Tensor, valid_a: Tensor, ids_b: Tensor, valid_b: Tensor) -> Tensor:
    """SoCo's correspondence matrix (docs/methods/soco.md §Loss): ``C[n, i, j] = 1`` when slot ``i`` of view a
    and slot ``j`` of view b of row ``n`` hold the same proposal (equal ids, both valid, id >= 0), else 0.
    Padding duplicates (repeated ids) create several matches, as in SoCo.

    Args: ``ids_a``/``valid_a`` ``[N, P]``, ``ids_b``/``valid_b`` ``[N, Q]``.  Returns float32 ``[N, P, Q]`` (a mask:
    the losses cast it to their compute dtype).
    """
    if ids_a.shape != valid_a.shape or ids_b.shape != valid_b.shape or ids_a.shape[0] != ids_b.shape[0]:
        raise ValueError(f"region_correspondence: ids/valid must be [N, P] and [N, Q] with the same N, got "
                         f"{tuple(ids_a.shape)}/{tuple(valid_a.shape)} and {tuple(ids_b.shape)}/{tuple(valid_b.shape)}")
    same = ids_a[:, :, None] == ids_b[:, None, :]
    ok = (valid_a & (ids_a >= 0))[:, :, None] & (valid_b & (ids_b >= 0))[:, None, :]
    return (same & ok).float()


def _pair_average(per_pair: Tensor, corr: Tensor) -> Tensor:
    """``mean_n sum_ij C_nij l_nij / (sum_ij C_nij + 1e-6)`` (SoCo's per-image average; an image without a
    matched pair contributes 0), in :func:`~semssl.losses.compute_dtype` of ``per_pair`` (the mask ``corr`` is cast
    to it, so the ``+ 1e-6`` is not rounded in float32 for float64 losses)."""
    corr = corr.to(compute_dtype(per_pair))
    return ((per_pair * corr).sum(dim=(1, 2)) / (corr.sum(dim=(1, 2)) + 1e-6)).mean()


def soco_loss(p: Tensor, z: Tensor, corr: Tensor) -> Tensor:
    """SoCo's BYOL-style region loss, one direction (docs/methods/soco.md §Loss): per row
    ``-2 sum_ij C_ij <p^_i, z^_j> / (sum_ij C_ij + 1e-6)`` with ``p^ = p / |p|``, ``z^ = z / |z|``, averaged over
    the rows.  SoCo symmetrises by adding the other direction (the caller swaps the views).  It equals BYOL's
    ``2 - 2 cos`` up to the constant 2 (dropped, as in SoCo's loss value).

    Args:
        p: ``[N, P, D]`` online predictions of view a's slots (gradient flows).
        z: ``[N, Q, D]`` target projections of view b's slots (detached: stop-gradient).
        corr: ``[N, P, Q]`` :func:`region_correspondence` of (a, b).
    """
    if p.ndim != 3 or z.ndim != 3 or corr.shape != (p.shape[0], p.shape[1], z.shape[1]):
        raise ValueError(f"soco_loss: p [N, P, D] {tuple(p.shape)}, z [N, Q, D] {tuple(z.shape)} and corr "
                         f"[N, P, Q] {tuple(corr.shape)} do not fit")
    dtype = compute_dtype(p, z)
    sim = torch.einsum("npd,nqd->npq", F.normalize(p.to(dtype), dim=-1), F.normalize(z.detach().to(dtype), dim=-1))
    return -2 * _pair_average(sim, corr)


def region_nce(q: Tensor, k: Tensor, corr: Tensor, negatives: Tensor, temperature: float = 0.2
               ) -> tuple[Tensor, Tensor]:
    """D3SSL's region InfoNCE (paper Eq. 5 in Eqs. 4 and 9) over matched slot pairs: for each pair ``(i, j)`` with
    ``C_ij = 1``, ``l_ij = -log exp(q^_i.k^_j/t) / (exp(q^_i.k^_j/t) + sum_m exp(q^_i.n_m/t))`` with negatives
    ``n_m`` from the region memory bank (MoCo formalism) and L2-normalised ``q^``, ``k^``; averaged per row as
    :func:`soco_loss` (``sum C l / (sum C + 1e-6)``, i.e. the ``1/K sum_i`` of Eq. 10 when each of the K boxes
    has one match) and over rows.

    Args:
        q: ``[N, P, D]`` student embeddings (gradient flows); ``k``: ``[N, Q, D]`` teacher embeddings
        (detached); ``corr``: ``[N, P, Q]``; ``negatives``: ``[K, D]`` L2-normalised bank entries (detached);
        ``temperature``: tau (0.2, docs/design.md §D3SSL).

    Returns:
        ``(loss, accuracy)``: the scalar loss, and the fraction of matched pairs whose positive logit beats
        every negative (for logging).
    """
    if q.ndim != 3 or k.ndim != 3 or corr.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(f"region_nce: q [N, P, D] {tuple(q.shape)}, k [N, Q, D] {tuple(k.shape)} and corr "
                         f"[N, P, Q] {tuple(corr.shape)} do not fit")
    dtype = compute_dtype(q, k, negatives)
    qn, kn = F.normalize(q.to(dtype), dim=-1), F.normalize(k.detach().to(dtype), dim=-1)
    pos = torch.einsum("npd,nqd->npq", qn, kn) / temperature
    neg = torch.einsum("npd,md->npm", qn, negatives.detach().to(dtype)) / temperature
    neg_lse = torch.logsumexp(neg, dim=-1, keepdim=True)  # [N, P, 1]
    per_pair = torch.logaddexp(pos, neg_lse) - pos
    with torch.no_grad():
        mask = corr.to(compute_dtype(pos))
        hits = (pos > neg.max(dim=-1, keepdim=True).values).to(mask.dtype)
        acc = (hits * mask).sum() / mask.sum().clamp(min=1)
    return _pair_average(per_pair, corr), acc
