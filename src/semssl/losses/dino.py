"""DINO's self-distillation loss with centering (docs/methods/dino.md §Loss; SCFS paper Eq. 1-4).

Notation: student temperature tau_s (0.1), teacher temperature tau_t (a schedule, 0.04 -> 0.07 in SCFS), running
center c (``[1, K]``, momentum 0.9), CE(p, q) = -sum_k p_k log q_k.

* teacher targets of each teacher crop: ``softmax((h_t - c) / tau_t)`` (:func:`teacher_targets`);
* student log-probabilities of every crop: ``log_softmax(h_s / tau_s)``;
* loss = the mean, over every (teacher crop i, student crop v) pair with v != i, of the batch-mean CE — the
  released code divides the sum by the number of pairs (2 x 10 - 2 = 18 with 2 global + 8 local crops); the
  paper's Eq. 2-4 write a sum. Student crop v = i is the same augmented image as teacher crop i, so the student
  crops must list the teacher's crops first, in the same order (global crops, then local ones);
* after the loss, ``c <- m c + (1 - m) mean(h_t)`` over all teacher rows of every process (:class:`Center`).

Tensors are crop-major stacks ``[n_crops, B, K]`` (``x.view(n_crops, B, K)`` of a batch ``[n_crops * B, K]``
whose index is ``crop * B + image``). Everything computes in :func:`~semssl.losses.compute_dtype` of its inputs:
float32 under mixed precision, float64 in a float64 run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.distributed import all_reduce_sum, world_size
from semssl.losses import at_least_float32, compute_dtype

__all__ = ["Center", "DINOLoss", "dino_cross_entropy", "dino_loss", "entropy", "teacher_targets"]


def teacher_targets(teacher_logits: Tensor, center: Tensor | None, teacher_temp: float) -> Tensor:
    """Centred, sharpened teacher distributions ``softmax((h_t - c) / tau_t)`` (no gradient).

    Args:
        teacher_logits: ``[..., K]`` teacher head outputs.
        center: ``[1, K]`` (or broadcastable) running center, or None for no centering (SCFS's search targets).
        teacher_temp: tau_t > 0.
    Returns:
        ``[..., K]`` probabilities, detached, in :func:`~semssl.losses.compute_dtype` of the logits and center.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    dtype = compute_dtype(teacher_logits) if center is None else compute_dtype(teacher_logits, center)
    logits = teacher_logits.detach().to(dtype)
    if center is not None:
        logits = logits - center.to(dtype)
    return F.softmax(logits / teacher_temp, dim=-1)


def dino_cross_entropy(student_logits: Tensor, targets: Tensor, student_temp: float,
                       pairs: str = "exclude_same") -> Tensor:
    """Mean over crop pairs of the batch-mean CE(targets_i, log_softmax(student_v / tau_s)).

    Args:
        student_logits: ``[V, B, K]`` student outputs of V crops (the teacher's crops first).
        targets: ``[T, B, K]`` teacher probabilities (:func:`teacher_targets`), T <= V.
        student_temp: tau_s > 0.
        pairs: ``"exclude_same"`` — every (i, v) with v != i (DINO, docs/methods/dino.md §Loss); ``"matched"`` —
            only (i, i) with T == V (SCFS's local-vs-searched term, docs/methods/scfs.md §Losses: local crop i
            against its own target).
    Returns:
        Scalar loss, in :func:`~semssl.losses.compute_dtype` of the logits and targets.
    """
    if student_logits.ndim != 3 or targets.ndim != 3:
        raise ValueError(f"expected [crops, B, K] tensors, got student {tuple(student_logits.shape)} and targets "
                         f"{tuple(targets.shape)}")
    if student_logits.shape[1:] != targets.shape[1:]:
        raise ValueError(f"student {tuple(student_logits.shape)} and targets {tuple(targets.shape)} differ in "
                         f"[B, K]")
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    dtype = compute_dtype(student_logits, targets)
    log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)
    # ce[i, v] = mean_b CE(targets[i, b], p[v, b]); in float32 at least even under autocast (the originals'
    # elementwise products stay in float32 there)
    with torch.autocast(device_type=log_p.device.type, enabled=False):
        ce = -torch.einsum("tbk,vbk->tv", targets.to(dtype), log_p) / student_logits.shape[1]
    n_t, n_v = targets.shape[0], student_logits.shape[0]
    if pairs == "matched":
        if n_t != n_v:
            raise ValueError(f"matched pairs need as many targets as student crops, got {n_t} and {n_v}")
        return ce.diagonal().mean()
    if pairs != "exclude_same":
        raise ValueError(f"pairs must be 'exclude_same' or 'matched', got {pairs!r}")
    if n_t > n_v:
        raise ValueError(f"more teacher crops ({n_t}) than student crops ({n_v})")
    keep = ~torch.eye(n_t, n_v, dtype=torch.bool, device=ce.device)
    if not keep.any():
        raise ValueError("DINO loss needs at least one (teacher crop, other student crop) pair; got "
                         f"{n_t} teacher and {n_v} student crops")
    return ce[keep].mean()


