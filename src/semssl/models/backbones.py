"""torchvision ResNets that return named stage maps and the pooled vector.

``ResNetBackbone(x)`` returns ``{"layer1": ..., "layer4": ..., "pooled": [B, C]}``. Each stage is callable on its
own (``backbone.stage("layer4")(layer3_map)``) so region methods (SoCo, D3SSL) can run the last stage on
RoI-aligned features, and heads read their widths from ``backbone.channels``. The parameter names are those
of ``torchvision.models.resnetXX`` (without ``fc``), so a trained backbone exports to a plain torchvision
``state_dict`` and a torchvision ``state_dict`` loads into it.

``width`` is the ResNet base width (``model.width``): the stem has ``width`` channels and stage i has
``width * 2**i`` planes (times 4 for ResNet-50's bottlenecks), so 64 is torchvision's network and 32 / 16 are
narrower ones for small runs. Every channel count follows it (``channels``, ``dim``, and the heads built on them).

Vision Transformers (``model.arch: vit_tiny | vit_small | vit_base``) follow the same contract with token grids
``block1..block12`` in place of the stage maps: :mod:`semssl.models.vit`; :func:`build_backbone` builds either.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from semssl.errors import ConfigError

STAGES = ("layer1", "layer2", "layer3", "layer4")

#: block type and blocks per stage of each supported depth (torchvision's resnet18/34/50/101)
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed over ``num_splits`` sub-batches.

    The single-process stand-in for shuffle-BN (as in the MoCo CIFAR-10 demo): with keys shuffled across the
    sub-batches, a query and its key are normalised with different statistics, so BatchNorm cannot leak which
    key matches. Running statistics are the mean over the splits; evaluation is a plain BatchNorm, and the
    parameter/buffer names are those of ``nn.BatchNorm2d``. Split k holds samples k, k+s, k+2s, ... (the
    ``view(-1, C*s, H, W)`` layout of the MoCo demo).
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"SplitBatchNorm2d: batch of {n} is not divisible by bn_splits={self.num_splits}")
        c, s = self.num_features, self.num_splits
        mean = self.running_mean.repeat(s)
        var = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(n // s, c * s, *x.shape[2:]), mean, var, self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum if self.momentum is not None else 0.1, self.eps,
        )
        # Decision: return the regrouped output as a fresh tensor for autograd (``_unsafe_view``), not as a
        # view of the batch-norm result. torchvision's ResNet applies ReLU(inplace=True) right after the norm;
        # on a view, autograd records CopySlices and the backward copies and zero-fills the whole activation
        # (measured with benchmarks/step_time.py --profile, ResNet-18, batch 32, 96 px: 40-70 ms of a ~1.1 s
        # MoCo-v2 step; its time/FLOP ratio to a supervised step went from 1.12 to 1.05).
        # Safe because nothing else holds ``out`` and batch-norm's backward does not read its output.
        out = torch.ops.aten._unsafe_view(out, x.shape) if out.is_contiguous() else out.reshape_as(x)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out


class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine terms (identical on 1 and N processes; used by parity tests)."""


