"""Checkpoints: written atomically, read with ``weights_only=True``, and models loaded for evaluation.

Below the engine and the evaluations (no Lightning here), so evaluation drivers and figures load checkpoints
without importing the training engine; :class:`semssl.engine.io.AtomicCheckpointIO` is the Lightning side.

A checkpoint holds tensors and plain values only (the config as a plain dict, RNG states as tensors), so it can
be read without unpickling arbitrary objects. Evaluation also accepts a plain torchvision ResNet ``state_dict`` and
a plain timm (or DINO) ViT ``state_dict``.

A file that is not a readable checkpoint gets one line naming it and what is wrong (:func:`checkpoint_problem`:
not a PyTorch file, empty, truncated or corrupt; or Python objects a weights-only load refuses), never torch's
advice to load it unsafely. Training keeps the checkpoint before ``last.ckpt`` as ``previous.ckpt`` (a hard link
made before each write, so it costs no space until the new one lands), and ``--resume`` falls back to it, saying
so in one line, when ``last.ckpt`` cannot be read (:func:`resume_checkpoint`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from semssl.config import Config, ConfigError, from_dict
from semssl.errors import CheckpointError
from semssl.models.backbones import (
    BackboneModel,
    ResNetBackbone,
    load_torchvision_weights,
)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: a crash never
    leaves a half-written checkpoint where a good one was.

    The file gets the mode ``open()`` would give it (``0o666`` less the umask), not mkstemp's private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


PREVIOUS = "previous.ckpt"


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """What is wrong with ``path`` as a PyTorch checkpoint file, in a few words, or None when it reads as one: a
    complete zip archive whose entries pass their CRC check (``torch.save``'s format), or a legacy pickle file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "no such file"
    if path.is_dir():
        return "a folder, not a checkpoint file"
    if size == 0:
        return "an empty file (0 bytes)"
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            return f"truncated or corrupt ({size} bytes: {err})"
        return f"corrupt (its entry {bad} fails its CRC check)" if bad else None
    if head[:1] == b"\x80":  # a pickle of protocol 2 or later: torch.save's format before PyTorch 1.6
        return None
    return f"not a PyTorch checkpoint (it starts with {head!r})"


def _refusal(err: Exception) -> Optional[str]:
    """The global a weights-only load refused (``module.Name``), or None when ``err`` is not such a refusal."""
    text = str(err)
    if "Weights only load failed" not in text and "weights_only" not in text:
        return None
    m = re.search(r"(?:Unsupported global|Unsupported class):?\s*(?:GLOBAL\s+)?([\w.]+)", text)
    return m.group(1) if m else "an object outside tensors and plain values"


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with a one-line error naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised as one line with the file named
        refused = _refusal(err)
        if refused is not None:
            raise CheckpointError(f"{path}: holds Python objects that a weights-only load does not build ({refused}); "
                                  "semssl reads checkpoints weights-only, so save the weights as a plain state_dict "
                                  "of tensors") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({first})") from None


def keep_previous(last: Path) -> None:
    """Before ``last`` is rewritten: keep its current content as ``previous.ckpt`` beside it (a hard link, so no
    copy; a copy where the file system has no hard links). The link is made under a temporary name and renamed,
    so ``previous.ckpt`` is never half there."""
    if not last.exists():
        return
    tmp = last.with_name(f".{PREVIOUS}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(last, tmp)
    except OSError:
        shutil.copy2(last, tmp)
    os.replace(tmp, last.with_name(PREVIOUS))


def resume_checkpoint(folder: Path) -> Path:
    """The checkpoint a run in ``folder`` (its ``checkpoints/``) resumes from: ``last.ckpt``, or ``previous.ckpt``
    when ``last.ckpt`` cannot be read — said in one line on stderr. :class:`CheckpointError` when neither can."""
    last, previous = folder / "last.ckpt", folder / PREVIOUS
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    if previous.exists() and checkpoint_problem(previous) is None:
        print(f"semssl: {last} cannot be read ({problem}); resuming from the checkpoint before it, {previous}",
              file=sys.stderr)
        return previous
    fallback = f"{previous} cannot be read either" if previous.exists() else f"there is no {PREVIOUS} to fall back to"
    raise CheckpointError(f"{last}: {problem}; {fallback}")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the ``last.ckpt`` of a run folder."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"{path}: run folder has no checkpoints/last.ckpt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def config_from_checkpoint(ckpt: dict, path: Path) -> Config:
    if "semssl_config" not in ckpt:
        raise CheckpointError(f"{path}: not a semssl checkpoint (no 'semssl_config')")
    try:
        return from_dict(Config, ckpt["semssl_config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored config is invalid ({err})") from err


def load_model(path: str | Path, arch: Optional[str] = None) -> tuple[nn.Module, dict, Optional[Config]]:
    """A model to evaluate, in eval mode, with an info dict and the run's config (None for a plain state_dict).

    A semssl checkpoint gives its whole :class:`~semssl.methods.Method` (so evaluation reads it through
    ``Method.features``, on the method's default branch unless told otherwise, exactly as the online monitor and
    the final evaluation did); a plain torchvision ResNet ``state_dict`` gives a
    :class:`~semssl.models.backbones.BackboneModel` (``arch`` names the depth; inferred from the keys if omitted;
    the base width ``model.width`` is read from ``conv1.weight``'s output channels). A semssl checkpoint is built
    from its stored config, ``model.width`` included.
    """
    from semssl.methods import build_method

    file = find_checkpoint(path)
    ckpt = safe_load(file)
    if isinstance(ckpt, dict) and "semssl_config" in ckpt:
        cfg = config_from_checkpoint(ckpt, file)
        method = build_method(cfg)
        state = {k.removeprefix("method."): v for k, v in ckpt["state_dict"].items()}
        try:
            method.load_state_dict(state)
        except RuntimeError as err:
            raise CheckpointError(f"{file}: weights do not match its own config ({err})") from err
        info = {"source": str(file), "method": cfg.method.name, "default_branch": method.default_branch,
                "arch": cfg.model.arch, "width": cfg.model.width, "epoch": ckpt.get("epoch"),
                "global_step": ckpt.get("global_step")}
        return method.eval(), info, cfg
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{file}: neither a semssl checkpoint nor a state_dict of tensors")
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if "cls_token" in state:  # a plain ViT (timm's names, which are also DINO's)
        return _load_vit(state, file, arch)
    arch = arch or _infer_arch(state, file)
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise CheckpointError(f"{file}: state_dict has no 4-d 'conv1.weight' (not a ResNet trunk)")
    # the stem's output channels are the base width (model.width; 64 = torchvision's), its kernel the stem kind
    width = int(conv1.shape[0])
    try:
        backbone = ResNetBackbone(arch, small_input=conv1.shape[-1] == 3, width=width)
        load_torchvision_weights(backbone, state)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from err
    info = {"source": str(file), "method": "torchvision", "default_branch": "online", "arch": arch,
            "width": width}
    return BackboneModel(backbone).eval(), info, None


def _load_vit(state: dict, file: Path, arch: Optional[str]) -> tuple[nn.Module, dict, None]:
    """A plain ViT ``state_dict`` (timm's ``VisionTransformer`` without head, or a DINO backbone): the size, patch
    and native side read from its shapes (:func:`semssl.models.vit.vit_from_state_dict`), loaded strictly."""
    from semssl.models.vit import vit_from_state_dict

    trunk = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        backbone = vit_from_state_dict(trunk)
        if arch is not None and backbone.arch != arch:
            raise ValueError(f"a {backbone.arch} state_dict, but arch={arch} was asked for")
        backbone.load_state_dict(trunk, strict=True)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{file}: {err}") from err
    info = {"source": str(file), "method": "timm", "default_branch": "online", "arch": backbone.arch,
            "patch_size": backbone.patch_size, "img_size": backbone.img_size}
    return BackboneModel(backbone).eval(), info, None


def _infer_arch(state: dict, file: Path) -> str:
    if "layer3.22.conv1.weight" in state:
        return "resnet101"
    if "layer1.0.conv3.weight" in state:
        return "resnet50"
    if "layer3.2.conv1.weight" in state:
        return "resnet34"
    if "layer1.0.conv1.weight" in state:
        return "resnet18"
    raise CheckpointError(f"{file}: cannot tell the ResNet depth from its keys; pass --arch")
