"""What every transfer protocol shares: the backbone it starts from, BatchNorm conversions, a resumable
iteration loop with progress and ETA, and the result table and JSON.

The starting backbone (:class:`BackboneSource`) is one of
    * a semssl checkpoint (a run folder or a ``.ckpt``): its method's backbone on ``branch`` (default: the
      method's evaluation branch, the teacher for DINO/SCFS), read through ``Method.backbone_for`` like every
      evaluation;
    * a plain torchvision ResNet ``state_dict`` (``.pth``; the depth inferred from its keys or given);
    * a random initialisation (``random_init``) of a stated architecture, seeded.
:func:`load_backbone` returns a trainable *copy* (the checkpoint is never modified), with SplitBatchNorm (the
single-process shuffle-BN stand-in of pre-training) turned into plain BatchNorm, so a fine-tuned network is an
ordinary torchvision-layout ResNet. ``--compare random-init`` runs the same schedule from
:func:`random_like` — the same architecture, width and stem as the checkpoint, seeded.

The loop (:func:`train_iterations`) is iteration based, like torchvision's detection references and
detectron2: the batch of iteration ``i`` is batch ``i mod n`` of epoch ``i // n`` of a sampler shuffled from
``(seed, epoch)``, so a resumed run sees exactly the batches the uninterrupted one would have. Its state
(model, optimiser, scheduler, iteration, RNG, loss history) is written atomically to ``<out>/state.pt`` every
``save_every`` iterations and at the end; ``resume=True`` continues from it and refuses a state written by a
different protocol setting (the ``identity`` dict names what must match).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from semssl.checkpoints import atomic_torch_save, safe_load
from semssl.errors import CheckpointError, ConfigError

log = logging.getLogger("semssl.transfer")

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: backbones a checkpoint may hold besides the ResNets (``semssl export`` only; random init builds ResNets)
VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
STATE_FILE = "state.pt"


# --------------------------------------------------------------------------------------------------------------
# The starting backbone
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BackboneSource:
    """Which backbone a transfer protocol starts from (module docstring).

    Args:
        checkpoint: a semssl run folder or ``.ckpt``, or a plain torchvision ResNet ``state_dict``.
        random_init: start from a random network instead (``checkpoint`` must then be None).
        arch: ``resnet18|34|50|101`` (a checkpoint: also ``vit_tiny|small|base``); for a state_dict the depth it must
            have (inferred if None); for random init the depth to build (``resnet50`` if None). A checkpoint of
            another architecture is an error naming both.
        width: random init only: the ResNet base width (64 = torchvision's).
        small_input: random init only: the 3x3/1 stem without max-pool.
        branch: which network of a semssl checkpoint (``online`` / ``teacher``; default: the method's).
        seed: the seed of a random initialisation.
    """

    checkpoint: Optional[str] = None
    random_init: bool = False
    arch: Optional[str] = None
    width: int = 64
    small_input: bool = False
    branch: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.random_init == bool(self.checkpoint):
            raise ConfigError("give a checkpoint (a run folder, a .ckpt or a torchvision state_dict) or random_init, "
                              "not both and not neither")
        if self.arch is not None and self.arch not in (*ARCHS, *VIT_ARCHS):
            raise ConfigError(f"arch: unknown backbone '{self.arch}' ({', '.join(ARCHS + VIT_ARCHS)})")
        if self.random_init and self.arch in VIT_ARCHS:
            raise ConfigError(f"arch {self.arch}: a random init builds a ResNet ({', '.join(ARCHS)}); a ViT comes "
                              f"from a checkpoint")


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every SplitBatchNorm2d replaced by an ``nn.BatchNorm2d`` holding the same parameters and
    statistics (the keys are the same), in place; returned for chaining."""
    from semssl.models.backbones import SplitBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, SplitBatchNorm2d):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.to(child.weight.device if child.weight is not None else "cpu"))
        else:
            plain_batchnorm(child)
    return module


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by torchvision's ``FrozenBatchNorm2d`` (statistics and affine
    terms fixed: the papers' detection setting at small per-GPU batches), in place; returned for chaining."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight if child.weight is not None else torch.ones(child.num_features))
                frozen.bias.copy_(child.bias if child.bias is not None else torch.zeros(child.num_features))
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            frozen_batchnorm(child)
    return module


