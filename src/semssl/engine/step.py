"""One optimisation step of any method, DINO-style explicit — shared by the Lightning module and the benchmarks.

Per iteration: look up every schedule (lr, weight decay, and the method's own: EMA momentum, teacher
temperature, ...) at this step and set lr / weight decay on the optimiser groups, run
``method.training_step(batch, progress)`` with the schedule values in ``progress.values``, stop on a non-finite
loss, backward, clip, ``method.on_after_backward``, optimiser step, EMA of every ``momentum_pairs()`` teacher.

Gradient accumulation (``trainer.accumulate_grad_batches = k``): the loader yields ``k x data.batch_size``
images per process and step, and the step runs them as ``k`` micro-batches of ``data.batch_size``
(:func:`semssl.data.views.split_batch`): forward and backward of each, with its loss divided by ``k``, the
gradients summed, then one clip, one optimiser step and one EMA. Under DDP the first ``k - 1`` backward passes
skip the gradient all-reduce (``no_sync``). Decision: the accumulation lives inside one step, not across
Lightning batches (Lightning's ``accumulate_grad_batches`` does not apply to manual optimisation), so a step,
its schedules, ``max_steps``, checkpoints and the resume position all count optimiser steps, the batch
transforms see the whole batch, and the lr scales with the effective batch ``k x data.batch_size x processes``.

Decision: the method's running state is updated once per step, from the whole batch, as one pass over it would:
the memory queues (MoCo, DenseCL, SoCo, DSC, D3SSL) and DINO/SCFS centers are held by :func:`deferred_state`
while the micro-batches run, so every micro-batch sees the state before the step. The update is then that of
the larger batch wherever the loss is a mean over images and nothing else couples the images of a batch
(tested for MoCo-v2, DINO and DenseCL with frozen BatchNorm, tests/test_accumulate.py). BatchNorm in training
mode (backbone, BYOL/SoCo heads), in-batch negatives and batch-level clustering (DSC's k-means and Sinkhorn)
see each micro-batch alone, as under DDP without SyncBN.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor

from semssl.data.views import split_batch
from semssl.errors import NonFiniteLossError
from semssl.methods.base import Method, ema_update
from semssl.optim import clip_gradients, scaled_lr, set_lr_wd
from semssl.schedules import Progress, Schedule, ScheduleConfig, build_schedule


def build_schedules(cfg: Any, method: Method, steps_per_epoch: int, total_steps: int,
                    global_batch: int) -> dict[str, Schedule]:
    """Every schedule of a run: ``lr`` and ``wd`` from ``cfg.optim``, then the method's own (``momentum``, ...).

    The peak lr is ``optim.lr`` scaled by the global batch (``lr_scaling: linear``); ``min_lr`` and the warm-up
    start (a fraction of the peak) are not scaled again. The weight decay is constant, or a cosine from
    ``weight_decay`` to ``weight_decay_end`` (DINO)."""
    o = cfg.optim
    peak = scaled_lr(o.lr, global_batch) if o.lr_scaling == "linear" else o.lr
    configs: dict[str, ScheduleConfig] = {
        "lr": ScheduleConfig(kind=o.schedule, base=peak, final=o.min_lr, warmup=o.warmup,
                             warmup_start=o.warmup_start * peak, milestones=tuple(o.milestones), per=o.per),
    }
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    configs["wd"] = ScheduleConfig(kind="cosine" if wd_end != o.weight_decay else "constant", base=o.weight_decay,
                                   final=wd_end)
    for name, sched in method.schedules().items():
        if name in configs:
            raise ValueError(f"method '{cfg.method.name}' declares a schedule named '{name}', which the engine "
                             f"already runs (lr, wd)")
        configs[name] = sched
    return {name: build_schedule(c, steps_per_epoch, total_steps) for name, c in configs.items()}


def with_values(progress: Progress, schedules: dict[str, Schedule]) -> Progress:
    """``progress`` carrying this step's value of every schedule."""
    return dataclasses.replace(progress, values={name: s(progress) for name, s in schedules.items()})


