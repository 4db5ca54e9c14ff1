"""The Method contract: an ``nn.Module`` usable without Lightning.

A method builds its modules from its config and declares

* ``required_views(cfg)`` — the view names it reads from ``batch["views"]`` (from its config, e.g. MoCo's
  ``views: [q, k]``); the config check compares them with ``data.views`` before anything runs;
* ``momentum_pairs()`` — (student, teacher) modules the engine EMA-updates after every optimiser step;
* ``schedules()`` — every value that changes during training besides the lr and weight decay (EMA momentum,
  DINO's teacher temperature, ...), as :class:`~semssl.schedules.ScheduleConfig` entries; the engine builds,
  steps and logs them like the lr and hands this step's values to the method in ``progress.values``;
* ``param_groups()`` — optimiser groups (norms and biases without weight decay by default);

and implements ``training_step(batch, progress) -> {"loss", logs...}`` and
``features(images, branch=None, kind="pooled")``, the one entry point of every evaluation (the online kNN
monitor, the final evaluation, ``semssl eval`` and checkpoint loading). The engine never looks inside.

``training_step`` may also return, under ``"embeddings"``, a dict of detached embedding matrices the step computed
anyway, for the engine's RankMe monitor (:mod:`semssl.eval.rankme`; logged every ``trainer.rankme_every_n_steps``
as ``monitor/rankme``, ``monitor/rankme_dense``, ``monitor/rankme_region``): ``pooled`` ``[N, C]`` (the backbone's
pooled vectors of one view), ``dense`` (its last stage map ``[N, C, h, w]``, one row per location once the engine
flattens it, on the steps it measures: dense methods) and ``region`` ``[R, C]`` (pooled RoI features of the
proposals, zeros for invalid slots: region methods). The engine takes the key out before logging; a method
without ``pooled`` gets it from :meth:`Method.features` on its first view.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

import torch
from torch import Tensor, nn

from semssl.errors import ConfigError
from semssl.models.backbones import STAGES, ResNetBackbone, backbone_features
from semssl.optim import param_groups as _param_groups
from semssl.schedules import Progress, ScheduleConfig


@dataclass
class MethodConfig:
    """Fields every method has. ``momentum``/``momentum_end``: EMA momentum of the teacher, constant
    (``momentum_end: null``) or cosine per iteration from ``momentum`` to ``momentum_end`` (BYOL/DINO/SoCo:
    ``m_k = m_end - (m_end - m0)(cos(pi k/K) + 1)/2``)."""

    name: str = ""
    momentum: float = 0.999
    momentum_end: Optional[float] = None


class Method(nn.Module, abc.ABC):
    """Base class of every pre-training method."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: branches :meth:`features` can read
    branches: ClassVar[tuple[str, ...]] = ("online", "teacher")
    #: branch used by :meth:`features` when none is given (DINO/SCFS: the teacher)
    default_branch: ClassVar[str] = "online"
    #: feature kinds :meth:`features` returns: the pooled vector and each stage map; methods add their own
    feature_kinds: ClassVar[tuple[str, ...]] = ("pooled", *STAGES)

    def __init__(self, cfg: MethodConfig, model_cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_cfg = model_cfg

    # -- declarations ----------------------------------------------------------------------------------------
    @classmethod
    def required_views(cls, cfg: MethodConfig) -> tuple[str, ...]:
        """View names the method reads from ``batch["views"]`` with this config."""
        return tuple(getattr(cfg, "views", ()))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs; the engine sets teacher <- m*teacher + (1-m)*student after each step,
        with m = ``progress.values["momentum"]``."""
        return []

    def schedules(self) -> dict[str, ScheduleConfig]:
        """Named schedules the engine builds and steps (per step or per epoch) and logs as ``train/<name>``.

        The base declares ``momentum`` (the teacher EMA: constant, or cosine from ``cfg.momentum`` to
        ``cfg.momentum_end``) when the method has momentum pairs. The cosine is the one of
        :func:`semssl.schedules.cosine_schedule` — DINO's ``cosine_scheduler(m0, 1, ...)``, which equals BYOL's and
        SoCo's ``1 - (1 - m0)(cos(pi k/K) + 1)/2`` at every step that is applied."""
        if not self.momentum_pairs():
            return {}
        m0, m1 = self.cfg.momentum, self.cfg.momentum_end
        if m1 is None:
            return {"momentum": ScheduleConfig(kind="constant", base=m0)}
        return {"momentum": ScheduleConfig(kind="cosine", base=m0, final=m1)}

    def teacher_modules(self) -> list[nn.Module]:
        return [teacher for _, teacher in self.momentum_pairs()]

    def named_trainable_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        teacher_ids = {id(p) for m in self.teacher_modules() for p in m.parameters()}
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in teacher_ids)

    def param_groups(self, weight_decay: float, exclude_norm_and_bias: bool = True) -> list[dict]:
        """Optimiser groups: norms and biases without weight decay (and without LARS adaptation)."""
        return _param_groups(self.named_trainable_parameters(), weight_decay,
                             exclude_norm_and_bias=exclude_norm_and_bias)

    # -- training --------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def training_step(self, batch: dict, progress: Progress) -> dict[str, Tensor]:
        """One step's losses: ``{"loss": scalar to minimise, other scalars to log}``, optionally with
        ``"embeddings"`` (the module docstring)."""

    def on_after_backward(self, progress: Progress) -> None:
        """Hook between backward and the optimiser step (e.g. DINO's frozen last layer in epoch 0)."""

    # -- evaluation ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def backbone_for(self, branch: str) -> ResNetBackbone:
        """The backbone of ``branch`` (one of :attr:`branches`)."""

    def resolve_branch(self, branch: Optional[str] = None) -> str:
        """``branch``, or the method's default; an unknown branch is a ConfigError naming the valid ones."""
        chosen = branch or self.default_branch
        if chosen not in self.branches:
            raise ConfigError(f"branch '{chosen}' is not one of {list(self.branches)} for method "
                              f"'{self.cfg.name}'")
        return chosen

    @torch.no_grad()
    def features(self, images: Tensor, branch: Optional[str] = None, kind: str = "pooled") -> Tensor:
        """What evaluation reads: ``pooled`` ``[B, C]`` or a stage map ``layer1..layer4`` ``[B, C, h, w]`` of the
        backbone of ``branch`` (default: :attr:`default_branch`). Methods extend ``kind`` (SCD: ``fg``)."""
        if kind not in self.feature_kinds:
            raise ConfigError(f"feature kind '{kind}' is not one of {list(self.feature_kinds)} for method "
                              f"'{self.cfg.name}'")
        return backbone_features(self.backbone_for(self.resolve_branch(branch)), images, kind)


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
