"""``semssl export``: a checkpoint's backbone written for other libraries — torchvision, timm, detectron2, ONNX —
with a side JSON saying where it came from and how to load each file.

Files (in ``out_dir``, ``name`` defaulting to the run folder's / file's stem, ``random-init`` for random init)
    ``<name>.torchvision.pth``  a plain torchvision ResNet ``state_dict`` (``conv1``, ``bn1``, ``layer1..4``; no
        ``fc``): ``m = torchvision.models.resnetXX(); m.fc = nn.Identity(); m.load_state_dict(sd)`` (strict)
        gives ``backbone(x)["pooled"]``.
    ``<name>.timm.pth``  the same weights under timm's names: ``timm.create_model("resnetXX", pretrained=False,
        num_classes=0).load_state_dict(sd)`` (strict) gives the same features.
    ``<name>.detectron2.pkl``  the trunk under detectron2's names (:func:`detectron2_key`), for
        ``MODEL.WEIGHTS``.
    ``<name>.onnx``  the backbone returning the pooled features (input ``images`` ``[batch, 3, S, S]``, output
        ``features`` ``[batch, C]``; the batch dimension dynamic, ``S = onnx_size``).
    ``<name>.json``  the source (run folder / file), its method and branch, the run's config (a semssl
        checkpoint), arch / width / small_input, the input normalisation, and per written file its path, format
        and sha256 (plus how to load it and, for ONNX, the runtime check).

Which backbone (:class:`~semssl.transfer.common.BackboneSource`, read by
:func:`~semssl.transfer.common.load_backbone`): a semssl checkpoint on ``branch`` (default: the method's
evaluation branch), a plain torchvision ``state_dict``, or a seeded random initialisation. SplitBatchNorm is
plain BatchNorm in every file (the same parameter names; evaluation behaviour).

Compatibility. Only a width-64 backbone with the standard 7x7/2 stem and max-pool is the network that
torchvision's and timm's ``resnetXX`` builders make. For another width or the small-input 3x3/1 stem the files
are still written (the same key names), but the JSON says ``"torchvision_builder_compatible": false`` (and
``timm_builder_compatible``, ``detectron2_compatible``) with the reasons, and names the semssl builder that
loads them. Decision: the compatible files are loaded strictly into the real builders (on the meta device, so
nothing is initialised) and compared with the backbone on a batch *before* they are written; a difference is an
:class:`ExportError`, not a file that silently computes something else.

Decision (timm names): timm 1.0's ResNet names every trunk parameter and buffer exactly as torchvision does (its
``act1`` / ``aa`` / ``drop_block`` modules hold no weights; checked key by key, with shapes, against the
installed timm's resnet18/34/50), so the map is the identity. The export compares the key set with the installed
timm's model each time and refuses, naming the keys that differ, should a timm version rename them; nothing is
guessed.

detectron2. The key rules are those of MoCo's ``detection/convert-pretrain-to-detectron2.py``
(facebookresearch/moco, MIT; rules restated here, code written anew), applied to the trunk's torchvision names:
    1. a key without ``layer`` is a stem key: prefix ``stem.`` (``conv1.weight`` -> ``stem.conv1.weight``);
    2. ``layer1..4`` -> ``res2..5``;
    3. ``bn1`` / ``bn2`` / ``bn3`` -> ``conv1.norm`` / ``conv2.norm`` / ``conv3.norm`` (so ``bn1.weight`` ->
       ``stem.conv1.norm.weight``);
    4. ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``.
Every key is converted, ``running_mean`` / ``running_var`` / ``num_batches_tracked`` included (as the MoCo
script does; detectron2 ignores, with a warning, keys its model lacks, e.g. ``num_batches_tracked`` for
FrozenBN). Values are numpy arrays; the pickle is ``{"model": {key: array}, "__author__": "semssl",
"matching_heuristics": True}`` (MoCo writes ``"MOCO"`` as author). ``matching_heuristics`` makes detectron2's
checkpointer match the names by suffix, so the same file serves C4 (``res5`` in the RoI head) and FPN backbones.
The detectron2 config such a file needs (MoCo's ``detection/configs/*_moco.yaml`` and detectron2's
``build_resnet_backbone``; also written into the JSON as ``detectron2_config``):
    * ``INPUT.FORMAT: "RGB"``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD: [58.395, 57.12,
      57.375]`` (torchvision's mean/std in the 0-255 scale; detectron2's defaults are BGR Caffe statistics);
    * ``MODEL.RESNETS.STRIDE_IN_1X1: False`` (torchvision's bottleneck strides in the 3x3 conv);
    * ``MODEL.RESNETS.DEPTH: 18 | 34 | 50``; for ResNet-18/34 ``MODEL.RESNETS.RES2_OUT_CHANNELS: 64`` (detectron2
      asserts it, so only width 64 works there); a ResNet-50 of width ``w`` needs ``STEM_OUT_CHANNELS: w``,
      ``RES2_OUT_CHANNELS: 4w`` and ``WIDTH_PER_GROUP: w`` (64 / 256 / 64 are detectron2's defaults).
detectron2's stem is always 7x7/2 with max-pool: a small-input backbone is written but marked incompatible
(detectron2 would skip the mismatched ``stem.conv1.weight`` with only a warning).

ONNX. Decision: ``torch.onnx.export(..., dynamo=True)`` (torch.export) with ``dynamic_shapes`` marking the batch
dimension, ``external_data=False`` (one self-contained file, so the temporary file can be renamed into place).
Measured with torch 2.14.1 / onnxscript 0.7.2 / onnxruntime 1.32 on this CPU (1 thread): both exporters give a
graph with a symbolic batch that onnxruntime runs at another batch size within 1e-5 on ResNet-18 features and
within 9e-5 on ResNet-50 features of magnitude ~200; the legacy TorchScript path exports in 0.8 s (ResNet-18) /
2.7 s (ResNet-50, 224 px) against 5.5 s / 11.7 s, but it warns that it is deprecated (torch.export has been the
default since 2.9) and is the path that will go; an export is a one-off, so the maintained path wins. The spatial
size is fixed at ``onnx_size`` (what the JSON states); the sample batch of the export is 2 (a batch of 1 would
let torch.export specialise the dimension) and the check runs a batch of 3.
Decision (the check's tolerance): the file is kept only if onnxruntime's features differ from PyTorch's by at
most ``1e-4 x max(1, max |feature|)``: 1e-4 absolute for features up to magnitude 1, relative beyond it, since
float32 rounding scales with the magnitude (a random-init ResNet-50 at 224 px has pooled features up to ~170,
where 1e-4 is a few ulps); a wrong graph differs by the features' own scale. Otherwise :class:`ExportError`,
and any earlier ``<name>.onnx`` stays.

ViT. A ViT backbone (:class:`~semssl.models.vit.ViTBackbone`, a subclass of timm's ``VisionTransformer``) is
written in the ``timm`` format only: its own ``state_dict`` (no head), which ``timm.create_model(
"vit_small_patch16_224", pretrained=False, num_classes=0)`` — with ``patch_size=`` / ``img_size=`` where they
differ from 16 / 224, as the JSON's ``timm_kwargs`` and load hint say — loads strictly; the check compares the
two on a batch at the native side. torchvision and detectron2 have no such network (a ConfigError after the
checkpoint is read, before any file is written); DINO's own ``vision_transformer.py`` uses the same key names.

Writing. Each file goes to a temporary file in ``out_dir`` and is renamed over its name (as
:func:`semssl.checkpoints.atomic_torch_save`), so a crash or a failed check never leaves a half-written file and
never clobbers the previous one; the JSON is rewritten after each file (``"complete": false`` until the last), so
it always lists what this call has written. Bad input (an unknown format, ``out_dir`` that is a file, a bad name
or size) is a :class:`~semssl.errors.ConfigError` raised before anything is loaded or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from semssl.checkpoints import atomic_torch_save, load_model
from semssl.errors import ConfigError, ExportError
from semssl.transfer.common import BackboneSource, as_dict, load_backbone, write_json

log = logging.getLogger("semssl.transfer")

FORMATS = ("torchvision", "timm", "detectron2", "onnx")
SUFFIXES = {"torchvision": ".torchvision.pth", "timm": ".timm.pth", "detectron2": ".detectron2.pkl",
            "onnx": ".onnx"}
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101}
#: the formats a ViT backbone is written in (module docstring, "ViT")
VIT_FORMATS = ("timm",)
ONNX_SAMPLE_BATCH, ONNX_CHECK_BATCH = 2, 3
ONNX_TOLERANCE = 1e-4  # times max(1, max |feature|): module docstring
BUILDER_TOLERANCE = 1e-6  # the same modules on the same weights: equal in practice (max difference recorded)
CHECK_SIZE = 64  # images of the builder checks (any size works for the 7x7/2 stem; small keeps it fast)


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------
def torchvision_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The trunk of a :class:`~semssl.models.backbones.ResNetBackbone` as a plain torchvision ``state_dict``:
    ``conv1``, ``bn1``, ``layer1..4`` (no ``fc``), detached CPU copies.

    Decision: a ``frozen_bn`` backbone gets ``num_batches_tracked = 0`` per norm, so the file holds every key
    torchvision's BatchNorm2d writes (BatchNorm would also load strictly without it; in eval mode it computes the
    same affine map); GroupNorm keys are written as they are and :func:`builder_compatibility` says why
    torchvision's builder cannot take them."""
    from torchvision.ops import FrozenBatchNorm2d

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in backbone.state_dict().items()}
    if any(k.startswith("fc.") for k in state):
        raise ConfigError("torchvision_state_dict: expected a backbone without fc (a semssl ResNetBackbone)")
    if _is_vit(backbone):
        return state
    for name, module in backbone.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


