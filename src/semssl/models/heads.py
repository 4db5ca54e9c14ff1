"""Projection and prediction heads. Widths follow the backbone (``in_dim = backbone.dim``)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Sequential):
    """``Linear -> [BN] -> ReLU -> ... -> Linear [-> BN]``.

    MoCo-v2's projector is ``MLP(2048, 2048, 128)`` (no BN); BYOL's projector/predictor is
    ``MLP(d, 4096, 256, batch_norm=True)``. ``last_bn`` adds a BatchNorm (no affine) after the last layer.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = False,
                 last_bn: bool = False, bias: bool = True) -> None:
        if num_layers < 1:
            raise ValueError(f"MLP needs at least 1 layer, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=bias and not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 (typed for readers)
        return super().forward(x)


class SaliencyNet(nn.Module):
    """SCD's saliency network M (SCD paper §4.2, App. A.1): on a stage map ``[B, C, H, W]`` (the last one, before
    global pooling) ``conv1x1(C -> hidden) -> BN -> ReLU -> conv1x1(hidden -> 1) -> sigmoid``, the foreground
    probability of every cell ``M^fg`` ``[B, 1, H, W]`` (hidden = C = 2048 on ResNet-50).

    Decision: the sigmoid is computed in float32 and clamped to ``[eps, 1 - eps]`` (eps 1e-6, representable at
    both ends in float32), so ``M^fg`` and ``M^bg = 1 - M^fg`` stay strictly inside (0, 1) even when the logits
    saturate (sigmoid(50) is exactly 1.0 in float32) and a weighted average under either map never divides by
    zero; the clamp changes M by at most 1e-6 where the sigmoid's gradient is already below 1e-6. The first conv
    has no bias (a BatchNorm follows), the last one has one.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        hidden = hidden_dim or in_dim
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))
        self.eps = eps

    def forward(self, fmap: Tensor) -> Tensor:
        return self.net(fmap).float().sigmoid().clamp(self.eps, 1 - self.eps)


class DINOHead(nn.Module):
    """DINO's head (docs/methods/dino.md §Model; SCFS's "four-layer MLP"): an ``num_layers``-layer MLP
    ``Linear(in, hidden) -> [BN] -> GELU -> ... -> Linear(hidden, bottleneck)``, L2 normalisation, then a
    weight-normalised ``Linear(bottleneck, out_dim, bias=False)`` whose gain g is set to 1 and, with
    ``norm_last_layer`` (DINO's default), frozen — so every prototype is a unit vector and the logits lie in
    [-1, 1]. MLP linears: truncated normal std 0.02 (bounds +-2, DINO's ``trunc_normal_``), biases 0; the last
    layer keeps PyTorch's default init (it is created after DINO's init pass). ResNet-50: 2048-2048-2048-256-65536.

    Decision: the weight norm is ``torch.nn.utils.parametrizations.weight_norm`` (g = ``original0`` [out, 1],
    v = ``original1``), the same function as DINO's ``nn.utils.weight_norm`` but deep-copyable (the teacher is a
    deep copy of the student) and not deprecated. :attr:`last_layer` is what DINO freezes in epoch 0.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs at least 1 layer, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck ``[B, bottleneck_dim]``."""
        return nn.functional.normalize(self.mlp(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, out_dim]`` of pooled features ``x`` ``[B, in_dim]``."""
        return self.last_layer(self.bottleneck(x))


class SearchHead(nn.Module):
    """SCFS's feature-search head, one per stage (docs/methods/scfs.md §Model, the released ``DINOShallowHead``;
    paper: "three conv layers and two FC layers"), on a stage map ``[B, C, H, W]``:

    residual bottleneck ``conv1x1(C -> mid) -> BN -> ReLU -> conv3x3(mid -> mid) -> BN -> ReLU -> conv1x1(mid -> C)
    -> BN``, ``+ identity -> ReLU``; global average pooling; ``Linear(C -> hidden) -> BN1d -> ReLU ->
    Linear(hidden -> out) -> BN1d``; L2 normalisation. Output ``[B, out]`` (unit vectors, so logits / tau are
    bounded). Convs without bias, linears with; PyTorch's default init (as released). ResNet-50: mid 256,
    hidden 2048, out 256 for C = 512 / 1024 / 2048 (layer2 / 3 / 4).

    ``kernel_size=1`` makes the middle convolution a 1x1: every layer before the pooling then acts on each
    position alone — the token-wise head of SCFS on a ViT's token grid (docs/methods/scfs.md §ViT).
    """

    def __init__(self, in_channels: int, mid_channels: int = 256, hidden_dim: int = 2048, out_dim: int = 256,
                 kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"SearchHead: kernel_size must be 3 (ResNet stage maps) or 1 (ViT tokens), got "
                             f"{kernel_size}")
        c, m = in_channels, mid_channels
        self.bottleneck = nn.Sequential(
            nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(inplace=True),
            nn.Conv2d(m, m, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm2d(m),
            nn.ReLU(inplace=True),
            nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c),
        )
        self.mlp = nn.Sequential(nn.Linear(c, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim))

    def forward(self, fmap: Tensor) -> Tensor:
        pooled = nn.functional.relu(self.bottleneck(fmap) + fmap).mean(dim=(2, 3))
        return nn.functional.normalize(self.mlp(pooled), dim=-1)


class ConvMLP(nn.Sequential):
    """DenseCL's dense projection neck (docs/methods/densecl.md §Model): ``conv1x1(in -> hidden) -> ReLU ->
    conv1x1(hidden -> out)`` on a stage map ``[B, C, h, w]``, no BN, no pooling (every position keeps its
    vector); PyTorch's default init (DenseCL's Kaiming init applies to its Linear layers only). ResNet-50:
    2048-2048-128."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1))


class Prototypes(nn.Module):
    """SwAV-style prototypes (DSC-PM, docs/methods/dsc.md §Prototypes): a bias-free ``Linear(dim, K)`` whose rows
    are the prototypes. :meth:`normalize_` L2-normalises them in place (SwAV does it before every iteration), so on
    L2-normalised inputs the scores are cosines; :meth:`scores` normalises on the fly without changing weights."""

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, num_prototypes, bias=False)

    def normalize_(self) -> None:
        weight = self.layer.weight.data  # in place, outside autograd
        weight.copy_(nn.functional.normalize(weight, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def scores(self, x: Tensor) -> Tensor:
        """Cosines of (normalised) ``x`` ``[..., dim]`` with the normalised prototypes, ``[..., K]``."""
        return nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.layer.weight, dim=1).t()
