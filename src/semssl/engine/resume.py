"""Exact resume at any point of an epoch, the end-step guard, and the run-folder lock.

Where a checkpoint stands
    Lightning records a run's position in its loops' progress counters, and what a restored loop does with them
    depends on the hook that saved them: a checkpoint written in ``on_train_epoch_end`` holds an epoch that is
    "processed" but not "completed", one written in ``on_train_batch_end`` a batch that is "processed" but not
    "completed", and iteration-based runs (``max_steps``) always restore as "restarting". Not every combination
    resumes correctly: a ``max_steps`` run saved at its first epoch's end restored that epoch's batch counter
    as already full, so the next epoch yielded one batch instead of eight and the run ended 7 steps short
    (``max_steps=160`` ended at 153, exit 0).

    Decision: a checkpoint records its position as two facts — the epochs completed and the batches of the
    next epoch already trained on (:class:`Position`, saved as ``semssl_position``) — and on resume the fit
    loop's counters are rewritten from them into one of the two states whose restore is exact (tested at every
    point of an epoch, ``tests/test_kill_resume.py``):

    * *between epochs* (0 batches done): every epoch counter at the epochs completed, the epoch's batch counter
      at 0 — the state of a clean epoch boundary;
    * *mid-epoch* (``0 < batches < steps per epoch``): the state Lightning writes at the end of a training
      batch, which it restores as "restarted on train batch end".

    A checkpoint whose batches fill the epoch (saved at the last batch, before the epoch-end hooks) is the
    boundary of the next epoch. A checkpoint written before ``semssl_position`` existed takes its position from
    ``global_step`` and the steps per epoch (every epoch has the same number of full batches).

The end-step guard
    :func:`expected_final_step` is the step a run's config asks for; a run that ends anywhere else raises
    :class:`semssl.errors.IncompleteRunError` before anything is evaluated, so a resume bug can never again be a
    silent wrong result.

The lock
    :class:`RunLock` is ``<run>/run.lock`` holding the pid and host of the process that trains in the folder.
    Two processes writing one ``last.ckpt`` corrupt a run silently, so a second one is refused. A lock of a
    process that no longer runs on this host (killed, crashed) is stale and taken over with a message; a lock
    of another host cannot be checked from here and is refused, naming the file to remove.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from semssl.errors import IncompleteRunError, RunLockedError

log = logging.getLogger("semssl")

POSITION_KEY = "semssl_position"
LOCK_NAME = "run.lock"


@dataclass(frozen=True)
class Position:
    """Where a checkpoint stands: ``epochs`` completed, then ``batches`` of the next epoch trained on."""

    epochs: int
    batches: int
    steps_per_epoch: int

    def normalised(self) -> "Position":
        """A position whose batches fill the epoch is the next epoch's boundary."""
        if self.steps_per_epoch > 0 and self.batches >= self.steps_per_epoch:
            extra, batches = divmod(self.batches, self.steps_per_epoch)
            return Position(self.epochs + extra, batches, self.steps_per_epoch)
        return self

    @classmethod
    def of_trainer(cls, trainer: Any, at_epoch_end: bool) -> "Position":
        """The position of a checkpoint saved now, from the end-of-batch or end-of-epoch hook."""
        spe = int(trainer.num_training_batches)
        epochs = int(trainer.fit_loop.epoch_progress.current.completed)  # the epoch being trained
        if at_epoch_end:
            return cls(epochs + 1, 0, spe)
        # at the end of a batch the batch is counted "processed" (and not yet "completed")
        batches = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return cls(epochs, batches, spe).normalised()


def position_of(checkpoint: dict[str, Any], steps_per_epoch: int) -> Position:
    """The checkpoint's recorded position, or the one its ``global_step`` implies (older checkpoints)."""
    recorded = checkpoint.get(POSITION_KEY)
    if recorded:
        return Position(**{k: int(v) for k, v in recorded.items()}).normalised()
    epochs, batches = divmod(int(checkpoint["global_step"]), steps_per_epoch)
    return Position(epochs, batches, steps_per_epoch)


