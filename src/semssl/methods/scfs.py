"""SCFS — Semantics-Consistent Feature Search (Song et al., ICCV 2023; docs/methods/scfs.md), a plug-in on
:class:`DINO`.

DINO's forward and loss are reused (:meth:`DINO.dino_forward`); SCFS adds, for every stage in ``stages``
(default layer2/3/4 — the paper's Res2/3/4, docs/methods/scfs.md §Model), a student and an EMA-teacher
:class:`~semssl.models.heads.SearchHead` (256-d L2-normalised output) with its own 256-d center, and the loss of
:mod:`semssl.losses.scfs`:

    L = L_DINO + sum over stages of  stage_weight * (global term + local-vs-searched term)      (stage_weight 1/2)

* local-vs-searched term: the query of local crop i is the pooled, L2-normalised, **detached** student stage map
  of that crop; it searches the teacher's stage map of global crop 0 (:func:`~semssl.losses.scfs.feature_search`:
  raw cosine attention x un-normalised map); the searched map goes through the teacher stage head; its output,
  sharpened with the teacher temperature but **not centred**, is the target of the student stage head's output
  of local crop i;
* global term (released code, not in the paper's equations): DINO's loss between the stage heads' outputs of
  the two global crops, centred with the stage center, which is updated from these teacher outputs only.

BatchNorm batches follow the released calls (docs/methods/scfs.md §Feature search): the teacher stage head runs
once on the G*B global maps and once on all searched maps; the student stage head once per resolution group (the
global crops, then each local view). Gradients reach only the student (backbone through its own stage maps, stage heads,
DINO head); the teacher, the search and the targets are computed without gradient.

Decisions (default = the released code, docs/methods/scfs.md §Code vs paper; the paper's reading as an option):

* ``search_views: first`` searches global crop 0 only (released); ``both`` searches both global crops (paper
  Eq. 9) and averages the local term over the two searches (the released code averages, rather than sums, every
  term).
* ``global_term: true`` keeps the released per-stage global-global term; ``false`` drops it (paper Eq. 10-11).
  The stage weight 1/2 stays on whichever terms remain.
* ``stages``: any subset of layer1..layer4 (Table 8: layer2; layer2+3; layer2+3+4).
* ``variant`` — the rows of Table 7:

  - ``scfs`` (default): as above;
  - ``dino``: no stage heads — exactly the ``dino`` method (SCFS's DINO* baseline is this recipe with the stage
    heads off);
  - ``dino_ml`` (DINO w ML): stage heads with the global-global term only (no search);
  - ``roi_crop`` (ROI Crop): the target of local crop i is the teacher stage map RoI-aligned
    (``torchvision.ops.roi_align``, ``roi_output_size`` x ``roi_output_size``, ``aligned=True`` for the
    continuous pixel coordinates of :mod:`semssl.data.views`) on the local crop's region inside global crop 0,
    found from the recorded ``batch["geometry"]`` (:func:`roi_regions`); a local crop that does not overlap
    global crop 0 uses its region in global crop 1, and one overlapping neither falls back to the searched map
    of global crop 0, RoI-aligned over the whole crop (so every target goes through the teacher head in one
    call). The RoI feature is mirrored when the local crop and the global crop it comes from differ in flip, so it
    is spatially aligned with the local crop. (The released code keeps unused RoIAlign modules with output 5 and
    ``aligned=False``; output 5 is kept.)
  - ``no_multicrop`` (SCFS w/o MC, G_d2G_f): no local crops; the query of global crop j (student) searches the
    teacher map of the other global crop ((j + 1) mod G) and the student stage output of crop j is trained on that
    target; the global term as configured. ``search_views`` does not apply.
  - ``dino_no_multicrop`` (DINO w/o MC): no stage heads, no local crops.

  The no-multi-crop variants read only ``views[0]``; a recipe should drop its local view (or the data pipeline
  makes crops nobody reads).

ViT backbones (SCFS Table 10: ViT-S/16, ViT-B/16; docs/methods/scfs.md §ViT). The released code has no ViT, so
this is a decision:

* the stages are token grids chosen by name, ``stages: [block4, block8, block12]`` of 12 blocks (a third, two
  thirds and the end of the network, as layer2/3/4 are the last three of a ResNet's four stages); a grid is the
  patch tokens after the final LayerNorm, ``[B, C, h, w]`` (:mod:`semssl.models.vit`);
* the search is unchanged on those grids: the query is the mean of the student's (detached) local-crop patch
  tokens, the keys are global crop 0's LayerNorm-ed token grid of the teacher (L2-normalised per token by the
  search), the value the same grid; the CLS token takes no part (it is the DINO head's input);
* the search heads become token-wise: :class:`~semssl.models.heads.SearchHead` with ``kernel_size=1``, so every
  layer before the pooling acts on each token alone (1x1 convolutions on the grid = per-token linears, BatchNorm
  over the batch and the tokens), the same residual-bottleneck, pooling and MLP output (256-d, L2-normalised).
  A 3x3 convolution would mix neighbouring patches, which a ViT's own layers do not do outside attention.

Why: each piece keeps what SCFS does on a ResNet (the same attention, the same pooled target through the same
kind of head, the same losses and BatchNorm call grouping), and only the ResNet-specific spatial kernel goes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from semssl.data.views import MIN_VALID_BOX_AREA, box_area, map_boxes
from semssl.errors import ConfigError
from semssl.losses import at_least_float32
from semssl.losses.dino import Center
from semssl.losses.scfs import feature_search, scfs_stage_loss
from semssl.methods import register
from semssl.methods.dino import DINO, DINOConfig
from semssl.models.backbones import STAGES
from semssl.models.heads import SearchHead
from semssl.models.vit import is_vit
from semssl.schedules import Progress

VARIANTS = ("scfs", "dino", "dino_ml", "roi_crop", "no_multicrop", "dino_no_multicrop")
_NO_STAGE_HEADS = ("dino", "dino_no_multicrop")
_NO_MULTICROP = ("no_multicrop", "dino_no_multicrop")


@dataclass
class SCFSConfig(DINOConfig):
    name: str = "scfs"
    variant: Literal["scfs", "dino", "dino_ml", "roi_crop", "no_multicrop", "dino_no_multicrop"] = "scfs"
    stages: tuple[str, ...] = ("layer2", "layer3", "layer4")
    search_views: Literal["first", "both"] = "first"
    global_term: bool = True
    stage_weight: float = 0.5
    stage_out_dim: int = 256
    stage_hidden_dim: int = 2048
    stage_mid_channels: int = 256
    roi_output_size: int = 5
    # SCFS's script: teacher temperature 0.04 -> 0.07 over 50 epochs (docs/methods/scfs.md §Schedules)
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int | float | str = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stages, str) or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: expected a list of distinct stage names, got {self.stages!r}")
        bad = [s for s in self.stages if s not in STAGES and not re.fullmatch(r"block[1-9][0-9]*", str(s))]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad} (valid: {list(STAGES)} for a ResNet, block1..block12 "
                              f"for a ViT)")
        if self.variant not in _NO_STAGE_HEADS and not self.stages:
            raise ConfigError(f"stages: variant '{self.variant}' needs at least one stage")
        two_globals = (self.variant == "no_multicrop" or self.search_views == "both"
                       or (self.global_term and self.variant not in _NO_STAGE_HEADS))
        if two_globals and self.global_crops < 2 and self.variant not in _NO_STAGE_HEADS:
            raise ConfigError(f"global_crops: {self.global_crops} global crop(s), but variant "
                              f"'{self.variant}' with global_term={self.global_term}, search_views="
                              f"'{self.search_views}' compares global crops with each other; use 2")
        if self.variant not in _NO_MULTICROP and self.variant not in ("dino", "dino_ml") and len(self.views) < 2:
            raise ConfigError(f"views: variant '{self.variant}' searches with local crops; give a local "
                              f"view after the global one (views: [global, local]) or use variant no_multicrop")
        if self.roi_output_size < 1:
            raise ConfigError(f"roi_output_size: must be >= 1, got {self.roi_output_size}")


def roi_regions(local_geometry: Tensor, global_geometry: Tensor, local_size: int, global_size: int,
                batch_size: int) -> tuple[Tensor, Tensor]:
    """Where each local crop lies inside the global crops of its image (ROI-crop variant;
    docs/methods/scfs.md §Variants).

    Args:
        local_geometry: ``[L*B, 5]`` recorded geometry (x1, y1, x2, y2, flip in source pixels) of the local crops,
            crop-major.
        global_geometry: ``[G*B, 5]`` the same for the G global crops.
        local_size, global_size: the crops' sides in pixels.
        batch_size: B.
    Returns:
        ``boxes`` ``[L*B, 4]``: the local crop's extent mapped into (and clipped to) the pixels of the global crop it
        is taken from; ``source`` ``[L*B]`` int64: that global crop (0, else 1, ... — the first one whose clipped
        box has area >= :data:`~semssl.data.views.MIN_VALID_BOX_AREA` px^2), or -1 when none overlaps (its box is
        then global crop 0's whole extent).
    """
    n = local_geometry.shape[0]
    if n % batch_size or global_geometry.shape[0] % batch_size:
        raise ValueError(f"geometry rows ({n}, {global_geometry.shape[0]}) are not multiples of the batch size "
                         f"{batch_size}")
    image = torch.arange(n, device=local_geometry.device) % batch_size
    extent = torch.tensor([[0.0, 0.0, float(local_size), float(local_size)]], device=local_geometry.device)
    boxes = torch.tensor([0.0, 0.0, float(global_size), float(global_size)],
                         device=local_geometry.device).repeat(n, 1)
    source = torch.full((n,), -1, dtype=torch.int64, device=local_geometry.device)
    for g in reversed(range(global_geometry.shape[0] // batch_size)):  # crop 0 last, so it wins
        mapped = map_boxes(extent.expand(n, 1, 4), local_geometry.float(),
                           global_geometry[g * batch_size + image].float(), global_size, src_size=local_size,
                           clip=True)[:, 0]
        inside = box_area(mapped) >= MIN_VALID_BOX_AREA
        boxes = torch.where(inside[:, None], mapped, boxes)
        source = torch.where(inside, torch.full_like(source, g), source)
    return boxes, source


@register("scfs")
class SCFS(DINO):
    config_class = SCFSConfig

    def __init__(self, cfg: SCFSConfig, model_cfg: Any) -> None:
        super().__init__(cfg, model_cfg)
        self.stages: tuple[str, ...] = () if cfg.variant in _NO_STAGE_HEADS else tuple(cfg.stages)
        channels = self.student.backbone.channels
        missing = [s for s in self.stages if s not in channels]
        if missing:
            hint = " (ViT: e.g. method.stages=[block4,block8,block12])" if is_vit(model_cfg.arch) else ""
            raise ConfigError(f"method.stages: {missing} are not stages of model.arch {model_cfg.arch} "
                              f"({', '.join(channels)}){hint}")
        # a ViT's search heads are token-wise: the 3x3 conv of the bottleneck becomes a 1x1 (module docstring)
        kernel = 1 if is_vit(model_cfg.arch) else 3
        self.student_heads = nn.ModuleDict({
            s: SearchHead(channels[s], cfg.stage_mid_channels, cfg.stage_hidden_dim, cfg.stage_out_dim,
                          kernel_size=kernel)
            for s in self.stages})
        if is_vit(model_cfg.arch):
            self.student.stages = self.teacher.stages = self.stages
        self.teacher_heads = copy.deepcopy(self.student_heads).requires_grad_(False)
        self.stage_centers = nn.ModuleDict({s: Center(cfg.stage_out_dim, cfg.center_momentum) for s in self.stages})

    # -- declarations ----------------------------------------------------------------------------------------
    @classmethod
    def required_views(cls, cfg: SCFSConfig) -> tuple[str, ...]:
        return tuple(cfg.views[:1]) if cfg.variant in _NO_MULTICROP else tuple(cfg.views)

    def local_views(self) -> tuple[str, ...]:
        return () if self.cfg.variant in _NO_MULTICROP else tuple(self.cfg.views[1:])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = super().momentum_pairs()
        if self.stages:
            pairs.append((self.student_heads, self.teacher_heads))
        return pairs

    # -- training --------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, progress: Progress) -> dict[str, Tensor]:
        out = self.dino_forward(batch, progress)
        if not self.stages:
            return {"loss": out["loss"], **out["logs"], "embeddings": out["embeddings"]}
        cfg, b = self.cfg, out["batch_size"]
        tau_s, tau_t = cfg.student_temp, out["teacher_temp"]
        s_global, s_locals, t_global = out["student"][0], out["student"][1:], out["teacher"]
        n_global = cfg.global_crops
        local_term = cfg.variant in ("scfs", "roi_crop", "no_multicrop")
        global_term = cfg.global_term or cfg.variant == "dino_ml"
        regions = self._roi_plan(batch, b) if cfg.variant == "roi_crop" else None
        logs = {**out["logs"], "loss_dino": out["loss"].detach()}
        total, glob_sum, local_sum = out["loss"], 0.0, 0.0
        for stage in self.stages:
            head_s, head_t = self.student_heads[stage], self.teacher_heads[stage]
            z_sg = head_s(s_global[stage]) if (global_term or cfg.variant == "no_multicrop") else None
            z_tg = None
            if global_term:
                with torch.no_grad():
                    z_tg = head_t(t_global[stage])
            z_sl = targets = None
            if local_term:
                with torch.no_grad():
                    maps = self._target_maps(stage, s_global, s_locals, t_global, b, regions)
                    targets = head_t(maps)
                if cfg.variant == "no_multicrop":
                    z_sl = z_sg
                    targets = targets.view(1, n_global, b, -1)
                else:
                    z_sl = torch.cat([head_s(o[stage]) for o in s_locals])
                    targets = targets.view(len(self._searched_crops()), -1, b, targets.shape[-1])
                z_sl = z_sl.view(-1, b, z_sl.shape[-1])
            res = scfs_stage_loss(
                z_sg.view(n_global, b, -1) if global_term else None,
                z_tg.view(n_global, b, -1) if z_tg is not None else None,
                self.stage_centers[stage].center if global_term else None,
                z_sl, targets, tau_s, tau_t, weight=cfg.stage_weight)
            if z_tg is not None:
                self.stage_centers[stage].update(z_tg)
            total = total + res["loss"]
            glob_sum, local_sum = glob_sum + res["global"], local_sum + res["local"]
            logs[f"loss_{stage}"] = res["loss"].detach()
        # unweighted sums over the stages of the two terms (0 for a term the variant does not have)
        logs["loss_stage_global"], logs["loss_search"] = torch.as_tensor(glob_sum), torch.as_tensor(local_sum)
        if regions is not None:
            source = regions["source"]
            logs["roi_second_crop"] = (source > 0).float().mean()
            logs["roi_fallback"] = (source < 0).float().mean()
        return {"loss": total, **logs, "embeddings": out["embeddings"]}

    def _searched_crops(self) -> tuple[int, ...]:
        """Global crops the local crops search: crop 0 (released) or all (``search_views: both``, Eq. 9)."""
        return tuple(range(self.cfg.global_crops)) if self.cfg.search_views == "both" else (0,)

    @torch.no_grad()
    def _target_maps(self, stage: str, s_global: dict, s_locals: list[dict], t_global: dict, b: int,
                     regions: dict[str, Any] | None) -> Tensor:
        """The maps the teacher stage head turns into targets, crop-major: ``[S*L*B, C, H, W]`` searched maps
        (S searched global crops), ``[L*B, C, r, r]`` RoI crops, or ``[G*B, C, H, W]`` (no multi-crop)."""
        t_map = t_global[stage]
        crop = lambda g: t_map[g * b:(g + 1) * b]
        if self.cfg.variant == "no_multicrop":
            n_global = self.cfg.global_crops
            queries = s_global[stage].detach().mean(dim=(2, 3))
            return torch.cat([feature_search(queries[j * b:(j + 1) * b], crop((j + 1) % n_global))
                              for j in range(n_global)])
        queries = torch.cat([o[stage].detach().mean(dim=(2, 3)) for o in s_locals])
        if self.cfg.variant == "roi_crop":
            assert regions is not None
            return self._roi_maps(queries, t_map, b, regions)
        return torch.cat([feature_search(queries, crop(g)) for g in self._searched_crops()])

    # -- ROI-crop variant ------------------------------------------------------------------------------------
    def _roi_plan(self, batch: dict, b: int) -> dict[str, Any]:
        """Per local crop (crop-major over the local views): ``boxes`` ``[L*B, 4]`` in global-crop pixels,
        ``source`` ``[L*B]`` (global crop, or -1 = fall back to search), ``mirror`` ``[L*B]`` (the local crop and
        its source crop differ in flip), and the global crops' side ``global_size``."""
        geometry = batch.get("geometry")
        names = self.local_views()
        global_name = self.cfg.views[0]
        if not isinstance(geometry, dict) or any(n not in geometry for n in (global_name, *names)):
            raise ConfigError(f"method.variant 'roi_crop' needs batch['geometry'] for views "
                              f"{[global_name, *names]} (recorded by semssl.data.views)")
        global_size = batch["views"][global_name].shape[-1]
        found = [roi_regions(geometry[n], geometry[global_name], batch["views"][n].shape[-1], global_size, b)
                 for n in names]
        boxes, source = torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])
        image = torch.arange(source.shape[0], device=source.device) % b
        local_flip = torch.cat([geometry[n][:, 4] for n in names]) > 0.5
        global_flip = geometry[global_name][:, 4].to(source.device)[source.clamp_min(0) * b + image] > 0.5
        return {"boxes": boxes, "source": source, "mirror": local_flip.to(source.device) != global_flip,
                "global_size": global_size}

    def _roi_maps(self, queries: Tensor, t_map: Tensor, b: int, plan: dict[str, Any]) -> Tensor:
        """RoIAlign of each local crop's region in its global crop's teacher map (``roi_output_size`` square);
        a fallback crop gets the searched map of global crop 0, RoI-aligned over the whole crop. Mirrored where
        the flips differ."""
        boxes, source = plan["boxes"].to(t_map.device), plan["source"].to(t_map.device)
        n = boxes.shape[0]
        image = torch.arange(n, device=t_map.device) % b
        inputs, index = t_map, source.clamp_min(0) * b + image
        fallback = (source < 0).nonzero().flatten()
        if fallback.numel():
            searched = feature_search(queries[fallback], t_map[:b][image[fallback]])
            inputs = torch.cat([t_map, searched])
            index = index.clone()
            index[fallback] = t_map.shape[0] + torch.arange(fallback.numel(), device=t_map.device)
        inputs = at_least_float32(inputs)  # RoIAlign in float32 at least, float64 in a float64 run
        rois = torch.cat([index[:, None].to(inputs.dtype), boxes.to(inputs.dtype)], dim=1)
        out = roi_align(inputs, rois, output_size=self.cfg.roi_output_size,
                        spatial_scale=t_map.shape[-1] / plan["global_size"], sampling_ratio=-1,
                        aligned=True).to(t_map.dtype)
        mirror = plan["mirror"].to(t_map.device)[:, None, None, None]
        return torch.where(mirror, out.flip(-1), out)
