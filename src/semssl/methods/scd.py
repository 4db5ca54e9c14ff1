"""SCD — Semantic-guided Consistency and Discrimination (paper 001; docs/methods/scd.md), a plug-in on a consistency
objective: ``scd_mocov2`` (SCD-MoCo: MoCo-v2's InfoNCE with a queue) and ``scd_byol`` (SCD-BYOL: BYOL's
normalised regression, asymmetric 1x backprop by default, ``symmetric: true`` for SCD-BYOL (2x)).

Per view pair (view 1 = the base's online/query view, view 2 = its target/key view), on the last stage map F
(``layer4``, before global pooling):

* saliency ``M^fg = M(F)`` in (0, 1) ``[B, 1, H, W]`` (:class:`~semssl.models.heads.SaliencyNet`), ``M^bg = 1 - M^fg``;
* ``h^fg = M^fg (x) F``, ``h^bg = M^bg (x) F`` — normalised weighted average pooling (Eq. 4,
  :func:`weighted_average_pool`);
* ``z^fg = H^s(h^fg)``, ``z^bg = H^s(h^bg)`` with one semantic projector H^s;
* ``L = L_c + lambda_d * L_d`` (Eq. 6) with L_d the triplet of Eq. 5 (:func:`semssl.losses.triplet.fg_bg_triplet`,
  margin only on the foreground term).

The base's forward is reused, not repeated: SCD-MoCo overrides ``MoCoV2.contrast`` and SCD-BYOL
``BYOL.regress`` to add ``lambda_d * L_d`` to the base's loss of that direction, reading the stage maps of the
same forward (the base returns them: ``key_outputs`` / ``target_outputs`` ask the target network for
``layer4`` in batch order). A symmetric base (MoCo ``symmetric``, BYOL ``symmetric``) calls it once per
direction, so the triplet is symmetrised exactly like the consistency loss (averaged in MoCo, summed in BYOL).

Decisions on points the paper leaves open (docs/methods/scd.md §Decisions):

* view 2's ``z2^fg``, ``z2^bg`` come from the **target** network (EMA backbone, EMA saliency net, EMA semantic
  projector, no gradient): the Siamese framing of §4.2 ("the target network ... has the same architecture");
  view 1's (the anchors) from the online network.
* H^s has the architecture of the base's projector (MoCo-v2: ``d -> d -> 128``; SCD-BYOL: ``d -> 4096 -> 512``
  with BN), freshly initialised; no predictor on ``z^fg``/``z^bg`` in SCD-BYOL (Eq. 5 uses H^s outputs only).
* H^s embeds ``h^fg`` and ``h^bg`` of a view in **one** forward (one batch of 2B rows), so a BatchNorm in H^s
  normalises foreground and background together and cannot erase the difference of their means.
* The target saliency net runs on the target's ``layer4`` map after the base restored the batch order (under
  shuffle-BN its BatchNorm sees the whole batch unshuffled; the triplet compares only within an image).
* Stability when M saturates: the saliency net clamps M to [1e-6, 1 - 1e-6] and :func:`weighted_average_pool`
  clamps its denominator to ``pool_eps``, so no division by zero and no NaN (tested with logits at +-50).
* A switched-off triplet term (Table 3) is dropped from Eq. 5's bracket, the 0.5 factor stays.
* With a 1x1 stage map (tiny inputs) ``h^fg = h^bg`` whatever M is, so L_d is constant and M learns nothing:
  that is a :class:`~semssl.errors.ConfigError`, not a silent no-op.

Logs: ``loss_c``, ``loss_d`` (L_d), ``loss_fg``, ``loss_bg`` (the two hinge terms), ``cos_fg_fg``,
``cos_fg_bg``, ``cos_bg_fg``, ``cos_bg_bg`` (means of the four cosines), ``mask_mean`` (mean of the online M),
``mask_std`` (its spatial std, averaged over images: 0 = a constant map), and the collapse monitors ``z_std``,
``zfg_std`` (std over the batch of the L2-normalised online global / foreground embeddings, ~1/sqrt(D) healthy,
0 collapsed). Features: ``features(images, branch, kind="fg")`` = ``h^fg`` of ``branch`` (Table 8's "fg").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from semssl.errors import ConfigError
from semssl.losses.triplet import fg_bg_triplet
from semssl.methods import register
from semssl.methods.base import Method
from semssl.methods.byol import BYOL, BYOLConfig, embedding_std
from semssl.methods.mocov2 import MoCoV2, MoCoV2Config
from semssl.models.heads import SaliencyNet

#: the stage map SCD reads (C5, before global average pooling)
SCD_STAGE = "layer4"


def weighted_average_pool(fmap: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalised weighted average pooling ``M (x) F`` (SCD Eq. 4): ``sum_ij M_ij F_:ij / sum_ij M_ij``.

    Args:
        fmap: ``[B, C, H, W]`` stage map F.
        weights: ``[B, 1, H, W]`` (or ``[B, H, W]``) non-negative weights M (``M^fg`` or ``M^bg``).
        eps: lower bound of the denominator ``sum_ij M_ij`` (decision: a clamp, not an added eps, so a
            non-degenerate map is pooled exactly; a map of zeros gives the zero vector instead of NaN).

    Returns:
        ``[B, C]``; with constant weights it is the plain spatial mean, i.e. the backbone's ``pooled`` vector.
    """
    if weights.dim() == 3:
        weights = weights.unsqueeze(1)
    if fmap.dim() != 4 or weights.shape != (fmap.shape[0], 1, *fmap.shape[2:]):
        raise ValueError(f"weighted_average_pool: map {tuple(fmap.shape)} and weights {tuple(weights.shape)} "
                         f"must be [B, C, H, W] and [B, 1, H, W]")
    num = (fmap * weights).sum(dim=(2, 3))
    return num / weights.sum(dim=(2, 3)).clamp_min(eps)