def load_backbone(source: BackboneSource, allow_vit: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A trainable copy of the chosen backbone (a :class:`semssl.models.backbones.ResNetBackbone`) and an info
    dict (``source``, ``method``, ``branch``, ``arch``, ``width``, ``small_input``).

    A ViT checkpoint (:class:`semssl.models.vit.ViTBackbone`; ``width`` None, ``patch_size`` and ``img_size`` in
    the info) only with ``allow_vit`` (``semssl export``): the other protocols read a ResNet's stage maps or
    BatchNorms, and refuse it with a :class:`CheckpointError` naming the architecture."""
    from semssl.checkpoints import load_model
    from semssl.models.backbones import ResNetBackbone

    if source.random_init:
        arch = source.arch or "resnet50"
        torch.manual_seed(source.seed)
        backbone = ResNetBackbone(arch, small_input=source.small_input, width=source.width)
        info = {"source": "random init", "method": None, "branch": None, "seed": source.seed}
    else:
        model, info, _ = load_model(source.checkpoint, arch=source.arch)
        branch = model.resolve_branch(source.branch)
        backbone = copy.deepcopy(model.backbone_for(branch))
        if source.arch is not None and backbone.arch != source.arch:
            raise CheckpointError(f"{info['source']}: a {backbone.arch} backbone, but arch={source.arch} was asked "
                                  f"for (a checkpoint of another architecture)")
        info = {"source": info["source"], "method": info.get("method"), "branch": branch}
        if hasattr(backbone, "last_selfattention") and not allow_vit:
            raise CheckpointError(f"{info['source']}: a {backbone.arch} (ViT) backbone; this protocol needs a "
                                  f"ResNet ({', '.join(ARCHS)}); `semssl export --format timm` writes a ViT")
    backbone = plain_batchnorm(backbone).float().to(memory_format=torch.contiguous_format)
    backbone.train()
    for p in backbone.parameters():
        p.requires_grad_(True)
    info.update(arch=backbone.arch, width=getattr(backbone, "width", None), small_input=backbone.small_input)
    if hasattr(backbone, "last_selfattention"):
        info.update(patch_size=backbone.patch_size, img_size=backbone.img_size)
    return backbone, info


def random_like(info: dict[str, Any], seed: int = 0) -> BackboneSource:
    """The random-init source of the same architecture, width and stem as a loaded backbone's ``info``."""
    return BackboneSource(random_init=True, arch=info["arch"], width=info["width"],
                          small_input=info["small_input"], seed=seed)


# --------------------------------------------------------------------------------------------------------------
# The resumable iteration loop
# --------------------------------------------------------------------------------------------------------------
class EpochOrder(Sampler):
    """Indices of ``size`` samples shuffled from ``(seed, epoch)``, starting at position ``start``."""

    def __init__(self, size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.epoch, self.start, self.shuffle = size, seed, epoch, start, shuffle

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.size - self.start


def batches_from(dataset: Dataset, batch_size: int, seed: int, first_iteration: int, collate: Callable,
                 workers: int = 0) -> Iterator[tuple[int, Any]]:
    """``(iteration, batch)`` from ``first_iteration`` on, forever: epochs of ``len(dataset) // batch_size`` full
    batches, each epoch's order drawn from ``(seed, epoch)``."""
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise ConfigError(f"batch_size={batch_size} is larger than the {len(dataset)} training samples")
    iteration = first_iteration
    while True:
        epoch, position = divmod(iteration, per_epoch)
        sampler = EpochOrder(len(dataset), seed, epoch, start=position * batch_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                            collate_fn=collate, persistent_workers=False)
        for batch in loader:
            yield iteration, batch
            iteration += 1


@dataclass
class LoopResult:
    iterations: int
    seconds: float
    history: list[dict[str, float]]  # a row per logged iteration: iteration, loss terms, lr
    resumed_from: int


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                    disable=not enabled, transient=False)


def train_iterations(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, batches: Callable[[int],
                     Iterator[tuple[int, Any]]], iterations: int, step: Callable[[nn.Module, Any], dict[str, Tensor]],
                     out_dir: Optional[Path], identity: dict[str, Any], resume: bool = False, save_every: int = 0,
                     log_every: int = 10, description: str = "train", progress: bool = True,
                     clip_grad: Optional[float] = None) -> LoopResult:
    """Train ``model`` for ``iterations`` optimiser steps (module docstring).

    Args:
        batches: ``first_iteration -> iterator of (iteration, batch)`` (e.g. :func:`batches_from`).
        step: ``(model, batch) -> {"loss": scalar, other terms...}``; the loop calls backward and the optimiser.
        out_dir: where ``state.pt`` goes (None: nothing is saved and ``resume`` must be False).
        identity: what a resumed state must have been written with (protocol, data, schedule...).
        save_every: save the state every this many iterations (0: only at the end).
    """
    start_iteration, history, t0 = 0, [], time.time()
    state_file = Path(out_dir) / STATE_FILE if out_dir is not None else None
    if resume:
        if state_file is None or not state_file.exists():
            raise CheckpointError(f"--resume: no {STATE_FILE} in {out_dir} to resume from")
        state = safe_load(state_file)
        if state.get("identity") != _plain(identity):
            diff = sorted(k for k in set(identity) | set(state.get("identity", {}))
                          if _plain(identity).get(k) != state.get("identity", {}).get(k))
            raise CheckpointError(f"{state_file}: written by another setting (differs in {', '.join(diff)}); "
                                  f"resume with the same options, or start in another --out folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start_iteration, history = int(state["iteration"]), list(state["history"])
        log.info("resumed from %s at iteration %d of %d", state_file, start_iteration, iterations)

    def save(iteration: int) -> None:
        if state_file is None:
            return
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict() if scheduler is not None else None,
                           "iteration": iteration, "rng_cpu": torch.get_rng_state(), "history": history,
                           "identity": _plain(identity)}, state_file)

    model.train()
    done = start_iteration
    with _progress(iterations, description, progress) as bar:
        task = bar.add_task(description, total=iterations, completed=start_iteration, status="")
        if start_iteration < iterations:
            for iteration, batch in batches(start_iteration):
                losses = step(model, batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    from semssl.errors import NonFiniteLossError

                    raise NonFiniteLossError(f"{description}: the loss is {loss.item()} at iteration {iteration}; "
                                             f"lower the learning rate ({state_file or 'nothing'} is kept)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                done = iteration + 1
                if done % log_every == 0 or done == iterations:
                    row = {"iteration": done, **{k: float(v.detach()) for k, v in losses.items()},
                           "lr": float(optimizer.param_groups[0]["lr"])}
                    history.append(row)
                    bar.update(task, status=f"loss {row['loss']:.3f}")
                bar.update(task, completed=done)
                if save_every and done % save_every == 0 and done < iterations:
                    save(done)
                if done >= iterations:
                    break
    save(done)
    return LoopResult(done, round(time.time() - t0, 1), history, start_iteration)


def _plain(value: Any) -> Any:
    """A JSON-like copy (tuples as lists, paths as strings) so that identities compare after a round trip."""
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------------------------
# Schedules and results
# --------------------------------------------------------------------------------------------------------------
def lr_schedule(optimizer: torch.optim.Optimizer, iterations: int, kind: str, warmup: int = 0,
                milestones: Sequence[float] = (), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration lr factor: linear warm-up over ``warmup`` iterations, then ``cosine`` to 0, ``step`` (x
    ``gamma`` at each milestone, given as fractions of the run) or ``constant``."""
    if kind not in ("cosine", "step", "constant"):
        raise ConfigError(f"schedule: unknown '{kind}' (cosine, step, constant)")
    steps = [int(round(m * iterations)) for m in milestones]

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if kind == "cosine":
            t = (i - warmup) / max(1, iterations - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if kind == "step":
            return gamma ** sum(i >= s for s in steps)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def report(title: str, results: dict[str, dict[str, Any]], out_dir: Optional[str | Path], extra: dict[str, Any],
           metrics: Sequence[str]) -> dict[str, Any]:
    """Print one table (a row per metric, a column per model: the checkpoint as ``value``, ``random_init`` beside
    it with ``--compare random-init``) like ``semssl eval``; return ``{model: result, ..., **extra}`` and, with
    ``out_dir``, write it to ``<out_dir>/result.json`` (atomically)."""
    from semssl.eval.report import print_table

    columns = {name: {m: r.get(m) for m in metrics} for name, r in results.items()}
    payload = {**results, **extra}
    print_table(title, columns, None, _plain(payload))
    if out_dir is not None:
        write_json(Path(out_dir) / "result.json", payload)
    return payload


def source_name(source: BackboneSource) -> str:
    """How a result names its backbone: ``random init`` or the checkpoint path."""
    return "random init" if source.random_init else str(source.checkpoint)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2))
    tmp.replace(path)


def as_dict(obj: Any) -> dict[str, Any]:
    return _plain(asdict(obj))
