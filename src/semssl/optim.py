"""Optimisers, parameter groups, learning-rate scaling and gradient clipping.

The released codes set the learning rate and the weight decay by hand at every iteration from precomputed
schedules (DINO/SCFS, docs/methods/dino.md §Schedules) instead of using ``torch.optim.lr_scheduler``; so does semssl:
the engine calls :func:`set_lr_wd` with the values of its :class:`~semssl.schedules.Schedule` objects
before each ``optimizer.step()``.

Parameter groups follow one convention for every method (DINO ``get_params_groups``, SoCo ``add_weight_decay``,
BYOL): weights are regularised; biases and all 1-D parameters (BatchNorm/LayerNorm/GroupNorm scales and
shifts) get no weight decay and, under LARS, no trust-ratio adaptation. Each group dict carries:

* ``"name"`` — ``"decay"`` or ``"no_decay"`` (for logs);
* ``"param_names"`` — the parameters' names (PyTorch >= 2.6 stores them in the optimizer's ``state_dict``);
* ``"weight_decay"`` — the initial weight decay;
* ``"wd_exclude"`` — True when :func:`set_lr_wd` must leave the group's weight decay at 0;
* ``"lars_exclude"`` — True when :class:`LARS` must not apply its trust ratio to the group;
* optionally ``"lr_scale"`` (added by a method) — a factor :func:`set_lr_wd` applies to the scheduled lr.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from semssl.errors import OptimError

__all__ = [
    "LARS",
    "OptimError",
    "build_optimizer",
    "clip_gradients",
    "param_groups",
    "scaled_lr",
    "set_lr_wd",
]

OptimizerName = Literal["sgd", "lars", "adamw"]
ClipMode = Literal["global", "per_param"]
_OPTIMIZERS: tuple[str, ...] = ("sgd", "lars", "adamw")
_CLIP_MODES: tuple[str, ...] = ("global", "per_param")



def _check_number(name: str, value: float, minimum: float = 0.0, below: float | None = None) -> None:
    """Raise :class:`OptimError` unless ``value`` is a finite number in ``[minimum, below)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise OptimError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (below is not None and value >= below):
        upper = "" if below is None else f" and < {below}"
        raise OptimError(f"{name} must be >= {minimum}{upper}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------------------
def _is_unregularised(name: str, param: nn.Parameter) -> bool:
    """Biases and every parameter with fewer than 2 dims (norm-layer scales/shifts, scalars), as DINO/SoCo."""
    return name.endswith(".bias") or name == "bias" or param.ndim <= 1


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    exclude_norm_and_bias: bool = True,
    lars_exclude: bool = True,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a regularised group and a no-weight-decay group.

    Args:
        named_params: ``(name, parameter)`` pairs, e.g. ``model.named_parameters()``; parameters with
            ``requires_grad=False`` (a frozen teacher) are skipped, and a parameter listed twice (shared weights)
            is kept once, under its first name.
        weight_decay: weight decay of the regularised group.
        exclude_norm_and_bias: when False every parameter is regularised (MSF's BYOL-asym uses one group,
            docs/methods/byol.md §Optimisation).
        lars_exclude: whether the no-decay group also skips the LARS trust ratio (SoCo, BYOL: yes).

    Returns:
        ``[decay_group, no_decay_group]``, the regularised group first (DINO's "group 0" convention); a group
        with no parameters is left out.

    Raises:
        OptimError: no trainable parameter at all, a bad weight decay, or a non-parameter in the input.
    """
    _check_number("weight_decay", weight_decay)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for item in named_params:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise OptimError(f"param_groups expects (name, parameter) pairs, got {item!r:.80}")
        name, param = item
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if exclude_norm_and_bias and _is_unregularised(name, param):
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    if not decay and not no_decay:
        raise OptimError("param_groups: no trainable parameter (all have requires_grad=False, or none given)")
    groups = [
        _group("decay", decay, weight_decay, wd_exclude=False, lars_excluded=False),
        _group("no_decay", no_decay, 0.0, wd_exclude=True, lars_excluded=lars_exclude),
    ]
    return [g for g in groups if g["params"]]


def _group(
    name: str, members: list[tuple[str, nn.Parameter]], weight_decay: float, wd_exclude: bool, lars_excluded: bool
) -> dict[str, Any]:
    return {
        "name": name,
        "params": [p for _, p in members],
        "param_names": [n for n, _ in members],
        "weight_decay": float(weight_decay),
        "wd_exclude": wd_exclude,
        "lars_exclude": lars_excluded,
    }


# --------------------------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor gradient is rescaled by the LARS trust ratio (You et al., 2017).

    Per parameter tensor ``w`` with gradient ``g`` in a group with weight decay ``wd`` and learning rate ``lr``
    (docs/methods/soco.md §Optimisation, SoCo ``contrast/lars.py``; BYOL's LARS does the same)::

        d = g + wd * w                                   # weight decay joins the gradient first
        if not group["lars_exclude"]:
            q = eta * ||w|| / (||d|| + eps)  if ||w|| > 0 and ||d|| > 0  else 1
            d = q * d
        buf = momentum * buf + d    (buf = d at the first step; PyTorch SGD, dampening 0)
        w  -= lr * (d + momentum * buf if nesterov else buf)

    Groups marked ``lars_exclude`` (biases, norm layers) get plain SGD with momentum; :func:`param_groups`
    also gives them weight decay 0.

    Decision: ``denominator="update"`` (default) normalises by the norm of the decayed gradient ``||g + wd w||``
    as SoCo and BYOL do; ``denominator="paper"`` uses You et al.'s ``||g|| + wd ||w||`` (NVIDIA apex LARC).
    The two coincide when ``wd = 0`` or when ``g`` and ``w`` are parallel.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 1e-3,
        eps: float = 1e-8,
        denominator: Literal["update", "paper"] = "update",
    ) -> None:
        _check_number("lr", lr)
        _check_number("momentum", momentum, below=1.0)
        _check_number("weight_decay", weight_decay)
        _check_number("trust_coefficient", trust_coefficient)
        _check_number("eps", eps)
        if denominator not in ("update", "paper"):
            raise OptimError(f"LARS denominator must be 'update' or 'paper', got {denominator!r}")
        if nesterov and momentum <= 0:
            raise OptimError("LARS nesterov=True needs momentum > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)
        self.denominator = denominator

    def _trust_ratio(self, w: torch.Tensor, g: torch.Tensor, d: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """``eta ||w|| / (denominator + eps)``, or 1 when ``||w||`` or the update norm is 0 (fresh zero-init)."""
        w_norm = torch.linalg.vector_norm(w)
        d_norm = torch.linalg.vector_norm(d)
        if self.denominator == "update":
            denom = d_norm
        else:
            denom = torch.linalg.vector_norm(g) + group["weight_decay"] * w_norm
        ratio = group["trust_coefficient"] * w_norm / (denom + group["eps"])
        valid = (w_norm > 0) & (d_norm > 0)
        return torch.where(valid, ratio, torch.ones_like(ratio))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 — behaviour documented on the class
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise OptimError("LARS does not support sparse gradients")
                self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        g = p.grad
        d = g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] != 0 else g.clone()
        if not group["lars_exclude"]:
            d.mul_(self._trust_ratio(p, g, d, group))
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(d, alpha=-group["lr"])


# --------------------------------------------------------------------------------------------------------------
# Construction, lr scaling, per-iteration updates, clipping
# --------------------------------------------------------------------------------------------------------------
def build_optimizer(
    name: OptimizerName,
    groups: Sequence[dict[str, Any]],
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    trust_coefficient: float = 1e-3,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Create ``sgd`` (DINO-RN50, SCFS, MoCo, DenseCL), ``lars`` (BYOL, SoCo) or ``adamw`` (DINO-ViT default).

    ``groups`` are dicts as produced by :func:`param_groups` (copied, never mutated); a group's own
    ``"weight_decay"`` wins over ``weight_decay``, which only fills groups without one. Each group starts at
    ``lr * group.get("lr_scale", 1)``. ``eps`` is LARS's trust-ratio epsilon and AdamW's epsilon.
    """
    if name not in _OPTIMIZERS:
        raise OptimError(f"optimizer {name!r} is not one of {_OPTIMIZERS}")
    _check_number("lr", lr)
    _check_number("momentum", momentum, below=1.0)
    _check_number("weight_decay", weight_decay)
    if not groups:
        raise OptimError("build_optimizer: no parameter groups given")
    copies = [_prepared_group(g, lr, weight_decay, i) for i, g in enumerate(groups)]
    if name == "sgd":
        return torch.optim.SGD(copies, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "lars":
        return LARS(
            copies,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
        )
    if nesterov:
        raise OptimError("optimizer 'adamw' has no nesterov option; set nesterov=False")
    for i, beta in enumerate(betas):
        _check_number(f"betas[{i}]", beta, below=1.0)
    return torch.optim.AdamW(copies, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _prepared_group(group: dict[str, Any], lr: float, weight_decay: float, index: int) -> dict[str, Any]:
    """Shallow copy of a group with its initial lr (``lr_scale`` applied) and weight decay filled in."""
    if not isinstance(group, dict) or "params" not in group:
        raise OptimError(f"parameter group {index} must be a dict with a 'params' list, got {type(group).__name__}")
    copy = dict(group)
    copy["params"] = list(group["params"])
    scale = copy.get("lr_scale", 1.0)
    _check_number(f"group {copy.get('name', index)!r} lr_scale", scale)
    copy["lr"] = lr * scale
    copy.setdefault("weight_decay", weight_decay)
    return copy


def scaled_lr(base_lr: float, global_batch: int, reference: int = 256) -> float:
    """Linear scaling rule ``base_lr * global_batch / reference`` (docs/design.md §Batch size; Goyal et al. 2017).

    ``global_batch`` is the per-device batch times the number of devices and nodes (docs/methods/scfs.md §Schedules:
    SCFS 0.1 x bs/256; docs/methods/soco.md: SoCo 1.0 x bs/256).
    """
    _check_number("base_lr", base_lr)
    for name, value in (("global_batch", global_batch), ("reference", reference)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptimError(f"{name} must be a positive integer, got {value!r}")
    return float(base_lr) * global_batch / reference


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Write this iteration's learning rate and weight decay into every parameter group.

    Every group gets ``lr * group.get("lr_scale", 1)``; only groups not marked ``wd_exclude`` get ``wd``, so the
    no-decay group stays at 0 (DINO applies its wd schedule to group 0, the regularised one). Groups without a
    ``wd_exclude`` key count as regularised.
    """
    _check_number("lr", lr)
    _check_number("wd", wd)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if not group.get("wd_exclude", False):
            group["weight_decay"] = wd


def clip_gradients(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, mode: ClipMode = "per_param"
) -> torch.Tensor:
    """Clip gradients in place and return their norms measured before clipping.

    * ``per_param`` (DINO/SCFS, docs/methods/dino.md §Optimisation): every tensor's gradient is clipped on its own,
      ``g *= min(1, max_norm / (||g|| + 1e-6))``; returns a 1-D tensor with one norm per gradient.
    * ``global``: all gradients scaled by one factor from their joint norm (``torch.nn.utils.clip_grad_norm_``,
      same 1e-6); returns the total norm as a 0-d tensor.

    Parameters without a gradient are skipped. With AMP, unscale the gradients first (``scaler.unscale_``).
    ``max_norm`` must be > 0: a run that does not clip should not call this.
    """
    if mode not in _CLIP_MODES:
        raise OptimError(f"clip mode {mode!r} is not one of {_CLIP_MODES}")
    _check_number("max_norm", max_norm)
    if max_norm <= 0:
        raise OptimError(f"max_norm must be > 0, got {max_norm!r}")
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([torch.linalg.vector_norm(g.detach()).to(grads[0].device) for g in grads])
    coefs = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g, coef in zip(grads, coefs):
        g.detach().mul_(coef.to(g.dtype))
    return norms
