"""``semssl report``: RankMe (hand-computed cases), the RankMe monitor a tiny run logs, the report's content for one
and for several runs, its errors on bad run folders, and the page opened in headless Chromium (skipped where no
browser or no Playwright is installed; ``.ci/run`` installs both)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from semssl.cli import main
from semssl.config import load_config
from semssl.engine.monitor import RANKME_KEYS, as_rows, rankme_due, rankme_logs
from semssl.engine.run import pretrain
from semssl.errors import ReportError
from semssl.eval.rankme import rankme, subsample_rows
from semssl.methods import build_method
from semssl.schedules import Progress
from semssl.viz.report import SECTIONS, write_report


# ------------------------------------------------------------------------------------------------ RankMe
@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_rankme_of_a_rank_r_identity_is_r(r: int) -> None:
    z = torch.zeros(40, 16)
    z[:r, :r] = torch.eye(r)  # r singular values 1, the rest 0: p_k = 1/r (+ eps), entropy log r
    assert rankme(z) == pytest.approx(r, rel=1e-4)


def test_rankme_by_hand() -> None:
    u, v = torch.randn(50, 1), torch.randn(1, 12)
    assert rankme(u @ v) == pytest.approx(1.0, abs=1e-3)  # rank 1
    # singular values 3 and 1: p = (0.75, 0.25), RankMe = exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert rankme(z) == pytest.approx(expected, rel=1e-6)
    assert rankme(7.5 * z) == pytest.approx(expected, rel=1e-6)  # scale-free
    # a rotation changes nothing; the 8 zero singular values add only eps terms (8 x 1e-7 x ln 1e7 = 1.3e-5)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    d = torch.diag(torch.tensor([3.0, 1.0] + [0.0] * 8, dtype=torch.float64))
    assert rankme(q[:, :10] @ d) == pytest.approx(rankme(d), rel=1e-9)
    assert rankme(d) == pytest.approx(expected, rel=1e-4)
    assert rankme(torch.zeros(5, 4)) == 0.0
    assert 1.0 <= rankme(torch.randn(256, 16)) <= 16.0
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        rankme(torch.randn(3, 4, 5))


def test_the_monitor_draws_no_random_number() -> None:
    z = torch.randn(5000, 8)
    state = torch.get_rng_state()
    rows = subsample_rows(z, 2048)
    assert torch.equal(torch.get_rng_state(), state)
    assert rows.shape == (2048, 8) and torch.equal(rows[0], z[0]) and torch.equal(rows[-1], z[-1])
    assert subsample_rows(z[:10], 2048).shape == (10, 8)
    assert [s for s in range(10) if rankme_due(s, 4)] == [0, 4, 8] and not rankme_due(0, 0)


def test_dense_and_region_methods_return_their_embeddings(tiny_synth: Path, tmp_path: Path) -> None:
    """DenseCL/DSC: pooled + per-location; SoCo/D3SSL: per-region, pooled through Method.features (eval mode)."""
    from region_testing import load_region_recipe, region_batch, tiny_scene_overrides

    cfg = load_config(None, ["method.name=densecl", "model.width=8", "method.queue_size=16",
                             "method.dense_queue_size=16", "model.bn_splits=2", "data.batch_size=4"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    x = torch.randn(4, 3, 32, 32)
    out = method.training_step({"views": {"q": x, "k": x}}, Progress(epoch=0, step=0, steps_per_epoch=1,
                                                                     total_steps=1))
    emb, dim = out["embeddings"], method.encoder_q.backbone.dim
    assert emb["pooled"].shape == (4, dim) and emb["dense"].shape == (4, dim, 4, 4)  # small-input stem: 32 px -> 4x4
    rows = as_rows(emb["dense"])  # one row per location, row-major (flatten_map's order)
    assert rows.shape == (64, dim) and torch.equal(rows[5], emb["dense"][0, :, 1, 1])
    logs = rankme_logs(method, emb, {"views": {"q": x, "k": x}}, cfg)
    assert set(logs) == {RANKME_KEYS["pooled"], RANKME_KEYS["dense"]}
    assert 1.0 <= logs["monitor/rankme"] <= 4.0 and 1.0 <= logs["monitor/rankme_dense"] <= 64.0

    cfg = load_region_recipe("soco_resnet18_1x32-300it_scenes", tiny_scene_overrides(tiny_synth, tmp_path / "r"))
    batch = region_batch(cfg, 4)
    torch.manual_seed(0)
    method = build_method(cfg).train()
    out = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    region, valid = out["embeddings"]["region"], batch["proposal_valid"]["x1"].reshape(-1)
    assert region.shape == (valid.numel(), method.online.backbone.dim)
    assert not region[~valid].any()  # invalid slots are zero rows: the same singular values as the valid rows alone
    assert rankme(region) == pytest.approx(rankme(region[valid]), rel=1e-5)
    bn = method.online.backbone.bn1
    before = bn.running_mean.clone()
    logs = rankme_logs(method, out["embeddings"], batch, cfg)
    assert set(logs) == {"monitor/rankme", "monitor/rankme_region"}
    assert torch.equal(bn.running_mean, before) and method.training  # the extra forward ran in eval mode


# ------------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def runs(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``main``: the main job's recipe, tiny (no online kNN, no figures, as the main job); ``other``: the same
    with another lr, the online kNN monitor and a figure drawn during training, plus a ``semssl eval`` JSON."""
    out = tmp_path_factory.mktemp("report_runs")
    common = tiny_overrides(tiny_synth, out / "runs") + ["trainer.max_epochs=1", "model.width=8",
                                                         "trainer.rankme_every_n_steps=2"]
    main_run = pretrain(load_config(None, common + ["trainer.run_name=main"]))
    other = pretrain(load_config(None, common + [
        "trainer.run_name=other", "optim.lr=0.2", "trainer.knn_every_n_epochs=1",
        "trainer.figures=[{name: clusters, every_n_epochs: 1}]"]))
    assert main(["eval", "knn", "--checkpoint", str(other), "--train", str(tiny_synth / "objects" / "train"),
                 "--test", str(tiny_synth / "objects" / "test"), "--k", "5", "--workers", "0",
                 "--out", str(other / "eval_knn.json")]) == 0
    return {"main": main_run, "other": other, "root": out}


