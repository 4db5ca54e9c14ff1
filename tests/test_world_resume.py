"""Resume on another world size, and preemption under DDP.

A real 2-process run (gloo on CPU, started as torchrun starts it, ``tests/test_ddp.py``'s plumbing) gets SIGTERM on
rank 0 only, in the middle of step 2: both ranks stop at the end of that step, rank 0 writes the checkpoint. One
process then resumes it with the same global batch (1 x 16 instead of 2 x 8) and finishes. The backbone's
BatchNorm is frozen, so nothing depends on how a batch is split, and the runs are in float64
(``trainer.precision=64-true``): measured, the uninterrupted 2- and 1-process runs differ by at most 6e-17 after 8
steps in float64, but by up to 1.2e-5 in float32 (1.5e-8 after 1 step), 7-14 % of what the last two steps change
— a float32 tolerance could not tell a wrong data position from rounding. The resumed run equals a 1-process run
stopped at the same step and resumed to 1e-12, and the uninterrupted 1-process run to 1e-6: Lightning loads a
resumed run's weights into the module before it converts the module to float64 (``Trainer._run`` restores the
modules before ``strategy.setup``), so every float64 resume passes them through float32 once. A resume that would
change the global batch is refused in one line naming both values.

Also, without processes: the first k global batches are the same samples on any number of processes, and
``EpochSampler.resume_at`` (in global terms) leaves exactly the rest of the epoch.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from ddp_testing import free_port as _free_port, spawn as _spawn

from semssl.checkpoints import safe_load
from semssl.cli import main
from semssl.config import load_config
from semssl.engine.data import EpochSampler
from semssl.engine.resume import Layout, check_layout, layout_of
from semssl.errors import ConfigError

SIGNALLED_IN = 2  # rank 0 gets SIGTERM inside this step; the checkpoint is at its end (step 3 of 6 in epoch 0)
# 96 images, a global batch of 16: 6 steps per epoch; 8 steps cross into epoch 1. Frozen BatchNorm, float64, no
# evaluation.
COMMON = ["model.norm=frozen_bn", "model.bn_splits=1", "eval.enabled=false", "trainer.num_threads=1",
          "trainer.accelerator=cpu", "trainer.precision=64-true", "trainer.max_steps=8", "trainer.max_epochs=100"]
SAME = {"rtol": 1e-12, "atol": 1e-14}  # against the same resume on 1 process: rounding only
CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # against the uninterrupted run: the float32 pass of a resume (docstring)
TWO = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8", "trainer.run_name=two"]
ONE = ["trainer.devices=1", "trainer.strategy=auto"]


def _signalled_rank(rank: int, port: int, overrides: list[str], out_dir: str) -> None:
    """One already-launched process (torchrun's environment); rank 0 sends itself SIGTERM inside a step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from semssl.engine import run
    from semssl.engine.module import SSLModule
    from semssl.errors import RunPreempted

    real = SSLModule.training_step

    def signalled(self: Any, batch: dict, batch_idx: int) -> Any:
        if rank == 0 and self.global_step == SIGNALLED_IN:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step, and only here: rank 1 never gets it
        return real(self, batch, batch_idx)

    SSLModule.training_step = signalled
    result: dict[str, Any] = {"preempted": False}
    try:
        run.pretrain(load_config(None, overrides))
    except RunPreempted as stop:
        result = {"preempted": True, "step": stop.step, "message": stop.message, "signals": list(stop.signals),
                  "checkpoint": stop.checkpoint}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_close(a: dict, b: dict, tolerance: dict) -> None:
    """Weights, buffers and SGD momentum within ``tolerance``; the MoCo queue as a set of keys (within a step's
    block the 2 ranks' keys come rank by rank)."""
    queue = "method.queue.queue"
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in b["state_dict"].items():
        if key != queue:
            torch.testing.assert_close(a["state_dict"][key], value, **tolerance, msg=lambda m, k=key: f"{k}: {m}")
    distance = torch.cdist(a["state_dict"][queue], b["state_dict"][queue],
                           compute_mode="donot_use_mm_for_euclid_dist")  # the matmul form is off by ~1e-8
    assert distance.min(dim=1).values.max() < tolerance["atol"] and distance.min(dim=0).values.max() < tolerance["atol"]
    mine, theirs = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert mine.keys() == theirs.keys()
    for index in mine:
        torch.testing.assert_close(mine[index]["momentum_buffer"], theirs[index]["momentum_buffer"], **tolerance,
                                   msg=lambda m, i=index: f"momentum of parameter {i}: {m}")


def test_two_processes_stopped_by_sigterm_resume_on_one_process_to_the_same_weights(tiny_synth: Path, tmp_path: Path,
                                                                                    capsys, monkeypatch) -> None:
    runs = tmp_path / "runs"
    common = tiny_overrides(tiny_synth, runs) + COMMON
    _spawn(_signalled_rank, _free_port(), common + TWO, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    run, step = runs / "two", SIGNALLED_IN + 1
    ckpt = run / "checkpoints" / "last.ckpt"
    for r in ranks:  # both stopped at the same step, though only rank 0 was signalled
        assert r["preempted"] and r["step"] == step and r["signals"] == ["SIGTERM"] and r["checkpoint"] == str(ckpt)
    assert ranks[0]["message"] == (f"semssl: stopped by SIGTERM at step {step}; the checkpoint is {ckpt}; "
                                   f"resume with: semssl pretrain --resume {run}")
    assert ranks[1]["message"] is None  # one line, from rank 0
    written = safe_load(ckpt)
    assert written["global_step"] == step and written["semssl_layout"] == {"world_size": 2, "batch_size": 8}
    assert not (run / "metrics.json").exists() and not (run / "run.lock").exists()

    config = (run / "config.yaml").read_text()
    assert main(["pretrain", "--resume", str(run), *ONE]) == 2  # 1 x 8: another global batch
    err = capsys.readouterr().err
    assert (f"--resume {run}: its checkpoint was trained with a global batch of 16 (2 processes x "
            "data.batch_size=8), this run would have 8 (1 process x data.batch_size=8)") in err
    assert "resume with data.batch_size=16" in err and len(err.strip().splitlines()) == 1, err
    assert (run / "config.yaml").read_text() == config  # refused before anything was written

    assert main(["pretrain", "--resume", str(run), *ONE, "data.batch_size=16"]) == 0
    resumed = _last(run)
    assert resumed["global_step"] == 8 and resumed["semssl_layout"] == {"world_size": 1, "batch_size": 16}
    assert json.loads((run / "metrics.json").read_text())["run"]["world_size"] == 1

    # the same stop and resume on 1 process all along (SIGTERM to this process, inside the same step)
    from semssl.engine.module import SSLModule

    real = SSLModule.training_step

    def signalled(self: Any, batch: dict, batch_idx: int) -> Any:
        if self.global_step == SIGNALLED_IN:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch, batch_idx)

    monkeypatch.setattr(SSLModule, "training_step", signalled)
    one = [*common, *ONE, "data.batch_size=16"]
    assert main(["pretrain", *one, "trainer.run_name=same"]) == 0
    monkeypatch.undo()
    assert safe_load(runs / "same" / "checkpoints" / "last.ckpt")["global_step"] == step
    assert main(["pretrain", "--resume", str(runs / "same")]) == 0
    _assert_close(resumed, _last(runs / "same"), SAME)

    assert main(["pretrain", *one, "trainer.run_name=one"]) == 0  # uninterrupted
    full = _last(runs / "one")
    assert full["global_step"] == 8
    _assert_close(resumed, full, CLOSE)
    conv = "method.encoder_q.backbone.conv1.weight"
    before = safe_load(runs / "one" / "checkpoints" / "previous.ckpt")["state_dict"][conv]  # step 6
    assert (full["state_dict"][conv] - before).abs().max() > 10 * CLOSE["atol"]  # the last 2 steps: far beyond it


@pytest.mark.parametrize("done", [0, 1, 3, 6])
def test_the_first_global_batches_are_the_same_samples_on_any_number_of_processes(done: int) -> None:
    """With rank-strided shards the first k global batches of W ranks are order[:k x W x b], whatever W; a resume
    at k global batches leaves every rank together exactly the epoch's remaining global batches."""
    size, global_batch, seed = 100, 8, 3
    steps = size // global_batch  # 12 on any W dividing the global batch

    def steps_of(world: int, done_batches: int) -> list[set[int]]:
        batch = global_batch // world
        samplers = [EpochSampler(size, world, r, seed=seed) for r in range(world)]
        for s in samplers:
            s.set_epoch(2)
            if done_batches:
                s.resume_at(2, done_batches * global_batch)
        orders = [[i for _, i in s] for s in samplers]
        return [set().union(*(o[k * batch:(k + 1) * batch] for o in orders)) for k in range(steps - done_batches)]

    single = steps_of(1, 0)
    assert len(set().union(*single)) == steps * global_batch  # no sample twice in an epoch
    for world in (1, 2, 4, 8):
        assert steps_of(world, 0) == single, f"{world} processes train other samples in some step"
        assert steps_of(world, done) == single[done:], f"{world} processes resumed at {done} replay or skip some"


def test_resume_at_refuses_a_count_the_ranks_cannot_share() -> None:
    sampler = EpochSampler(100, 2, 0)
    with pytest.raises(ValueError, match="not a multiple of 2 processes"):
        sampler.resume_at(0, 7)
    with pytest.raises(ValueError, match="within this epoch's 100"):
        sampler.resume_at(0, 102)


def test_layouts_and_their_refusals(tmp_path: Path) -> None:
    check_layout(tmp_path, Layout(2, 32), Layout(1, 64))  # the same global batch: fine
    check_layout(tmp_path, Layout(8, 8), Layout(2, 32))
    check_layout(tmp_path, None, Layout(3, 5))  # a checkpoint that says nothing: nothing to check
    with pytest.raises(ConfigError, match=r"global batch of 16 \(2 processes x data.batch_size=8\), this run would "
                                          r"have 24 \(3 processes x data.batch_size=8\).*no data.batch_size gives 16 "
                                          r"on 3 processes"):
        check_layout(tmp_path, Layout(2, 8), Layout(3, 8))
    assert layout_of({"semssl_layout": {"world_size": 4, "batch_size": 16}}) == Layout(4, 16)
    old = {"semssl_config": {"trainer": {"devices": 2, "num_nodes": 2}, "data": {"batch_size": 32}}}
    assert layout_of(old) == Layout(4, 32)  # written before the layout was recorded: its config's
    assert layout_of({"semssl_config": {"trainer": {"devices": "auto"}, "data": {"batch_size": 32}}}) is None
    assert layout_of({}) is None
