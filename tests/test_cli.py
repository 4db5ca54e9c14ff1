"""The command line end to end on tiny data: help texts, lists, the pre-train run folder and metrics contract,
evaluation of a run / a plain torchvision state_dict, and clear errors."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import tiny_overrides

from semssl.checkpoints import safe_load
from semssl.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semssl.cli", *args], capture_output=True, text=True, timeout=600)


def test_help_describes_every_command_and_option():
    out = run_cli("--help").stdout
    for command in ("pretrain", "eval", "data", "methods", "recipes"):
        assert command in out
    parser = build_parser()
    pretrain_help = run_cli("pretrain", "--help").stdout
    for option in ("--recipe", "--resume", "--print-config", "KEY=VALUE"):
        assert option in pretrain_help
    for sub in (["eval", "knn"], ["eval", "linear"], ["data", "synth"], ["data", "check"]):
        text = run_cli(*sub, "--help").stdout
        assert "usage: semssl" in text
    # every option and positional of every sub-command, nested ones included, carries a help string
    commands = dict(_sub_commands(parser))
    for nested in ("pretrain", "eval knn", "eval linear", "eval dense", "eval objects", "data proposals",
                   "finetune", "transfer segment", "transfer detect", "export", "recipes", "report"):
        assert nested in commands, sorted(commands)
    missing = [f"{name}: {'/'.join(action.option_strings) or action.dest}" for name, sub in commands.items()
               for action in sub._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert not missing, missing


def _sub_commands(parser: argparse.ArgumentParser, prefix: str = ""):
    """``(name, parser)`` of every sub-command, depth first (``"eval knn"``, ``"transfer segment"``, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                yield full, sub
                yield from _sub_commands(sub, full)


def test_methods_lists_one_per_line():
    res = run_cli("methods")
    assert res.returncode == 0
    assert "mocov2" in res.stdout.splitlines()


def test_config_error_is_a_clear_message():
    res = run_cli("pretrain", "optim.lrr=0.1", "--print-config")
    assert res.returncode == 2
    assert "unknown key 'optim.lrr'; did you mean 'lr'?" in res.stderr


def test_pretrain_then_evaluate(tiny_synth: Path, tmp_path: Path, capsys):
    out_dir = tmp_path / "runs"
    overrides = tiny_overrides(tiny_synth, out_dir) + ["trainer.run_name=tiny", "trainer.max_epochs=1"]
    assert main(["pretrain", *overrides]) == 0
    run = out_dir / "tiny"
    printed = capsys.readouterr().out
    assert str(run) in printed
    for row in ("random init", "random init, BN re-estimated", "pixels (centred)", "trained",
                "gain over best baseline"):
        assert row in printed
    metrics = json.loads((run / "metrics.json").read_text())
    baselines = ("random_init", "random_init_bn", "pixels")
    for branch in ("trained", *baselines):
        for key in ("knn_top1", "linear_top1", "k5_top1", "k20_top1"):
            assert 0.0 <= metrics[branch][key] <= 100.0
    assert metrics["run"]["width"] == 16  # the main recipe's ResNet-18 of width 16 with the small-input stem
    assert (run / "config.yaml").exists() and (run / "logs" / "csv" / "metrics.csv").exists()
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = safe_load(run / "checkpoints" / "last.ckpt")
    assert "semssl_config" in ckpt and "rng_cpu" in ckpt

    train, test = str(tiny_synth / "objects" / "train"), str(tiny_synth / "objects" / "test")
    knn_json = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(run), "--train", train, "--test", test,
                 "--k", "5", "20", "--out", str(knn_json), "--workers", "0"]) == 0
    res = json.loads(knn_json.read_text())
    # the CLI reproduces the number the run itself computed with the same protocol
    assert res["knn"]["k20_top1"] == pytest.approx(metrics["trained"]["k20_top1"])
    lin_json = tmp_path / "lin.json"
    assert main(["eval", "linear", "--checkpoint", str(run), "--train", train, "--test", test,
                 "--epochs", "5", "--out", str(lin_json), "--workers", "0"]) == 0
    # the fast probe with the run's settings (5 epochs, the same lr grid and seed) gives the run's number
    assert json.loads(lin_json.read_text())["linear"]["linear_top1"] == metrics["trained"]["linear_top1"]
    # and the random-init rows are the same architecture, seed and data as `semssl eval knn --random-init`
    # (BatchNorm re-estimated in the run's evaluation batches: eval.batch_size 64)
    rand_json = tmp_path / "rand.json"
    assert main(["eval", "knn", "--random-init", "--arch", "resnet18", "--width", "16", "--small-input", "--seed",
                 "0", "--train", train, "--test", test, "--size", "32", "--resize-ratio", "1", "--k", "5", "20",
                 "--workers", "0",
                 "--batch-size", "64", "--out", str(rand_json)]) == 0
    rand = json.loads(rand_json.read_text())
    for name in baselines:
        assert rand[name]["knn"]["k20_top1"] == metrics[name]["k20_top1"], name
        assert rand[name]["knn"]["k5_top1"] == metrics[name]["k5_top1"], name
    assert rand["random_init_bn"]["model"]["source"] == "random init, BN re-estimated"
    assert "random init, BN re-estimated" in capsys.readouterr().out
    scores = ("k5_top1", "k20_top1", "linear_top1")  # training changed the network (one score may tie by chance)
    assert [metrics["trained"][k] for k in scores] != [metrics["random_init"][k] for k in scores]

    # a plain torchvision state_dict is accepted too (architecture inferred from the keys)
    plain = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    assert main(["eval", "knn", "--checkpoint", str(plain), "--train", train, "--test", test, "--size", "32",
                 "--workers", "0", "--k", "5"]) == 0
    assert "k5_top1" in capsys.readouterr().out


