"""A quick, quiet command line: building the parser (``semssl --help``, ``semssl methods``, ``semssl recipes``)
imports no heavy library, the light copies the parser reads (method and recipe names, option choices, figure
entries, module docstrings) agree with the modules they stand for, and a pre-training run's terminal shows neither
library warnings nor the fast linear probe's lr search, which its ``logs/semssl.log`` keeps.

No wall time is asserted (the machine is shared); the import check is what keeps the commands fast."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import tiny_overrides

import semssl
from semssl import cli, cli_transfer

HEAVY = ("torch", "torchvision", "lightning", "matplotlib", "timm", "cv2", "pycocotools", "PIL")
SRC = str(Path(semssl.__file__).parents[1])


def _heavy_imported(code: str) -> list[str]:
    """The heavy modules loaded after ``code`` runs in a fresh interpreter (this checkout's sources first)."""
    probe = f"{code}; import sys; print([m for m in {HEAVY!r} if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return ast.literal_eval(res.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_no_heavy_library() -> None:
    assert _heavy_imported("from semssl.cli import build_parser; build_parser()") == []


@pytest.mark.parametrize("command", ["methods", "recipes"])
def test_the_lists_import_no_heavy_library(command: str) -> None:
    assert _heavy_imported(f"from semssl.cli import main; main([{command!r}])") == []


def test_methods_and_recipes_print_the_registries(capsys) -> None:
    from semssl.config import PACKAGE_CONFIGS, list_recipes
    from semssl.methods import available_methods

    assert cli.RECIPE_FOLDER == PACKAGE_CONFIGS

    assert cli.main(["methods"]) == 0
    assert capsys.readouterr().out.splitlines() == available_methods()
    assert cli.main(["recipes"]) == 0
    assert capsys.readouterr().out.splitlines() == list_recipes()


def test_the_option_choices_are_the_modules_own() -> None:
    from semssl.eval.options import STAGES
    from semssl.models import backbones

    # the modules (semssl.transfer binds their names to the protocol functions)
    segment, detect, export = (importlib.import_module(f"semssl.transfer.{m}") for m in ("segment", "detect", "export"))
    assert STAGES == backbones.STAGES
    t = cli_transfer
    assert (t.HEADS, t.SEGMENT_NORMS, t.SCHEDULES) == (segment.HEADS, segment.NORMS, segment.SCHEDULES)
    assert t.OUTPUT_STRIDES == backbones.OUTPUT_STRIDES == segment.OUTPUT_STRIDES
    assert (t.LAYOUTS, t.TASKS, t.DETECT_NORMS) == (detect.LAYOUTS, detect.TASKS, detect.NORMS)
    assert t.FORMATS == export.FORMATS


def test_every_figure_has_its_entry_and_every_entry_its_figure() -> None:
    from semssl.viz import figure_modules
    from semssl.viz.options import FIGURES

    assert list(FIGURES) == list(figure_modules())
    parser = cli.build_parser()
    args = parser.parse_args(["viz", "bias", "--inputs", "a.json"])
    assert args.func is cli.cmd_viz and args.viz_command == "bias"


@pytest.mark.parametrize("name", ["semssl.eval.dense", "semssl.eval.objects", "semssl.eval.bias", "semssl.reproduce",
                                  "semssl.transfer.finetune", "semssl.transfer.segment", "semssl.transfer.detect",
                                  "semssl.transfer.export", "semssl.transfer", "semssl.cli"])
def test_module_doc_reads_the_docstring_without_importing(name: str) -> None:
    assert cli_transfer.module_doc(name) == importlib.import_module(name).__doc__


def test_only_the_lightning_leafspec_warning_is_filtered() -> None:
    from semssl.engine.run import quiet_library_warnings

    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_warnings()
        for message, category, module in ((leaf, FutureWarning, "lightning.pytorch.utilities._pytree"),
                                          (leaf, FutureWarning, "mycode"),
                                          ("something else", FutureWarning, "lightning.pytorch.utilities._pytree"),
                                          (leaf, UserWarning, "lightning.pytorch.utilities._pytree")):
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert [(str(w.message)[:14], w.category.__name__) for w in seen] == [
        ("`isinstance(tr", "FutureWarning"), ("something else", "FutureWarning"), ("`isinstance(tr", "UserWarning")]


def test_a_run_prints_no_library_warning_and_logs_the_lr_search_to_its_folder(tiny_synth: Path,
                                                                                tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    overrides = tiny_overrides(tiny_synth, out_dir) + ["trainer.run_name=quiet", "trainer.max_epochs=1",
                                                          "trainer.num_threads=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "semssl", "pretrain", *overrides], capture_output=True, text=True,
                         timeout=600, env=env)
    printed = res.stdout + res.stderr
    assert res.returncode == 0, printed
    assert "gain over best baseline" in res.stdout  # the final table
    assert "LeafSpec" not in printed
    assert not re.search(r"\.py:\d+: ", printed), printed  # no warning of any library (file:line: message)
    assert "fast linear probe: lr" not in printed
    log = (out_dir / "quiet" / "logs" / "semssl.log").read_text()
    searched = re.findall(r"DEBUG semssl\.eval\.linear: fast linear probe: lr \S+ -> held-out top-1", log)
    assert len(searched) >= 4 * 2, log  # the trained network and its three baselines, each over >= 2 lrs
    assert "evaluating the trained network and its random-init baselines" in log