def _is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "last_selfattention")


def builder_compatibility(backbone: nn.Module) -> list[str]:
    """Why torchvision's / timm's ``resnetXX`` builders do not make this network (empty: they do). A ViT is
    always timm's network (:meth:`~semssl.models.vit.ViTBackbone.timm_kwargs`)."""
    if _is_vit(backbone):
        return []
    reasons = []
    if backbone.width != 64:
        reasons.append(f"width {backbone.width} (the builders' ResNets have width 64)")
    if backbone.small_input:
        reasons.append("the small-input 3x3/1 stem without max-pool (the builders have the 7x7/2 stem and "
                       "max-pool)")
    if any(isinstance(m, nn.GroupNorm) for m in backbone.modules()):
        reasons.append("GroupNorm (model.norm=gn; the builders' default norm is BatchNorm2d)")
    return reasons


def _timm_model(arch: str, meta: bool = True, backbone: Optional[nn.Module] = None) -> nn.Module:
    import timm

    if backbone is not None and _is_vit(backbone):
        from semssl.models.vit import TIMM_NAMES

        with torch.device("meta" if meta else "cpu"):
            return timm.create_model(TIMM_NAMES[backbone.arch], **backbone.timm_kwargs())
    if meta:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=0)
    return timm.create_model(arch, pretrained=False, num_classes=0)


