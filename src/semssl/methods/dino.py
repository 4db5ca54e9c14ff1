"""DINO with a ResNet or ViT backbone (Caron et al. 2021; docs/methods/dino.md, shared with SCFS; the ViT parts:
docs/methods/dino.md §ViT).

* Student = backbone + :class:`~semssl.models.heads.DINOHead` (3-layer MLP with GELU, hidden 2048, L2-normalised
  256-d bottleneck, weight-normalised last layer to ``out_dim`` = 65536 with its gain frozen at 1); teacher = an
  EMA copy (momentum cosine 0.996 -> 1 per iteration, over every parameter; buffers not averaged). The teacher is
  never put in eval mode during training: its BatchNorm uses batch statistics, as in DINO.
* Views: ``views[0]`` (default ``global``) holds the global crops (``global_crops`` = 2, crop-major), seen by
  both networks; every further view (default ``local``, N crops) is seen by the student only. Crops are grouped
  by resolution as DINO's ``MultiCropWrapper``: one backbone forward per view (all crops of a view share a
  size), so BatchNorm statistics come from each resolution group. ``views: [global]`` is DINO without multi-crop.
* Loss: :class:`~semssl.losses.dino.DINOLoss` — centred (momentum 0.9, all-reduced) and sharpened teacher
  targets of the global crops against the student's log-softmax (tau_s 0.1) of every other crop, averaged over
  the (teacher i, student v != i) pairs. The teacher temperature is the schedule ``teacher_temp``
  (:meth:`schedules`): per epoch, linear from ``warmup_teacher_temp`` to ``teacher_temp`` over
  ``warmup_teacher_temp_epochs`` (epochs or a fraction of the run), then constant.
* The last layer's gradients are dropped during the first ``freeze_last_layer`` epochs
  (:meth:`on_after_backward`, after clipping, as DINO's ``cancel_gradients_last_layer``). Per-parameter
  gradient clipping (3.0) is the engine's (``optim.clip_grad``, ``optim.clip_mode: per_param``).
* Evaluation reads the **teacher** backbone (``default_branch``), as DINO's k-NN/linear scripts do.
* ViT backbones (``model.arch: vit_tiny | vit_small | vit_base``, :mod:`semssl.models.vit`): the head reads the
  CLS token; the student has the stochastic depth ``model.drop_path`` and the teacher none (DINO builds its
  teacher without it; here the teacher copy has every ``DropPath`` set to 0); the features add DINO's linear
  evaluation kinds ``cls_last4`` and ``cls_avgpool`` and the token grids ``block<i>``. DINO's ViT optimisation
  (AdamW, weight decay 0.04 -> 0.4, ...) is the recipes' (``dino_vit-s16_*``, ``dino_vit-b16_*``).

Logged besides the loss (the engine logs ``teacher_temp`` with the other schedules): two collapse monitors: ``teacher_entropy`` (mean entropy of the
centred teacher targets, nats; ``log(out_dim)`` = uniform collapse, 0 = one-hot collapse) and ``embed_std``
(per-dimension std over the batch of the L2-normalised teacher pooled features, times sqrt(dim): about 1 for
spread features, 0 when every image maps to the same vector).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.errors import ConfigError
from semssl.losses.dino import DINOLoss, entropy
from semssl.methods import register
from semssl.methods.base import Method, MethodConfig
from semssl.models.backbones import ResNetBackbone, build_backbone
from semssl.models.heads import DINOHead
from semssl.models.vit import is_vit, without_drop_path
from semssl.schedules import Progress, ScheduleConfig, resolve_length


@dataclass
class DINOConfig(MethodConfig):
    name: str = "dino"
    #: views[0]: the global crops (teacher and student); views[1:]: student-only local views, one forward each
    views: tuple[str, ...] = ("global", "local")
    global_crops: int = 2  # crops of views[0] (DINO: 2)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04  # DINO's default; SCFS: 0.07 after a 50-epoch ramp from 0.04
    warmup_teacher_temp_epochs: int | float | str = 0  # epochs, or a fraction of the run (< 1)
    center_momentum: float = 0.9
    freeze_last_layer: int | float | str = 1  # epochs (or a fraction of the run) with the last layer frozen
    momentum: float = 0.996
    momentum_end: float | None = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.views, str) or not self.views or not all(isinstance(v, str) and v for v in self.views):
            raise ConfigError(f"views: expected a list of view names (global first), got {self.views!r}")
        if len(set(self.views)) != len(self.views):
            raise ConfigError(f"views: view names repeat in {list(self.views)}")
        if self.global_crops < 1:
            raise ConfigError(f"global_crops: must be >= 1, got {self.global_crops}")
        for key in ("student_temp", "warmup_teacher_temp", "teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ConfigError(f"center_momentum: must be in [0, 1], got {self.center_momentum}")
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_teacher_temp_epochs", "freeze_last_layer"):
            try:
                resolve_length(getattr(self, key), 1, 1)
            except ConfigError as err:
                raise ConfigError(f"{key}: {err}") from None


class DINONetwork(nn.Module):
    """Backbone + DINO head (DINO's ``MultiCropWrapper`` without the crop loop: one call = one resolution)."""

    def __init__(self, backbone: ResNetBackbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        #: the stage maps the backbone returns (None: all; a ViT's DINO asks for none, SCFS for its stages, so a
        #: ViT does not lay out twelve token grids nobody reads)
        self.stages: tuple[str, ...] | None = None

    def _backbone(self, x: Tensor) -> dict[str, Tensor]:
        return self.backbone(x) if self.stages is None else self.backbone(x, stages=self.stages)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The backbone's stage maps and ``pooled`` vector plus ``logits`` (the head's output)."""
        out = self._backbone(x)
        out["logits"] = self.head(out["pooled"])
        return out

    def forward_crops(self, xs: list[Tensor]) -> list[dict[str, Tensor]]:
        """One output dict per tensor of ``xs`` (one tensor per resolution), as DINO's ``MultiCropWrapper``: the
        backbone runs once per resolution, the head once over the pooled vectors of every crop together, so a
        head with BatchNorm normalises global and local crops with the same batch statistics."""
        outs = [self._backbone(x) for x in xs]
        logits = self.head(torch.cat([o["pooled"] for o in outs]))
        for out, part in zip(outs, logits.split([o["pooled"].shape[0] for o in outs])):
            out["logits"] = part
        return outs


@register("dino")
class DINO(Method):
    config_class = DINOConfig
    default_branch = "teacher"

    def __init__(self, cfg: DINOConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        backbone = build_backbone(model_cfg)
        head = DINOHead(backbone.dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                        batch_norm=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
        self.student = DINONetwork(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        if is_vit(model_cfg.arch):
            # DINO builds its ViT teacher without drop path (main_dino.py: drop_path_rate for the student only)
            without_drop_path(self.teacher)
            self.feature_kinds = tuple(backbone.feature_kinds)  # pooled, cls_last4, cls_avgpool, block1..
            self.student.stages = self.teacher.stages = ()
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum)

    # -- declarations ----------------------------------------------------------------------------------------
    @classmethod
    def required_views(cls, cfg: DINOConfig) -> tuple[str, ...]:
        return tuple(cfg.views)

    def local_views(self) -> tuple[str, ...]:
        """The student-only views this method forwards (SCFS's no-multi-crop variants return none)."""
        return tuple(self.cfg.views[1:])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.student, self.teacher)]

    def backbone_for(self, branch: str) -> ResNetBackbone:
        return self.teacher.backbone if branch == "teacher" else self.student.backbone

    def schedules(self) -> dict[str, ScheduleConfig]:
        """The EMA momentum (base) and DINO's teacher temperature: per epoch, ``linspace(warmup_teacher_temp,
        teacher_temp, ramp)`` then ``teacher_temp`` (docs/methods/dino.md §Schedules)."""
        c = self.cfg
        return {**super().schedules(),
                "teacher_temp": ScheduleConfig(kind="linear", base=c.warmup_teacher_temp, final=c.teacher_temp,
                                               ramp=c.warmup_teacher_temp_epochs, per="epoch")}

    # -- training --------------------------------------------------------------------------------------------
    def split_views(self, batch: dict) -> tuple[Tensor, list[Tensor], int]:
        """(global crops ``[G*B, ...]``, local views ``[[N_v*B, ...], ...]``, B) from the batch, checked."""
        views = batch["views"]
        names = (self.cfg.views[0], *self.local_views())
        missing = [n for n in names if n not in views]
        if missing:
            raise ConfigError(f"method '{self.cfg.name}' reads views {list(names)}; the batch has {sorted(views)} "
                              f"(missing {missing}); check method.views and data.views")
        x_global = views[names[0]]
        g = self.cfg.global_crops
        if x_global.shape[0] % g:
            raise ConfigError(f"view '{names[0]}' has {x_global.shape[0]} crops in the batch, not a multiple of "
                              f"method.global_crops={g}; set data.views' n_crops to {g}")
        batch_size = x_global.shape[0] // g
        locals_ = [views[n] for n in names[1:]]
        for name, x in zip(names[1:], locals_):
            if x.shape[0] % batch_size:
                raise ConfigError(f"view '{name}' has {x.shape[0]} crops, not a multiple of the batch size "
                                  f"{batch_size}")
        return x_global, locals_, batch_size

    def dino_forward(self, batch: dict, progress: Progress) -> dict[str, Any]:
        """DINO's forward and loss; plug-ins (SCFS) reuse it and add their terms.

        Returns ``{"loss", "logs": {...}, "student": [global outputs, local outputs per view], "teacher": global
        outputs, "batch_size": B, "teacher_temp": tau_t}``; outputs are :class:`DINONetwork` dicts (stage maps,
        ``pooled``, ``logits``), the teacher's computed without gradient."""
        x_global, x_locals, b = self.split_views(batch)
        # the engine puts this epoch's value in progress.values; a bare Progress (outside the engine) gets the final
        tau_t = float(progress.values.get("teacher_temp", self.cfg.teacher_temp))
        student = self.student.forward_crops([x_global, *x_locals])
        with torch.no_grad():
            teacher = self.teacher(x_global)
        k = self.cfg.out_dim
        s_logits = torch.cat([o["logits"] for o in student]).view(-1, b, k)
        t_logits = teacher["logits"].view(-1, b, k)
        loss, targets = self.dino_loss(s_logits, t_logits, tau_t)
        with torch.no_grad():
            pooled = F.normalize(teacher["pooled"].float(), dim=1)
            logs = {"teacher_entropy": entropy(targets),
                    "embed_std": pooled.std(0).mean() * math.sqrt(pooled.shape[1]) if pooled.shape[0] > 1
                    else torch.zeros(())}
        return {"loss": loss, "logs": logs, "student": student, "teacher": teacher, "batch_size": b,
                "teacher_temp": tau_t, "embeddings": {"pooled": teacher["pooled"].detach()}}

    def training_step(self, batch: dict, progress: Progress) -> dict[str, Tensor]:
        out = self.dino_forward(batch, progress)
        return {"loss": out["loss"], **out["logs"], "embeddings": out["embeddings"]}

    def frozen_last_layer_steps(self, progress: Progress) -> int:
        """Number of first steps whose last-layer gradients are dropped (``freeze_last_layer`` resolved)."""
        return resolve_length(self.cfg.freeze_last_layer, progress.steps_per_epoch, progress.total_steps)

    def on_after_backward(self, progress: Progress) -> None:
        """DINO's ``cancel_gradients_last_layer``: during the first ``freeze_last_layer`` epochs the student head's
        last layer gets no update (its gradients are set to None, so SGD applies neither momentum nor decay)."""
        if progress.step < self.frozen_last_layer_steps(progress):
            for p in self.student.head.last_layer.parameters():
                p.grad = None