def _norm_layer(norm: str, bn_splits: int) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return partial(SplitBatchNorm2d, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    if norm == "gn":
        def group_norm(c: int) -> nn.GroupNorm:
            groups = min(32, c // 4)
            if groups < 1 or c % groups:
                raise ConfigError(f"model.norm=gn: {c} channels cannot be split into min(32, {c}//4) groups "
                                  "(choose another model.width)")
            return nn.GroupNorm(groups, c)
        return group_norm
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    raise ValueError(f"model.norm: unknown norm '{norm}' (bn, gn, frozen_bn)")


def _make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int,
                norm_layer: Callable[[int], nn.Module]) -> tuple[nn.Sequential, int]:
    """One ResNet stage of torchvision's ``block`` classes (as ``ResNet._make_layer`` builds it, same module names
    and construction order): a projection shortcut on the first block when the shape changes. Returns the stage
    and its output channels."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(conv1x1(inplanes, out, stride), norm_layer(out))
    layers = [block(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
    layers += [block(out, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


class ResNetBackbone(nn.Module):
    """A torchvision ResNet trunk exposing ``layer1..layer4`` maps and the global-average-pooled vector.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50`` | ``resnet101``.
        small_input: replace the 7x7/2 stem and max-pool by a 3x3/1 conv (for 32-64 px inputs).
        zero_init_residual: zero-init the last BN gamma of every block (SoCo's ResNet does this).
        norm: ``bn``, ``gn`` (GroupNorm) or ``frozen_bn``.
        bn_splits: > 1 makes BatchNorm compute statistics over that many sub-batches (see SplitBatchNorm2d).
        width: base width (``model.width``): 64 = torchvision's; the stem has ``width`` channels, stage i
            ``width * 2**i`` planes.

    Decision: the trunk is assembled here from torchvision's own ``BasicBlock`` / ``Bottleneck`` / ``conv1x1``
    (torchvision's builders only scale the bottleneck's inner width, ``width_per_group``, not the stages), in
    torchvision's module order, with its initialisation (Kaiming-normal fan-out convs, unit/zero norms,
    optional zero-init residual). The random stream is consumed exactly as ``torchvision.models.resnetXX()``
    consumes it, ``fc`` included (a throwaway ``Linear`` is drawn where torchvision draws its ``fc``), so at
    width 64 the same seed gives torchvision's initial weights, key for key and value for value.
    """

    def __init__(self, arch: str = "resnet50", small_input: bool = False, zero_init_residual: bool = False,
                 norm: str = "bn", bn_splits: int = 1, width: int = 64) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch: unknown backbone '{arch}' ({', '.join(ARCHS)})")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.width: expected a positive int (64 = torchvision's ResNet), got {width!r}")
        block, depths = ARCHS[arch]
        norm_layer = _norm_layer(norm, bn_splits)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, (name, blocks) in enumerate(zip(STAGES, depths)):
            stage, inplanes = _make_stage(block, inplanes, width * 2**i, blocks, 1 if i == 0 else 2, norm_layer)
            setattr(self, name, stage)
        nn.Linear(inplanes, 1000)  # torchvision's fc: drawn (and dropped) to keep torchvision's random stream
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        if small_input:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        self.arch, self.small_input, self.width = arch, small_input, width
        self.channels = {name: width * 2**i * block.expansion for i, name in enumerate(STAGES)}
        self.strides = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
        if small_input:
            self.strides = {k: v // 4 for k, v in self.strides.items()}
        self.dim = self.channels["layer4"]

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage(self, name: str) -> nn.Module:
        """The module of one stage (``stem`` or ``layer1..4``), callable on the previous stage's map."""
        if name == "stem":
            return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        if name not in STAGES:
            raise KeyError(f"unknown stage '{name}' (stem, {', '.join(STAGES)})")
        return getattr(self, name)

    def forward(self, x: Tensor, stages: Sequence[str] | None = None, upto: str = "layer4") -> dict[str, Tensor]:
        """Run the trunk up to ``upto``; return the requested stage maps (all by default) and ``pooled``."""
        out: dict[str, Tensor] = {}
        h = self.stem(x)
        for name in STAGES:
            h = getattr(self, name)(h)
            if stages is None or name in stages:
                out[name] = h
            if name == upto:
                break
        if upto == "layer4":
            out["pooled"] = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return out

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        """Weights under torchvision's key names (no ``fc``): loadable with ``strict=False`` into resnetXX()."""
        return {k: v for k, v in self.state_dict().items()}


def backbone_features(backbone: ResNetBackbone, images: Tensor, kind: str = "pooled") -> Tensor:
    """``pooled`` ``[B, C]`` or one stage map (``layer1..layer4``) of ``backbone`` on ``images``; a stage map runs
    the trunk only up to that stage. A ViT (:class:`~semssl.models.vit.ViTBackbone`) answers its own kinds
    (``pooled``, ``cls_last4``, ``cls_avgpool``, ``block<i>``)."""
    if hasattr(backbone, "last_selfattention"):  # a ViTBackbone
        return backbone.features(images, kind)
    if kind == "pooled":
        return backbone(images)["pooled"]
    if kind in STAGES:
        return backbone(images, stages=(kind,), upto=kind)[kind]
    raise ConfigError(f"unknown feature kind '{kind}' (pooled, {', '.join(STAGES)})")


#: the output strides :func:`dilate_backbone` makes (of the standard stem)
OUTPUT_STRIDES = (8, 16, 32)


def _dilate_stage(stage: nn.Module, name: str, previous: int, dilation: int) -> None:
    """One stage's stride-2 3x3 conv to stride 1 with dilation ``previous``, every later 3x3 conv of the stage to
    dilation ``dilation`` (padding alike) and the projection shortcut's stride to 1, in place."""
    seen_stride = False
    for block in stage.children():
        for child_name, module in block.named_children():
            if child_name == "downsample":
                for conv in module.modules():
                    if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
                        conv.stride = (1, 1)
                continue
            if not isinstance(module, nn.Conv2d) or module.kernel_size != (3, 3):
                continue
            if module.stride != (1, 1):
                if seen_stride:
                    raise ConfigError(f"output_stride: {name} has more than one strided 3x3 conv")
                module.stride, module.dilation, module.padding = (1, 1), (previous, previous), (previous, previous)
                seen_stride = True
            elif seen_stride:
                module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
    if not seen_stride:
        raise ConfigError(f"output_stride: {name} has no stride-2 conv to dilate (already dilated?)")


def dilate_backbone(backbone: nn.Module, output_stride: int) -> nn.Module:
    """Dilate a :class:`ResNetBackbone` in place to ``output_stride``: 8 dilates ``layer3`` (2) and ``layer4`` (4),
    16 ``layer4`` (2), 32 nothing. Updates ``backbone.strides``; returns the backbone.

    The stride-2 3x3 conv of a dilated stage becomes stride 1 with the previous dilation, every later 3x3 conv of
    the stage gets the new one, the projection shortcut loses its stride: torchvision's
    ``replace_stride_with_dilation`` rule, done here for both block types because torchvision refuses it for
    ``BasicBlock`` (ResNet-18/34). For ``Bottleneck`` that is exactly torchvision's network; for both it is the
    *a trous* equivalent of the original: the dilated map sub-sampled by the stride removed equals the undilated
    one, in eval mode (tested). ``output_stride`` is named for the standard stem (with the small-input stem every
    map is 4x denser). Used by ``semssl transfer segment`` and the dense probe's ``--output-stride``."""
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride: expected one of {OUTPUT_STRIDES}, got {output_stride}")
    dilated = {8: ("layer3", "layer4"), 16: ("layer4",), 32: ()}[output_stride]
    dilation = 1
    for name in dilated:
        previous, dilation = dilation, dilation * 2
        _dilate_stage(backbone.stage(name), name, previous, dilation)
    if hasattr(backbone, "strides"):
        strides = dict(backbone.strides)
        factor = 1
        for name in ("layer3", "layer4"):
            if name in dilated:
                factor *= 2
            strides[name] = strides[name] // factor
        backbone.strides = strides
    return backbone


class BackboneModel(nn.Module):
    """A bare backbone behind the ``Method.features`` interface: a plain torchvision ``state_dict`` or a random
    initialisation evaluated by the same code paths as a trained method. It has one branch, ``online``."""

    branches = ("online",)
    default_branch = "online"
    feature_kinds = ("pooled", *STAGES)

    def __init__(self, backbone: ResNetBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_kinds = tuple(getattr(backbone, "feature_kinds", BackboneModel.feature_kinds))

    def resolve_branch(self, branch: str | None = None) -> str:
        if branch not in (None, "online"):
            raise ConfigError(f"branch '{branch}': a plain backbone has only the 'online' branch")
        return "online"

    def backbone_for(self, branch: str | None = None) -> ResNetBackbone:
        self.resolve_branch(branch)
        return self.backbone

    @torch.no_grad()
    def features(self, images: Tensor, branch: str | None = None, kind: str = "pooled") -> Tensor:
        return backbone_features(self.backbone_for(branch), images, kind)


def build_backbone(cfg) -> ResNetBackbone:
    """Backbone from a :class:`semssl.config.ModelConfig`: a ResNet, or a ViT (:mod:`semssl.models.vit`) for
    ``model.arch: vit_tiny | vit_small | vit_base`` (``model.patch_size``, ``model.img_size``,
    ``model.drop_path``)."""
    from semssl.models.vit import ViTBackbone, is_vit

    if is_vit(cfg.arch):
        return ViTBackbone(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, drop_path=cfg.drop_path)
    model = ResNetBackbone(cfg.arch, small_input=cfg.small_input, zero_init_residual=cfg.zero_init_residual,
                           norm=cfg.norm, bn_splits=cfg.bn_splits, width=cfg.width)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_torchvision_weights(backbone: ResNetBackbone, state_dict: dict[str, Tensor]) -> None:
    """Load a plain torchvision ResNet ``state_dict`` (``fc.*`` ignored); missing trunk keys are an error."""
    trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in trunk.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"state_dict does not match {backbone.arch} (width {backbone.width}): shapes differ at "
                         f"{wrong[:3]}{'...' if len(wrong) > 3 else ''}")
    missing, unexpected = backbone.load_state_dict(trunk, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match {backbone.arch} (width {backbone.width}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
