"""``semssl reproduce``: every table's rows are valid recipes (small and paper scale), the paper-scale commands
parse, ``--dry-run`` lists without running, the table arithmetic (seed means, paired deltas, sign agreement) on
hand-made results, resuming, and one whole small table run end to end with tiny settings."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semssl import reproduce as rp
from semssl.cli import build_parser, main
from semssl.config import load_config
from semssl.reproduce_tables import EVALUATIONS, TABLES

ALL = sorted(TABLES)


@pytest.mark.parametrize("key", ALL, ids=[f"{p}-{t}" for p, t in ALL])
def test_every_row_is_a_valid_recipe_at_both_scales(key) -> None:
    table = TABLES[key]
    assert table.row(table.baseline) is not None
    keys = {m.key for m in table.measures}
    for row in table.rows:
        load_config(row.recipe, list(row.overrides))
        paper_overrides = row.paper_overrides if row.paper_overrides is not None else row.overrides
        load_config(row.paper_recipe or table.paper_recipe, list(paper_overrides))
        assert table.baseline_of(row).key in {r.key for r in table.rows}
        assert set(row.paper) <= keys, f"{row.key}: paper values for columns the table lacks"
        assert row.paper, f"{row.key}: no paper value"
    assert all(m.evaluation in EVALUATIONS for m in table.measures)
    assert set(table.evaluations) <= set(EVALUATIONS)


@pytest.mark.parametrize("key", ALL, ids=[f"{p}-{t}" for p, t in ALL])
def test_paper_scale_commands_parse_and_name_every_row(key, capsys) -> None:
    table = TABLES[key]
    assert main(["reproduce", *key, "--scale", "paper", "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("semssl ")]
    assert len(commands) == 2 * len(table.rows) * len(table.paper_scale)
    parser = build_parser()
    for line in commands:
        parser.parse_args(shlex.split(line)[1:])  # every printed command is one semssl accepts
    for row in table.rows:
        assert f"trainer.run_name={row.key}-s1" in out
    assert "$" in out and "= " in out  # the placeholders are explained


def test_dry_run_lists_every_run_and_runs_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "rep"
    assert main(["reproduce", "scfs", "table7", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = TABLES[("scfs", "table7")]
    for row in table.rows:
        for seed in (0, 1, 2):
            assert f"{row.key}-s{seed}" in text
    assert "method.variant=roi_crop" in text and "trainer.seed=2" in text
    assert "estimated time still to run:" in text
    hours = [line for line in text.splitlines() if line.startswith("estimated time")][0]
    # 6 rows x 3 seeds x the measured 1,597 s of the recipe
    assert hours.split(": ", 1)[1].startswith(rp.hms(6 * 3 * 1597.0))
    assert not out.exists()


def test_bad_paper_table_and_seeds_name_the_value(capsys) -> None:
    assert main(["reproduce", "dsc", "table9", "--dry-run"]) == 2
    assert "unknown table 'table9' (one of table4, table5)" in capsys.readouterr().err
    assert main(["reproduce", "dsc", "table4", "--seeds", "0,x", "--dry-run"]) == 2
    assert "--seeds '0,x'" in capsys.readouterr().err


def test_agreement() -> None:
    assert rp.agreement(1.0, None, 2.0) == "yes"
    assert rp.agreement(-1.0, 0.5, 2.0) == "no"
    assert rp.agreement(0.3, 0.5, 2.0) == "noise"
    assert rp.agreement(None, None, 2.0) == "-"
    assert rp.agreement(1.0, None, 0.0) == "-"


def _fake_results(run: rp.Run, oknn: float, cr: float, mcs: float) -> None:
    run.dir.mkdir(parents=True)
    (run.dir / "metrics.json").write_text("{}")
    (run.dir / "eval_objects.json").write_text(json.dumps({"objects": {"oknn_top1": oknn}}))
    (run.dir / "eval_bias.json").write_text(json.dumps({"coupling_rate": {"layer4": cr},
                                                        "positional_mcs": {"layer4": mcs}}))


def test_table_means_paired_deltas_and_agreement_from_results(tmp_path) -> None:
    table = TABLES[("d3ssl", "table7")]
    runs = rp.plan(table, [0, 1], tmp_path)
    values = {("wo_dp", 0): (40.0, 1.02, 0.70), ("wo_dp", 1): (42.0, 1.01, 0.72),
              ("w_dp", 0): (45.0, 1.00, 0.80), ("w_dp", 1): (44.0, 1.03, 0.71)}
    for run in runs:
        _fake_results(run, *values[(run.row.key, run.seed)])
    assert all(step.done for run in runs for step in run.steps)
    measures = rp.shown_measures(table, detect=False)
    assert [m.key for m in measures] == ["oknn", "cr", "mcs"]  # AP needs --detect
    result = rp.collect(table, runs, measures)
    w = next(r for r in result["rows"] if r["key"] == "w_dp")["cells"]
    assert w["oknn"]["mean"] == pytest.approx(44.5) and w["oknn"]["sd"] == pytest.approx(0.7071, abs=1e-4)
    assert w["oknn"]["delta"] == pytest.approx(3.5)  # paired: (45 - 40 + 44 - 42) / 2
    assert w["oknn"]["delta_sd"] == pytest.approx(2.1213, abs=1e-4)
    assert w["oknn"]["paper_delta"] == pytest.approx(1.5) and w["oknn"]["agrees"] == "yes"
    assert w["cr"]["paper_delta"] == pytest.approx(-0.16)
    assert w["cr"]["delta"] == pytest.approx(0.0) and w["cr"]["agrees"] == "noise"
    assert w["mcs"]["delta"] == pytest.approx(0.045) and w["mcs"]["agrees"] == "noise"  # sd 0.078
    md = rp.markdown(result, measures)
    assert "| w/ L_dp (D3SSL) | 44.5 ± 0.7 (n 2) | 57.0 | +3.5 ± 2.1 | +1.5 | yes |" in md
    assert "lower is better" in md


def test_resume_turns_checkpoints_into_resumes_and_keeps_failed_starts(tmp_path) -> None:
    table = TABLES[("dsc", "table5")]
    run = rp.plan(table, [0], tmp_path)[0]
    pre, segment = run.steps[0], run.steps[1]
    assert segment.name == "segment_sb"
    (run.dir / "checkpoints").mkdir(parents=True)
    (run.dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert rp.resumable_argv(pre, run) == ["pretrain", "--resume", str(run.dir)]
    (run.dir / "checkpoints" / "last.ckpt").unlink()
    (run.dir / "config.yaml").write_text("a failed start")
    assert rp.resumable_argv(pre, run) == pre.argv
    assert (run.dir.parent / f"{run.name}.incomplete-1" / "config.yaml").exists() and not run.dir.exists()
    (run.dir / "transfer_segment").mkdir(parents=True)
    (run.dir / "transfer_segment" / "state.pt").write_bytes(b"x")
    assert rp.resumable_argv(segment, run)[-1] == "--resume"


def test_failed_pretraining_skips_its_evaluations_and_the_rest_goes_on(tmp_path) -> None:
    table = TABLES[("d3ssl", "table7")]
    runs = rp.plan(table, [0], tmp_path)
    calls = []

    def spawn(argv, log):
        calls.append(argv[:2])
        if argv[0] == "pretrain" and "method.depositioning=false" in argv:
            return 1
        run = next(r for r in runs if f"trainer.run_name={r.name}" in argv)
        if argv[0] == "pretrain":
            _fake_results(run, 50.0, 1.0, 0.9)
        return 0

    failed = rp.execute(table, runs, tmp_path, say=lambda _: None, spawn=spawn)
    assert failed == ["wo_dp-s0/pretrain"]
    assert calls == [["pretrain", "-c"], ["pretrain", "-c"]]  # w_dp's evaluations were already written
    timings = json.loads((tmp_path / "d3ssl-table7" / "timings.json").read_text())
    assert set(timings) == {"w_dp-s0/pretrain"}


def _tiny_cifar(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("cat", "dog"):
            d = root / "cifar10-6k" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")


def test_one_whole_small_table_with_tiny_settings_then_resume(tmp_path, monkeypatch, capsys) -> None:
    """SCFS Table 8 (3 rows) end to end through real `semssl pretrain` child processes, 2 steps each on a tiny
    stand-in of the CIFAR-10 slice; a second call finds everything done and runs nothing."""
    _tiny_cifar(tmp_path / "data")
    monkeypatch.setenv("SEMSSL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "rep"
    tiny = ["--set", "trainer.max_steps=2", "--set", "data.batch_size=4", "--set", "data.num_workers=0",
            "--set", "trainer.num_threads=1", "--set", "eval.linear.epochs=5"]
    assert main(["reproduce", "scfs", "table8", "--seeds", "0", "--out", str(out), *tiny]) == 0
    text = capsys.readouterr().out
    assert "[3/3] scfs table8" in text and "ETA" in text
    result = json.loads((out / "scfs-table8" / "table.json").read_text())
    assert result["failed"] == [] and [r["key"] for r in result["rows"]] == ["res2", "res2_3", "res2_3_4"]
    for r in result["rows"]:
        for key in ("knn", "linear"):
            assert r["cells"][key]["values"]["0"] is not None
        assert r["cells"]["linear"]["paper"] is not None
    top = result["rows"][2]["cells"]["knn"]
    assert top["paper_delta"] == pytest.approx(84.8 - 82.0)
    config = (out / "scfs-table8" / "res2-s0" / "config.yaml").read_text()
    assert "layer2" in config and "max_steps: 2" in config
    assert (out / "scfs-table8" / "table.md").read_text().startswith("### SCFS table8")

    spawned = []
    rc = rp.reproduce("scfs", "table8", seeds="0", out=str(out), extra=tiny[1::2],
                      spawn=lambda argv, log: spawned.append(argv) or 0, say=lambda _: None)
    assert rc == 0 and spawned == []