def test_a_tiny_run_logs_rankme(runs: dict[str, Path]) -> None:
    rows = list(csv.DictReader((runs["main"] / "logs" / "csv" / "metrics.csv").open()))
    measured = {int(r["step"]): float(r["monitor/rankme"]) for r in rows if r.get("monitor/rankme")}
    assert sorted(measured) == [0, 2, 4]  # every 2 steps of 6, each once (not repeated on the rows between)
    assert all(1.0 <= v <= 16.0 for v in measured.values())  # batch of 16, 64-d pooled vectors (width 8)
    assert any(r.get("train/z_std") for r in rows)  # MoCo-v2's collapse monitor
    run = json.loads((runs["main"] / "metrics.json").read_text())["run"]
    assert run["versions"]["torch"] == torch.__version__ and run["machine"]["cpu_count"] == os.cpu_count()


class _Sections(HTMLParser):
    """Text, images and tables inside each ``<section id=...>``, and every URL the page would load."""

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.text: dict[str, str] = {}
        self.images: dict[str, int] = {}
        self.tables: dict[str, int] = {}
        self.urls: list[str] = []
        self.diff_cells: list[str] = []
        self._in_diff = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self.current = a.get("id")
            self.text[self.current], self.images[self.current], self.tables[self.current] = "", 0, 0
        if tag in ("img", "script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.urls.append(a.get("src") or a.get("href"))
        if self.current and tag == "img":
            self.images[self.current] += 1
        if self.current and tag == "table":
            self.tables[self.current] += 1
        self._in_diff = tag == "td" and "diff" in (a.get("class") or "").split()

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current:
            self.text[self.current] += data
        if self._in_diff and data.strip():
            self.diff_cells.append(data.strip())
            self._in_diff = False


def _parse(page: Path) -> _Sections:
    parser = _Sections()
    parser.feed(page.read_text())
    return parser


def test_the_report_of_one_run_has_every_section_with_content(runs: dict[str, Path], tmp_path: Path) -> None:
    out = write_report([runs["main"]], tmp_path / "main.html")
    page = _parse(out)
    assert list(page.text) == list(SECTIONS)
    for sid, title in SECTIONS.items():
        body = page.text[sid].replace(title, "", 1).strip()
        assert body and (page.images[sid] or page.tables[sid]), sid
    assert all(u.startswith("data:") for u in page.urls), page.urls  # self-contained: nothing to fetch
    text = page.text
    assert "mocov2_resnet18-w16_1x128-800it_synthetic" in text["config"]  # compared with the main recipe
    assert "model.width" in text["config"] and "8" in page.diff_cells  # an override of the recipe, highlighted
    for label in ("random init", "random init, BN re-estimated", "pixels (centred)", "gain over the best baseline"):
        assert label in text["evaluation"]
    assert "online kNN monitor was off" in text["knn"]
    assert "monitor/rankme" in text["collapse"] and "not logged by this run" in text["collapse"]  # teacher entropy
    assert "clusters of checkpoints/last.ckpt" in text["figures"]
    assert "version: torch" in text["environment"] and torch.__version__ in text["environment"]


def test_several_runs_side_by_side_with_their_differences_highlighted(runs: dict[str, Path], tmp_path: Path
                                                                      ) -> None:
    out = tmp_path / "both.html"
    assert main(["report", str(runs["main"]), str(runs["other"]), "-o", str(out)]) == 0
    page = _parse(out)
    html = out.read_text()
    assert html.count('<div class="run">') >= 4  # config, evaluation, figures: one column per run
    config = page.text["config"]
    assert "Differences between the runs" in config
    assert re.search(r"<code>optim\.lr</code></td><td>0\.4</td><td class=\"diff\">0\.2</td>", html)
    assert "trainer.knn_every_n_epochs" in config
    assert "other: online kNN every 1 epoch(s)" in page.text["knn"]
    assert "clusters-epoch0001.png: drawn during training" in page.text["figures"]
    assert "eval_knn.json" in page.text["evaluation"] and "k5_top1" in page.text["evaluation"]


def test_bad_run_folders_are_errors_naming_the_file_and_leave_the_output_alone(runs: dict[str, Path],
                                                                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    out.write_text("an earlier report")
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'nowhere'}: no such run folder")):
        write_report([runs["main"], tmp_path / "nowhere"], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "-o", str(out)]) == 1
    assert f"{empty / 'config.yaml'}: missing" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(runs["main"], broken, ignore=shutil.ignore_patterns("checkpoints"))
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(ReportError, match=re.escape(str(broken / "metrics.json")) + ": not valid JSON"):
        write_report([broken], out)
    (broken / "metrics.json").unlink()
    (broken / "logs" / "csv" / "metrics.csv").write_text("step,train/loss\n0,1.5\n1,oops\n")
    with pytest.raises(ReportError, match=re.escape(str(broken / "logs" / "csv" / "metrics.csv")) + ": line 3"):
        write_report([broken], out)
    (broken / "config.yaml").write_text("method: [unclosed")
    with pytest.raises(ReportError, match=re.escape(str(broken / "config.yaml")) + ": not valid YAML"):
        write_report([broken], out)
    with pytest.raises(ReportError, match="ending in .html"):
        write_report([runs["main"]], tmp_path / "report.png")
    assert out.read_text() == "an earlier report"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.html.tmp")]


