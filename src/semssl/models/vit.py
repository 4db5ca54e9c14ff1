"""Vision Transformers (ViT-Ti/S/B) built on timm, behind the backbone contract of :mod:`semssl.models.backbones`.

``ViTBackbone(x)`` returns ``{"block1": ..., "block12": ..., "pooled": [B, C]}``, as a ResNet returns its stage
maps and ``pooled`` (docs/methods/vit.md §Backbone):

* ``pooled`` is the CLS token after the final LayerNorm (DINO's ``VisionTransformer.forward``; what DINO's kNN
  evaluation reads);
* ``block<i>`` (i = 1 .. depth) is the token map after block i: the patch tokens passed through the final
  LayerNorm, as DINO's ``get_intermediate_layers`` returns them, laid out as a ``[B, C, h, w]`` grid (h = H / p,
  w = W / p), so every consumer of a stage map (the SCFS search, dense probes, figures) addresses a ViT block by
  name exactly as it addresses ``layer3`` of a ResNet;
* :meth:`ViTBackbone.features` adds DINO's two linear-evaluation features (``eval_linear.py``) as feature kinds:
  ``cls_last4`` — the CLS tokens of the last 4 blocks, each through the final LayerNorm, concatenated
  (``--n_last_blocks 4``, DINO's ViT-S setting), ``[B, 4C]``; ``cls_avgpool`` — the last block's CLS token and
  the mean of its patch tokens (``--n_last_blocks 1 --avgpool_patchtokens true``, DINO's ViT-B setting),
  ``[B, 2C]``.

The class *is* timm's ``VisionTransformer`` (a subclass with ``num_classes=0``), so its ``state_dict`` has exactly
the keys and shapes of ``timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)`` (and of
DINO's released backbones, whose ViT uses the same names), loads into it strictly, and with the same seed the
same initial values (timm's initialisation: truncated-normal linears and position embedding, std 0.02).

Decisions:

* Position embeddings at another grid than the native one (``img_size / patch_size``) are DINO's
  ``interpolate_pos_encoding``: the patch part of the table resized bicubically (no antialiasing) with the scale
  factor ``(n + 0.1) / N`` per side, the CLS entry kept; at the native grid the table is used as it is, so the
  tokens equal timm's. timm's own ``dynamic_img_size`` resampling antialiases when it shrinks the table (DINO's
  96 px local crops), which DINO does not; DINO's rule is kept because the DINO recipes are DINO as released.
* ``cls_avgpool`` concatenates ``[CLS, mean of patch tokens]``; DINO interleaves the two vectors element by
  element. The two layouts are a fixed permutation of each other: a linear classifier and a cosine kNN give the
  same results on either.
* Image sides must be multiples of the patch size (checked when the config is read, ``model.patch_size``): timm's
  patch embedding refuses a remainder, where DINO's convolution would silently drop it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from semssl.errors import ConfigError

#: embedding width, depth and heads of each size (DINO's ``vit_tiny`` / ``vit_small`` / ``vit_base``, timm's
#: ``vit_*_patch16_224``: MLP ratio 4, qkv bias, LayerNorm eps 1e-6)
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
#: the timm model of the same name (patch 16, 224 px); other patch sizes / sides are its keyword arguments
TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
#: DINO's linear-evaluation features (module docstring)
VIT_FEATURE_KINDS = ("cls_last4", "cls_avgpool")
N_LAST_BLOCKS = 4


def is_vit(arch: str) -> bool:
    """Whether ``model.arch`` names a ViT."""
    return arch in VIT_ARCHS


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], native: tuple[int, int]) -> Tensor:
    """The position embedding ``[1, 1 + N, C]`` (CLS first) for a ``grid = (h, w)`` of patches, DINO's rule
    (module docstring): unchanged at the ``native`` grid, else the patch part resized bicubically with the scale
    factor ``(h + 0.1) / N_h``, ``(w + 0.1) / N_w`` (so the output has exactly h x w cells), no antialiasing."""
    if tuple(grid) == tuple(native):
        return pos_embed
    (h, w), (n_h, n_w) = grid, native
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, n_h, n_w, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / n_h, (w + 0.1) / n_w), mode="bicubic",
                          align_corners=False)
    if patch.shape[-2:] != (h, w):
        raise ValueError(f"position-embedding interpolation gave a {tuple(patch.shape[-2:])} grid, not {(h, w)}")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)


class ViTBackbone(VisionTransformer):
    """timm's Vision Transformer exposing ``block1..block<depth>`` token grids and the CLS vector (module docstring).

    Args:
        arch: ``vit_tiny`` | ``vit_small`` | ``vit_base``.
        patch_size: patch side in pixels (``model.patch_size``; DINO's ViT-S/16: 16).
        img_size: the image side the position embeddings are made for (``model.img_size``; 224); other sides
            interpolate them.
        drop_path: stochastic-depth rate of the last block (``model.drop_path``), linear from 0 over the blocks
            (timm's and DINO's rule); DINO trains its student with 0.1 and builds its teacher without
            (:func:`without_drop_path`).
    """

    def __init__(self, arch: str = "vit_small", patch_size: int = 16, img_size: int = 224,
                 drop_path: float = 0.0) -> None:
        if arch not in VIT_ARCHS:
            raise ValueError(f"model.arch: unknown ViT '{arch}' ({', '.join(VIT_ARCHS)})")
        for key, value in (("model.patch_size", patch_size), ("model.img_size", img_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: expected a positive int, got {value!r}")
        if img_size % patch_size:
            raise ConfigError(f"model.img_size {img_size} is not a multiple of model.patch_size {patch_size}")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"model.drop_path: must be in [0, 1), got {drop_path}")
        dim, depth, heads = VIT_ARCHS[arch]
        super().__init__(img_size=img_size, patch_size=patch_size, num_classes=0, embed_dim=dim, depth=depth,
                         num_heads=heads, drop_path_rate=drop_path, dynamic_img_size=True)
        self.arch, self.patch_size, self.img_size, self.drop_path = arch, patch_size, img_size, drop_path
        self.depth, self.heads, self.dim = depth, heads, dim
        self.small_input = False
        self.stage_names = tuple(f"block{i}" for i in range(1, depth + 1))
        self.channels = {name: dim for name in self.stage_names}
        self.strides = {name: patch_size for name in self.stage_names}
        self.feature_kinds = ("pooled", *VIT_FEATURE_KINDS, *self.stage_names)

    # -- tokens ----------------------------------------------------------------------------------------------
    def _pos_embed(self, x: Tensor) -> Tensor:
        """Patch embeddings ``[B, h, w, C]`` -> ``[B, 1 + h*w, C]``: the CLS token prepended, the (interpolated)
        position embedding added, position dropout (timm's hook, so timm's own forwards use DINO's rule too)."""
        b, h, w, c = x.shape
        pos = interpolate_pos_embed(self.pos_embed, (h, w), tuple(self.patch_embed.grid_size))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1) + pos
        return self.pos_drop(x)

    def tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The token sequence entering block 1, ``[B, 1 + h*w, C]``, and the patch grid ``(h, w)``."""
        x = self.patch_embed(images)
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return x, grid

    @staticmethod
    def token_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens ``[B, 1 + h*w, C]`` (CLS first) as a ``[B, C, h, w]`` map."""
        b, _, c = tokens.shape
        return tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)

    # -- the backbone contract -------------------------------------------------------------------------------
    def forward(self, x: Tensor, stages: Sequence[str] | None = None, upto: str | None = None) -> dict[str, Tensor]:
        """Run the blocks up to ``upto`` (default: all); return the requested ``block<i>`` grids (all by default)
        and, when every block ran, ``pooled``."""
        wanted = self.stage_names if stages is None else tuple(stages)
        unknown = [s for s in (*wanted, *([upto] if upto else [])) if s not in self.stage_names]
        if unknown:
            raise KeyError(f"unknown stage(s) {unknown} of {self.arch} (block1..block{self.depth})")
        last = self.depth if upto is None else self.stage_names.index(upto) + 1
        h, grid = self.tokens(x)
        out: dict[str, Tensor] = {}
        for i in range(last):
            h = self.blocks[i](h)
            name = self.stage_names[i]
            if i == self.depth - 1:
                normed = self.norm(h)
                out["pooled"] = normed[:, 0]
                if name in wanted:
                    out[name] = self.token_grid(normed, grid)
            elif name in wanted:
                out[name] = self.token_grid(self.norm(h), grid)
        return out

    def stage(self, name: str) -> nn.Module:
        """The block module of ``block<i>`` (it maps tokens to tokens, not grids)."""
        if name not in self.stage_names:
            raise KeyError(f"unknown stage '{name}' (block1..block{self.depth})")
        return self.blocks[self.stage_names.index(name)]

    def features(self, images: Tensor, kind: str = "pooled") -> Tensor:
        """One feature kind of :attr:`feature_kinds` (module docstring)."""
        if kind == "pooled":
            return self(images, stages=())["pooled"]
        if kind in self.stage_names:
            return self(images, stages=(kind,), upto=kind)[kind]
        if kind not in VIT_FEATURE_KINDS:
            raise ConfigError(f"unknown feature kind '{kind}' ({', '.join(self.feature_kinds)})")
        h, _ = self.tokens(images)
        last = []
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i >= self.depth - N_LAST_BLOCKS:
                last.append(self.norm(h))
        if kind == "cls_last4":
            return torch.cat([t[:, 0] for t in last], dim=1)
        return torch.cat([last[-1][:, 0], last[-1][:, 1:].mean(dim=1)], dim=1)

    @torch.no_grad()
    def last_selfattention(self, images: Tensor) -> Tensor:
        """The last block's self-attention weights ``[B, heads, 1 + h*w, 1 + h*w]`` (softmax over keys; row 0 is
        the CLS token's attention), DINO's ``get_last_selfattention``; timm's fused attention does not return
        them, so they are recomputed from the block's own ``norm1``, ``qkv``, ``q_norm`` / ``k_norm`` and scale."""
        h, _ = self.tokens(images)
        for block in self.blocks[:-1]:
            h = block(h)
        block = self.blocks[-1]
        attn = block.attn
        y = block.norm1(h)
        b, n, _ = y.shape
        qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    # -- export ----------------------------------------------------------------------------------------------
    def timm_kwargs(self) -> dict:
        """The keyword arguments of ``timm.create_model(TIMM_NAMES[arch], **kwargs)`` that build this network
        (weights aside): ``pretrained=False, num_classes=0`` plus ``patch_size`` / ``img_size`` where they differ
        from the name's 16 / 224."""
        kwargs: dict = {"pretrained": False, "num_classes": 0}
        if self.patch_size != 16:
            kwargs["patch_size"] = self.patch_size
        if self.img_size != 224:
            kwargs["img_size"] = self.img_size
        return kwargs