def fresh_copy(module: nn.Module) -> nn.Module:
    """A module of the same architecture as ``module`` with its own fresh initialisation (H^s from H)."""
    new = copy.deepcopy(module)
    for sub in new.modules():
        if sub is not new and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return new


class SemanticHeads(nn.Module):
    """The saliency net M and the semantic projector H^s of one network (online or target)."""

    def __init__(self, saliency: SaliencyNet, projector: nn.Module, pool_eps: float = 1e-6) -> None:
        super().__init__()
        self.saliency, self.projector, self.pool_eps = saliency, projector, pool_eps

    def forward(self, fmap: Tensor) -> dict[str, Tensor]:
        """``fmap`` ``[B, C, H, W]`` -> ``mask`` M^fg ``[B, 1, H, W]``, ``h_fg``/``h_bg`` ``[B, C]``, ``z_fg``/``z_bg``
        ``[B, D]`` (H^s on the 2B rows ``[h_fg; h_bg]`` at once)."""
        mask = self.saliency(fmap)
        h_fg = weighted_average_pool(fmap, mask, self.pool_eps)
        h_bg = weighted_average_pool(fmap, 1 - mask, self.pool_eps)
        z_fg, z_bg = self.projector(torch.cat([h_fg, h_bg])).chunk(2)
        return {"mask": mask, "h_fg": h_fg, "h_bg": h_bg, "z_fg": z_fg, "z_bg": z_bg}


@dataclass
class SCDFields:
    """SCD's own keys (both variants)."""

    lambda_d: float = 0.5  # lambda of Eq. 6 (Table 4: 0, 0.1, 0.5, 1, 2)
    margin: float = 1.0  # alpha of Eq. 5, on the foreground term only (Fig. 3: 0 .. 1.4)
    fg_term: bool = True  # Table 3 "FG"
    bg_term: bool = True  # Table 3 "BG"
    saliency_hidden_dim: Optional[int] = None  # None: the stage's channels (2048 on ResNet-50, as the paper)
    pool_eps: float = 1e-6  # clamp of the weighted-average denominator


@dataclass
class SCDMoCoConfig(MoCoV2Config, SCDFields):
    name: str = "scd_mocov2"


@dataclass
class SCDBYOLConfig(BYOLConfig, SCDFields):
    """SCD-BYOL defaults = MSF's BYOL-asym heads and EMA (App. A.1: projector 4096/512 following MSF)."""

    name: str = "scd_byol"
    symmetric: bool = False  # SCD-BYOL is 1x backprop; true = "SCD-BYOL (2x)"
    proj_dim: int = 512
    momentum: float = 0.99
    momentum_end: Optional[float] = None
    shuffle_bn: bool = True  # MSF shuffles the target batch


