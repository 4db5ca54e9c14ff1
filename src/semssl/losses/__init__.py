"""Losses and searches (docs/design.md §Losses) and their one dtype policy.

Every loss, search and similarity matrix of this package computes in ``torch.promote_types(input dtype,
float32)`` (:func:`compute_dtype`): float32 for bfloat16, float16 and float32 inputs (never below float32, as the
originals' ``.float()`` under mixed precision), float64 for float64 inputs (a float64 run, its model and buffers
``.double()``, checks parity against float64 references). A boolean or integer mask that multiplies data is cast
to the data's compute dtype. Under autocast, the ops autocast itself lowers (matmuls, einsums) still run in its
precision unless it is switched off around them, as :func:`~semssl.losses.dino.dino_cross_entropy` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["at_least_float32", "compute_dtype"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss or search computes in: ``promote_types`` of float32 and every tensor's dtype (float32 for
    half-precision, integer or boolean tensors; float64 as soon as one is float64)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def at_least_float32(t: Tensor, *others: Tensor) -> Tensor:
    """``t`` in :func:`compute_dtype` of ``t`` and ``others`` (``t`` itself when it is already in that dtype; the
    cast is differentiable)."""
    return t.to(compute_dtype(t, *others))
