"""MoCo-v2 (Chen et al. 2020; docs/methods/mocov2.md) — the consistency objective SCD and DSC build on.

Query encoder = backbone + MLP projector (``dim -> dim -> 128``, no BN, as the ``--mlp`` head: 2048-2048-128 on
ResNet-50); key encoder = EMA copy (momentum 0.999, constant); InfoNCE with tau 0.2 against a queue of past keys
(65536 at paper scale), keys enqueued after each step (all-gathered under DDP). The key branch uses shuffle-BN:
keys are shuffled across the global batch before the key encoder and unshuffled after, so BatchNorm statistics
cannot reveal which key matches. On one process the shuffle only helps together with ``model.bn_splits > 1``
(BatchNorm over sub-batches, as the MoCo CIFAR-10 demo) — the small recipes set it. With ``model.sync_bn``
(CUDA DDP) the key shuffle is not needed and ``shuffle_bn: false`` may be set.

Decision: ``symmetric: true`` (MoCo-v3 style, both views as queries) is an option; the default is MoCo-v2's
asymmetric loss (query = view ``q``, key = view ``k``). ``proj_batch_norm: true`` puts a BatchNorm after the
projector's hidden layer (MoCo-v3 / SimCLR style) for small-scale experiments; MoCo-v2's head has none (default).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semssl.distributed import batch_shuffle, batch_unshuffle
from semssl.losses.infonce import MemoryQueue, info_nce
from semssl.methods import register
from semssl.methods.base import Method, MethodConfig
from semssl.methods.byol import embedding_std
from semssl.models.backbones import ResNetBackbone, build_backbone
from semssl.models.heads import MLP


@dataclass
class MoCoV2Config(MethodConfig):
    name: str = "mocov2"
    views: tuple[str, str] = ("q", "k")  # (query view, key view) of batch["views"]; e.g. [weak, strong]
    proj_hidden_dim: Optional[int] = None  # None: the backbone width (2048 on ResNet-50, as MoCo-v2)
    proj_dim: int = 128
    queue_size: int = 65536
    temperature: float = 0.2
    momentum: float = 0.999
    momentum_end: Optional[float] = None
    shuffle_bn: bool = True
    symmetric: bool = False
    proj_batch_norm: bool = False  # BatchNorm after the projector's hidden layer (MoCo-v3/SimCLR style)


class Encoder(nn.Module):
    """Backbone + projector. Returns a dict: the backbone's stage maps and ``pooled`` vector, and ``z``, the
    L2-normalised projection — so a plug-in (SCD, DSC) reads the maps of the same forward."""

    def __init__(self, backbone: ResNetBackbone, projector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.backbone(x)
        out["z"] = F.normalize(self.projector(out["pooled"]), dim=1)
        return out


@register("mocov2")
class MoCoV2(Method):
    config_class = MoCoV2Config

    def __init__(self, cfg: MoCoV2Config, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        backbone = build_backbone(model_cfg)
        hidden = cfg.proj_hidden_dim or backbone.dim
        self.encoder_q = Encoder(backbone, MLP(backbone.dim, hidden, cfg.proj_dim, batch_norm=cfg.proj_batch_norm))
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue = MemoryQueue(cfg.queue_size, cfg.proj_dim)
        #: key-encoder outputs :meth:`keys` returns in batch order (a plug-in adds e.g. "layer4")
        self.key_outputs: tuple[str, ...] = ("z",)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder_q, self.encoder_k)]

    def backbone_for(self, branch: str) -> ResNetBackbone:
        return self.encoder_k.backbone if branch == "teacher" else self.encoder_q.backbone

    @torch.no_grad()
    def keys(self, x: Tensor) -> dict[str, Tensor]:
        """The key encoder's outputs named in :attr:`key_outputs` (``z``; plug-ins add stage maps) with
        shuffle-BN: the batch is shuffled across ranks / BN splits before the key encoder and every returned
        output, maps included, is restored to the batch order after.

        Decision: only the outputs a method asks for are returned, because under DDP undoing the shuffle
        all-gathers each of them and a stage map is far larger than the 128-d embedding."""
        if not self.cfg.shuffle_bn:
            out = self.encoder_k(x)
            return {name: out[name] for name in self.key_outputs}
        x, unshuffle = batch_shuffle(x)
        out = self.encoder_k(x)
        return {name: batch_unshuffle(out[name], unshuffle) for name in self.key_outputs}

    def contrast(self, x_q: Tensor, x_k: Tensor) -> dict[str, Any]:
        """InfoNCE of queries from ``x_q`` against the keys of ``x_k`` and the queue (not yet enqueued).

        Returns ``{"loss", "logits", "q": query-encoder outputs (stage maps, ``pooled``, ``z``), "k": key-encoder
        outputs (:attr:`key_outputs`)}`` so plug-ins (SCD, DSC) reuse this forward instead of repeating it."""
        q = self.encoder_q(x_q)
        k = self.keys(x_k)
        loss, logits = info_nce(q["z"], k["z"], self.queue.queue.clone(), self.cfg.temperature)
        return {"loss": loss, "logits": logits, "q": q, "k": k}

    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        name_q, name_k = self.cfg.views
        x_q, x_k = batch["views"][name_q], batch["views"][name_k]
        out = self.contrast(x_q, x_k)
        loss, keys = out["loss"], [out["k"]["z"]]
        if self.cfg.symmetric:
            out2 = self.contrast(x_k, x_q)
            loss = (loss + out2["loss"]) / 2
            keys.append(out2["k"]["z"])
        for key in keys:
            self.queue.enqueue(key)
        acc = (out["logits"].argmax(dim=1) == 0).float().mean() * 100
        return {"loss": loss, "acc1": acc.detach(), "z_std": embedding_std(out["q"]["z"]),
                "embeddings": {"pooled": out["q"]["pooled"].detach()}}
