"""One optimisation step of any method, DINO-style explicit — shared by the Lightning module and the benchmarks.

Per iteration: look up every schedule (lr, weight decay, and the method's own: EMA momentum, teacher
temperature, ...) at this step and set lr / weight decay on the optimiser groups, run
``method.training_step(batch, progress)`` with the schedule values in ``progress.values``, stop on a non-finite
loss, backward, clip, ``method.on_after_backward``, optimiser step, EMA of every ``momentum_pairs()`` teacher.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor

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


def optimisation_step(method: Method, optimizer: Any, batch: dict, progress: Progress, cfg: Any,
                      backward: Optional[Callable[[Tensor], None]] = None,
                      unscale: Optional[Callable[[], None]] = None) -> dict[str, Any]:
    """Run one iteration; return the method's outputs plus every schedule value used (``lr``, ``wd``, ...).

    ``progress`` must carry the schedule values (:func:`with_values`). ``backward`` defaults to
    ``loss.backward()`` (Lightning passes ``manual_backward`` for precision plugins); ``unscale`` unscales
    AMP gradients before clipping. ``optimizer`` is a torch optimiser or Lightning's wrapper of one."""
    values = progress.values
    set_lr_wd(getattr(optimizer, "optimizer", optimizer), values["lr"], values["wd"])
    if cfg.model.channels_last:
        batch = {**batch, "views": {k: v.contiguous(memory_format=torch.channels_last)
                                    for k, v in batch["views"].items()}}
    out = method.training_step(batch, progress)
    loss = out["loss"]
    if not torch.isfinite(loss).all():
        terms = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        raise NonFiniteLossError(
            f"loss is {float(loss.detach())} at epoch {progress.epoch}, step {progress.step} (terms: {terms}). "
            f"The run stopped; the last good checkpoint is kept. Lower optim.lr, enable optim.clip_grad, "
            f"or use trainer.precision=32-true.")
    optimizer.zero_grad(set_to_none=True)
    (backward or Tensor.backward)(loss)
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
