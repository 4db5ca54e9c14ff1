"""A real kill: a `semssl pretrain` process killed with SIGKILL after a checkpoint, then resumed with `--resume`,
ends exactly where the uninterrupted run ends (same final step, same weights, optimiser state and RNG), for a
step-based run killed mid-epoch and for an epoch-based run killed between two epoch-end checkpoints.

The child process is the real command line with one test-only slow-down (a script wrapping ``semssl.cli.main``
that sleeps after every step past the kill point), so the parent reliably kills it after the checkpoint and
before the run ends; nothing in the product changes for the test.
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
import sys, time
from semssl.engine.module import SSLModule
real = SSLModule.training_step
def slow(self, batch, batch_idx):
    out = real(self, batch, batch_idx)
    if self.global_step >= {after}:
        time.sleep(0.5)  # leave the parent time to kill us after the checkpoint of step {after}
    return out
SSLModule.training_step = slow
from semssl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_after_checkpoint(args: list[str], run_dir: Path, step: int, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(after=step))
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if ckpt.exists():
                try:
                    if safe_load(ckpt)["global_step"] >= step:
                        break
                except Exception:  # noqa: BLE001 - being replaced right now: read it again
                    pass
            if proc.poll() is not None:
                pytest.fail(f"the child run ended (code {proc.returncode}) before it could be killed")
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint of the kill step appeared in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("length, kill_at, end", [
    (["trainer.max_steps=16", "trainer.checkpoint_every_n_steps=4"], 8, 16),  # 8 = epoch 1, batch 2
    (["trainer.max_epochs=3"], 6, 18),  # killed in epoch 1, after epoch 0's checkpoint
], ids=["max_steps-mid-epoch", "max_epochs"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_synth: Path, tmp_path: Path, length: list[str],
                                                          kill_at: int, end: int) -> None:
    common = tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "eval.enabled=false", "optim.schedule=cosine", "optim.warmup=0.25", "method.momentum_end=1.0",
        "trainer.max_epochs=100", "trainer.num_threads=1", *length]  # one thread in the child too: same sums
    assert main(["pretrain", *common, "trainer.run_name=full"]) == 0
    killed = tmp_path / "runs" / "killed"
    _kill_after_checkpoint(["pretrain", *common, "trainer.run_name=killed"], killed, kill_at, tmp_path)
    at_kill = safe_load(killed / "checkpoints" / "last.ckpt")["global_step"]
    assert kill_at <= at_kill < end
    assert main(["pretrain", "--resume", str(killed)]) == 0
    full = torch.load(tmp_path / "runs" / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert full["global_step"] == resumed["global_step"] == end
    _assert_same_training_state(full, resumed)


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