def timm_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The trunk under the installed timm's ResNet key names (module docstring: the identity map of the
    torchvision names, checked against the installed timm; an ExportError names any key that differs)."""
    import timm

    from semssl.models.backbones import ResNetBackbone

    if _is_vit(backbone):  # the ViT is timm's own class: compare its keys with the builder's all the same
        ours = set(backbone.state_dict())
        theirs = set(_timm_model(backbone.arch, backbone=backbone).state_dict())
    else:
        with torch.device("meta"):  # the names only: nothing is initialised
            ours = set(ResNetBackbone(backbone.arch).state_dict())
        theirs = set(_timm_model(backbone.arch).state_dict())
    if ours != theirs:
        raise ExportError(f"timm {timm.__version__} names the {backbone.arch} trunk differently from torchvision: "
                          f"only in timm {sorted(theirs - ours)[:5]}, only in torchvision "
                          f"{sorted(ours - theirs)[:5]}; this export knows no mapping for it")
    return torchvision_state_dict(backbone)


def detectron2_key(name: str) -> str:
    """detectron2's name for one torchvision trunk key (MoCo's ``convert-pretrain-to-detectron2.py`` rules,
    module docstring): ``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight``, ``bn1.running_mean`` ->
    ``stem.conv1.norm.running_mean``, ``layer2.0.downsample.1.bias`` -> ``res3.0.shortcut.norm.bias``."""
    key = name if "layer" in name else f"stem.{name}"
    for stage in (1, 2, 3, 4):
        key = key.replace(f"layer{stage}", f"res{stage + 1}")
    for conv in (1, 2, 3):
        key = key.replace(f"bn{conv}", f"conv{conv}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def detectron2_checkpoint(backbone: nn.Module) -> dict[str, Any]:
    """The pickled object of the ``.detectron2.pkl`` file: ``{"model": {detectron2 key: numpy array},
    "__author__": "semssl", "matching_heuristics": True}``."""
    model = {detectron2_key(k): v.numpy() for k, v in torchvision_state_dict(backbone).items()}
    return {"model": model, "__author__": "semssl", "matching_heuristics": True}


def detectron2_config(info: dict[str, Any]) -> dict[str, Any]:
    """The detectron2 config keys a file of this backbone needs (module docstring)."""
    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    width = info["width"]
    config: dict[str, Any] = {
        "INPUT.FORMAT": "RGB", "MODEL.PIXEL_MEAN": [round(255 * m, 3) for m in IMAGENET_MEAN],
        "MODEL.PIXEL_STD": [round(255 * s, 3) for s in IMAGENET_STD], "MODEL.RESNETS.DEPTH": DEPTHS[info["arch"]],
        "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NUM_GROUPS": 1,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": width,
    }
    if info["arch"] == "resnet50":
        config.update({"MODEL.RESNETS.RES2_OUT_CHANNELS": 4 * width, "MODEL.RESNETS.WIDTH_PER_GROUP": width})
    else:
        config["MODEL.RESNETS.RES2_OUT_CHANNELS"] = width
    return config


def detectron2_compatibility(info: dict[str, Any], backbone: nn.Module) -> list[str]:
    """Why stock detectron2 cannot build this network (empty: it can, with :func:`detectron2_config`)."""
    reasons = []
    if info["arch"] != "resnet50" and info["width"] != 64:
        reasons.append(f"width {info['width']}: detectron2 asserts RES2_OUT_CHANNELS = 64 for R18/R34")
    if info["small_input"]:
        reasons.append("the small-input stem: detectron2's stem is 7x7/2 with max-pool")
    if any(isinstance(m, nn.GroupNorm) for m in backbone.modules()):
        reasons.append("GroupNorm: set MODEL.RESNETS.NORM to GN (groups of 32 channels, not semssl's min(32, c//4))")
    return reasons


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------
class PooledFeatures(nn.Module):
    """``backbone(images)["pooled"]`` as a module with one tensor output (what the ONNX graph computes)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)["pooled"]


