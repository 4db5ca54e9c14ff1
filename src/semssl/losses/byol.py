"""BYOL's normalised regression loss (BYOL paper Eq. 2; SCD paper Eq. 2-3, L_mse = L_c of SCD-BYOL)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from semssl.losses import compute_dtype


def byol_loss(prediction: Tensor, target: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalised mean squared error ``|| p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)``, averaged over the batch.

    SCD's Eq. 3 (``L_mse``, equal to ``2 + 2 L_cos`` of its Eq. 2); one direction of BYOL's loss (BYOL Eq. 2); the
    symmetric BYOL loss is the sum of this over both directions (the caller swaps the views), MSF's top-1
    BYOL-asym loss is this over one direction.

    Args:
        prediction: ``[N, D]`` online predictions ``p = G(H(E(x_online)))`` (gradient flows), any norm.
        target: ``[N, D]`` target projections ``z = H_xi(E_xi(x_target))`` of the same images in the same
            (crop-major) order, any norm; treated as a constant (detached: stop-gradient).
        eps: the L2 normalisation's lower bound on the norm (``F.normalize``), so a zero vector gives cos 0.

    Returns:
        The scalar ``mean_n (2 - 2 cos(p_n, z_n))`` in ``[0, 4]``, in :func:`~semssl.losses.compute_dtype` of the
        inputs.
    """
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"byol_loss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must be "
                         f"equal [N, D] shapes")
    dtype = compute_dtype(prediction, target)
    p = F.normalize(prediction.to(dtype), dim=1, eps=eps)
    z = F.normalize(target.detach().to(dtype), dim=1, eps=eps)
    return (2 - 2 * (p * z).sum(dim=1)).mean()
