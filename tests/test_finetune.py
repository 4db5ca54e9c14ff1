"""``semssl finetune`` / ``semssl.transfer.finetune``: the class-balanced label fraction, 2 training steps from a
semssl checkpoint, exact resume, the random-init comparison, and clear errors for bad input.

Data: the tiny built-in objects (96 train / 40 test images, 4 classes, 32 px; tests/conftest.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from semssl.cli import main
from semssl.errors import CheckpointError, ConfigError, DataError
from semssl.transfer import BackboneSource, finetune
from semssl.transfer.finetune import RECIPES, label_fraction

SMALL = {"epochs": 1, "batch_size": 12, "size": 32, "progress": False}  # 0.25 x 96 = 24 images: 2 steps
RANDOM18 = BackboneSource(random_init=True, arch="resnet18", width=16, small_input=True)


def _folders(tiny_synth: Path) -> tuple[str, str]:
    return str(tiny_synth / "objects" / "train"), str(tiny_synth / "objects" / "test")


def test_label_fraction_is_class_balanced_and_seeded() -> None:
    targets = [c for c in range(5) for _ in range(100 + 20 * c)]  # 100, 120, ..., 180 images per class
    chosen = label_fraction(targets, 0.1, seed=0)
    counts = Counter(targets[i] for i in chosen)
    assert counts == {0: 10, 1: 12, 2: 14, 3: 16, 4: 18}  # round(n_c x 0.1) of every class
    assert chosen == label_fraction(targets, 0.1, seed=0)  # the same for the same seed
    assert chosen != label_fraction(targets, 0.1, seed=1)
    assert Counter(targets[i] for i in label_fraction(targets, 0.1, seed=1)) == counts
    assert label_fraction(targets, 1.0) == list(range(len(targets)))
    with pytest.raises(DataError, match="class 'b' has 100 images, so its share rounds to 0"):
        label_fraction([1] * 100 + [0] * 1000, 0.001, classes=["a", "b"])
    with pytest.raises(ConfigError, match="fraction"):
        label_fraction(targets, 0.0)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step MoCo-v2 run on the tiny objects (ResNet-18, the small-input stem, width 16)."""
    out = tmp_path_factory.mktemp("ft_ckpt")
    args = tiny_overrides(tiny_synth, out) + ["eval.enabled=false", "trainer.max_steps=2", "model.width=16",
                                              "model.small_input=true", "trainer.run_name=moco"]
    assert main(["pretrain", *args]) == 0
    return out / "moco"


def test_finetune_runs_two_steps_from_a_checkpoint_and_writes_the_subset(tiny_synth: Path, tiny_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    train, test = _folders(tiny_synth)
    out = tmp_path / "ft"
    result = finetune(BackboneSource(checkpoint=str(tiny_checkpoint)), train, test, fraction=0.25, out_dir=out,
                      **SMALL)
    model = result["model"]
    assert model["iterations"] == 2 and model["backbone"]["method"] == "mocov2"
    assert model["backbone"]["branch"] == "online" and model["backbone"]["width"] == 16
    assert 0 <= model["top1"] <= model["top5"] <= 100 and torch.isfinite(torch.tensor(model["final_loss"]))
    lines = (out / "subset_0.25_seed0.txt").read_text().splitlines()
    assert len(lines) == 24 and Counter(line.split("\t")[1] for line in lines) == {c: 6 for c in
                                                                                  Counter(line.split("\t")[1]
                                                                                          for line in lines)}
    assert len({line.split("\t")[1] for line in lines}) == 4
    saved = json.loads((out / "result.json").read_text())
    assert saved["model"]["top1"] == model["top1"] and saved["subset_size"] == 24
    # the backbone really was the checkpoint's: a fine-tune of 0 steps keeps its weights
    state = torch.load(out / "state.pt", weights_only=True)
    ckpt = torch.load(tiny_checkpoint / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["model"]["backbone.conv1.weight"].shape == ckpt["state_dict"][
        "method.encoder_q.backbone.conv1.weight"].shape


def test_finetune_resume_equals_the_uninterrupted_run(tiny_synth: Path, tmp_path: Path) -> None:
    """2 epochs at once vs 1 epoch, then --resume with 2 epochs: the same weights (constant lr, so the schedule
    does not depend on the length) and the same accuracy."""
    train, test = _folders(tiny_synth)
    kw = {**SMALL, "fraction": 0.25, "schedule": "constant"}
    full = finetune(RANDOM18, train, test, out_dir=tmp_path / "full", **{**kw, "epochs": 2})
    finetune(RANDOM18, train, test, out_dir=tmp_path / "cut", **kw)
    with pytest.raises(CheckpointError, match="written by another setting"):  # another lr: refused
        finetune(RANDOM18, train, test, out_dir=tmp_path / "cut", resume=True, lr_head=0.5, **{**kw, "epochs": 2})
    resumed = finetune(RANDOM18, train, test, out_dir=tmp_path / "cut", resume=True, **{**kw, "epochs": 2})
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "state.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["model"]["top1"] == full["model"]["top1"]


def test_finetune_command_compares_with_random_init(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    train, test = _folders(tiny_synth)
    out = tmp_path / "cli"
    assert main(["finetune", "--random-init", "--arch", "resnet18", "--width", "16", "--small-input",
                 "--train", train, "--test", test, "--fraction", "0.25", "--epochs", "1", "--batch-size", "12",
                 "--size", "32", "--compare", "random-init", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "random init" in text and "top1" in text
    saved = json.loads((out / "result.json").read_text())
    assert {"model", "random_init"} <= set(saved) and saved["random_init"]["iterations"] == 2
    assert (out / "random_init" / "state.pt").exists()


def test_finetune_bad_input_is_one_clear_line(tiny_synth: Path, tiny_checkpoint: Path, tmp_path: Path,
                                              capsys) -> None:
    train, test = _folders(tiny_synth)
    with pytest.raises(CheckpointError, match="a resnet18 backbone, but arch=resnet50"):
        finetune(BackboneSource(checkpoint=str(tiny_checkpoint), arch="resnet50"), train, test, **SMALL)
    with pytest.raises(DataError, match="rounds to 0"):
        finetune(RANDOM18, train, test, fraction=0.01, **SMALL)
    with pytest.raises(ConfigError, match="recipe: unknown 'nope'"):
        finetune(RANDOM18, train, test, recipe="nope", **SMALL)
    assert main(["finetune", "--random-init", "--train", str(tmp_path / "missing"), "--test", test]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "Traceback" not in err


def test_recipes_hold_the_papers_settings() -> None:
    """SCD App. A.3 and SimCLR App. B.5, as written in the recipe table."""
    moco = RECIPES["scd-mocov2-semi_1pct"]
    assert (moco.fraction, moco.epochs, moco.batch_size, moco.lr_head, moco.lr_backbone, moco.weight_decay) == \
        (0.01, 50, 256, 0.5, 2e-4, 0.0)
    assert [round(m * moco.epochs) for m in moco.milestones] == [30, 40]
    assert (RECIPES["scd-byol-semi_1pct"].lr_head, RECIPES["scd-byol-semi_10pct"].lr_head) == (20.0, 5.0)
    simclr = RECIPES["simclr-semi_10pct"]
    assert (simclr.epochs, simclr.lr_head, simclr.batch_size, simclr.nesterov) == (30, 0.05 * 4096 / 256, 4096, True)
