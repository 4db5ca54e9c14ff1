"""D3SSL — de-coupling and de-positioning dense SSL (Qiu et al. 2023, paper 003 §4), on SoCo
(docs/methods/d3ssl.md §Learning modules).

No official code exists; the paper's equations are the default (docs/design.md §D3SSL).  A plug-in of
:class:`~semssl.methods.soco.SoCo`: the same region encoder (RoIAlign 14x14 on C4 -> C5 -> pooling -> projector,
Eq. 1), the same EMA teacher, the same matching of slots by proposal id and the same two losses; it changes
which views are compared.

Views (the recipe's ``data`` section):

* ``x1`` — the whole image resized (224), its boxes jittered with RBJ (``box_jitter_p: 0.5``,
  ``box_jitter_grow: false``: docs/design.md §D3SSL, RBJ on view-1 boxes);
* ``x2`` — RandomResizedCrop scale [0.4, 1] (the paper; SoCo's code 0.6), seen un-augmented by the teacher;
* ``x2s`` — x2 at 112 px (``geometry_from: x2``), its RoIs 7x7 (``small_views``);
* de-coupling views ``x^1 = PRM o PRC(x1)``, ``x^2s = PRM o PRC(x2s)`` (Eq. 2): decision — made in the data
  pipeline by the batch transforms ``prc`` and ``prm`` on ``[x1, x2s]`` (:mod:`semssl.data.regions`), so the
  batch's ``x1``/``x2s`` *are* x^1/x^2s (the raw x1 is not used by D3SSL); the de-positioning view ``x3``
  (Eqs. 6-8) by the batch transform ``depositioning`` (source ``x2``), listed first.  Each augmentation is
  switched in the recipe (Table 5: ``prc``/``prm`` entries, ``box_jitter_p``; SoCo's cutout ``box_cutout_p``).

Embeddings (Eq. 3, 8): ``z_s1 = f_q(x^1)``, ``z_s2 = f_q(x^2s)``, ``z_s3 = f_q(x3, b^)`` (student = online
network); ``z_t1 = f_k(x^1)``, ``z_t2 = f_k(x2)`` (teacher = EMA network).  Losses over slots matched by proposal
id, each term averaged over the boxes of an image (Eq. 10) and over images:

* de-coupling (Eq. 4): ``L_dc = NCE(z_s1, z_t2) + NCE(z_s2, z_t1)``;
* de-positioning (Eq. 9): ``L_dp = NCE(z_s3, z_t2) + NCE(z_s3, z_t1)``;
* ``L = L_dc + L_dp`` (Eq. 10); ``decoupling`` / ``depositioning`` switch each module (Table 7: ``w/o L_dp``).

``loss: nce`` (default, the paper): InfoNCE with a region memory bank, tau 0.2, L2-normalised projector
outputs, no predictor, teacher embeddings of both teacher views enqueued after each step, ``bank_size`` per
recipe (docs/design.md §D3SSL); ``loss: byol`` uses SoCo's regression (with its predictor) for the same pairs.  Unknown
(the paper's supplement is unavailable): learning rate, batch size, tau, bank size, EMA schedule — SoCo's
settings are the recipes' defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import Tensor

from semssl.errors import ConfigError, SampleError
from semssl.methods import register
from semssl.methods.soco import SoCo, SoCoConfig, embedding_std, region_embeddings


@dataclass
class D3SSLConfig(SoCoConfig):
    name: str = "d3ssl"
    views: tuple[str, str] = ("x1", "x2")  # (x^1: whole image after PRM o PRC, x2: the crop the teacher sees)
    small_view: str = "x2s"  # x^2s: the 112 px copy of x2 after PRM o PRC
    composite_view: str = "x3"  # made by the `depositioning` batch transform
    small_views: tuple[str, ...] = ("x2s",)
    decoupling: bool = True  # L_dc (Eq. 4)
    depositioning: bool = True  # L_dp (Eq. 9)
    loss: Literal["byol", "nce"] = "nce"
    predictor: Optional[bool] = None  # None: off with nce (paper), on with byol (SoCo)
    temperature: float = 0.2
    bank_size: int = 65536


@register("d3ssl")
class D3SSL(SoCo):
    config_class = D3SSLConfig

    def __init__(self, cfg: D3SSLConfig, model_cfg: Any) -> None:
        if not (cfg.decoupling or cfg.depositioning):
            raise ConfigError("method.decoupling and method.depositioning are both false: D3SSL needs at least one "
                              "of its two modules")
        super().__init__(cfg, model_cfg)

    @classmethod
    def required_views(cls, cfg: D3SSLConfig) -> tuple[str, ...]:
        """``x1``, ``x2`` and, with de-coupling, ``x2s``; ``x3`` is made by a batch transform after collation, so
        it is not in ``data.views`` and is checked on the first batch instead."""
        return tuple(cfg.views) + ((cfg.small_view,) if cfg.decoupling else ())

    def training_step(self, batch: dict, progress: Any) -> dict[str, Tensor]:
        cfg = self.cfg
        v1, v2 = cfg.views
        if cfg.depositioning and cfg.composite_view not in batch["views"]:
            raise SampleError(
                f"d3ssl: method.depositioning is on but the batch has no view {cfg.composite_view!r} (views: "
                f"{sorted(batch['views'])}); add the batch transform {{name: depositioning, source: {v2}, out: "
                f"{cfg.composite_view}}} to data.batch_transforms, or set method.depositioning=false")
        t1, t2 = self.teacher(batch, v1), self.teacher(batch, v2)
        loss, out = 0.0, {}
        acc = []
        if cfg.decoupling:
            s1, s2 = self.student(batch, v1), self.student(batch, cfg.small_view)
            l1, g1 = self.pair_loss(s1, t2)
            l2, g2 = self.pair_loss(s2, t1)
            out["loss_dc"] = (l1 + l2).detach()
            loss = loss + l1 + l2
            acc += [g1.get("acc1"), g2.get("acc1")]
            out["z_std"], out["pairs"] = embedding_std(s1["z"], s1["valid"]), g1["pairs"]
            out["embeddings"] = {"region": region_embeddings(s1)}
        if cfg.depositioning:
            s3 = self.student(batch, cfg.composite_view)
            l3, g3 = self.pair_loss(s3, t2)
            l4, g4 = self.pair_loss(s3, t1)
            out["loss_dp"] = (l3 + l4).detach()
            loss = loss + l3 + l4
            acc += [g3.get("acc1"), g4.get("acc1")]
            out.setdefault("z_std", embedding_std(s3["z"], s3["valid"]))
            out.setdefault("pairs", g3["pairs"])
            out.setdefault("embeddings", {"region": region_embeddings(s3)})
        self.enqueue(t1, t2)
        acc = [a for a in acc if a is not None]
        if acc:
            out["acc1"] = sum(acc).detach() / len(acc)
        return {"loss": loss, **out}
