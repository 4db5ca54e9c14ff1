"""Checkpoints a long run can trust: a file that is not a readable checkpoint gets one line naming it and what is
wrong (never torch's advice to load it unsafely); training keeps the checkpoint before ``last.ckpt`` as
``previous.ckpt``, and ``--resume`` falls back to it, in one line, when ``last.ckpt`` is truncated or corrupt."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from semssl.checkpoints import PREVIOUS, checkpoint_problem, resume_checkpoint, safe_load
from semssl.cli import main
from semssl.config import load_config
from semssl.engine.run import pretrain, resume_config
from semssl.errors import CheckpointError

FAST = ["eval.enabled=false", "trainer.num_threads=1", "optim.schedule=constant", "optim.warmup=0"]


class NotATensor:  # a class a weights-only load does not build
    pass


def _state(path: Path) -> Path:
    torch.save({"w": torch.arange(2048, dtype=torch.float32)}, path)
    return path


def test_problems_are_named(tmp_path: Path) -> None:
    good = _state(tmp_path / "good.pth")
    assert checkpoint_problem(good) is None
    text = tmp_path / "notes.txt"
    text.write_text("hello, these are notes")
    assert checkpoint_problem(text) == "not a PyTorch checkpoint (it starts with b'hell')"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "an empty file (0 bytes)"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert checkpoint_problem(cut).startswith("truncated or corrupt")
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # inside the tensor data: the archive reads, the CRC does not match
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    assert "corrupt" in checkpoint_problem(tmp_path / "flipped.ckpt")
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_problem(legacy) is None and torch.equal(safe_load(legacy)["w"], torch.zeros(2))
    assert checkpoint_problem(tmp_path / "missing.ckpt") == "no such file"


def test_a_pickle_of_objects_is_refused_without_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "objects.pth"
    torch.save({"model": NotATensor(), "order": collections.OrderedDict()}, path)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: holds Python objects") and "NotATensor" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_eval_on_a_text_file_says_so_in_one_line(tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    rc = main(["eval", "knn", "--checkpoint", str(notes), "--train", str(tmp_path), "--test", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.splitlines() == [f"semssl: CheckpointError: {notes}: not a PyTorch checkpoint (it starts with b'not ')"]
    assert "weights_only" not in err


def test_resume_falls_back_to_the_previous_checkpoint(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    """A 2-epoch run keeps epoch 1's checkpoint as previous.ckpt; with last.ckpt truncated, --resume with one more
    epoch starts from previous.ckpt (step 6, said in one line) and ends at step 18."""
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path) + FAST + ["trainer.run_name=r"])
    run = pretrain(cfg)
    folder = run / "checkpoints"
    last, previous = folder / "last.ckpt", folder / PREVIOUS
    assert safe_load(last)["global_step"] == 12 and safe_load(previous)["global_step"] == 6
    assert resume_checkpoint(folder) == last
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    assert resume_checkpoint(folder) == previous
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"semssl: {last} cannot be read (truncated or corrupt") and str(previous) in line
    resumed = pretrain(resume_config(run, ["trainer.max_epochs=3"]), resume=run)
    assert safe_load(resumed / "checkpoints" / "last.ckpt")["global_step"] == 18
    previous.write_bytes(b"junk")
    last.write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read either"):
        resume_checkpoint(folder)
