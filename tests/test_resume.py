"""Resume reproduces the uninterrupted run bit for bit; checkpoints are weights-only, atomic and NaN-guarded.

Every run here is the tiny MoCo-v2 config of ``conftest.py`` (96 images, batch 16: 6 steps per epoch) with the
evaluation off. Two ways to stop a run half-way are tested:

* the run is *configured* shorter (``trainer.max_epochs=1``) and resumed with ``trainer.max_epochs=2``. The lr
  schedule and its warm-up are fractions of the configured run, so this is exact only with a schedule that does
  not depend on the run's length: these runs use ``optim.schedule=constant optim.warmup=0``;
* the run is *interrupted* (an exception at the start of epoch 1, after epoch 0's checkpoint) and resumed
  with the same config: exact with a cosine lr schedule, warm-up and a cosine EMA momentum.

Also: the checkpoint is weights-only loadable with the config and RNG state; a crash while writing it leaves
the previous one intact; a NaN loss stops the run naming the step and keeps the last good checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides

from semssl import checkpoints as ckpt_module
from semssl.checkpoints import atomic_torch_save, load_model, safe_load
from semssl.config import Config, from_dict, load_config, to_dict
from semssl.engine.module import SSLModule
from semssl.engine.run import RUN_DIR_ENV, pretrain, resume_config
from semssl.errors import NonFiniteLossError
from semssl.methods.mocov2 import MoCoV2

FAST = ["eval.enabled=false", "trainer.num_threads=1"]
LENGTH_FREE = ["optim.schedule=constant", "optim.warmup=0"]  # schedules that do not depend on max_epochs


def _config(synth: Path, out: Path, *extra: str) -> Config:
    return load_config(None, tiny_overrides(synth, out) + FAST + list(extra))


def _last(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_identical(a: Any, b: Any, where: str) -> None:
    """Nested dicts / lists of tensors and plain values are equal; tensors bit for bit (torch.equal)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_training_state(a: dict, b: dict) -> None:
    """Method state (student, key encoder, queue + pointer), optimiser state, progress and RNG all equal."""
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key in ("method.queue.queue", "method.queue.ptr", "method.encoder_q.backbone.conv1.weight",
                "method.encoder_k.backbone.conv1.weight"):
        assert key in a["state_dict"], key
    _assert_identical(a["state_dict"], b["state_dict"], "state_dict")
    _assert_identical(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])


