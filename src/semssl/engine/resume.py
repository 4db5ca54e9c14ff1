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

Another world size
    A checkpoint also records the layout that wrote it (``semssl_layout``: processes and ``data.batch_size`` per
    process; older checkpoints: their config's), and a run resumes on any number of processes that keeps the
    *global batch* (processes x ``data.batch_size``): 2 processes of 32 resume as 1 of 64, or 8 of 8.

    Decision: the global batch is kept, never re-scaled. It decides the lr (scaled per 256 images), the steps per
    epoch (``(images // W) // b == images // (W x b)``), hence the schedules, the end step and the meaning of a
    position; with it kept, a position's batches are the same global batches in either layout, and the data
    order lines up (:meth:`semssl.engine.data.EpochSampler.resume_at` counts in global terms: the first ``k``
    batches of all ranks are ``order[:k x W x b]`` whatever ``W``). A resume whose global batch differs is
    refused before anything is written, in one line naming both values and the ``data.batch_size`` to pass
    (:func:`check_layout`; where ``trainer.devices`` is ``auto``, ``-1`` or a device list, the number of
    processes is known only once they are launched, and nothing is checked). semssl does not pick that batch by
    itself: the per-process batch decides the memory a device needs, and a run that silently doubled it on
    resume would fail hours later, out of memory, on a requeued job; ``config.yaml`` keeps saying what runs.

    What stays different across layouts: the order of the samples within a batch (the MoCo queue holds the same
    keys in another order), the rounding of the gradient sums and, for BatchNorm without SyncBN, the per-device
    statistics. For methods without batch-statistics coupling (frozen BN, GroupNorm) the resumed run equals the
    same run resumed on the first layout to rounding (tested in float64, 2 processes -> 1: to 1e-12,
    ``tests/test_world_resume.py``); with BatchNorm it is a faithful continuation, not a bit-identical one.

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

from semssl.errors import ConfigError, IncompleteRunError, RunLockedError

log = logging.getLogger("semssl")

POSITION_KEY = "semssl_position"
LAYOUT_KEY = "semssl_layout"
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


@dataclass(frozen=True)
class Layout:
    """The processes of a run and the images each takes per step (``data.batch_size`` x accumulated batches)."""

    world_size: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def describe(self) -> str:
        processes = "1 process" if self.world_size == 1 else f"{self.world_size} processes"
        return f"{self.global_batch} ({processes} x data.batch_size={self.batch_size})"


def layout_of(checkpoint: dict[str, Any]) -> Optional[Layout]:
    """The layout a checkpoint was written by; for older checkpoints the one its config asked for (None when
    neither says)."""
    recorded = checkpoint.get(LAYOUT_KEY)
    try:
        if recorded:
            return Layout(int(recorded["world_size"]), int(recorded["batch_size"]))
        cfg = checkpoint["semssl_config"]
        devices, nodes = cfg["trainer"]["devices"], int(cfg["trainer"].get("num_nodes", 1))
        if not isinstance(devices, int) or devices < 1:
            return None  # "auto", -1, a device list: the count is not in the config
        return Layout(devices * nodes, int(cfg["data"]["batch_size"]))
    except (KeyError, TypeError, ValueError):
        return None


def read_layout(path: Path) -> Optional[Layout]:
    """:func:`layout_of` the checkpoint file at ``path``, read memory-mapped (no tensor is loaded); None where it
    cannot be read (the resume itself then says why)."""
    import torch

    try:
        return layout_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - the checkpoint's own load reports what is wrong with it
        return None


def check_layout(run_dir: Path, recorded: Optional[Layout], now: Layout) -> None:
    """ConfigError (one line) when a resume would change the global batch (module docstring: another world size)."""
    if recorded is None or recorded.global_batch == now.global_batch:
        return
    target = recorded.global_batch
    if target % now.world_size == 0:
        fix = f"resume with data.batch_size={target // now.world_size}"
    else:
        fix = f"no data.batch_size gives {target} on {now.world_size} processes: resume on a count that divides it"
    raise ConfigError(f"--resume {run_dir}: its checkpoint was trained with a global batch of {recorded.describe()}, "
                      f"this run would have {now.describe()}; the lr, schedules and data position follow the global "
                      f"batch, so {fix}")


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
