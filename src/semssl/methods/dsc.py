"""DSC — Dense Semantic Contrast (Li et al., ACM MM'21; paper 002; docs/methods/dsc.md §Semantic losses;
docs/design.md §DSC).

DenseCL (:class:`~semssl.methods.densecl.DenseCL`, reused as is: global MoCo-v2 term, dense projections,
argmax correspondence, dense InfoNCE with the pooled dense queue) plus one semantic term (Eq. 10)::

    L = w_ins * L_ins + w_pix * L_pix + w_sem * L_sem          (weights 1, 1, 1 by default)

No code was released; the paper's equations are the default and every open point is a decision written here.
``semantic`` picks L_sem (exactly one is active, as in the paper):

* ``neighbor`` — L_nei (Eq. 5): the dense InfoNCE with each query pixel's top-``num_neighbors`` (N_i = 1)
  most similar *other* pixels of the same image and view added to numerator and denominator. Decisions: the
  ranking uses the correspondence's feature space (``match_on``: backbone ``layer4`` by default); the
  neighbours' embeddings are the query view's dense projections, treated as constants like the key positives;
  L_nei is added to L_pix as Eq. 10 reads (``w_pix: 0`` makes it replace L_pix instead).
* ``triplet`` — L_tri (Eq. 6) with margin 0.3 and the same neighbours, as printed by default
  (``triplet_sign: printed``, reproducing Table 4's drop); ``triplet_sign: corrected`` swaps the similarities.
* ``kmeans`` — L_KM (Eq. 7, DSC-KM): ``num_clusters`` (K = 100) spherical k-means on the L2-normalised dense
  projections of *all* pixels of both views of the batch together (across images and ranks;
  ``cluster_on: backbone`` clusters the L2-normalised ``layer4`` features instead), ``kmeans_iters`` Lloyd
  iterations per step; then centroids per view (normalised means of each view's members, differentiable for
  the query view, constants for the key view) and an InfoNCE (tau ``centroid_temperature`` 0.2) of each
  query-view centroid against the key-view centroids of the clusters present in both views. Decisions:
  ``kmeans_warm_start`` (default) starts each step from the previous step's centroids (a buffer, identical on
  every rank; online k-means keeps its clusters from step to step), initialised at the first step from random
  pixels of the batch; an empty cluster keeps its centroid.
* ``prototypes`` — L_PM (Eqs. 8-9, DSC-PM), SwAV-style: ``num_prototypes`` (K = 150) L2-normalised prototypes
  (normalised before every step), Sinkhorn codes (epsilon 0.05, 3 iterations, over the whole global batch)
  of each view's pixel embeddings, swapped prediction with softmax temperature 0.1 over the **matched pixel
  pairs** (query pixel i and its key pixel c_i). The key view's embeddings come from the momentum encoder
  (Fig. 2), so ``l(v^b, q^a)`` trains the prototypes only. Prototypes are frozen for the first
  ``freeze_prototypes_iters`` iterations (SwAV: 313).
* ``ce`` — the "CE" variant of Table 4: the same prototypes and pairs, with the hard argmax code of one view
  as the target of the other view's softmax (no Sinkhorn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semssl.errors import ConfigError
from semssl.losses.dense import flatten_map, gather_positions
from semssl.losses.dense_semantic import (
    centroid_info_nce,
    hard_codes,
    neighbor_info_nce,
    neighbor_triplet,
    same_view_neighbors,
    swapped_prediction,
)
from semssl.losses.kmeans import cluster_means, kmeans_init, spherical_kmeans
from semssl.losses.sinkhorn import sinkhorn
from semssl.methods import register
from semssl.methods.densecl import DenseCL, DenseCLConfig
from semssl.models.heads import Prototypes

STRATEGIES = ("neighbor", "triplet", "ce", "kmeans", "prototypes")


@dataclass
class DSCConfig(DenseCLConfig):
    name: str = "dsc"
    semantic: Literal["neighbor", "triplet", "ce", "kmeans", "prototypes"] = "prototypes"
    w_ins: float = 1.0  # Eq. 10: unweighted sum
    w_pix: float = 1.0
    w_sem: float = 1.0
    # neighbor / triplet
    num_neighbors: int = 1
    triplet_margin: float = 0.3
    triplet_sign: Literal["printed", "corrected"] = "printed"
    # kmeans
    num_clusters: int = 100
    kmeans_iters: int = 3
    kmeans_warm_start: bool = True
    cluster_on: Literal["projection", "backbone"] = "projection"
    centroid_temperature: float = 0.2
    # prototypes / ce
    num_prototypes: int = 150
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    proto_temperature: float = 0.1
    freeze_prototypes_iters: int = 313


@register("dsc")
class DSC(DenseCL):
    config_class = DSCConfig

    def __init__(self, cfg: DSCConfig, model_cfg: Any) -> None:
        _check(cfg)
        super().__init__(cfg, model_cfg)
        if cfg.semantic in ("prototypes", "ce"):
            self.prototypes = Prototypes(cfg.dense_dim, cfg.num_prototypes)
        if cfg.semantic == "kmeans":
            dim = cfg.dense_dim if cfg.cluster_on == "projection" else self.encoder_q.backbone.dim
            self.register_buffer("centroids", F.normalize(torch.randn(cfg.num_clusters, dim), dim=1))
            self.register_buffer("centroids_ready", torch.zeros((), dtype=torch.bool))

    def required_key_outputs(self) -> tuple[str, ...]:
        outputs = super().required_key_outputs()
        if self.cfg.semantic == "kmeans" and self.cfg.cluster_on == "backbone" and "layer4" not in outputs:
            outputs = outputs + ("layer4",)
        return outputs

    # -- the semantic term ---------------------------------------------------------------------------------
    def objective(self, out: dict[str, Any], progress: Any) -> dict[str, Tensor]:
        terms = super().objective(out, progress)  # w_ins * L_ins + w_pix * L_pix
        semantic = getattr(self, f"_loss_{self.cfg.semantic}")(out)
        loss_sem = semantic.pop("loss_sem")
        terms["loss"] = terms["loss"] + self.cfg.w_sem * loss_sem
        terms["loss_sem"] = loss_sem.detach()
        terms.update(semantic)  # the strategy's monitors
        return terms

    def _neighbors(self, out: dict[str, Any]) -> Tensor:
        """``[B*S, N, D]``: the dense embeddings (constants) of each query pixel's same-view neighbours."""
        q = out["q"]
        space = flatten_map(q["layer4"]) if self.cfg.match_on == "backbone" else q["dense"]
        idx = same_view_neighbors(space.detach(), self.cfg.num_neighbors)
        return gather_positions(q["dense"].detach(), idx).flatten(0, 1)

    def _loss_neighbor(self, out: dict[str, Any]) -> dict[str, Tensor]:
        d = self.cfg.dense_dim
        loss = neighbor_info_nce(out["q"]["dense"].reshape(-1, d), out["k_matched"].reshape(-1, d),
                                 self._neighbors(out), self.queue2.queue.clone(), self.cfg.temperature)
        return {"loss_sem": loss}

    def _loss_triplet(self, out: dict[str, Any]) -> dict[str, Tensor]:
        d = self.cfg.dense_dim
        loss = neighbor_triplet(out["q"]["dense"].reshape(-1, d), out["k_matched"].reshape(-1, d),
                                self._neighbors(out), self.cfg.triplet_margin, self.cfg.triplet_sign)
        return {"loss_sem": loss}

    def _cluster_space(self, enc_out: dict[str, Tensor]) -> Tensor:
        """``[B*S, D_c]`` L2-normalised features k-means runs on (dense projections or ``layer4``)."""
        if self.cfg.cluster_on == "backbone":
            return F.normalize(flatten_map(enc_out["layer4"]).reshape(-1, self.encoder_q.backbone.dim), dim=1)
        return enc_out["dense"].reshape(-1, self.cfg.dense_dim)

    def _loss_kmeans(self, out: dict[str, Any]) -> dict[str, Tensor]:
        k = self.cfg.num_clusters
        xa, xb = self._cluster_space(out["q"]).detach(), self._cluster_space(out["k"]).detach()
        points = torch.cat([xa, xb])
        with torch.no_grad():
            if not (self.cfg.kmeans_warm_start and bool(self.centroids_ready)):
                self.centroids.copy_(kmeans_init(points, k))
            centroids, assign = spherical_kmeans(points, self.centroids, self.cfg.kmeans_iters)
            self.centroids.copy_(centroids)
            self.centroids_ready.fill_(True)
        assign_a, assign_b = assign[: xa.shape[0]], assign[xa.shape[0]:]
        d = self.cfg.dense_dim
        e_a, n_a = cluster_means(out["q"]["dense"].reshape(-1, d), assign_a, k)
        e_b, n_b = cluster_means(out["k"]["dense"].reshape(-1, d).detach(), assign_b, k)
        valid = (n_a > 0) & (n_b > 0)
        loss = centroid_info_nce(e_a, e_b, valid, self.cfg.centroid_temperature)
        return {"loss_sem": loss, "clusters": valid.sum().float()}

    def _prototype_scores(self, out: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Scores ``[B*S, K]`` of the matched pixel pairs: query pixel i (online) and key pixel c_i (momentum)."""
        self.prototypes.normalize_()
        d = self.cfg.dense_dim
        return (self.prototypes(out["q"]["dense"].reshape(-1, d)),
                self.prototypes(out["k_matched"].reshape(-1, d).detach()))

    def _loss_prototypes(self, out: dict[str, Any]) -> dict[str, Tensor]:
        s_a, s_b = self._prototype_scores(out)
        eps, iters = self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iters
        codes_a, codes_b = sinkhorn(s_a.detach(), eps, iters), sinkhorn(s_b.detach(), eps, iters)
        loss = swapped_prediction(s_a, s_b, codes_a, codes_b, self.cfg.proto_temperature)
        return {"loss_sem": loss, **_code_stats(codes_a)}

    def _loss_ce(self, out: dict[str, Any]) -> dict[str, Tensor]:
        s_a, s_b = self._prototype_scores(out)
        codes_a, codes_b = hard_codes(s_a.detach()), hard_codes(s_b.detach())
        loss = swapped_prediction(s_a, s_b, codes_a, codes_b, self.cfg.proto_temperature)
        return {"loss_sem": loss, **_code_stats(codes_a)}

    def on_after_backward(self, progress: Any) -> None:
        """SwAV's frozen prototypes: no update during the first ``freeze_prototypes_iters`` iterations."""
        if hasattr(self, "prototypes") and progress.step < self.cfg.freeze_prototypes_iters:
            for p in self.prototypes.parameters():
                p.grad = None

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def cluster_map(self, images: Tensor, branch: str | None = None) -> Tensor | None:
        """``[B, h, w]`` long: each ``layer4`` position's k-means cluster (nearest current centroid) or
        highest-scoring prototype, for the cluster-map figure; None for the neighbour/triplet strategies."""
        if self.cfg.semantic not in ("kmeans", "prototypes", "ce"):
            return None
        encoder = self.encoder_for(branch)
        fmap = encoder.backbone(images, stages=("layer4",))["layer4"]
        b, _, h, w = fmap.shape
        dense = F.normalize(flatten_map(encoder.dense_projector(fmap)), dim=2).reshape(b * h * w, -1)
        if self.cfg.semantic == "kmeans":
            space = {"layer4": fmap, "dense": dense.reshape(b, h * w, -1)}
            assign = (self._cluster_space(space) @ self.centroids.t()).argmax(dim=1)
        else:
            assign = self.prototypes.scores(dense).argmax(dim=1)
        return assign.reshape(b, h, w)


@torch.no_grad()
def _code_stats(codes: Tensor) -> dict[str, Tensor]:
    """Collapse monitor of prototype codes: how many prototypes win at least one pixel (``protos_used``)."""
    return {"protos_used": torch.bincount(codes.argmax(dim=1), minlength=codes.shape[1]).gt(0).sum().float()}


def _check(cfg: DSCConfig) -> None:
    """Values the dataclass types cannot check, each a ConfigError naming the key."""
    positive = {"num_neighbors": cfg.num_neighbors, "num_clusters": cfg.num_clusters,
                "num_prototypes": cfg.num_prototypes, "sinkhorn_iters": cfg.sinkhorn_iters,
                "centroid_temperature": cfg.centroid_temperature, "proto_temperature": cfg.proto_temperature,
                "sinkhorn_epsilon": cfg.sinkhorn_epsilon}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"method.{key}: must be > 0, got {value}")
    if cfg.kmeans_iters < 0:
        raise ConfigError(f"method.kmeans_iters: must be >= 0, got {cfg.kmeans_iters}")
    if cfg.semantic not in STRATEGIES:
        raise ConfigError(f"method.semantic: '{cfg.semantic}' is not one of {list(STRATEGIES)}")