@pytest.fixture(scope="module")
def runs(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted 2-epoch run, and the same run stopped after epoch 1 and resumed (0 and 1 workers)."""
    out = tmp_path_factory.mktemp("resume_runs")
    full = pretrain(_config(tiny_synth, out, *LENGTH_FREE, "trainer.run_name=full"))
    result = {"full": full}
    for name, workers in (("split", 0), ("split_workers", 1)):
        first = pretrain(_config(tiny_synth, out, *LENGTH_FREE, f"data.num_workers={workers}",
                                 f"trainer.run_name={name}", "trainer.max_epochs=1"))
        assert _last(first)["global_step"] == 6
        result[name] = pretrain(resume_config(first, ["trainer.max_epochs=2"]), resume=first)
    return result


def test_runs_in_one_process_get_their_own_folders(runs: dict[str, Path]) -> None:
    """Regression: SEMSSL_RUN_DIR leaked out of pretrain(), so the next run reused the first run's folder."""
    assert len(set(runs.values())) == 3
    assert [p.name for p in runs.values()] == ["full", "split", "split_workers"]
    assert RUN_DIR_ENV not in os.environ
    for run_dir in runs.values():
        assert (run_dir / "config.yaml").is_file()
        assert (run_dir / "logs" / "csv" / "metrics.csv").is_file()
    # a resume keeps the curves written before it and logs the rest next to them
    for name in ("split", "split_workers"):
        first, second = (runs[name] / "logs" / v / "metrics.csv" for v in ("csv", "csv-resume1"))
        steps = [int(row["step"]) for row in csv.DictReader(first.open())]
        later = [int(row["step"]) for row in csv.DictReader(second.open())]
        assert steps and later and max(steps) < min(later)


def test_resume_after_a_shorter_run_is_bit_identical(runs: dict[str, Path]) -> None:
    full, split = _last(runs["full"]), _last(runs["split"])
    assert full["global_step"] == 12 and full["epoch"] == 1  # saved at the end of epoch index 1
    _assert_same_training_state(full, split)
    assert int(full["state_dict"]["method.queue.ptr"]) == (12 * 16) % 64


def test_resume_with_a_worker_is_bit_identical_and_independent_of_workers(runs: dict[str, Path]) -> None:
    """Regressions: (1) with workers, Lightning creates the first iterator of a resumed run before it sets the
    sampler's epoch, and the iterator prefetches, so epoch 0's order was replayed; (2) the DataLoader drew its
    worker base seed from the global RNG, shifting the shuffle-BN permutations after a resume and between 0
    and N workers. The 1-worker resumed run must equal the 0-worker uninterrupted one."""
    _assert_same_training_state(_last(runs["full"]), _last(runs["split_workers"]))


class _Interrupted(RuntimeError):
    """Stands for a kill between two epochs."""


def test_interrupted_cosine_run_resumes_exactly(tiny_synth: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cosine = ["optim.schedule=cosine", "optim.warmup=0.25", "method.momentum_end=1.0"]  # every schedule moves
    full = pretrain(_config(tiny_synth, tmp_path, *cosine, "trainer.run_name=full"))

    def stop_at_epoch_1(self: SSLModule) -> None:
        if self.current_epoch == 1:
            raise _Interrupted("killed after epoch 0")

    with monkeypatch.context() as patch:
        patch.setattr(SSLModule, "on_train_epoch_start", stop_at_epoch_1, raising=False)
        with pytest.raises(_Interrupted):
            pretrain(_config(tiny_synth, tmp_path, *cosine, "trainer.run_name=killed"))
    killed = tmp_path / "killed"
    assert _last(killed)["global_step"] == 6
    resumed = pretrain(resume_config(killed, []), resume=killed)
    assert resumed == killed
    _assert_same_training_state(_last(full), _last(resumed))


def test_checkpoint_is_weights_only_with_config_and_rng(runs: dict[str, Path]) -> None:
    path = runs["split"] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(ckpt["rng_cpu"], torch.Tensor) and ckpt["rng_cpu"].dtype == torch.uint8
    cfg = from_dict(Config, ckpt["semssl_config"])
    assert cfg.trainer.max_epochs == 2  # the resumed run's config ...
    assert to_dict(cfg) == to_dict(resume_config(runs["split"], []))  # ... which config.yaml now holds too
    model, info, _ = load_model(runs["split"])
    backbone = model.backbone_for(info["default_branch"])
    assert info["global_step"] == 12 and info["method"] == "mocov2"
    state = {k.removeprefix("method.encoder_q.backbone."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("method.encoder_q.backbone.")}
    _assert_identical(backbone.state_dict(), state, "backbone")


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def _checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_crash_while_saving_keeps_the_previous_checkpoint(runs: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _copy_run(runs["full"], tmp_path / "run")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.seek(len(before) // 2)
        f.truncate()
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(ckpt_module.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        pretrain(resume_config(run_dir, ["trainer.max_epochs=3"]), resume=run_dir)
    with pytest.raises(OSError, match="simulated"):  # the same through the function itself
        atomic_torch_save({"x": torch.ones(3)}, run_dir / "checkpoints" / "last.ckpt")
    monkeypatch.undo()

    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before
    # no temporary file left behind; previous.ckpt is the checkpoint before last.ckpt (a hard link until replaced)
    assert _checkpoint_files(run_dir) == ["last.ckpt", "previous.ckpt"]
    assert safe_load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 12


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoints_follow_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    """The temporary file mkstemp makes is private (0600); the checkpoint gets the mode open() would give it."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    before = os.umask(umask)
    try:
        atomic_torch_save({"x": torch.ones(3)}, path)
        atomic_torch_save({"x": torch.zeros(3)}, path)  # replacing a checkpoint too
        assert os.umask(umask) == umask  # reading the umask left it as it was
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == mode
    assert safe_load(path)["x"].sum() == 0 and _checkpoint_files(tmp_path) == ["last.ckpt"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        tiny_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss turns NaN at step 8 (epoch 1): the run stops there, and epoch 0's checkpoint (step 6) is kept.
    Regression: Lightning's ModelCheckpoint(save_top_k=0, save_last=True) wrote last.ckpt only when training
    ended, so there was no checkpoint at all."""
    real_step = MoCoV2.training_step

    def nan_from_step_8(self: MoCoV2, batch: dict, progress: Any) -> dict:
        out = real_step(self, batch, progress)
        if progress.step >= 8:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MoCoV2, "training_step", nan_from_step_8)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, step 8 "):
        pretrain(_config(tiny_synth, tmp_path, "trainer.run_name=nan"))

    ckpt = safe_load(tmp_path / "nan" / "checkpoints" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 6)
    for name, value in ckpt["state_dict"].items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    for group in ckpt["optimizer_states"][0]["param_groups"]:
        assert math.isfinite(group["lr"])
    assert _checkpoint_files(tmp_path / "nan") == ["last.ckpt"]
