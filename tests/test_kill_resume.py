"""A real kill: a `semssl pretrain` process killed with SIGKILL right after a checkpoint, then resumed with
`--resume`, ends exactly where the uninterrupted run ends (same final step, same weights, optimiser state and RNG),
at every point of an epoch: the first batch, the middle, the last batch before the epoch ends, between epochs,
for `max_steps` and `max_epochs` runs, with `trainer.checkpoint_every_n_steps` on and off.

The child process is the real command line with one test hook (a script wrapping ``semssl.cli.main`` that sends
itself SIGKILL right after the checkpoint of a chosen hook and step), so the kill lands at exactly that point
with no timing involved; nothing in the product changes for the test.

Also: a run that ends at another step than its config asks for exits 1 naming both; a run folder in use by a
live process is refused; a stale lock is taken over; Ctrl-C, a full disk and read-only folders are one line.

Preemption: a real `semssl pretrain` that this test signals (SIGTERM, or SIGUSR1 / SIGTERM under a faked SLURM)
inside a step checkpoints that step, exits 0 with one line and resumes to the uninterrupted run's state; the data
workers ignore SIGUSR1. (Under DDP: tests/test_world_resume.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from test_resume import _assert_same_training_state

from semssl.checkpoints import safe_load
from semssl.cli import main

CHILD = """
import os, signal, sys
from semssl.engine.run import LastCheckpoint
HOOK, STEP = {hook!r}, {step}

def kill_after(name):
    real = getattr(LastCheckpoint, name)
    def hook(self, trainer, *args):
        real(self, trainer, *args)
        if name == HOOK and trainer.global_step == STEP and self._saved_step == STEP:
            os.kill(os.getpid(), signal.SIGKILL)  # right after the checkpoint: nothing else is written
    setattr(LastCheckpoint, name, hook)

