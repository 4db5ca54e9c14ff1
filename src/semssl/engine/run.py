"""``semssl pretrain``: build everything from a config, train with Lightning, evaluate, write the run folder.

Run folder::

    runs/<name>-<time>/
      config.yaml            the full resolved config (``--resume`` reads it back)
      checkpoints/last.ckpt  written atomically at the end of every epoch (weights-only loadable), and at the end of
                             the step in progress when SIGTERM or SIGUSR1 stops the run (engine/preempt.py)
      checkpoints/previous.ckpt  the checkpoint before it (--resume falls back to it if last.ckpt is unreadable)
      logs/tensorboard/      TensorBoard events
      logs/csv/metrics.csv   the same scalars as CSV
      logs/semssl.log        everything semssl logs while the run trains and evaluates, details included (the
                             fast linear probe's lr search), appended on resume
      metrics.json           {"trained": {...}, "random_init": {...}, "random_init_bn": {...}, "pixels": {...},
                              "run": {...}}, accuracies in percent; "run" holds the length, wall time, machine
                              and package versions (run_environment)
      figures/               trainer.figures drawn during training
      run.lock               pid and host of the process training here, while it runs (engine/resume.py)

``semssl report RUN`` turns the folder into one HTML page (semssl.viz.report).

Decision: the terminal shows the progress bar, one line per phase and the final table; details are logged at
DEBUG level, which ``logs/semssl.log`` records and the command line shows only with ``-v``; the library warnings
a run cannot act on are filtered one by one, by message and module (:func:`quiet_library_warnings`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from semssl.checkpoints import PREVIOUS, keep_previous, resume_checkpoint
from semssl.config import (
    Config,
    ConfigError,
    apply_overrides,
    dump_config,
    from_dict,
    load_yaml,
)
from semssl.distributed import broadcast_buffers
from semssl.errors import RunLockedError
from semssl.engine.data import (
    build_train_dataset,
    resolve_paths,
    step_batch,
    steps_per_epoch,
    train_loader,
)
from semssl.engine.io import AtomicCheckpointIO
from semssl.engine.module import SSLModule
from semssl.engine.monitor import FigureCallback, KNNMonitor
from semssl.engine.preempt import Preemption
from semssl.engine.resume import (
    LAYOUT_KEY,
    POSITION_KEY,
    Layout,
    Position,
    RunLock,
    canonical_fit_loop,
    check_final_step,
    check_layout,
    position_of,
    read_layout,
)
from semssl.eval.evaluate import (
    BASELINE_LABELS,
    BASELINES,
    baseline_models,
    describe,
    evaluate,
)

log = logging.getLogger("semssl")

RUN_DIR_ENV = "SEMSSL_RUN_DIR"  # shared with the processes Lightning launches for DDP
RUN_LOG = Path("logs") / "semssl.log"  # in the run folder
RUN_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_library_warnings() -> None:
    """Ignore the library warnings a run cannot act on, each by its message, category and the module it is raised
    from (never a whole category): Lightning 2.6 builds torch's deprecated ``LeafSpec`` in
    ``lightning/pytorch/utilities/_pytree.py`` on every training step (torch >= 2.10 warns about it)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class SSLDataModule(pl.LightningDataModule):
    """Builds the training loader once the trainer knows the world size and rank (after DDP launch)."""

    def __init__(self, cfg: Config, dataset: Any) -> None:
        super().__init__()
        self.cfg, self.dataset = cfg, dataset

    def train_dataloader(self):
        # the epoch the fit loop is at (restored on resume); Lightning passes the same number to set_epoch
        loop = self.trainer.fit_loop
        epoch = int(loop.epoch_progress.current.processed)
        # batches of that epoch a mid-epoch checkpoint already trained on (0 for a new run or an epoch-end one);
        # a mid-epoch checkpoint is written at a batch end, where "processed" counts the batches trained on
        done = int(loop.epoch_loop.batch_progress.current.processed) if loop.restarting else 0
        spe = steps_per_epoch(len(self.dataset), step_batch(self.cfg), self.trainer.world_size)
        done = done if 0 < done < spe else 0
        return train_loader(self.dataset, self.cfg, self.trainer.world_size, self.trainer.global_rank, epoch, done)