def _images(batch: int, size: int, seed: int) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _builder(fmt: str, arch: str, backbone: Optional[nn.Module] = None) -> nn.Module:
    """The real ``resnetXX`` of torchvision (``fc`` = Identity) or timm (``num_classes=0``), on the meta device;
    for a ViT ``backbone`` timm's ``vit_*_patch16_224`` with its patch size and side."""
    if fmt == "timm":
        return _timm_model(arch, backbone=backbone)
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
        model.fc = nn.Identity()
    return model


@torch.no_grad()
def check_builder(fmt: str, state: dict[str, Tensor], backbone: nn.Module) -> dict[str, Any]:
    """Load ``state`` strictly into the real builder of ``fmt`` and compare its features with ``backbone``'s on a
    batch of 2 images of 64 px (a ViT: of its native side); an :class:`ExportError` names the difference."""
    model = _builder(fmt, backbone.arch, backbone)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ExportError(f"{fmt}: the state_dict does not load strictly into {fmt}'s {backbone.arch} ({err})") \
            from err
    model.eval()
    size = backbone.img_size if _is_vit(backbone) else CHECK_SIZE
    x = _images(2, size, seed=1)
    ref, got = backbone(x)["pooled"], model(x)
    diff = float((ref - got).abs().max())
    if got.shape != ref.shape or not diff <= BUILDER_TOLERANCE * max(1.0, float(ref.abs().max())):
        raise ExportError(f"{fmt}: {fmt}'s {backbone.arch} gives features {tuple(got.shape)} that differ from the "
                          f"backbone's {tuple(ref.shape)} by {diff:.3g}")
    return {"batch": 2, "size": size, "max_abs_diff": diff}