def dino_loss(student_logits: Tensor, teacher_logits: Tensor, center: Tensor | None, student_temp: float,
              teacher_temp: float) -> Tensor:
    """DINO's loss (docs/methods/dino.md §Loss; SCFS Eq. 2-4 averaged over pairs as released).

    Args:
        student_logits: ``[V, B, K]``, the teacher's T crops first.
        teacher_logits: ``[T, B, K]``.
        center: ``[1, K]`` or None.
    Returns:
        Scalar: mean over the ``T * V - T`` pairs (v != i) of the batch-mean cross-entropy.
    """
    return dino_cross_entropy(student_logits, teacher_targets(teacher_logits, center, teacher_temp), student_temp)


@torch.no_grad()
def entropy(probs: Tensor) -> Tensor:
    """Mean entropy (nats) of the distributions in the last dim — a collapse monitor: ``log K`` = uniform
    collapse, 0 = one-hot collapse."""
    p = at_least_float32(probs)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


class Center(nn.Module):
    """DINO's running center: a ``[1, dim]`` buffer (zeros at start) updated after each step with
    ``c <- m c + (1 - m) * batch_center``, where ``batch_center`` is the mean of the teacher outputs over every
    row of every process (sum all-reduced, divided by rows x world size, docs/methods/dino.md §Loss).

    The buffer starts in float32 and follows the module's dtype (``.double()`` in a float64 run); the batch mean is
    computed in :func:`~semssl.losses.compute_dtype` of the outputs and the buffer.

    Under gradient accumulation (:meth:`defer` ... :meth:`flush`) the micro-batches' rows are summed and the
    center is updated once from all of them, as one pass over the whole batch does."""

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))
        self._pending: Optional[tuple[Tensor, int]] = None  # (sum of the held rows, their number), while deferred

    def defer(self) -> None:
        """Hold the rows of the following :meth:`update` calls until :meth:`flush`."""
        self._pending = (torch.zeros_like(self.center), 0)

    def next_part(self) -> None:
        """Micro-batches are summed alike: nothing to mark."""

    def flush(self, apply: bool = True) -> None:
        """Update once from every held row, and stop holding; ``apply=False`` drops them."""
        pending, self._pending = self._pending, None
        if apply and pending is not None and pending[1] > 0:
            self._update_from(*pending)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """Update from teacher outputs ``[N, dim]`` (all crops of this process's batch)."""
        rows = at_least_float32(teacher_logits.reshape(-1, self.center.shape[1]), self.center)
        if self._pending is not None:
            total, count = self._pending
            self._pending = (total + rows.sum(0, keepdim=True), count + rows.shape[0])
            return
        self._update_from(rows.sum(0, keepdim=True), rows.shape[0])

    @torch.no_grad()
    def _update_from(self, row_sum: Tensor, rows: int) -> None:
        batch_center = all_reduce_sum(row_sum) / (rows * world_size())
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)


class DINOLoss(nn.Module):
    """DINO's loss with its center (the released ``DINOLoss``): ``forward(student, teacher, teacher_temp)``
    computes :func:`dino_loss` with the current center, then updates the center from the teacher outputs.

    ``student`` ``[V, B, K]`` (global crops first), ``teacher`` ``[T, B, K]``; returns ``(loss, targets)`` with the
    teacher probabilities ``[T, B, K]`` used (for monitors such as the teacher entropy)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center = Center(out_dim, center_momentum)

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor]:
        targets = teacher_targets(teacher, self.center.center, teacher_temp)
        loss = dino_cross_entropy(student, targets, self.student_temp)
        self.center.update(teacher)
        return loss, targets