kill_after("on_train_batch_end")
kill_after("on_train_epoch_end")
from semssl.cli import main
sys.exit(main(sys.argv[1:]))
"""

BATCH_END, EPOCH_END = "on_train_batch_end", "on_train_epoch_end"


def _kill_after_checkpoint(args: list[str], hook: str, step: int, tmp_path: Path) -> None:
    """Run the real command line in a child that SIGKILLs itself right after the checkpoint that ``hook`` writes
    at ``step`` (a test hook, not a timing: the kill lands at exactly that point, every time)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(hook=hook, step=step))
    proc = subprocess.run([sys.executable, str(script), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the child was not killed at step {step}: {proc.stderr[-2000:]}"


# 96 images at batch 16: 6 steps per epoch. max_steps=10 ends mid-epoch 1 (epochs: ceil(10 / 6) = 2);
# max_epochs=2 ends at step 12. Checkpoints every epoch, and with "steps on" every step too.
LENGTHS = {"max_steps": (["trainer.max_steps=10", "trainer.max_epochs=100"], 10),
           "max_epochs": (["trainer.max_epochs=2"], 12)}
STEPS_ON = ["trainer.checkpoint_every_n_steps=1"]
KILL_POINTS = [  # (length, checkpoint every step?, hook that wrote the checkpoint, step)
    ("max_steps", False, EPOCH_END, 6),   # between epochs, the only checkpoint: the bug of issue 34 (ended 1 short)
    ("max_steps", True, BATCH_END, 1),    # the first batch
    ("max_steps", True, BATCH_END, 3),    # the middle of an epoch
    ("max_steps", True, BATCH_END, 6),    # the last batch, before the epoch-end hooks ran
    ("max_steps", True, EPOCH_END, 6),    # between epochs
    ("max_steps", True, BATCH_END, 7),    # the first batch of the second epoch
    ("max_epochs", False, EPOCH_END, 6),  # between epochs
    ("max_epochs", True, BATCH_END, 1),
    ("max_epochs", True, BATCH_END, 3),
    ("max_epochs", True, BATCH_END, 6),
    ("max_epochs", True, EPOCH_END, 6),
]


def _common(tiny_synth: Path, out: Path, length: str) -> list[str]:
    return tiny_overrides(tiny_synth, out) + [
        "eval.enabled=false", "optim.schedule=cosine", "optim.warmup=0.25", "method.momentum_end=1.0",
        "trainer.num_threads=1", *LENGTHS[length][0]]  # one thread in the child too: the same sums


@pytest.fixture(scope="module")
def uninterrupted(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The uninterrupted run of each length (checkpointing every step or not does not change the weights)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = {}
    for length in LENGTHS:
        assert main(["pretrain", *_common(tiny_synth, out, length), f"trainer.run_name={length}"]) == 0
        result[length] = torch.load(out / length / "checkpoints" / "last.ckpt", weights_only=True)
    return result


@pytest.mark.parametrize("length, every_step, hook, step", KILL_POINTS,
                         ids=[f"{n}-{'steps_on' if e else 'steps_off'}-{h.split('_')[2]}_end@{s}"
                              for n, e, h, s in KILL_POINTS])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_synth: Path, tmp_path: Path, uninterrupted: dict,
                                                          length: str, every_step: bool, hook: str,
                                                          step: int) -> None:
    """Killed right after the checkpoint at each point of an epoch, then resumed: the same final step, weights,
    optimiser state and RNG as the uninterrupted run."""
    common = _common(tiny_synth, tmp_path / "runs", length) + (STEPS_ON if every_step else [])
    killed = tmp_path / "runs" / "killed"
    _kill_after_checkpoint(["pretrain", *common, "trainer.run_name=killed"], hook, step, tmp_path)
    assert safe_load(killed / "checkpoints" / "last.ckpt")["global_step"] == step
    assert (killed / "run.lock").exists()  # the killed process's lock: stale, taken over by the resume
    assert main(["pretrain", "--resume", str(killed)]) == 0
    assert not (killed / "run.lock").exists()
    full, resumed = uninterrupted[length], torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == full["global_step"] == LENGTHS[length][1]
    _assert_same_training_state(full, resumed)


def test_a_run_that_ends_at_the_wrong_step_says_so_and_exits_1(tiny_synth: Path, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    """The end-step guard: a resume bug that loses steps (here: one forced by dropping the position rewrite and
    starting the resumed epoch with its batch counter full) is an error naming both steps, not a result."""
    from semssl.engine import run

    common = tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "eval.enabled=false", "trainer.num_threads=1", "trainer.max_steps=10", "trainer.max_epochs=100"]
    cut = tmp_path / "runs" / "cut"
    assert main(["pretrain", *common, "trainer.max_steps=6", "trainer.run_name=cut"]) == 0

    def broken(self, trainer, pl_module, checkpoint):  # the behaviour before the fix: counters as Lightning left them
        fit = checkpoint["loops"]["fit_loop"]
        fit["epoch_progress"]["current"]["completed"] = fit["epoch_progress"]["total"]["completed"] = 0
        fit["epoch_loop.batch_progress"]["is_last_batch"] = True

    monkeypatch.setattr(run.LastCheckpoint, "on_load_checkpoint", broken)
    assert main(["pretrain", "--resume", str(cut), "trainer.max_steps=10"]) == 1
    err = capsys.readouterr().err
    assert "IncompleteRunError" in err and "ended at step 7" in err and "asks for step 10" in err, err
    import json

    assert json.loads((cut / "metrics.json").read_text())["run"]["global_step"] == 6  # the first run's, not rewritten
    assert safe_load(cut / "checkpoints" / "last.ckpt")["global_step"] == 7  # kept, not lost


def _paused_child_script(tmp_path: Path, go: Path) -> Path:
    """A child run that waits at its second step until the file ``go`` exists (it holds the folder meanwhile)."""
    script = tmp_path / "paused.py"
    script.write_text(f"""
import os, sys, time
from semssl.engine.module import SSLModule
real = SSLModule.training_step
def paused(self, batch, batch_idx):
    if self.global_step == 2:
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
    return real(self, batch, batch_idx)
SSLModule.training_step = paused
from semssl.cli import main
sys.exit(main(sys.argv[1:]))
""")
    return script


def test_a_second_process_on_a_run_folder_in_use_is_refused(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    """Two real processes: while a run trains (paused at step 2, after its step-1 checkpoint), ``--resume`` of
    its folder from another process exits 1 naming the holder's pid and host, and writes nothing there."""
    import socket

    go = tmp_path / "go"
    args = tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "eval.enabled=false", "trainer.num_threads=1", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=1",
        "trainer.run_name=busy"]
    run = tmp_path / "runs" / "busy"
    proc = subprocess.Popen([sys.executable, str(_paused_child_script(tmp_path, go)), "pretrain", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        ckpt = run / "checkpoints" / "last.ckpt"
        while not (ckpt.exists() and safe_load(ckpt)["global_step"] == 2):  # then the child waits for `go`
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the child wrote no step-2 checkpoint in time"
            time.sleep(0.1)

        def files() -> dict[Path, int]:  # the child's TensorBoard writer may flush on its own: not compared
            return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and "tfevents" not in p.name}

        before = files()
        assert main(["pretrain", "--resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert "RunLockedError" in err and f"process {proc.pid} on host {socket.gethostname()}" in err, err
        assert str(run / "run.lock") in err
        assert files() == before  # the refused process wrote nothing (config.yaml included) and made no file
    finally:
        go.touch()
        out = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, out
    assert safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("holder", ["dead", "other_host", "unreadable"])
def test_run_lock_holders(tmp_path: Path, holder: str, caplog) -> None:
    """A lock of a process that no longer runs here is taken over with a message; a lock of another host (which
    cannot be checked) or an unreadable one is refused, naming the file to remove."""
    import json
    import logging
    import socket

    from semssl.engine.resume import RunLock
    from semssl.errors import RunLockedError

    lock = RunLock(tmp_path)
    if holder == "dead":
        done = subprocess.run([sys.executable, "-c", "pass"])
        assert done.returncode == 0
        lock.path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # above pid_max
        with caplog.at_level(logging.WARNING, logger="semssl"):
            lock.acquire()
        assert "taking over the stale lock of process 4206649" in caplog.text
        assert json.loads(lock.path.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        lock.release()
        assert not lock.path.exists()
        return
    lock.path.write_text(json.dumps({"pid": 1, "host": "elsewhere-node-7"}) if holder == "other_host" else "{")
    with pytest.raises(RunLockedError, match="in use by") as err:
        lock.acquire()
    assert str(lock.path) in str(err.value)
    assert ("process 1 on host elsewhere-node-7" if holder == "other_host" else "unreadable") in str(err.value)
    assert lock.path.exists()  # left as it was


PAUSED_AT = """
import os, sys, time
from semssl.engine.module import SSLModule
real = SSLModule.training_step
def paused(self, batch, batch_idx):
    if self.global_step == {step}:  # inside the step: the test signals, then lets it go on
        open({paused!r}, "w").close()
        while not os.path.exists({go!r}):
            time.sleep(0.02)
    return real(self, batch, batch_idx)
SSLModule.training_step = paused
from semssl.cli import main
sys.exit(main(sys.argv[1:]))
"""

FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "semssl-test", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
PREEMPT_POINTS = [  # (signal, the step it lands in, under SLURM?): the checkpoint is at the end of that step
    ("SIGTERM", 7, False),  # epoch 1, after epoch 0's checkpoint (kept as previous.ckpt)
    ("SIGUSR1", 2, True),  # SLURM's requeue signal: checkpoint, then `scontrol requeue`
    ("SIGTERM", 4, True),  # SLURM's SIGTERM (scancel, preemption): checkpoint, no requeue
]


@pytest.mark.parametrize("name, step, slurm", PREEMPT_POINTS,
                         ids=[f"{n}{'-slurm' if slurm else ''}@{s}" for n, s, slurm in PREEMPT_POINTS])
def test_a_signal_checkpoints_the_step_and_resume_gives_the_same_weights(tiny_synth: Path, tmp_path: Path,
                                                                         uninterrupted: dict, name: str, step: int,
                                                                         slurm: bool) -> None:
    """A real `semssl pretrain` gets the signal from this test in the middle of a step (a test hook holds the
    child there until the signal is sent): it finishes the step, writes its checkpoint, prints one line and exits
    0, unevaluated; `--resume` then ends with the uninterrupted run's weights, optimiser state and RNG, bit for bit.
    Under SLURM (faked: its environment and an `scontrol` that records its arguments) SIGUSR1 requeues the job."""
    runs, paused, go = tmp_path / "runs", tmp_path / "paused", tmp_path / "go"
    run = runs / "preempted"
    script = tmp_path / "child.py"
    script.write_text(PAUSED_AT.format(step=step, paused=str(paused), go=str(go)))
    env, calls = dict(os.environ), tmp_path / "scontrol-calls"
    if slurm:
        fake = tmp_path / "bin" / "scontrol"
        fake.parent.mkdir()
        fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
        fake.chmod(0o755)
        env.update(FAKE_SLURM, PATH=f"{fake.parent}{os.pathsep}{env.get('PATH', '')}")
    args = ["pretrain", *_common(tiny_synth, runs, "max_steps"), "trainer.run_name=preempted"]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.time() + 240
        while not paused.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, f"the child did not reach step {step} in time"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, name))
        go.touch()
        err = proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    ckpt = run / "checkpoints" / "last.ckpt"
    lines = [line for line in err.splitlines() if line.startswith("semssl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert (f"stopped by {name} at step {step + 1}; the checkpoint is {ckpt}; "
            f"resume with: semssl pretrain --resume {run}") in lines[0]
    requeued = name == "SIGUSR1" and slurm
    assert ("SLURM job 4242 requeued" in lines[0]) == requeued, lines[0]
    assert (calls.read_text() if calls.exists() else "") == ("requeue 4242\n" if requeued else "")
    assert safe_load(ckpt)["global_step"] == step + 1
    previous = run / "checkpoints" / "previous.ckpt"
    assert (safe_load(previous)["global_step"] if previous.exists() else None) == (6 if step >= 6 else None)
    assert not (run / "metrics.json").exists()  # neither evaluated nor marked complete
    assert not (run / "run.lock").exists()
    assert not list(run.rglob("hpc_ckpt*"))  # Lightning's own SLURM checkpoint is not written
    assert main(["pretrain", "--resume", str(run)]) == 0
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] == uninterrupted["max_steps"]["global_step"] == 10
    _assert_same_training_state(uninterrupted["max_steps"], resumed)
    assert (run / "metrics.json").exists()


def test_data_workers_ignore_slurms_sigusr1(tiny_cfg) -> None:
    """SLURM signals every process of a job: a training loader's worker that gets SIGUSR1 keeps loading (its
    default action would end it, and the run with it)."""
    from semssl.engine.data import build_train_dataset, resolve_paths, train_loader

    tiny_cfg.data.num_workers = 1
    loader = train_loader(build_train_dataset(tiny_cfg, resolve_paths(tiny_cfg)["train"]), tiny_cfg)
    batches = iter(loader)
    next(batches)
    (worker,) = batches._workers
    os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert worker.is_alive()
    assert all(next(batches)["views"]["q"].shape[0] == 16 for _ in range(3))
    batches._shutdown_workers()


def test_ctrl_c_says_where_the_last_checkpoint_is(tiny_synth: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import signal as _signal

    from semssl.engine.module import SSLModule

    real = SSLModule.training_step

    def interrupted(self, batch, batch_idx):
        if self.global_step == 3:
            raise KeyboardInterrupt
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SSLModule, "training_step", interrupted)
    before = _signal.getsignal(_signal.SIGINT)
    args = tiny_overrides(tiny_synth, tmp_path / "runs") + ["eval.enabled=false", "trainer.run_name=ctrlc",
                                                             "trainer.checkpoint_every_n_steps=2"]
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown exits with code 1
            main(["pretrain", *args])
    finally:
        _signal.signal(_signal.SIGINT, before)  # Lightning ignores further Ctrl-C while it shuts down
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "ctrlc"
    assert "interrupted at step 3" in err and f"semssl pretrain --resume {run}" in err
    assert safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_full_disk_is_one_clear_line(monkeypatch, capsys) -> None:
    import errno

    from semssl.engine import run

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/.last.ckpt.tmp")

    monkeypatch.setattr(run, "pretrain", full)
    assert main(["pretrain", "trainer.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device: runs/x/checkpoints/.last.ckpt.tmp" in err and "previous checkpoint" in err
    assert "Traceback" not in err


def _one_clear_line(err: str, path: Path) -> str:
    lines = [line for line in err.splitlines() if line.startswith("semssl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and "trainer.out_dir" in lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["run folder", "checkpoint"])
def test_a_read_only_output_folder_is_one_clear_line(where: str, tiny_synth: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    """The tests run as root, for whom no folder is read-only: the OS error is simulated where the run writes,
    through the real command line and Lightning. The run folder cannot be made (EACCES), or the folder turned
    read-only (EROFS) by the time the first checkpoint is written."""
    import errno
    import tempfile

    out = tmp_path / "runs"
    run = out / "ro"
    if where == "run folder":
        real_mkdir = Path.mkdir

        def mkdir(self: Path, *args, **kwargs) -> None:
            if self == run:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        path, reason = run, "Permission denied"
    else:
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == run / "checkpoints":
                raise OSError(errno.EROFS, "Read-only file system", str(dir))
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        path, reason = run / "checkpoints", "Read-only file system"
    args = tiny_overrides(tiny_synth, out) + ["eval.enabled=false", "trainer.run_name=ro", "trainer.max_steps=2"]
    assert main(["pretrain", *args]) == 1
    line = _one_clear_line(capsys.readouterr().err, path)
    assert f"{reason}: {path}" in line


def test_an_immutable_output_folder_is_one_clear_line(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    """A real unwritable folder, even for root: ``chattr +i`` (skipped where chattr is missing or not allowed)."""
    import shutil

    out = tmp_path / "runs"
    out.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        args = tiny_overrides(tiny_synth, out) + ["eval.enabled=false", "trainer.run_name=ro", "trainer.max_steps=2"]
        assert main(["pretrain", *args]) == 1
    finally:
        subprocess.run([chattr, "-i", str(out)], check=True)
    assert "Operation not permitted" in _one_clear_line(capsys.readouterr().err, out / "ro")
    assert list(out.iterdir()) == []