@contextlib.contextmanager
def deferred_state(method: Method) -> Iterator[Callable[[], None]]:
    """Hold the running-state updates of ``method`` (every submodule with ``defer`` / ``next_part`` / ``flush``:
    memory queues, DINO centers) for the duration, then apply each once (they gather across ranks). Yields the
    function to call where the next micro-batch starts. On an error the held updates are dropped, not applied:
    the step did not happen, and a rank that raised must not wait for the others."""
    holders = [m for m in method.modules() if all(callable(getattr(m, name, None))
                                                  for name in ("defer", "next_part", "flush"))]
    for holder in holders:
        holder.defer()

    def next_part() -> None:
        for holder in holders:
            holder.next_part()

    try:
        yield next_part
    except BaseException:
        for holder in holders:
            holder.flush(apply=False)
        raise
    for holder in holders:
        holder.flush()


def merge_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """One step's outputs from its micro-batches': scalars averaged (each micro-batch has the same size), the
    ``embeddings`` matrices (RankMe) concatenated, anything else from the last micro-batch."""
    if len(outputs) == 1:
        return outputs[0]
    merged = dict(outputs[-1])
    for key, value in outputs[-1].items():
        values = [out[key] for out in outputs]
        if torch.is_tensor(value) and value.numel() == 1:
            merged[key] = torch.stack([v.detach().reshape(()) for v in values]).mean()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = sum(values) / len(values)
        elif key == "embeddings" and torch.is_tensor(value) and value.ndim >= 1:
            merged[key] = torch.cat(values)
    return merged


def optimisation_step(method: Method, optimizer: Any, batch: dict, progress: Progress, cfg: Any,
                      backward: Optional[Callable[[Tensor], None]] = None,
                      unscale: Optional[Callable[[], None]] = None,
                      no_sync: Optional[Callable[[], ContextManager]] = None) -> dict[str, Any]:
    """Run one iteration; return the method's outputs plus every schedule value used (``lr``, ``wd``, ...).

    ``progress`` must carry the schedule values (:func:`with_values`). ``backward`` defaults to
    ``loss.backward()`` (Lightning passes ``manual_backward`` for precision plugins); ``unscale`` unscales
    AMP gradients before clipping. ``optimizer`` is a torch optimiser or Lightning's wrapper of one. With
    ``trainer.accumulate_grad_batches > 1`` the batch runs as that many micro-batches (the module docstring);
    ``no_sync`` (DDP's) then wraps every backward but the last."""
    values = progress.values
    set_lr_wd(getattr(optimizer, "optimizer", optimizer), values["lr"], values["wd"])
    if cfg.model.channels_last:
        batch = {**batch, "views": {k: v.contiguous(memory_format=torch.channels_last)
                                    for k, v in batch["views"].items()}}
    parts = split_batch(batch, accumulation(cfg))
    optimizer.zero_grad(set_to_none=True)
    outputs = []
    with deferred_state(method) if len(parts) > 1 else contextlib.nullcontext(lambda: None) as next_part:
        for j, part in enumerate(parts):
            if j:
                next_part()
            out = method.training_step(part, progress)
            _check_finite(out, progress, j, len(parts))
            last = j == len(parts) - 1
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
                (backward or Tensor.backward)(out["loss"] / len(parts) if len(parts) > 1 else out["loss"])
            outputs.append(out)
    out = merge_outputs(outputs)
    if cfg.optim.clip_grad > 0:
        if unscale is not None:
            unscale()
        clip_gradients(method.parameters(), cfg.optim.clip_grad, mode=cfg.optim.clip_mode)
    method.on_after_backward(progress)
    optimizer.step()
    if "momentum" in values:
        for student, teacher in method.momentum_pairs():
            ema_update(student, teacher, values["momentum"])
    return {**out, **values}


def accumulation(cfg: Any) -> int:
    """``trainer.accumulate_grad_batches`` (1 where a config has no trainer section, e.g. a bare method config)."""
    trainer = getattr(cfg, "trainer", None)
    return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)


def _check_finite(out: dict[str, Any], progress: Progress, part: int, parts: int) -> None:
    loss = out["loss"]
    if torch.isfinite(loss).all():
        return
    terms = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
    where = f" (micro-batch {part + 1} of {parts})" if parts > 1 else ""
    raise NonFiniteLossError(
        f"loss is {float(loss.detach())} at epoch {progress.epoch}, step {progress.step}{where} (terms: {terms}). "
        f"The run stopped; the last good checkpoint is kept. Lower optim.lr, enable optim.clip_grad, "
        f"or use trainer.precision=32-true.")