def test_a_run_still_training_is_reported_with_what_it_has(runs: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(runs["main"], partial, ignore=shutil.ignore_patterns("checkpoints", "metrics.json"))
    page = _parse(write_report([partial], tmp_path / "partial.html"))
    assert "still training" in page.text["environment"] and "No evaluation" in page.text["evaluation"]
    assert page.images["curves"] and "no checkpoints/last.ckpt" in page.text["figures"]  # said, not raised
    page = _parse(write_report([partial], tmp_path / "partial.html", draw=False))
    assert "--no-draw" in page.text["figures"]


# ------------------------------------------------------------------------------------------------ in a browser
def _chromium() -> str | None:
    for name in (os.environ.get("SEMSSL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def test_the_main_jobs_report_opens_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    """The acceptance test: the page loads from disk with no console error and no request, and every section is
    visible with content (text besides its heading, and a loaded plot or a table)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install "
                                                                 "playwright; .ci/run installs it)")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium executable on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    out = write_report([runs["main"]], tmp_path / "main.html")
    problems: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("requestfailed", lambda req: problems.append(f"failed request: {req.url}"))
            page.on("request", lambda req: problems.append(f"request: {req.url[:80]}")
                    if not req.url.startswith(("file:", "data:")) else None)
            page.goto(out.resolve().as_uri(), wait_until="load")
            assert page.title().startswith("Run report")
            for sid, title in SECTIONS.items():
                section = page.locator(f"section#{sid}")
                assert section.count() == 1 and section.is_visible(), sid
                assert section.locator("h2").inner_text().strip() == title
                body = section.inner_text().replace(title, "", 1).strip()
                assert body, f"section {sid} is empty"
                images = section.locator("img")
                tables = section.locator("table")
                assert images.count() + tables.count() > 0, sid
                for i in range(images.count()):
                    img = images.nth(i)
                    assert img.is_visible() and img.evaluate("e => e.complete && e.naturalWidth > 0"), (sid, i)
                for i in range(tables.count()):
                    assert tables.nth(i).is_visible(), (sid, i)
        finally:
            browser.close()
    assert problems == []