class SCDPlugin:
    """The plug-in: heads, the discrimination term, logs and ``fg`` features. Mixed in before a base method
    (``class SCDMoCo(SCDPlugin, MoCoV2)``), which calls :meth:`add_discrimination` from its per-direction
    forward."""

    feature_kinds = (*Method.feature_kinds, "fg")

    def _init_scd(self, projector: nn.Module, dim: int) -> None:
        cfg = self.cfg
        if cfg.lambda_d < 0 or cfg.margin < 0 or cfg.pool_eps <= 0:
            raise ConfigError(f"method: lambda_d ({cfg.lambda_d}) and margin ({cfg.margin}) must be >= 0 and "
                              f"pool_eps ({cfg.pool_eps}) > 0")
        self.sem = SemanticHeads(SaliencyNet(dim, cfg.saliency_hidden_dim), fresh_copy(projector), cfg.pool_eps)
        self.sem_t = copy.deepcopy(self.sem).requires_grad_(False)
        self._scd_logs: list[dict[str, Tensor]] = []

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.sem, self.sem_t)]

    def add_discrimination(self, out: dict[str, Any], online: dict[str, Tensor], target_map: Tensor) -> dict:
        """``out["loss"] += lambda_d * L_d`` for one direction: anchors from the online outputs of view 1
        (``online[layer4]``), positive/negative from the target network's map of view 2 ``[B, C, H, W]`` (same
        images, same crop-major order). Returns ``out`` (``loss`` replaced; ``scd`` = the heads' outputs)."""
        fmap = online[SCD_STAGE]
        if fmap.shape[-2:].numel() < 2:
            raise ConfigError(f"method '{self.cfg.name}': the {SCD_STAGE} map has 1x1 cell at this view size "
                              f"({tuple(fmap.shape[-2:])}), so h^fg = h^bg whatever the saliency and L_d is "
                              f"constant; use larger views (ResNet: >= 64 px) or model.small_input=true")
        one = self.sem(fmap)
        with torch.no_grad():
            two = self.sem_t(target_map)
        cfg = self.cfg
        terms = fg_bg_triplet(one["z_fg"], one["z_bg"], two["z_fg"], two["z_bg"], margin=cfg.margin,
                              fg_term=cfg.fg_term, bg_term=cfg.bg_term)
        loss_c = out["loss"]
        out["loss"] = loss_c + cfg.lambda_d * terms.loss
        out["scd"] = one
        mask = one["mask"].detach()
        self._scd_logs.append({
            "loss_c": loss_c.detach(), "loss_d": terms.loss.detach(), "loss_fg": terms.fg.detach(),
            "loss_bg": terms.bg.detach(),
            **{f"cos_{n}": s.detach() for n, s in zip(("fg_fg", "fg_bg", "bg_fg", "bg_bg"), terms.sims)},
            "mask_mean": mask.mean(), "mask_std": mask.flatten(1).std(dim=1, unbiased=False).mean(),
            "z_std": embedding_std(online["z"]), "zfg_std": embedding_std(one["z_fg"]),
        })
        return out

    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        self._scd_logs = []
        out = super().training_step(batch, progress)
        logs = self._scd_logs
        self._scd_logs = []
        merged = {k: torch.stack([d[k] for d in logs]).mean() for k in logs[0]} if logs else {}
        return {**out, **merged}

    # -- evaluation and figures ------------------------------------------------------------------------------
    def heads_for(self, branch: str) -> SemanticHeads:
        return self.sem_t if branch == "teacher" else self.sem

    @torch.no_grad()
    def saliency(self, images: Tensor, branch: Optional[str] = None) -> Tensor:
        """The foreground saliency map ``M^fg`` ``[B, 1, h, w]`` of ``branch`` (default: the evaluated one) on
        ``images`` ``[B, 3, H, W]`` (what ``semssl viz saliency`` draws)."""
        branch = self.resolve_branch(branch)
        fmap = self.backbone_for(branch)(images, stages=(SCD_STAGE,))[SCD_STAGE]
        return self.heads_for(branch).saliency(fmap)

    @torch.no_grad()
    def features(self, images: Tensor, branch: Optional[str] = None, kind: str = "pooled") -> Tensor:
        """As :meth:`Method.features`, plus ``kind="fg"``: the foreground semantics ``h^fg`` ``[B, C]`` (Eq. 4:
        the ``layer4`` map pooled under the branch's own saliency map; Table 8's "fg")."""
        if kind != "fg":
            return super().features(images, branch, kind)
        branch = self.resolve_branch(branch)
        fmap = self.backbone_for(branch)(images, stages=(SCD_STAGE,))[SCD_STAGE]
        heads = self.heads_for(branch)
        return weighted_average_pool(fmap, heads.saliency(fmap), heads.pool_eps)


@register("scd_mocov2")
class SCDMoCo(SCDPlugin, MoCoV2):
    """SCD-MoCo: MoCo-v2 (query = view ``views[0]``, key = ``views[1]``) + lambda_d * L_d."""

    config_class = SCDMoCoConfig

    def __init__(self, cfg: SCDMoCoConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        self.key_outputs = ("z", SCD_STAGE)
        self._init_scd(self.encoder_q.projector, self.encoder_q.backbone.channels[SCD_STAGE])

    def contrast(self, x_q: Tensor, x_k: Tensor) -> dict[str, Any]:
        out = super().contrast(x_q, x_k)
        return self.add_discrimination(out, out["q"], out["k"][SCD_STAGE])


@register("scd_byol")
class SCDBYOL(SCDPlugin, BYOL):
    """SCD-BYOL: BYOL (online = view ``views[0]``, target = ``views[1]``; asymmetric by default) + lambda_d * L_d."""

    config_class = SCDBYOLConfig

    def __init__(self, cfg: SCDBYOLConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        self.target_outputs = ("z", SCD_STAGE)
        self._init_scd(self.online.projector, self.online.backbone.channels[SCD_STAGE])

    def regress(self, x_online: Tensor, x_target: Tensor) -> dict[str, Any]:
        out = super().regress(x_online, x_target)
        return self.add_discrimination(out, out["online"], out["target"][SCD_STAGE])