class RunFolder(pl.Callback):
    """Makes every process use global rank 0's run folder; rank 0 creates it and writes ``config.yaml``.

    Decision: ``config.yaml`` is (re)written on resume too, with the overrides given then (e.g. a longer
    ``trainer.max_epochs``), so a run that is interrupted again resumes with the config it was running.

    Decision: the folder is settled in ``setup``, the first hook after the process group exists. Processes
    that were launched externally (torchrun, SLURM, or any launcher that sets ``LOCAL_RANK``) each call
    :func:`pretrain` and name a folder on their own (a timestamp, a ``-2`` suffix if it already exists), so
    they can disagree; broadcasting rank 0's choice makes the return value, ``metrics.json`` and the
    checkpoints agree, and no other rank creates a stray folder. (Lightning's loggers write on rank 0 only,
    and :class:`LastCheckpoint` broadcasts its folder from rank 0 too.)

    Decision: global rank 0 takes the folder's :class:`semssl.engine.resume.RunLock` before it writes anything
    there (``config.yaml`` included) and :func:`pretrain` releases it when the run ends, evaluation included;
    a refusal is broadcast so that every rank stops with the same message instead of waiting for rank 0.
    """

    def __init__(self, cfg: Config, path: Path) -> None:
        self.cfg, self.path = cfg, Path(path)
        self.lock: Optional[RunLock] = None
        self.log_file: Optional[logging.Handler] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = Path(trainer.strategy.broadcast(str(self.path), src=0))
        os.environ[RUN_DIR_ENV] = str(self.path)
        refused = None
        if trainer.is_global_zero:
            self.lock = RunLock(self.path)
            try:
                self.lock.acquire()
            except RunLockedError as err:
                self.lock, refused = None, str(err)
        refused = trainer.strategy.broadcast(refused, src=0)
        if refused:
            raise RunLockedError(refused)
        if trainer.is_global_zero:
            dump_config(self.cfg, self.path / "config.yaml")
            self.log_file = open_run_log(self.path)

    def release(self) -> None:
        if self.log_file is not None:
            logging.getLogger("semssl").removeHandler(self.log_file)
            self.log_file.close()
            self.log_file = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_run_log(run_dir: Path) -> logging.Handler:
    """Append every record the ``semssl`` loggers let through (all of them, DEBUG included, under the command line)
    to ``run_dir/logs/semssl.log``; returns the handler, which :meth:`RunFolder.release` removes."""
    path = run_dir / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(RUN_LOG_FORMAT))
    logging.getLogger("semssl").addHandler(handler)
    return handler