def _counters(ready: int, started: int, processed: int, completed: int) -> dict[str, int]:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


def canonical_fit_loop(fit_loop: dict[str, Any], position: Position) -> dict[str, Any]:
    """The fit loop's state rewritten so that Lightning restores it at ``position`` exactly (module docstring).

    Only the epoch and batch progress change; the optimiser-step counters (``global_step``) and everything else
    are Lightning's own."""
    state = dict(fit_loop)
    e, b = position.epochs, position.batches
    batches = dict(state["epoch_loop.batch_progress"])
    n = int(batches["total"]["processed"])  # batches trained in the whole run
    if b == 0:  # between epochs: a clean boundary
        epoch = _counters(e, e, e, e)
        batches["total"] = _counters(n, n, n, n)
        batches["current"] = _counters(0, 0, 0, 0)
    else:  # mid-epoch: Lightning's own end-of-batch state
        epoch = _counters(e + 1, e + 1, e, e)
        batches["total"] = _counters(n, n, n, n - 1)
        batches["current"] = _counters(b, b, b, b - 1)
    batches["is_last_batch"] = False
    state["epoch_loop.batch_progress"] = batches
    state["epoch_progress"] = {"total": dict(epoch), "current": dict(epoch)}
    return state


def expected_final_step(max_steps: int, max_epochs: int, steps_per_epoch: int) -> int:
    """The step a run ends at: ``max_steps`` unless ``max_epochs`` x steps per epoch comes first."""
    by_epochs = max_epochs * steps_per_epoch if max_epochs > 0 else None
    if max_steps > 0:
        return min(max_steps, by_epochs) if by_epochs is not None else max_steps
    assert by_epochs is not None, "a config asks for max_steps or max_epochs"
    return by_epochs


def check_final_step(run_dir: Path, ended_at: int, max_steps: int, max_epochs: int, steps_per_epoch: int,
                     resumed: bool) -> None:
    """Raise :class:`IncompleteRunError` when a run ended at another step than the one its config asks for."""
    expected = expected_final_step(max_steps, max_epochs, steps_per_epoch)
    if ended_at == expected:
        return
    asked = (f"trainer.max_steps={max_steps}" if max_steps > 0 and expected == max_steps
             else f"{max_epochs} epochs x {steps_per_epoch} steps")
    raise IncompleteRunError(
        f"{'the resumed' if resumed else 'the'} run {run_dir} ended at step {ended_at}, but its config asks for "
        f"step {expected} ({asked}); the result is wrong and is not evaluated. Its last checkpoint is kept in "
        f"{run_dir / 'checkpoints'}; please report this with the run's config.yaml")


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str

    def alive(self) -> bool:
        """Whether the holder still runs (only answerable on its own host)."""
        if self.host != socket.gethostname():
            return True  # cannot tell from here: assume it does
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by another user
        return True


class RunLock:
    """``<run>/run.lock`` while a process trains in the folder (module docstring). ``acquire`` returns None or
    the one-line reason the folder is refused; ``release`` removes the lock if it is still this process's."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.me = LockHolder(os.getpid(), socket.gethostname())
        self.held = False

    def holder(self) -> Optional[LockHolder]:
        try:
            data = json.loads(self.path.read_text())
            return LockHolder(int(data["pid"]), str(data["host"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return LockHolder(-1, "?")  # unreadable: treated as held by an unknown process

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; :class:`RunLockedError` if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder == self.me:
                    self.held = True
                    return
                if holder.pid > 0 and not holder.alive():
                    log.warning("run folder %s: taking over the stale lock of process %d on %s, which no longer "
                                "runs (killed or crashed)", self.path.parent, holder.pid, holder.host)
                    self.path.unlink(missing_ok=True)
                    continue
                where = (f"process {holder.pid} on host {holder.host}" if holder.pid > 0
                         else "another process (unreadable lock file)")
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {where}: two runs writing one checkpoint corrupt "
                    f"it. Wait for that run to end or stop it; if it is gone, remove {self.path}")
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self.me), f)
            self.held = True
            return
        raise RunLockedError(f"run folder {self.path.parent}: cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held and self.holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False
