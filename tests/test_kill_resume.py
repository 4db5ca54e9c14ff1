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
