"""SoCo, C4 variant, as released (Wei et al. 2021; docs/methods/soco.md §Network) — the base D3SSL extends.

Data (the recipe's ``data`` section, not this file): view ``x1`` = the whole image resized (``whole_image: true``,
224 px, ``byol_view1`` colours), view ``x2`` = RandomResizedCrop 224 of scale (0.6, 1) (``byol_view2``) with
SoCo's cutout in boxes (``box_cutout_p: 0.5``); ``data.proposals: true`` attaches the selective-search proposals
(:mod:`semssl.data.proposals`) and ``data.region_sampling`` keeps k = 4 visible in both views, padded by
duplicates that keep their ids (:class:`semssl.data.regions.RegionSampling`).

Network: for each view, the backbone up to ``layer3`` (C4, stride 16), RoIAlign ``roi_size x roi_size`` (14) of
every valid proposal (``aligned=True``, spatial scale = map side / view side), ``backbone.layer4`` (C5) on the
RoIs, average pooling -> projector ``MLP(C5, 4096, 256, BN)`` -> predictor ``MLP(256, 4096, 256, BN)`` (online
only).  Target = EMA copy of backbone + projector, momentum 0.99 -> 1 (cosine per step: ``momentum`` /
``momentum_end``).  Loss: :func:`semssl.losses.region.soco_loss` over the slots matched by proposal id
(:func:`~semssl.losses.region.region_correspondence`), symmetrised (view 1 online -> view 2 target + view 2 online
-> view 1 target, summed).

Options (decisions; docs/design.md §D3SSL: both losses are available to both methods):

* ``loss: nce`` — InfoNCE with a region memory bank (D3SSL's loss, :func:`~semssl.losses.region.region_nce`): tau
  ``temperature``, L2-normalised projector outputs, ``bank_size`` entries, the teacher embeddings of both views
  enqueued after each step; ``predictor`` defaults to off with ``nce`` and on with ``byol``.  The bank receives a
  fixed ``rows x P`` embeddings per view and step (all-gathered under DDP, which needs equal shapes): padding
  duplicates are enqueued as they are, invalid slots (rare) as random unit vectors, like the bank's start.
* ``small_views`` — views whose RoIs use ``roi_size_small`` (7: SoCo's 112 px path, pooled 4x4 after C5).
* ``shuffle_bn`` — shuffle the target's images (with their boxes) across the batch / ranks before the target
  network and restore the order after (MoCo's shuffle-BN); off in SoCo (SyncBN).  On one process it only helps
  with ``model.bn_splits > 1``.
* every slot goes through C5 (fixed RoI count, see :func:`~semssl.losses.region.roi_features`); the projector
  and predictor (BatchNorm1d) see the valid slots only.

Evaluation: ``features()`` as every method (default branch: online); :meth:`SoCo.region_features` gives SoCo's
own RoI feature of given boxes (RoIAlign on layer3 -> layer4 -> pooling), e.g. for an object kNN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.distributed import batch_shuffle, batch_unshuffle
from semssl.errors import ConfigError, SampleError
from semssl.losses.infonce import MemoryQueue
from semssl.losses.region import (
    region_correspondence,
    region_nce,
    roi_features,
    soco_loss,
)
from semssl.methods import register
from semssl.methods.base import Method, MethodConfig
from semssl.models.backbones import ResNetBackbone, build_backbone
from semssl.models.heads import MLP


@dataclass
class SoCoConfig(MethodConfig):
    name: str = "soco"
    views: tuple[str, str] = ("x1", "x2")  # (view 1 = whole image, view 2 = random crop) of batch["views"]
    small_views: tuple[str, ...] = ()  # views whose RoIs use roi_size_small
    roi_size: int = 14
    roi_size_small: int = 7
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    predictor: Optional[bool] = None  # None: on with loss byol, off with nce
    loss: Literal["byol", "nce"] = "byol"
    temperature: float = 0.2  # nce only
    bank_size: int = 65536  # nce only
    momentum: float = 0.99
    momentum_end: Optional[float] = 1.0
    shuffle_bn: bool = False


def dense_apply(module: nn.Module, x: Tensor, valid: Tensor) -> Tensor:
    """``module`` on the valid slots of ``x`` ``[N, P, D]`` only (BatchNorm sees no padding); zeros elsewhere."""
    flat = valid.reshape(-1)
    out = module(x.reshape(-1, x.shape[-1])[flat])
    dense = out.new_zeros((flat.shape[0], out.shape[-1]))
    return dense.index_copy(0, flat.nonzero().flatten(), out).reshape(*x.shape[:2], -1)


class RegionEncoder(nn.Module):
    """Backbone + projector over regions (D3SSL Eq. 1, ``z = f^H(RoIAlign(f^E(x), b))``).

    ``forward(x, boxes, valid, roi_size)`` returns ``{"layer3": [N, C3, h, w], "region": [N, P, C5] (C5 +
    pooling), "z": [N, P, D] (projector)}``; invalid slots hold zeros."""

    def __init__(self, backbone: ResNetBackbone, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def regions(self, x: Tensor, boxes: Tensor, valid: Tensor, roi_size: int) -> dict[str, Tensor]:
        """Stage-3 map and pooled C5 RoI features (no projector)."""
        f3 = self.backbone(x, stages=("layer3",), upto="layer3")["layer3"]
        region = roi_features(f3, boxes, valid, self.backbone.stage("layer4"), out=roi_size,
                              spatial_scale=f3.shape[-1] / x.shape[-1])
        return {"layer3": f3, "region": region}

    def forward(self, x: Tensor, boxes: Tensor, valid: Tensor, roi_size: int) -> dict[str, Tensor]:
        out = self.regions(x, boxes, valid, roi_size)
        out["z"] = dense_apply(self.projector, out["region"], valid)
        return out


def embedding_std(z: Tensor, valid: Tensor) -> Tensor:
    """Collapse monitor: per-dimension std over the valid slots of the L2-normalised embeddings, averaged
    (~1/sqrt(D) when spread, 0 when collapsed)."""
    flat = z.detach().reshape(-1, z.shape[-1])[valid.reshape(-1)].float()
    if flat.shape[0] < 2:
        return flat.new_zeros(())
    return F.normalize(flat, dim=1).std(dim=0).mean()


def region_embeddings(student: dict[str, Tensor]) -> Tensor:
    """``[N*P, C5]``: the pooled C5 RoI features of a student view's slots, detached (RankMe monitor). Invalid
    slots hold zeros, rows that change no singular value, so they are not masked out (a mask would synchronise
    the device at every step)."""
    region = student["region"].detach()
    return region.reshape(-1, region.shape[-1])


@register("soco")
class SoCo(Method):
    config_class = SoCoConfig

    def __init__(self, cfg: SoCoConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        if cfg.roi_size < 1 or cfg.roi_size_small < 1:
            raise ConfigError(f"method.roi_size / roi_size_small must be >= 1, got {cfg.roi_size}, "
                              f"{cfg.roi_size_small}")
        if cfg.loss == "nce" and (cfg.bank_size < 1 or cfg.temperature <= 0):
            raise ConfigError(f"method.loss=nce needs bank_size >= 1 and temperature > 0, got {cfg.bank_size}, "
                              f"{cfg.temperature}")
        backbone = build_backbone(model_cfg)
        projector = MLP(backbone.dim, cfg.proj_hidden_dim, cfg.proj_dim, batch_norm=True)
        self.online = RegionEncoder(backbone, projector)
        use_predictor = cfg.predictor if cfg.predictor is not None else cfg.loss == "byol"
        self.predictor = (MLP(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, batch_norm=True)
                          if use_predictor else None)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.bank = MemoryQueue(cfg.bank_size, cfg.proj_dim) if cfg.loss == "nce" else None

    # -- declarations ----------------------------------------------------------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.online, self.target)]

    def backbone_for(self, branch: str) -> ResNetBackbone:
        return self.target.backbone if branch == "teacher" else self.online.backbone

    # -- pieces plug-ins reuse ------------------------------------------------------------------------------
    def roi_size_for(self, view: str) -> int:
        return self.cfg.roi_size_small if view in self.cfg.small_views else self.cfg.roi_size

    @staticmethod
    def regions_of(batch: dict, view: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(boxes [N, P, 4], ids [N, P], valid [N, P])`` of a view's proposals; a SampleError when missing."""
        for key in ("proposals", "proposal_ids", "proposal_valid"):
            if key not in batch or view not in batch[key]:
                raise SampleError(f"region methods read batch[{key!r}][{view!r}]; the batch has "
                                  f"{sorted(batch.get(key, {})) if key in batch else 'no ' + repr(key)} — set "
                                  f"data.proposals: true and data.region_sampling (views with proposals)")
        return batch["proposals"][view], batch["proposal_ids"][view], batch["proposal_valid"][view]

    def student(self, batch: dict, view: str) -> dict[str, Tensor]:
        """Online-network outputs of a view's proposals (``layer3``, ``region``, ``z``, and ``q``: the vector the
        loss compares — the predictor's output, or ``z`` without a predictor) plus its ``ids``/``valid``."""
        boxes, ids, valid = self.regions_of(batch, view)
        out = self.online(batch["views"][view], boxes, valid, self.roi_size_for(view))
        out["q"] = dense_apply(self.predictor, out["z"], valid) if self.predictor is not None else out["z"]
        return {**out, "ids": ids, "valid": valid}

    @torch.no_grad()
    def teacher(self, batch: dict, view: str) -> dict[str, Tensor]:
        """Target-network projections ``z`` ``[N, P, D]`` of a view's proposals (with ``ids``/``valid``); with
        ``shuffle_bn`` the images travel with their boxes through a batch shuffle and come back in order."""
        boxes, ids, valid = self.regions_of(batch, view)
        x, roi = batch["views"][view], self.roi_size_for(view)
        if not self.cfg.shuffle_bn:
            z = self.target(x, boxes, valid, roi)["z"]
            return {"z": z, "ids": ids, "valid": valid}
        n, p = boxes.shape[:2]
        packed = torch.cat([x.reshape(n, -1), boxes.reshape(n, -1).to(x.dtype), valid.to(x.dtype)], dim=1)
        packed, unshuffle = batch_shuffle(packed)
        sx = packed[:, : x[0].numel()].reshape(x.shape)
        sb = packed[:, x[0].numel(): x[0].numel() + 4 * p].reshape(n, p, 4).to(boxes.dtype)
        sv = packed[:, -p:] > 0.5
        z = self.target(sx, sb, sv, roi)["z"]
        z = batch_unshuffle(z.reshape(n, -1), unshuffle).reshape(n, p, -1)
        return {"z": z, "ids": ids, "valid": valid}

    def pair_loss(self, s: dict[str, Tensor], t: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """One direction: student slots ``s`` (``q``) against teacher slots ``t`` (``z``) matched by proposal id
        — :func:`soco_loss` (``byol``) or :func:`region_nce` against the bank (``nce``)."""
        if s["q"].shape[0] != t["z"].shape[0]:
            raise SampleError(f"region views have {s['q'].shape[0]} and {t['z'].shape[0]} rows; region methods need "
                              f"the same number of crops per view")
        corr = region_correspondence(s["ids"], s["valid"], t["ids"], t["valid"])
        logs = {"pairs": corr.sum(dim=(1, 2)).mean()}
        if self.bank is None:
            return soco_loss(s["q"], t["z"], corr), logs
        loss, acc = region_nce(s["q"], t["z"], corr, self.bank.queue.clone(), self.cfg.temperature)
        logs["acc1"] = acc * 100
        return loss, logs

    @torch.no_grad()
    def enqueue(self, *teachers: dict[str, Tensor]) -> None:
        """Teacher embeddings into the bank (``nce``): every slot of every row, L2-normalised; invalid slots as
        random unit vectors (a fixed count per step, see the module docstring)."""
        if self.bank is None:
            return
        for t in teachers:
            z = F.normalize(t["z"].reshape(-1, t["z"].shape[-1]).float(), dim=1)
            filler = F.normalize(torch.randn_like(z), dim=1)
            self.bank.enqueue(torch.where(t["valid"].reshape(-1, 1), z, filler))

    # -- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        a, b = self.cfg.views
        s_a, s_b = self.student(batch, a), self.student(batch, b)
        t_a, t_b = self.teacher(batch, a), self.teacher(batch, b)
        loss_ab, logs = self.pair_loss(s_a, t_b)
        loss_ba, logs_ba = self.pair_loss(s_b, t_a)
        self.enqueue(t_a, t_b)
        out = {"loss": loss_ab + loss_ba, "z_std": embedding_std(s_a["z"], s_a["valid"]), "pairs": logs["pairs"],
               "embeddings": {"region": region_embeddings(s_a)}}
        if "acc1" in logs:
            out["acc1"] = (logs["acc1"] + logs_ba["acc1"]).detach() / 2
        return out

    # -- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def region_features(self, images: Tensor, boxes: Tensor, valid: Optional[Tensor] = None,
                        branch: Optional[str] = None, roi_size: Optional[int] = None) -> Tensor:
        """SoCo's region feature of ``boxes`` ``[N, P, 4]`` (image pixels) in ``images`` ``[N, 3, H, W]``: RoIAlign
        ``roi_size`` (default ``method.roi_size``) on layer3 -> layer4 -> average pooling, ``[N, P, C5]`` (zeros
        for invalid slots), from the backbone of ``branch`` (default: online)."""
        encoder = self.target if self.resolve_branch(branch) == "teacher" else self.online
        valid = valid if valid is not None else torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
        return encoder.regions(images, boxes, valid, roi_size or self.cfg.roi_size)["region"]
