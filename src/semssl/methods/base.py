"""The Method contract: an ``nn.Module`` usable without Lightning.

A method builds its modules from its config, declares ``momentum_pairs()`` (student -> teacher modules the
engine EMA-updates) and ``param_groups()``, implements ``training_step(batch, progress) -> {"loss", logs...}``
and ``features(images, branch)`` for evaluation. The engine never looks inside.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

import torch
from torch import Tensor, nn

from semssl.engine.optim import param_groups as _param_groups
from semssl.models.backbones import ResNetBackbone


@dataclass
class MethodConfig:
    """Fields every method has. ``momentum``/``momentum_end``: EMA of the teacher, cosine per iteration from
    ``momentum`` to ``momentum_end`` (None = constant)."""

    name: str = ""
    momentum: float = 0.999
    momentum_end: Optional[float] = None


class Method(nn.Module, abc.ABC):
    """Base class of every pre-training method."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: view names the method reads from ``batch["views"]``
    required_views: ClassVar[tuple[str, ...]] = ()
    #: branch used by :meth:`features` when none is given ("online" or "teacher")
    default_branch: ClassVar[str] = "online"

    def __init__(self, cfg: MethodConfig, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg

    # -- contract --------------------------------------------------------------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs; the engine sets teacher <- m*teacher + (1-m)*student after each step."""
        return []

    def teacher_modules(self) -> list[nn.Module]:
        return [teacher for _, teacher in self.momentum_pairs()]

    def named_trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        teacher_ids = {id(p) for m in self.teacher_modules() for p in m.parameters()}
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in teacher_ids)

    def param_groups(self, weight_decay: float, exclude_norm_and_bias: bool = True) -> list[dict]:
        """Optimiser groups: norms and biases without weight decay (and without LARS adaptation)."""
        return _param_groups(self.named_trainable_parameters(), weight_decay,
                             exclude_norm_and_bias=exclude_norm_and_bias)

    def ema_momentum(self, progress: Any) -> float:
        """Teacher EMA momentum at this step: constant, or cosine from ``momentum`` to ``momentum_end``
        (BYOL/DINO: m = m_end - (m_end - m0)(cos(pi k/K) + 1)/2)."""
        m0, m1 = self.cfg.momentum, self.cfg.momentum_end
        if m1 is None or progress.total_steps <= 0:
            return m0
        return m1 - (m1 - m0) * (math.cos(math.pi * progress.step / progress.total_steps) + 1) / 2

    @abc.abstractmethod
    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        """One step's losses: ``{"loss": scalar to minimise, other scalars to log}``."""

    def on_after_backward(self, progress: Any) -> None:
        """Hook between backward and the optimiser step (e.g. DINO's frozen last layer in epoch 0)."""

    @abc.abstractmethod
    def backbone_for(self, branch: Optional[str] = None) -> ResNetBackbone:
        """The backbone of ``branch`` ("online" or "teacher")."""

    @torch.no_grad()
    def features(self, images: Tensor, branch: Optional[str] = None) -> Tensor:
        """Pooled backbone features used by evaluation (kNN, linear probe)."""
        return self.backbone_for(branch or self.default_branch)(images)["pooled"]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over parameters (buffers are not averaged,
    as in MoCo and DINO)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("ema_update: student and teacher have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)
