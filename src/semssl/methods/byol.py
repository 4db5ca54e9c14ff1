"""BYOL (Grill et al. 2020), symmetric as released in OpenSelfSup, and asymmetric as MSF's BYOL-asym
(docs/methods/byol.md) — the consistency objective SCD-BYOL builds on.

Online network = backbone + projector ``MLP(d, 4096, proj_dim, BN)`` + predictor ``MLP(proj_dim, 4096, proj_dim,
BN)``; target = EMA copy of backbone + projector (no predictor). Loss: :func:`semssl.losses.byol.byol_loss`,
``2 - 2 cos(p_online, z_target)``.

* ``symmetric: true`` (default; BYOL / OpenSelfSup ``r50_bs256_ep200``): both views through both networks, the
  two directions' losses **summed** (BYOL's ``L + L~``; OpenSelfSup adds its two head losses), 2x backprop;
  heads 4096/256, EMA 0.996 -> 1 cosine per iteration (``momentum``/``momentum_end``); LARS in the recipe.
* ``symmetric: false`` (MSF BYOL-asym = MSF with top-k 1, whose own target is its only neighbour): one
  direction, online on view ``views[0]``, target on view ``views[1]``, 1x backprop; MSF's heads 4096/512, EMA
  0.99 constant, SGD lr 0.05, weak target view / strong online view (``views: [strong, weak]``) in the recipe.

``shuffle_bn`` shuffles the target batch before the target network and restores the order after (MSF's target
shuffle; off in BYOL). ``target_outputs`` names the target outputs :meth:`targets` returns (``z``; SCD adds the
stage map it reads), like MoCoV2's ``key_outputs``.

Decision: the symmetric variant runs the two views through the online network in two forwards (BatchNorm
statistics per view), as OpenSelfSup does, not as one concatenated batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.distributed import batch_shuffle, batch_unshuffle
from semssl.losses.byol import byol_loss
from semssl.methods import register
from semssl.methods.base import Method, MethodConfig
from semssl.models.backbones import ResNetBackbone, build_backbone
from semssl.models.heads import MLP


@dataclass
class BYOLConfig(MethodConfig):
    name: str = "byol"
    # (online view, target view) of batch["views"]; symmetric: also the other way round. MSF: [strong, weak]
    views: tuple[str, str] = ("q", "k")
    symmetric: bool = True
    proj_hidden_dim: int = 4096
    proj_dim: int = 256  # MSF / SCD-BYOL: 512
    pred_hidden_dim: int = 4096
    momentum: float = 0.996
    momentum_end: Optional[float] = 1.0  # None: constant momentum (MSF: 0.99)
    shuffle_bn: bool = False  # MSF shuffles the target batch


class ProjectedEncoder(nn.Module):
    """Backbone + projector. Returns a dict: the backbone's stage maps and ``pooled`` vector, and ``z``, the
    projection (not normalised: the predictor reads it)."""

    def __init__(self, backbone: ResNetBackbone, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.backbone(x)
        out["z"] = self.projector(out["pooled"])
        return out


def embedding_std(z: Tensor) -> Tensor:
    """Collapse monitor (SimSiam §4.1): the per-dimension standard deviation over the batch of the L2-normalised
    embeddings ``[N, D]``, averaged over dimensions; ~1/sqrt(D) for spread embeddings, 0 when collapsed (and for
    a single embedding, which has no spread)."""
    if z.shape[0] < 2:
        return z.new_zeros((), dtype=torch.float32)
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


@register("byol")
class BYOL(Method):
    config_class = BYOLConfig

    def __init__(self, cfg: BYOLConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        backbone = build_backbone(model_cfg)
        projector = MLP(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, batch_norm=True)
        self.online = ProjectedEncoder(backbone, projector)
        self.predictor = MLP(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, batch_norm=True)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        #: target-network outputs :meth:`targets` returns in batch order (a plug-in adds e.g. "layer4")
        self.target_outputs: tuple[str, ...] = ("z",)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.online, self.target)]

    def backbone_for(self, branch: str) -> ResNetBackbone:
        return self.target.backbone if branch == "teacher" else self.online.backbone

    @torch.no_grad()
    def targets(self, x: Tensor) -> dict[str, Tensor]:
        """The target network's outputs named in :attr:`target_outputs`, in batch order (with ``shuffle_bn`` the
        batch is shuffled before the target network and every returned output restored after)."""
        if not self.cfg.shuffle_bn:
            out = self.target(x)
            return {name: out[name] for name in self.target_outputs}
        x, unshuffle = batch_shuffle(x)
        out = self.target(x)
        return {name: batch_unshuffle(out[name], unshuffle) for name in self.target_outputs}

    def regress(self, x_online: Tensor, x_target: Tensor) -> dict[str, Any]:
        """One direction of BYOL: the prediction from ``x_online`` regressed on the target projection of
        ``x_target`` (same images, same crop-major order).

        Returns ``{"loss", "p": predictions, "online": online-network outputs (stage maps, ``pooled``, ``z``),
        "target": target outputs (:attr:`target_outputs`)}`` so plug-ins (SCD) reuse this forward."""
        online = self.online(x_online)
        p = self.predictor(online["z"])
        target = self.targets(x_target)
        return {"loss": byol_loss(p, target["z"]), "p": p, "online": online, "target": target}

    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        name_a, name_b = self.cfg.views
        x_a, x_b = batch["views"][name_a], batch["views"][name_b]
        out = self.regress(x_a, x_b)
        loss, z = out["loss"], out["online"]["z"]
        if self.cfg.symmetric:
            loss = loss + self.regress(x_b, x_a)["loss"]
        return {"loss": loss, "z_std": embedding_std(z), "embeddings": {"pooled": out["online"]["pooled"].detach()}}
