"""Evaluation labels are matched by class name: a test folder with a subset of the training classes is scored
against the right labels, an unknown test class is an error naming it (or is dropped and counted on request)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semssl.config import load_config
from semssl.errors import EvalInputError
from semssl.eval.evaluate import evaluate

COLOURS = {"apple": (220, 30, 30), "banana": (230, 220, 40), "cherry": (120, 0, 40), "date": (90, 60, 20)}


def _folder(root: Path, classes: list[str], per_class: int = 4) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((16, 16, 3), COLOURS[name], dtype=np.uint8)
            pixels[i % 16, :, :] = 255 - pixels[i % 16, :, :]  # images of one class differ a little
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class MeanColour(torch.nn.Module):
    """Features = the image's mean colour: a perfect classifier of these folders."""

    def features(self, images, branch=None, kind="pooled"):
        return torch.nn.functional.normalize(images.mean((2, 3)) + 3.0, dim=1)


def _cfg():
    return load_config(None, ["data.eval_size=16", "data.eval_resize_ratio=1", "data.num_workers=0",
                              "eval.knn_k=[3]", "eval.batch_size=8"])


def test_a_test_folder_with_a_subset_of_classes_is_scored_by_name(tmp_path: Path) -> None:
    train = _folder(tmp_path / "train", ["apple", "banana", "cherry"])
    test = _folder(tmp_path / "test", ["banana", "cherry"])  # own sorted order would call banana class 0
    res = evaluate(MeanColour(), _cfg(), str(train), str(test), linear=False)
    assert res["knn_top1"] == 100.0


def test_an_unknown_test_class_is_an_error_or_dropped_and_counted(tmp_path: Path, caplog) -> None:
    train = _folder(tmp_path / "train", ["apple", "banana"])
    test = _folder(tmp_path / "test", ["apple", "banana", "date"])
    with pytest.raises(EvalInputError, match=r"classes \['date'\] are not in the training split"):
        evaluate(MeanColour(), _cfg(), str(train), str(test), linear=False)
    res = evaluate(MeanColour(), _cfg(), str(train), str(test), linear=False, drop_unknown=True)
    assert res["knn_top1"] == 100.0
    assert "left out 4 images of 1 classes" in caplog.text


def test_the_cli_names_the_unknown_class(tmp_path: Path, capsys) -> None:
    from semssl.cli import main

    train = _folder(tmp_path / "train", ["apple", "banana"])
    test = _folder(tmp_path / "test", ["cherry"])
    code = main(["eval", "knn", "--random-init", "--arch", "resnet18", "--train", str(train), "--test", str(test),
                 "--size", "16", "--workers", "0", "--k", "3"])
    assert code == 1 and "['cherry']" in capsys.readouterr().err
