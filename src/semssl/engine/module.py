"""The Lightning glue: one optimisation step of any :class:`semssl.methods.Method` per batch.

Manual optimisation, so every step is the explicit :func:`semssl.engine.step.optimisation_step` (schedules ->
``method.training_step`` -> finite check -> backward -> clip -> optimiser step -> EMA), the same function the
benchmark harness runs. Lightning provides devices/DDP, precision (autocast + GradScaler), checkpoints, loggers
and the progress bar.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from semssl.config import Config, to_dict
from semssl.engine.data import step_batch
from semssl.engine.monitor import rankme_due, rankme_logs
from semssl.engine.step import build_schedules, optimisation_step, with_values
from semssl.methods import Method, build_method
from semssl.optim import build_optimizer, scaled_lr
from semssl.schedules import Progress, Schedule


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
        self.schedules: dict[str, Schedule] = {}

    # -- schedules -------------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self._global_batch or step_batch(self.cfg) * self.trainer.world_size

    def total_steps(self, steps_per_epoch: int) -> int:
        t = self.cfg.trainer
        by_epochs = t.max_epochs * steps_per_epoch
        return min(t.max_steps, by_epochs) if t.max_steps > 0 else by_epochs

    def build_schedules(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.total = self.total_steps(steps_per_epoch)
        self.schedules = build_schedules(self.cfg, self.method, steps_per_epoch, self.total, self.global_batch)

    def progress(self) -> Progress:
        """Where training is, with this step's value of every schedule in ``values``."""
        base = Progress(epoch=self.current_epoch, step=min(self.global_step, self.total - 1),
                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total)
        return with_values(base, self.schedules)

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
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        steps_done = int(self.global_step)
        model = self.trainer.model  # DistributedDataParallel under DDP: skip the all-reduce of accumulated grads
        out = optimisation_step(self.method, opt, batch, self.progress(), self.cfg, backward=self.manual_backward,
                                unscale=(lambda: scaler.unscale_(opt.optimizer)) if scaler is not None else None,
                                no_sync=model.no_sync if isinstance(model, DistributedDataParallel) else None)
        embeddings = out.pop("embeddings", None)  # detached [N, D] matrices for the RankMe monitor (methods.base)
        loss = out["loss"]
        logs = {f"train/{k}": (v.detach().float() if torch.is_tensor(v) else v) for k, v in out.items()
                if not torch.is_tensor(v) or v.numel() == 1}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=step_batch(self.cfg))
        if self.trainer.is_global_zero and rankme_due(steps_done, self.cfg.trainer.rankme_every_n_steps):
            # Decision: written to the loggers directly, at the step Lightning gives this batch's row: through
            # self.log a value logged on some steps only is repeated on every later logged step of the epoch
            values = rankme_logs(self.method, embeddings, batch, self.cfg)
            for logger in self.loggers:
                logger.log_metrics(values, step=steps_done)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, logger=False,
                 batch_size=step_batch(self.cfg))
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