class LastCheckpoint(Checkpoint):
    """Writes ``checkpoints/last.ckpt`` (through the trainer's atomic checkpoint IO, on global rank 0) at the end
    of every ``every_n_epochs``-th complete training epoch, of the last epoch, every ``every_n_steps``
    optimisation steps, and at the step where ``trainer.max_steps`` ends training mid-epoch.

    Decision: not Lightning's ``ModelCheckpoint(save_top_k=0, save_last=True)``: that one writes ``last.ckpt``
    only in a step where it also wrote a top-k checkpoint — with ``save_top_k=0`` never before training ends —
    so a run killed, or stopped by the NaN guard, in epoch 10 had no checkpoint to resume from.

    Decision: a mid-epoch checkpoint is written at the end of its training batch, never in the epoch-end hook.
    When ``max_steps`` stops training mid-epoch, Lightning still runs the epoch-end hooks and counts the epoch
    as processed; a checkpoint written there claims the epoch is done, and a resumed run skipped the rest of
    it (killed after 16 of 40 steps, the resumed run ended at step 33). Written at the batch end, it records
    the batches done, and :class:`SSLDataModule` resumes the epoch's data order right after them.

    Decision: every checkpoint also records its :class:`semssl.engine.resume.Position` (epochs completed, batches
    of the next epoch done), and on resume the fit loop's counters are rewritten from it into a state whose
    restore is exact (:func:`semssl.engine.resume.canonical_fit_loop`): an epoch-end checkpoint of a ``max_steps``
    run otherwise restored its epoch's batch counter as full, and the next epoch yielded one batch.
    """

    def __init__(self, dirpath: Path, every_n_epochs: int, every_n_steps: int = 0, steps_per_epoch: int = 0) -> None:
        self.dirpath, self.every_n_epochs, self.every_n_steps = Path(dirpath), every_n_epochs, every_n_steps
        self.steps_per_epoch = steps_per_epoch  # of this run (the loader's full batches); 0 = not known
        self._saved_step = -1
        self._position: Optional[Position] = None

    @property
    def path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = Path(trainer.strategy.broadcast(str(self.dirpath), src=0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        if periodic or final:
            self._save(trainer, Position.of_trainer(trainer, at_epoch_end=False))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if done < trainer.num_training_batches:
            return  # max_steps ended the epoch early: saved at its last batch (see the class docstring)
        epoch = trainer.current_epoch + 1
        periodic = self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0
        last = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch
        if periodic or last:
            self._save(trainer, Position.of_trainer(trainer, at_epoch_end=True))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            spe = self.steps_per_epoch
            self._save(trainer, Position(*divmod(trainer.global_step, spe), spe) if spe > 0 else None)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._position is not None:
            checkpoint[POSITION_KEY] = {"epochs": self._position.epochs, "batches": self._position.batches,
                                        "steps_per_epoch": self._position.steps_per_epoch}
        checkpoint[LAYOUT_KEY] = {"world_size": int(trainer.world_size),  # resume keeps the global batch
                                  "batch_size": int(step_batch(pl_module.cfg))}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Rewrite the fit loop's progress from the checkpoint's position (called before the loops restore)."""
        loops = checkpoint.get("loops") or {}
        if "fit_loop" in loops and self.steps_per_epoch > 0:
            position = position_of(checkpoint, self.steps_per_epoch)
            loops["fit_loop"] = canonical_fit_loop(loops["fit_loop"], position)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Ctrl-C: say where the last checkpoint is and how to resume (Lightning then exits with code 1).

        Decision: no checkpoint is written on the way out — the interrupt may land inside a step, and a
        checkpoint of a half-done step would not resume exactly; the last one written is consistent."""
        if not isinstance(exception, KeyboardInterrupt) or not trainer.is_global_zero:
            return
        run_dir = self.dirpath.parent
        if self.path.exists():
            where = (f"the last checkpoint ({self._saved_step if self._saved_step >= 0 else 'an earlier run'}"
                     f" step) is {self.path}; resume with: semssl pretrain --resume {run_dir}")
        else:
            where = f"no checkpoint was written yet ({run_dir}); start the run again"
        print(f"semssl: interrupted at step {trainer.global_step}; {where}", file=sys.stderr)

    def save_at_batch_end(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint of the batch that just ended, from an ``on_train_batch_end`` hook, unless this
        step's is written already (engine/preempt.py: a signal stops the run); every rank calls it. Its path."""
        if self._saved_step != trainer.global_step:
            self._save(trainer, Position.of_trainer(trainer, at_epoch_end=False))
        return self.path

    def _save(self, trainer: pl.Trainer, position: Optional[Position]) -> None:
        # every rank calls it (a barrier); rank 0 writes. Lightning's save-side ``weights_only`` option is set
        # off so the file holds the full state (optimiser, loops, RNG) that resume needs; reading is always
        # weights-only (AtomicCheckpointIO).
        self._position = position
        if trainer.is_global_zero:
            keep_previous(self.path)  # the one before stays as previous.ckpt: --resume falls back to it
        trainer.save_checkpoint(self.path, **{"weights_only": False})
        self._saved_step = trainer.global_step


class ProgressBar(RichProgressBar):
    """Rich progress bar without Lightning's logger-version field (``v_num``)."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def new_run_dir(cfg: Config) -> Path:
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    name = cfg.trainer.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.trainer.out_dir) / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(cfg.trainer.out_dir) / f"{name}-{suffix}"
    return path


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (is it a semssl run folder?)")
    return from_dict(Config, apply_overrides(load_yaml(cfg_file), overrides))


def world_size_of(cfg: Config) -> int:
    devices = cfg.trainer.devices
    n = devices if isinstance(devices, int) and devices > 0 else 1
    return n * cfg.trainer.num_nodes


def csv_version(run_dir: Path) -> str:
    """``csv`` for a new run; ``csv-resume1``, ``csv-resume2``, ... for each resume, because Lightning's
    CSVLogger would otherwise delete the curves written before the resume (TensorBoard appends by itself)."""
    logs = run_dir / "logs"
    if not (logs / "csv").exists():
        return "csv"
    n = 1
    while (logs / f"csv-resume{n}").exists():
        n += 1
    return f"csv-resume{n}"


def build_trainer(cfg: Config, run_dir: Path, max_epochs: int, callbacks: list, steps_per_epoch: int = 0
                  ) -> pl.Trainer:
    t = cfg.trainer
    loggers = [TensorBoardLogger(str(run_dir), name="logs", version="tensorboard"),
               CSVLogger(str(run_dir), name="logs", version=csv_version(run_dir))]
    ckpt = LastCheckpoint(run_dir / "checkpoints", every_n_epochs=t.checkpoint_every_n_epochs,
                          every_n_steps=t.checkpoint_every_n_steps, steps_per_epoch=steps_per_epoch)
    if t.progress_bar:
        callbacks = [*callbacks, ProgressBar(leave=True)]
    strategy = t.strategy
    if cfg.model.sync_bn and strategy == "auto":
        strategy = "ddp"
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_epochs=max_epochs, max_steps=t.max_steps if t.max_steps > 0 else -1,
        callbacks=[ckpt, *callbacks], logger=loggers, plugins=[AtomicCheckpointIO()],
        log_every_n_steps=t.log_every_n_steps, use_distributed_sampler=False, num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar, enable_model_summary=False, sync_batchnorm=cfg.model.sync_bn,
        default_root_dir=str(run_dir),
    )


def pretrain(cfg: Config, resume: Optional[Path] = None, console: Any = None) -> Path:
    """Pre-train, evaluate (trained vs random init) and return the run folder (the same on every rank).

    ``SEMSSL_RUN_DIR`` names the folder for the processes Lightning launches for DDP while this call runs.
    Decision: it is restored afterwards, so a second ``pretrain`` in the same process gets a folder of its own
    instead of silently reusing (and overwriting) the first run's.
    """
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        return _pretrain(cfg, resume, console)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _pretrain(cfg: Config, resume: Optional[Path], console: Any) -> Path:
    quiet_library_warnings()
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)
    start = time.time()
    run_dir = Path(resume) if resume else new_run_dir(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    pl.seed_everything(cfg.trainer.seed, workers=False, verbose=False)

    paths = resolve_paths(cfg)
    dataset = build_train_dataset(cfg, paths["train"])
    world = world_size_of(cfg)
    spe = steps_per_epoch(len(dataset), step_batch(cfg), world)  # a DataError before any folder if 0
    if spe == 1:
        accumulate = cfg.trainer.accumulate_grad_batches
        log.warning("data.train: %d images make only 1 step/epoch at data.batch_size=%d%s%s (%d images left out of "
                    "each epoch); lower data.batch_size for more steps", len(dataset), cfg.data.batch_size,
                    f" x {accumulate} accumulated" if accumulate > 1 else "",
                    f" x {world} processes" if world > 1 else "", len(dataset) - step_batch(cfg) * world)
    max_epochs = cfg.trainer.max_epochs
    if cfg.trainer.max_steps > 0:
        max_epochs = min(max_epochs, math.ceil(cfg.trainer.max_steps / spe)) if max_epochs > 0 else \
            math.ceil(cfg.trainer.max_steps / spe)

    module = SSLModule(cfg)
    # the random-init baselines start from the same method, architecture and seed, evaluated through the same
    # features(): as it is, with BatchNorm statistics re-estimated, and raw pixels (eval.evaluate.baseline_models)
    random_model = copy.deepcopy(module.method) if cfg.eval.enabled and cfg.eval.random_init else None

    folder, preemption = RunFolder(cfg, run_dir), Preemption()
    callbacks: list = [folder, preemption]
    monitor = None
    if cfg.trainer.knn_every_n_epochs > 0 and paths["eval_train"] and paths["eval_test"]:
        monitor = KNNMonitor(cfg, paths["eval_train"], paths["eval_test"], cfg.trainer.knn_every_n_epochs)
        callbacks.append(monitor)
    if cfg.trainer.figures:
        callbacks.append(FigureCallback(cfg, paths, run_dir))
    trainer = build_trainer(cfg, run_dir, max_epochs, callbacks, steps_per_epoch=spe)
    ckpt_path = None
    if resume:
        folder_ckpt = run_dir / "checkpoints"
        if not (folder_ckpt / "last.ckpt").exists() and not (folder_ckpt / PREVIOUS).exists():
            raise ConfigError(f"--resume {run_dir}: no checkpoints/last.ckpt to resume from")
        ckpt_path = resume_checkpoint(folder_ckpt)  # last.ckpt, or previous.ckpt where last.ckpt is unreadable
        if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0:  # else the count is known at launch only
            check_layout(run_dir, read_layout(ckpt_path), Layout(world, step_batch(cfg)))  # same global batch
    log.info("run folder: %s (%d images, %s/epoch, %s)", run_dir, len(dataset), _count(spe, "step"),
             _count(max_epochs, "epoch"))
    try:
        trainer.fit(module, datamodule=SSLDataModule(cfg, dataset), ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=True)
        run_dir = folder.path
        train_seconds = time.time() - start
        check_final_step(run_dir, int(trainer.global_step), cfg.trainer.max_steps, max_epochs, spe, bool(resume))

        metrics: dict[str, Any] = {}
        if cfg.eval.enabled and paths["eval_train"] and paths["eval_test"]:
            device = module.device
            # under DDP each rank's BatchNorm statistics hold its own last batch: evaluate rank 0's, the checkpoint's
            broadcast_buffers(module.method)
            log.info("evaluating the trained network%s: kNN, fast linear probe",
                     " and its random-init baselines" if random_model is not None else "")
            metrics["trained"] = evaluate(module.method, cfg, paths["eval_train"], paths["eval_test"], device=device)
            if random_model is not None:
                baselines = baseline_models(random_model, cfg, paths["eval_train"], device=device)
                for name, model in baselines.items():
                    metrics[name] = evaluate(model, cfg, paths["eval_train"], paths["eval_test"], device=device)
        metrics["run"] = {
            "method": cfg.method.name, "arch": cfg.model.arch, "width": cfg.model.width,
            "global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.time() - start, 1), "world_size": int(trainer.world_size),
            "eval_train": paths["eval_train"], "eval_test": paths["eval_test"],
            "knn_monitor": monitor.history if monitor else [],
            "peak_rss_mb": peak_rss_mb(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)),
            **run_environment(trainer),
        }
        if trainer.is_global_zero:
            write_json(run_dir / "metrics.json", metrics)
            print_summary(run_dir, metrics, console)
        return run_dir
    finally:  # also when a signal stopped the run (semssl.errors.RunPreempted)
        preemption.release()
        folder.release()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


#: the packages whose versions a run records (those its numbers depend on)
RECORDED_PACKAGES = ("torch", "torchvision", "lightning", "numpy", "pillow", "timm", "opencv-contrib-python-headless",
                     "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where that is not readable)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def run_environment(trainer: Optional[pl.Trainer] = None) -> dict[str, Any]:
    """``{"machine": {...}, "versions": {...}}`` of this process, for ``metrics.json`` and the run report: the host,
    platform, CPU model and count, torch threads, accelerator and devices; semssl's, Python's and
    :data:`RECORDED_PACKAGES`' versions (None where a package is not installed)."""
    import platform
    import socket
    from importlib import metadata

    import semssl

    machine: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(), "cpu": cpu_model(),
                               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if trainer is not None:
        machine["accelerator"] = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        machine["devices"] = int(trainer.num_devices)
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    versions: dict[str, Optional[str]] = {"semssl": semssl.__version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torchvision

    versions["torch"], versions["torchvision"] = torch.__version__, torchvision.__version__  # with the build (+cu130)
    return {"machine": machine, "versions": versions}


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def print_summary(run_dir: Path, metrics: dict, console: Any = None) -> None:
    """The trained network next to the three random-init baselines, and its gain over the best of them (per
    column: the best baseline of the kNN column may differ from the linear one's; it is shown in bold)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if "trained" in metrics:
        run = metrics["run"]
        width = f" (width {run['width']})" if run.get("width", 64) != 64 else ""
        table = Table(title=f"{run['method']} / {run['arch']}{width}: "
                            f"{run['global_step']} steps, {run['train_seconds']:.0f} s")
        table.add_column("backbone")
        columns = {"knn_top1": "kNN top-1 (k=20) %", "linear_top1": "linear top-1 (fast) %"}
        for title in columns.values():
            table.add_column(title, justify="right")
        baselines = {name: describe(metrics[name]) for name in BASELINES if metrics.get(name)}
        trained = describe(metrics["trained"])
        best = {key: max((b[key] for b in baselines.values() if b[key] is not None), default=None)
                for key in columns}

        def cell(value: Any, bold: bool = False) -> str:
            if value is None:
                return "-"
            return f"[bold]{value:.2f}[/bold]" if bold else f"{value:.2f}"

        for name, d in baselines.items():
            table.add_row(BASELINE_LABELS[name], *(cell(d[k], len(baselines) > 1 and d[k] == best[k])
                                                    for k in columns))
        table.add_row("trained", *(cell(trained[k]) for k in columns))
        if baselines:
            gains = [f"{trained[k] - best[k]:+.2f}" if trained[k] is not None and best[k] is not None else "-"
                     for k in columns]
            table.add_row("gain over best baseline" if len(baselines) > 1 else "gain", *gains)
        console.print(table)
    console.print(f"Run folder: {run_dir}  (checkpoints/last.ckpt, logs/, metrics.json, config.yaml)")
