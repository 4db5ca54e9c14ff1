"""DenseCL (Wang et al. 2021) as released (docs/methods/densecl.md §Model) — the base DSC extends.

MoCo-v2 (:class:`~semssl.methods.mocov2.MoCoV2`: query encoder + EMA key encoder, shuffle-BN, global projector
``d -> d -> 128``, InfoNCE against a queue, tau 0.2) plus a dense branch:

* **dense neck** on the last stage map (``layer4``): ``conv1x1(C -> C) -> ReLU -> conv1x1(C -> 128)``, no BN
  (:class:`~semssl.models.heads.ConvMLP`; 2048-2048-128 on ResNet-50), every position L2-normalised;
* **correspondence**: for each query position, the key position of the same image with the highest cosine
  between the L2-normalised *backbone* ``layer4`` features of the two views (``match_on: backbone``, the code;
  ``match_on: projection`` = the DSC paper's Eq. 4 on the dense projections);
* **dense InfoNCE** (tau 0.2) of every query position against its matched key position, with negatives from a
  second queue, ``queue2``, holding **one vector per key image**: the L2-normalised global average of the key's
  dense projection map (not individual pixels);
* **loss** ``w_ins * L_global + w_pix * L_dense`` with ``w_ins = 1 - lambda = 0.5``, ``w_pix = lambda = 0.5``
  (DenseCL's lambda 0.5; its warm-up hook is not enabled in the released configs, so there is none);
* after each step the global keys go to ``queue`` and the pooled dense keys to ``queue2`` (both all-gathered
  under DDP by :class:`~semssl.losses.infonce.MemoryQueue`). Not symmetrised: query = view ``q``, key = ``k``.

Key-encoder outputs come back in batch order after shuffle-BN through ``MoCoV2.keys`` (``key_outputs``).
Evaluation: ``features(kind="dense")`` returns the normalised dense projection map ``[B, 128, h, w]`` besides
the backbone kinds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.losses.dense import (
    dense_correspondence,
    dense_info_nce,
    flatten_map,
    gather_positions,
)
from semssl.losses.infonce import MemoryQueue
from semssl.methods import register
from semssl.methods.base import Method
from semssl.methods.mocov2 import Encoder, MoCoV2, MoCoV2Config
from semssl.models.backbones import ResNetBackbone
from semssl.models.heads import ConvMLP


@dataclass
class DenseCLConfig(MoCoV2Config):
    name: str = "densecl"
    dense_dim: int = 128
    dense_hidden_dim: int | None = None  # None: the backbone width (2048 on ResNet-50, as released)
    dense_queue_size: int | None = None  # None: queue_size (65536 x 2 as released)
    w_ins: float = 0.5  # 1 - lambda
    w_pix: float = 0.5  # lambda
    match_on: Literal["backbone", "projection"] = "backbone"


class DenseEncoder(Encoder):
    """MoCo-v2's encoder plus the dense neck: adds ``dense`` ``[B, S, D]`` (every position of the projected
    ``layer4`` map, L2-normalised, row-major) and ``dense_pooled`` ``[B, D]`` (the L2-normalised global average
    of the projected map — what ``queue2`` stores)."""

    def __init__(self, backbone: ResNetBackbone, projector: torch.nn.Module, dense_projector: torch.nn.Module) -> None:
        super().__init__(backbone, projector)
        self.dense_projector = dense_projector

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = super().forward(x)
        d = self.dense_projector(out["layer4"])
        out["dense"] = F.normalize(flatten_map(d), dim=2)
        out["dense_pooled"] = F.normalize(d.mean(dim=(2, 3)), dim=1)
        return out


@register("densecl")
class DenseCL(MoCoV2):
    config_class = DenseCLConfig
    feature_kinds: ClassVar[tuple[str, ...]] = (*Method.feature_kinds, "dense")

    def __init__(self, cfg: DenseCLConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        backbone = self.encoder_q.backbone
        dense = ConvMLP(backbone.dim, cfg.dense_hidden_dim or backbone.dim, cfg.dense_dim)
        self.encoder_q = DenseEncoder(backbone, self.encoder_q.projector, dense)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.queue2 = MemoryQueue(cfg.dense_queue_size or cfg.queue_size, cfg.dense_dim)
        self.key_outputs = self.required_key_outputs()

    def required_key_outputs(self) -> tuple[str, ...]:
        """Key-encoder outputs this method reads (stage maps only where a feature space needs them: under DDP
        each one is all-gathered to undo the shuffle)."""
        outputs = ("z", "dense", "dense_pooled")
        return outputs + ("layer4",) if self.cfg.match_on == "backbone" else outputs

    # -- forward -------------------------------------------------------------------------------------------
    def dense_contrast(self, x_q: Tensor, x_k: Tensor) -> dict[str, Any]:
        """MoCo-v2's global contrast (``MoCoV2.contrast``) plus the dense one, queues not yet updated.

        Returns the ``contrast`` dict (``loss`` = global InfoNCE, ``logits``, ``q``, ``k``) with ``loss_dense``,
        ``logits_dense`` ``[B*S, 1 + K2]``, ``match`` ``[B, S_q]`` (key position matched to each query
        position) and ``k_matched`` ``[B, S_q, D]`` (the key's dense embeddings at those positions)."""
        out = self.contrast(x_q, x_k)
        q, k = out["q"], out["k"]
        if self.cfg.match_on == "backbone":
            match = dense_correspondence(flatten_map(q["layer4"].detach()), flatten_map(k["layer4"]))
        else:
            match = dense_correspondence(q["dense"].detach(), k["dense"])
        k_matched = gather_positions(k["dense"], match)
        loss, logits = dense_info_nce(q["dense"], k_matched, self.queue2.queue.clone(), self.cfg.temperature)
        out.update(loss_dense=loss, logits_dense=logits, match=match, k_matched=k_matched)
        return out

    def objective(self, out: dict[str, Any], progress: Any) -> dict[str, Tensor]:
        """The loss of one direction: ``w_ins * L_global + w_pix * L_dense`` and its terms."""
        loss = self.cfg.w_ins * out["loss"] + self.cfg.w_pix * out["loss_dense"]
        return {"loss": loss, "loss_ins": out["loss"].detach(), "loss_pix": out["loss_dense"].detach()}

    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        name_q, name_k = self.cfg.views
        x_q, x_k = batch["views"][name_q], batch["views"][name_k]
        outs = [self.dense_contrast(x_q, x_k)]
        if self.cfg.symmetric:
            outs.append(self.dense_contrast(x_k, x_q))
        terms = [self.objective(out, progress) for out in outs]
        logs = {name: sum(t[name] for t in terms) / len(terms) for name in terms[0]}
        for out in outs:  # after every loss is computed: the queues used above hold only past keys
            self.queue.enqueue(out["k"]["z"])
            self.queue2.enqueue(out["k"]["dense_pooled"])
        first = outs[0]
        with torch.no_grad():
            logs["acc1"] = (first["logits"].argmax(dim=1) == 0).float().mean() * 100
            logs["acc_dense"] = (first["logits_dense"].argmax(dim=1) == 0).float().mean() * 100
            logs["std_z"] = embedding_std(first["q"]["z"])
            logs["std_dense"] = embedding_std(first["q"]["dense"].reshape(-1, self.cfg.dense_dim))
            logs["embeddings"] = {"pooled": first["q"]["pooled"].detach(), "dense": first["q"]["layer4"].detach()}
        return logs

    # -- evaluation ----------------------------------------------------------------------------------------
    def encoder_for(self, branch: str | None = None) -> DenseEncoder:
        return self.encoder_k if self.resolve_branch(branch) == "teacher" else self.encoder_q

    @torch.no_grad()
    def features(self, images: Tensor, branch: str | None = None, kind: str = "pooled") -> Tensor:
        """The backbone kinds (``pooled``, ``layer1..4``) or ``dense``: the L2-normalised dense projection map
        ``[B, D, h, w]`` of the branch's encoder."""
        if kind == "dense":
            encoder = self.encoder_for(branch)
            fmap = encoder.backbone(images, stages=("layer4",))["layer4"]
            return F.normalize(encoder.dense_projector(fmap), dim=1)
        return super().features(images, branch, kind)


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Collapse monitor: the per-dimension standard deviation of L2-normalised embeddings ``[N, D]``, averaged
    and scaled by sqrt(D) — about 1 for embeddings spread over the sphere, 0 when they have collapsed."""
    if z.shape[0] < 2:
        return z.new_zeros(())
    return z.float().std(dim=0).mean() * math.sqrt(z.shape[1])