def without_drop_path(module: nn.Module) -> nn.Module:
    """Set every timm ``DropPath`` of ``module`` to probability 0, in place (DINO's teacher is built without
    drop path); returned for chaining."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    return module


def vit_from_state_dict(state: dict[str, Tensor]) -> ViTBackbone | None:
    """An empty :class:`ViTBackbone` shaped like a plain ViT ``state_dict`` (timm's or DINO's names), or None when
    the keys are not a ViT's: the size from the CLS token's width, the patch from the patch embedding's kernel, the
    native side from the position table (``1 + (side / patch)^2`` entries)."""
    cls, pos, proj = state.get("cls_token"), state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if cls is None or pos is None or proj is None:
        return None
    by_dim = {dim: arch for arch, (dim, _, _) in VIT_ARCHS.items()}
    arch = by_dim.get(int(cls.shape[-1]))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if arch is None or depth != VIT_ARCHS[arch][1]:
        raise ValueError(f"a ViT state_dict of width {int(cls.shape[-1])} and depth {depth}: not one of "
                         f"{ {a: (d, n) for a, (d, n, _) in VIT_ARCHS.items()} } (width, depth)")
    patch = int(proj.shape[-1])
    side = round((int(pos.shape[1]) - 1) ** 0.5)
    if side * side != int(pos.shape[1]) - 1:
        raise ValueError(f"pos_embed has {int(pos.shape[1])} entries: not 1 + a square grid")
    return ViTBackbone(arch, patch_size=patch, img_size=side * patch)
