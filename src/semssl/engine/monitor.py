"""What looks at the method while it trains: the online kNN monitor (around
:func:`semssl.eval.evaluate.evaluate`), figures drawn every few epochs (``trainer.figures``) and RankMe of the
training batch's embeddings (``trainer.rankme_every_n_steps``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from semssl.distributed import broadcast_buffers
from semssl.eval.evaluate import evaluate
from semssl.eval.rankme import rankme, subsample_rows

#: the logged name of RankMe per kind of embedding a method returns under ``"embeddings"`` (semssl.methods.base)
RANKME_KEYS = {"pooled": "monitor/rankme", "dense": "monitor/rankme_dense", "region": "monitor/rankme_region"}
#: rows of one SVD: a batch's pooled embeddings fit; dense and region matrices are evenly subsampled to it
RANKME_MAX_ROWS = 2048


def rankme_due(steps_done: int, every: int) -> bool:
    """Whether the step after ``steps_done`` optimisation steps is measured (``trainer.rankme_every_n_steps``:
    steps 0, every, 2 every, ...; 0 = off)."""
    return every > 0 and steps_done % every == 0


@torch.no_grad()
def rankme_logs(method: Any, embeddings: Optional[dict[str, Tensor]], batch: dict,
                cfg: Any) -> dict[str, float]:
    """``{"monitor/rankme": ..., "monitor/rankme_dense": ..., "monitor/rankme_region": ...}`` for the kinds the
    method returned (:data:`RANKME_KEYS`).

    Decision: a method that computes no pooled vector in its step (SoCo, D3SSL: C4 -> RoIAlign -> C5 only) gets
    its pooled embeddings from ``method.features`` on the first view it reads, in eval mode (so BatchNorm's running
    statistics, what the checkpoint and the evaluation use, do not see the extra forward), then train mode again."""
    found = dict(embeddings or {})
    unknown = sorted(set(found) - set(RANKME_KEYS))
    if unknown:
        raise ValueError(f"method '{cfg.method.name}' returned embeddings {unknown}; the monitor knows "
                         f"{sorted(RANKME_KEYS)}")
    if "pooled" not in found:
        view = method.required_views(cfg.method)[0]
        was_training = method.training
        method.eval()
        try:
            found["pooled"] = method.features(batch["views"][view], kind="pooled")
        finally:
            method.train(was_training)
    return {RANKME_KEYS[kind]: rankme(subsample_rows(as_rows(z), RANKME_MAX_ROWS))
            for kind, z in found.items() if z is not None and z.numel()}


def as_rows(z: Tensor) -> Tensor:
    """``[rows, C]``: a matrix as it is, a stage map ``[N, C, h, w]`` one row per location (row-major)."""
    z = z.detach()
    if z.dim() == 4:
        return z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1])
    return z.reshape(-1, z.shape[-1])


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


class FigureCallback(pl.Callback):
    """Draws the ``trainer.figures`` entries (``{name, every_n_epochs, ...options}``) into
    ``<run>/figures/<name>-epoch<NNNN>.png`` every ``every_n_epochs`` epochs and after the last one, on global rank
    0, with the method in eval mode (its mode is restored afterwards)."""

    def __init__(self, cfg: Any, paths: dict, run_dir: Path) -> None:
        from semssl.viz import training_figure

        self.cfg, self.paths, self.run_dir = cfg, paths, Path(run_dir)
        self.entries = []
        for i, entry in enumerate(cfg.trainer.figures):
            if not isinstance(entry, dict) or "name" not in entry:
                from semssl.errors import ConfigError

                raise ConfigError(f"trainer.figures[{i}]: expected a mapping with a 'name', got {entry!r}")
            options = {k: v for k, v in entry.items() if k not in ("name", "every_n_epochs")}
            self.entries.append((entry["name"], int(entry.get("every_n_epochs", 1)), options,
                                 training_figure(entry["name"])))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_dir = Path(trainer.strategy.broadcast(str(self.run_dir), src=0))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        due = [(n, o, m) for n, every, o, m in self.entries if last or trainer.should_stop or epoch % every == 0]
        if not due or not trainer.is_global_zero:
            return
        method = pl_module.method
        was_training = method.training
        method.eval()
        try:
            for name, options, module in due:
                out = self.run_dir / "figures" / f"{name}-epoch{epoch:04d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                module.during_training(method, self.cfg, self.paths, out, **options)
        finally:
            method.train(was_training)