def test_eval_rejects_a_bad_checkpoint(tmp_path: Path, tiny_synth: Path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    code = main(["eval", "knn", "--checkpoint", str(bad), "--train", str(tiny_synth / "objects" / "train"),
                 "--test", str(tiny_synth / "objects" / "test")])
    assert code == 1
    assert "bad.ckpt" in capsys.readouterr().err


def test_a_dataset_smaller_than_a_batch_is_a_clear_error(tiny_synth: Path, tmp_path: Path, capsys):
    """96 training images, data.batch_size=128: the loader drops the partial batch, so 0 steps per epoch."""
    args = tiny_overrides(tiny_synth, tmp_path / "runs") + ["data.batch_size=128", "eval.enabled=false"]
    assert main(["pretrain", *args]) == 1
    err = capsys.readouterr().err
    assert "96 images are fewer than one batch (data.batch_size=128)" in err and "0 steps" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # stopped before any run folder


def test_one_step_per_epoch_is_a_warning(tiny_synth: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """96 training images, data.batch_size=64: one full batch per epoch, the other 32 images left out."""
    args = tiny_overrides(tiny_synth, tmp_path / "runs") + ["data.batch_size=64", "trainer.max_epochs=1",
                                                             "eval.enabled=false", "trainer.run_name=one"]
    with caplog.at_level(logging.INFO, logger="semssl"):
        assert main(["pretrain", *args]) == 0
    assert "96 images make only 1 step/epoch at data.batch_size=64 (32 images left out of each epoch)" in caplog.text
    assert f"run folder: {tmp_path / 'runs' / 'one'} (96 images, 1 step/epoch, 1 epoch)" in caplog.text
    assert "steps/epoch" not in caplog.text


def test_data_synth_and_check(tmp_path: Path):
    root = tmp_path / "synth"
    res = run_cli("data", "synth", "--root", str(root), "--n-train-objects", "20", "--n-test-objects", "10",
                  "--n-train-scenes", "4", "--n-test-scenes", "2", "--object-size", "32", "--scene-size", "64",
                  "--workers", "1")
    assert res.returncode == 0, res.stderr
    assert (root / "manifest.json").exists()
    assert run_cli("data", "check", str(root / "objects" / "train")).returncode == 0
    (root / "objects" / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG garbage")
    res = run_cli("data", "check", str(root / "objects" / "train"))
    assert res.returncode == 1 and "broken.png" in res.stdout


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--temperature", "0"), ("--size", "0"),
                                           ("--batch-size", "x")])
def test_bad_eval_options_exit_2_naming_the_option(option: str, value: str, tmp_path: Path, capsys) -> None:
    """Issue 10 point 3: `semssl eval` options are checked before any model or data is touched."""
    with pytest.raises(SystemExit) as info:
        main(["eval", "knn", "--random-init", "--train", str(tmp_path), "--test", str(tmp_path), option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err
