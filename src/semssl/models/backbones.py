"""torchvision ResNets that return named stage maps and the pooled vector.

``ResNetBackbone(x)`` returns ``{"layer1": ..., "layer4": ..., "pooled": [B, C]}``. Each stage is callable on its
own (``backbone.stage("layer4")(layer3_map)``) so region methods (SoCo, D3SSL) can run the last stage on
RoI-aligned features, and heads read their widths from ``backbone.channels``. The parameter names are those
of ``torchvision.models.resnetXX`` (without ``fc``), so a trained backbone exports to a plain torchvision
``state_dict`` and a torchvision ``state_dict`` loads into it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from semssl.errors import ConfigError

STAGES = ("layer1", "layer2", "layer3", "layer4")


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
        return lambda c: nn.GroupNorm(min(32, c // 4), c)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    raise ValueError(f"model.norm: unknown norm '{norm}' (bn, gn, frozen_bn)")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet trunk exposing ``layer1..layer4`` maps and the global-average-pooled vector.

    Args:
        arch: ``resnet18`` | ``resnet34`` | ``resnet50``.
        small_input: replace the 7x7/2 stem and max-pool by a 3x3/1 conv (for 32-64 px inputs).
        zero_init_residual: zero-init the last BN gamma of every block (SoCo's ResNet does this).
        norm: ``bn``, ``gn`` (GroupNorm) or ``frozen_bn``.
        bn_splits: > 1 makes BatchNorm compute statistics over that many sub-batches (see SplitBatchNorm2d).
    """

    def __init__(self, arch: str = "resnet50", small_input: bool = False, zero_init_residual: bool = False,
                 norm: str = "bn", bn_splits: int = 1) -> None:
        super().__init__()
        if arch not in ("resnet18", "resnet34", "resnet50"):
            raise ValueError(f"model.arch: unknown backbone '{arch}' (resnet18, resnet34, resnet50)")
        net = getattr(torchvision.models, arch)(
            weights=None, zero_init_residual=zero_init_residual, norm_layer=_norm_layer(norm, bn_splits)
        )
        if small_input:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.arch, self.small_input = arch, small_input
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if arch == "resnet50" else 1
        self.channels = {name: w * expansion for name, w in zip(STAGES, (64, 128, 256, 512))}
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
    the trunk only up to that stage."""
    if kind == "pooled":
        return backbone(images)["pooled"]
    if kind in STAGES:
        return backbone(images, stages=(kind,), upto=kind)[kind]
    raise ConfigError(f"unknown feature kind '{kind}' (pooled, {', '.join(STAGES)})")


class BackboneModel(nn.Module):
    """A bare backbone behind the ``Method.features`` interface: a plain torchvision ``state_dict`` or a random
    initialisation evaluated by the same code paths as a trained method. It has one branch, ``online``."""

    branches = ("online",)
    default_branch = "online"
    feature_kinds = ("pooled", *STAGES)

    def __init__(self, backbone: ResNetBackbone) -> None:
        super().__init__()
        self.backbone = backbone

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
    """Backbone from a :class:`semssl.config.ModelConfig`."""
    model = ResNetBackbone(cfg.arch, small_input=cfg.small_input, zero_init_residual=cfg.zero_init_residual,
                           norm=cfg.norm, bn_splits=cfg.bn_splits)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_torchvision_weights(backbone: ResNetBackbone, state_dict: dict[str, Tensor]) -> None:
    """Load a plain torchvision ResNet ``state_dict`` (``fc.*`` ignored); missing trunk keys are an error."""
    trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(trunk, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match {backbone.arch}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