@torch.no_grad()
def check_onnx(path: Path, model: nn.Module, size: int) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime on a batch of :data:`ONNX_CHECK_BATCH` (not the export's batch) and
    compare with PyTorch (module docstring: the tolerance); an :class:`ExportError` says by how much it differs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch_dim = session.get_inputs()[0].shape[0]
    if isinstance(batch_dim, int):
        raise ExportError(f"onnx: the exported input has a fixed batch of {batch_dim}, not a dynamic one")
    x = _images(ONNX_CHECK_BATCH, size, seed=2)
    ref = model(x)
    got = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    scale = float(ref.abs().max())
    tolerance = ONNX_TOLERANCE * max(1.0, scale)
    diff = float((ref - got).abs().max()) if got.shape == ref.shape else float("inf")
    if not diff <= tolerance:
        raise ExportError(f"onnx: onnxruntime's features {tuple(got.shape)} at batch {ONNX_CHECK_BATCH} differ from "
                          f"PyTorch's {tuple(ref.shape)} by {diff:.3g} (> {tolerance:.3g} = {ONNX_TOLERANCE:g} x "
                          f"max(1, max |feature| = {scale:.3g})); the file was not written")
    return {"runtime": f"onnxruntime {ort.__version__}", "export_batch": ONNX_SAMPLE_BATCH,
            "batch": ONNX_CHECK_BATCH, "size": size, "max_abs_diff": diff, "max_abs_feature": scale,
            "tolerance": tolerance}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` into a temporary file beside ``path``, fsync, then rename it over ``path``; the temporary
    file is removed on any error (``path``, if it existed, is untouched). Returns what ``write`` returns."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        mask = os.umask(0)  # reading the umask means setting it: set it straight back
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return result
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_pickle(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(obj)))


def _write_onnx(backbone: nn.Module, path: Path, size: int) -> dict[str, Any]:
    """Export (torch.export, dynamic batch) into a temporary file, check it with onnxruntime, rename it."""
    import onnx

    model = PooledFeatures(backbone).eval()

    def write(tmp: Path) -> dict[str, Any]:
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, (_images(ONNX_SAMPLE_BATCH, size, seed=0),), str(tmp), dynamo=True,
                          external_data=False, input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: batch},), verbose=False)
        check = check_onnx(tmp, model, size)
        opsets = {o.domain or "ai.onnx": o.version for o in onnx.load(str(tmp), load_external_data=False).opset_import}
        return {"input": "images", "output": "features", "input_shape": ["batch", 3, size, size],
                "output_shape": ["batch", backbone.dim], "opset": opsets.get("ai.onnx"),
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "check": check}

    return _atomic_write(path, write)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------------------------------------------
def _formats(formats: Sequence[str] | str) -> list[str]:
    """The requested formats in order, without repeats; a string is a comma list; unknown ones are an error."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen: list[str] = []
    for item in items:
        fmt = str(item).strip()
        if fmt not in FORMATS:
            raise ConfigError(f"format: unknown '{fmt}' ({', '.join(FORMATS)})")
        if fmt not in chosen:
            chosen.append(fmt)
    if not chosen:
        raise ConfigError(f"format: none given ({', '.join(FORMATS)})")
    return chosen


def default_name(source: BackboneSource) -> str:
    """The run folder's name, the checkpoint file's stem, or ``random-init``."""
    if source.random_init:
        return "random-init"
    path = Path(source.checkpoint)
    return path.resolve().name if path.is_dir() else path.stem


def _load_hint(fmt: str, info: dict[str, Any], path: Path, compatible: bool) -> str:
    arch = info["arch"]
    if fmt == "onnx":
        return f"onnxruntime.InferenceSession('{path}').run(['features'], {{'images': x}})"
    if fmt == "detectron2":
        return f"MODEL.WEIGHTS {path} with detectron2_config"
    if fmt == "timm" and info.get("patch_size"):  # a ViT
        from semssl.models.vit import TIMM_NAMES

        kwargs = ", ".join(f"{k}={v!r}" for k, v in info["timm_kwargs"].items())
        return (f"timm.create_model('{TIMM_NAMES[arch]}', {kwargs})"
                f".load_state_dict(torch.load('{path}', weights_only=True))")
    if not compatible:
        return (f"semssl.models.backbones.ResNetBackbone('{arch}', small_input={info['small_input']}, "
                f"width={info['width']}).load_state_dict(torch.load('{path}', weights_only=True))")
    if fmt == "timm":
        return (f"timm.create_model('{arch}', pretrained=False, num_classes=0)"
                f".load_state_dict(torch.load('{path}', weights_only=True))")
    return (f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity(); "
            f"m.load_state_dict(torch.load('{path}', weights_only=True))")


def _side_json(name: str, source: BackboneSource, backbone: nn.Module, info: dict[str, Any], config: Any,
               formats: list[str]) -> dict[str, Any]:
    """The side JSON before any file is written (``files`` empty, ``complete`` false)."""
    from semssl.config import to_dict
    from semssl.data.augment import IMAGENET_MEAN, IMAGENET_STD

    reasons = builder_compatibility(backbone)
    d2_reasons = ["a ViT: detectron2's ResNet backbones cannot hold it"] if _is_vit(backbone) else \
        detectron2_compatibility(info, backbone)
    if source.random_init:
        origin = {"checkpoint": None, "file": None, "kind": "random_init", "seed": source.seed}
    else:
        origin = {"checkpoint": source.checkpoint, "file": info["source"],
                  "kind": "semssl" if config is not None else "torchvision_state_dict"}
    return {
        "name": name, "source": {**origin, "request": as_dict(source)},
        "method": info.get("method"), "branch": info.get("branch"),
        "config": to_dict(config) if config is not None else None,
        "arch": info["arch"], "width": info["width"], "small_input": info["small_input"],
        "feature_dim": backbone.dim,
        "preprocessing": {"channels": "RGB", "scale": "0-1", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "torchvision_builder_compatible": not reasons, "timm_builder_compatible": not reasons,
        "builder_incompatibility": reasons,
        "detectron2_compatible": not d2_reasons, "detectron2_incompatibility": d2_reasons,
        "detectron2_config": None if _is_vit(backbone) else detectron2_config(info),
        **({"patch_size": info["patch_size"], "img_size": info["img_size"], "timm_kwargs": info["timm_kwargs"]}
           if _is_vit(backbone) else {}),
        "formats": formats, "complete": False, "files": [],
    }


def export(source: BackboneSource, out_dir: str | Path, formats: Optional[Sequence[str]] = None,
           onnx_size: int = 224,
           name: Optional[str] = None) -> dict[str, Any]:
    """Write the backbone of ``source`` in ``formats`` into ``out_dir`` with the side JSON (module docstring).

    Args:
        source: the backbone (a semssl run folder / ``.ckpt`` on ``source.branch``, a torchvision ``state_dict``,
            or ``random_init``).
        out_dir: the folder of the files (created if missing; a file there is an error).
        formats: any of ``torchvision``, ``timm``, ``detectron2``, ``onnx`` (a string is a comma list); None:
            every format the backbone can be written in (all four for a ResNet, ``timm`` for a ViT).
        onnx_size: the ONNX input's height and width in pixels.
        name: the files' stem (default: :func:`default_name`).

    Returns:
        the side JSON's content (as read back from ``<out_dir>/<name>.json``).

    Raises:
        ConfigError: an unknown format, a bad size or name, ``out_dir`` a file (before anything is loaded).
        CheckpointError: a source that cannot be read (from :func:`~semssl.transfer.common.load_backbone`).
        ExportError: a file that would not compute the backbone's features (that file is not written).
    """
    chosen = _formats(formats) if formats is not None else None
    if isinstance(onnx_size, bool) or not isinstance(onnx_size, int) or onnx_size < 8:
        raise ConfigError(f"onnx_size: expected an int >= 8 (pixels), got {onnx_size!r}")
    name = default_name(source) if name is None else name
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"name: '{name}' cannot be a file name stem (empty, '.', '..' or holds a '/')")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir: '{out}' is a file, not a folder")

    backbone, info = load_backbone(source, allow_vit=True)
    backbone.eval().requires_grad_(False)
    if chosen is None:
        chosen = list(VIT_FORMATS if _is_vit(backbone) else FORMATS)
    if _is_vit(backbone):
        wrong = [f for f in chosen if f not in VIT_FORMATS]
        if wrong:
            raise ConfigError(f"format: {wrong} cannot hold a {backbone.arch} (ViT) backbone; a ViT is written as "
                              f"{list(VIT_FORMATS)} (timm's VisionTransformer)")
        info["timm_kwargs"] = backbone.timm_kwargs()
    config = None
    if source.checkpoint:
        # Decision: the checkpoint is read a second time for its config (load_model returns it), so that
        # load_backbone stays the one path to a backbone; an export is a one-off.
        config = load_model(source.checkpoint, arch=source.arch)[2]
    payload = _side_json(name, source, backbone, info, config, chosen)
    compatible = payload["torchvision_builder_compatible"]
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    for fmt in chosen:
        path = out / f"{name}{SUFFIXES[fmt]}"
        entry: dict[str, Any] = {"format": fmt}
        if fmt in ("torchvision", "timm"):
            state = torchvision_state_dict(backbone) if fmt == "torchvision" else timm_state_dict(backbone)
            if compatible:
                entry["check"] = check_builder(fmt, state, backbone)
            entry["builder_compatible"] = compatible
            atomic_torch_save(state, path)
        elif fmt == "detectron2":
            entry["compatible"] = payload["detectron2_compatible"]
            _write_pickle(detectron2_checkpoint(backbone), path)
        else:
            entry["onnx"] = _write_onnx(backbone, path, onnx_size)
        entry.update(path=str(path.resolve()), file=path.name, bytes=path.stat().st_size, sha256=sha256(path),
                     load=_load_hint(fmt, info, path, compatible))
        payload["files"].append(entry)
        payload["complete"] = fmt == chosen[-1]
        write_json(json_path, payload)
        log.info("export: %s -> %s", fmt, path)
    return json.loads(json_path.read_text())
