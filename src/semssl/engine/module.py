"""The Lightning glue: one optimisation step of any :class:`semssl.methods.Method`, DINO-style explicit.

Per iteration (manual optimisation, so every step is visible here): look up lr / weight decay from their
schedules and set them on the optimiser groups, run ``method.training_step``, stop on a non-finite loss,
backward, clip, ``method.on_after_backward``, optimiser step, EMA of every ``momentum_pairs()`` teacher, log.
Lightning provides devices/DDP, precision (autocast + GradScaler), checkpoints, loggers and the progress bar.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from semssl.config import Config, to_dict
from semssl.engine.optim import build_optimizer, clip_gradients, scaled_lr, set_lr_wd
from semssl.engine.schedules import Progress, Schedule, ScheduleConfig, build_schedule
from semssl.methods import Method, build_method
from semssl.methods.base import ema_update


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


class SSLModule(pl.LightningModule):
    """Wraps a method for Lightning. ``self.method`` is a plain ``nn.Module`` usable without Lightning."""

    def __init__(self, cfg: Config, global_batch: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.method: Method = build_method(cfg)
        if cfg.model.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.automatic_optimization = False
        self._global_batch = global_batch
        self.lr_schedule: Optional[Schedule] = None
        self.wd_schedule: Optional[Schedule] = None

    # -- schedules -------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self._global_batch or self.cfg.data.batch_size * self.trainer.world_size

    def total_steps(self, steps_per_epoch: int) -> int:
        t = self.cfg.trainer
        by_epochs = t.max_epochs * steps_per_epoch
        return min(t.max_steps, by_epochs) if t.max_steps > 0 else by_epochs

    def build_schedules(self, steps_per_epoch: int) -> None:
        o = self.cfg.optim
        total = self.total_steps(steps_per_epoch)
        peak = scaled_lr(o.lr, self.global_batch) if o.lr_scaling == "linear" else o.lr
        final = scaled_lr(o.min_lr, self.global_batch) if o.lr_scaling == "linear" else o.min_lr
        self.steps_per_epoch = steps_per_epoch
        self.total = total
        self.lr_schedule = build_schedule(
            ScheduleConfig(kind=o.schedule, base=peak, final=final, warmup=o.warmup,
                           warmup_start=o.warmup_start * peak, milestones=tuple(o.milestones)),
            steps_per_epoch, total)
        wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
        self.wd_schedule = build_schedule(
            ScheduleConfig(kind="cosine" if wd_end != o.weight_decay else "constant", base=o.weight_decay,
                           final=wd_end), steps_per_epoch, total)

    def progress(self) -> Progress:
        return Progress(epoch=self.current_epoch, step=min(self.global_step, self.total - 1),
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total)

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        groups = self.method.param_groups(o.weight_decay, exclude_norm_and_bias=o.exclude_norm_and_bias)
        return build_optimizer(o.name, groups, lr=scaled_lr(o.lr, self.global_batch), momentum=o.momentum,
                               nesterov=o.nesterov, weight_decay=o.weight_decay, betas=tuple(o.betas))

    def on_train_start(self) -> None:
        self.build_schedules(int(self.trainer.num_training_batches))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        progress = self.progress()
        lr, wd = self.lr_schedule(progress), self.wd_schedule(progress)
        set_lr_wd(opt.optimizer, lr, wd)
        if self.cfg.model.channels_last:
            batch["views"] = {k: v.contiguous(memory_format=torch.channels_last) for k, v in batch["views"].items()}

        out = self.method.training_step(batch, progress)
        loss = out["loss"]
        if not torch.isfinite(loss).all():
            terms = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
            raise NonFiniteLossError(
                f"loss is {float(loss)} at epoch {progress.epoch}, step {progress.step} (terms: {terms}). "
                f"The run stopped; the last good checkpoint is kept. Lower optim.lr, enable optim.clip_grad, "
                f"or use trainer.precision=32-true.")

        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.cfg.optim.clip_grad > 0:
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                scaler.unscale_(opt.optimizer)
            clip_gradients(self.method.parameters(), self.cfg.optim.clip_grad, mode=self.cfg.optim.clip_mode)
        self.method.on_after_backward(progress)
        opt.step()

        momentum = self.method.ema_momentum(progress)
        for student, teacher in self.method.momentum_pairs():
            ema_update(student, teacher, momentum)

        logs = {f"train/{k}": v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
        logs.update({"train/lr": lr, "train/wd": wd, "train/momentum": momentum})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=self.cfg.data.batch_size)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, logger=False,
                 batch_size=self.cfg.data.batch_size)
        return loss.detach()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the config and the RNG state (as tensors) so ``weights_only=True`` can load everything."""
        checkpoint["semssl_config"] = to_dict(self.cfg)
        checkpoint["rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_cpu" in checkpoint:
            torch.set_rng_state(checkpoint["rng_cpu"])
        if "rng_cuda" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])


def epochs_for_steps(max_steps: int, steps_per_epoch: int) -> int:
    return max(1, math.ceil(max_steps / steps_per_epoch))
