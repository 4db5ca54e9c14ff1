"""Preemption: SIGTERM or SIGUSR1 checkpoints the step in progress and stops the run; under SLURM, SIGUSR1 also
requeues the job.

What happens
    :class:`Preemption` installs handlers for SIGTERM and SIGUSR1 in every training process; a handler only notes
    the signal. At the end of the training batch in progress (``on_train_batch_end``) the ranks agree on it (a sum
    over ranks of the signals each received, every step: a signal may reach one rank only, and every rank must
    stop at the same step), write ``checkpoints/last.ckpt`` through :class:`semssl.engine.run.LastCheckpoint`
    (atomic, ``previous.ckpt`` kept, the position recorded, so ``--resume`` continues exactly) and raise
    :class:`semssl.errors.RunPreempted`. Nothing is evaluated and no ``metrics.json`` is written; the command
    line prints one line (the step, the checkpoint, ``semssl pretrain --resume RUN``) and exits 0.

    Under SLURM (Lightning's :class:`~lightning.fabric.plugins.environments.SLURMEnvironment` detects it),
    SIGUSR1 — what ``sbatch --signal=USR1@120`` sends ahead of the time limit — also requeues the job:
    ``scontrol requeue $SLURM_JOB_ID`` (array jobs: ``$SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID``), run by global
    rank 0 once the checkpoint is written; the job's script then runs again and resumes. SIGTERM never requeues:
    ``scancel`` sends it too, and a cancelled job must stay cancelled (a job SLURM preempts with
    ``PreemptMode=REQUEUE`` is requeued by SLURM itself).

Decisions
    * The stop is an exception raised in the batch-end hook, not ``trainer.should_stop``: a stop through
      ``should_stop`` still runs the epoch-end hooks, where the kNN monitor and the figures take a stop for the
      last epoch, so a preempted run would evaluate during the scheduler's grace time, and the end-step guard
      would have to tell a preempted run from a short one.
    * Exit code 0: the run did what the signal asks, stop cleanly and resumably; the printed line and the missing
      ``metrics.json`` say it is not finished. (Ctrl-C stays Lightning's exit 1 and writes no checkpoint.)
    * Lightning's own handling is replaced, not composed. Lightning 2.6 installs a SIGTERM handler when ``fit``
      starts (after the ``setup`` hooks) that makes the run raise ``SIGTERMException`` — a ``SystemExit`` of
      code 0 — after the batch, without a checkpoint, and under DDP calls ``dist.broadcast`` from inside the signal
      handler, a collective the other ranks do not match. Under SLURM it also installs a SIGUSR1 handler that
      writes ``hpc_ckpt_N.ckpt`` from inside the signal handler, mid-step, and requeues. So the handlers are
      installed in ``setup``, before Lightning's (Lightning then leaves SIGUSR1 alone: it installs its own only
      where none is set), and SIGTERM's again in ``on_train_start``, right after Lightning's; a SIGTERM in between
      reaches both (Lightning's handler calls the one it found), and Lightning's flag is cleared there. Lightning
      puts back the handlers it found when ``fit`` ends; :meth:`Preemption.release` then puts back the ones from
      before the run.
    * Data-loader workers ignore SIGUSR1 (:func:`semssl.engine.data.train_loader`), so the signal SLURM sends to
      every process of a job leaves them running (by default it ends them, and the run with a DataLoader error).
      A SIGTERM sent to the workers too (SLURM's at the time limit, ``scancel``, ``kill -TERM -PGID``) still ends
      PyTorch's workers, and the training process raises "DataLoader worker ... is killed by signal" at once,
      mid-step: the run ends with its last periodic checkpoint (``trainer.checkpoint_every_n_steps``), not this
      step's. Not worked around: a worker that ignored SIGTERM would also ignore its parent's ``terminate()``,
      which ``multiprocessing`` follows with a ``join()`` at exit. So under SLURM ask for SIGUSR1 ahead of the end
      (``--signal=USR1@120``), and elsewhere signal the training process only (``kill PID``); with
      ``data.num_workers=0`` SIGTERM to the whole group is handled too.
    * A signal arriving while the run is evaluating, after training, is not deferred (the handlers are gone by
      then): the last checkpoint is the final one, and ``--resume`` evaluates it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from semssl.errors import RunPreempted

log = logging.getLogger("semssl")

#: the signals that preempt a run (SIGUSR1 does not exist on Windows)
SIGNALS: tuple[int, ...] = tuple(int(s) for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None))
                                 if s is not None)
REQUEUE_SIGNAL = getattr(signal, "SIGUSR1", None)


def slurm_job_id() -> Optional[str]:
    """The SLURM job to requeue (``JOB`` or ``ARRAYJOB_TASK``), or None outside SLURM (as Lightning detects it:
    ``SLURMEnvironment.detect()``, which also says no for an interactive ``srun --pty bash``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")
    return job if re.fullmatch(r"[0-9]+(_[0-9]+)?", job) else None


def requeue(job_id: str) -> Optional[str]:
    """``scontrol requeue JOB``; None when it worked, else the reason in a few words."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if done.returncode != 0:
        text = (done.stderr or done.stdout or "").strip()
        return text.splitlines()[-1] if text else f"exit code {done.returncode}"
    return None


def signal_names(signums: set[int]) -> tuple[str, ...]:
    return tuple(signal.Signals(s).name for s in sorted(signums))


class Preemption(pl.Callback):
    """SIGTERM / SIGUSR1: checkpoint at the end of the current step on every rank, requeue under SLURM, stop
    (module docstring). ``release`` puts back the signal handlers from before the run; call it when the run ends."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._before: dict[int, Any] = {}
        self._checkpoint: Any = None  # the trainer's LastCheckpoint

    # -- handlers --------------------------------------------------------------------------------------------
    def _note(self, signum: int, frame: Any) -> None:
        self.received.append(int(signum))  # only this: the step in progress finishes first

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("preemption: not the main thread, so no SIGTERM/SIGUSR1 handlers (Python allows none there)")
            return
        for signum in SIGNALS:
            self._before.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._note)

    def release(self) -> None:
        """Put back the handlers found before the run (idempotent)."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._before.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._before = {}

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._checkpoint = trainer.checkpoint_callback
        if not hasattr(self._checkpoint, "save_at_batch_end"):
            log.debug("preemption: no LastCheckpoint in the trainer, so signals are left to Lightning")
            self._checkpoint = None
            return
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._checkpoint is None:
            return
        self._install()  # SIGTERM again: Lightning installed its own since setup
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and getattr(connector, "received_sigterm", False):
            connector.received_sigterm = False  # ours has it too; Lightning's would stop the run uncheckpointed
            self.received.append(int(signal.SIGTERM))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._checkpoint is None:
            return
        asked = self._agreed(trainer)
        if not asked:
            return
        path = Path(self._checkpoint.save_at_batch_end(trainer))  # every rank (a barrier); rank 0 writes
        run_dir, step, names = path.parent.parent, int(trainer.global_step), signal_names(asked)
        requeued, message = None, None
        if trainer.is_global_zero:
            message = (f"semssl: stopped by {' and '.join(names)} at step {step}; the checkpoint is {path}; "
                       f"resume with: semssl pretrain --resume {run_dir}")
            job = slurm_job_id() if REQUEUE_SIGNAL is not None and int(REQUEUE_SIGNAL) in asked else None
            if job is not None:
                failed = requeue(job)
                if failed is None:
                    requeued = job
                    message += f"; SLURM job {job} requeued (its script must resume: semssl pretrain --resume RUN)"
                else:
                    message += f"; requeueing SLURM job {job} failed ({failed}): resubmit it"
            log.debug(message.removeprefix("semssl: "))  # into the run's logs/semssl.log
        raise RunPreempted(message, step, names, str(path), requeued)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.release()

    def _agreed(self, trainer: pl.Trainer) -> set[int]:
        """The signals any rank received: the same set on every rank (one small all-reduce per step under DDP)."""
        mine = [int(s in self.received) for s in SIGNALS]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.tensor(mine, dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(counts)
            mine = counts.tolist()
        return {s for s, n in zip(SIGNALS, mine) if n}
