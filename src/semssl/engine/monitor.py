"""The online kNN monitor: a Lightning callback around :func:`semssl.eval.evaluate.evaluate`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from semssl.distributed import broadcast_buffers
from semssl.eval.evaluate import evaluate


class KNNMonitor(pl.Callback):
    """kNN accuracy of the method's evaluated branch (``Method.features``) every ``every`` epochs (and after the
    last epoch)."""

    def __init__(self, cfg: Any, train_path: str, test_path: str, every: int) -> None:
        self.cfg, self.train_path, self.test_path, self.every = cfg, train_path, test_path, every
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every and not last and not trainer.should_stop:
            return
        broadcast_buffers(pl_module.method)  # rank 0's BatchNorm statistics on every rank (what is checkpointed)
        res = evaluate(pl_module.method, self.cfg, self.train_path, self.test_path, linear=False,
                       device=pl_module.device)
        self.history.append({"epoch": epoch, "knn_top1": res["knn_top1"]})
        pl_module.log("monitor/knn_top1", float(res["knn_top1"]), on_epoch=True, sync_dist=False,
                      prog_bar=True, rank_zero_only=True)
