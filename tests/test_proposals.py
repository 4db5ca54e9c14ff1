"""Selective-search proposals (semssl.data.proposals): SoCo's filters on hand-made boxes, the search on tiny
images, the on-disk cache (round trip, stale files detected, parameters checked), fallbacks, sources, CLI."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semssl.cli import main as cli_main
from semssl.data import proposals as P
from semssl.data.proposals import (
    ProposalParams,
    SourceProposals,
    aspect_filter,
    check_proposals,
    default_cache_path,
    ensure_proposals,
    filter_proposals,
    min_side_px,
    relative_size_filter,
    selective_search,
    side_filter,
)
from semssl.data.sources import CocoSource, FileListSource, ImageFolderSource
from semssl.errors import DataError


def two_rectangles(width: int = 96, height: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:] = (30, 120, 40)  # green field
    image[8:40, 10:40] = (220, 30, 30)  # red rectangle
    image[20:56, 55:90] = (30, 30, 220)  # blue rectangle
    return image


def write_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = two_rectangles()
        image[:, :, 1] = (image[:, :, 1].astype(int) + 20 * i).clip(0, 255)
        path = folder / f"img{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ filters
def test_filters_on_hand_made_boxes():
    boxes = np.array([
        [0, 0, 40, 40],     # square, 40 px sides
        [0, 0, 31, 80],     # one side < 32
        [0, 0, 100, 33],    # aspect 3.03 > 3
        [0, 0, 99, 33],     # aspect 3.0: kept
        [10, 10, 10, 50],   # degenerate
    ], dtype=float)
    assert side_filter(boxes, 32).tolist() == [True, False, True, True, False]
    assert aspect_filter(boxes, 3.0).tolist() == [True, True, False, True, False]
    # sqrt(wh)/sqrt(WH) on a 100 x 100 image: 0.4, 0.498, 0.574, 0.572, 0
    assert relative_size_filter(boxes, (100, 100), (0.3, 0.8)).tolist() == [True, True, True, True, False]
    assert relative_size_filter(boxes, (100, 100), (0.45, 0.8)).tolist() == [False, True, True, True, False]
    # the side threshold is 32 px at a 224 px image and scales with sqrt(W H)
    assert min_side_px((224, 224)) == pytest.approx(32.0)
    assert min_side_px((128, 128)) == pytest.approx(32 * 128 / 224)
    assert min_side_px((200, 50)) == pytest.approx(32 * 100 / 224)
    assert min_side_px((640, 480), ProposalParams(reference_size=None)) == 32.0


def test_filter_fallbacks_follow_soco():
    image = (224, 224)
    good = [50, 50, 150, 150]          # passes everything (rel 0.446)
    thin_big = [0, 0, 200, 40]         # aspect 5: fails aspect; sides >= 32; rel 0.4
    tiny_square = [0, 0, 10, 10]       # aspect 1; side < 32; rel 0.045
    huge = [0, 0, 224, 224]            # rel 1.0 > 0.8
    kept, level = filter_proposals(np.array([good, thin_big, tiny_square]), image)
    assert level == 0 and kept.tolist() == [good]
    kept, level = filter_proposals(np.array([thin_big, tiny_square, huge]), image)  # aspect-only fallback
    assert level == 1 and kept.tolist() == [tiny_square, huge]
    kept, level = filter_proposals(np.array([thin_big, [0, 0, 5, 40]]), image)  # side-only fallback
    assert level == 2 and kept.tolist() == [thin_big]
    kept, level = filter_proposals(np.array([[0, 0, 5, 40]]), image)
    assert level == 3 and kept.shape == (0, 4)
    kept, level = filter_proposals(np.zeros((0, 4)), image)
    assert level == 3


def test_params_are_validated():
    with pytest.raises(DataError):
        ProposalParams(max_aspect=0.5)
    with pytest.raises(DataError):
        ProposalParams(rel_size=(0.8, 0.3))
    with pytest.raises(DataError):
        P.as_params({"nope": 1})
    assert P.as_params({"reference_size": None, "rel_size": [0.2, 0.9]}) == ProposalParams(reference_size=None,
                                                                                          rel_size=(0.2, 0.9))


# ------------------------------------------------------------------------------------------------ search
def test_selective_search_finds_the_rectangles_of_a_tiny_image():
    image = two_rectangles()
    boxes = selective_search(image)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) >= 2
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    rows = {tuple(b) for b in boxes.tolist()}
    assert (10, 8, 40, 40) in rows and (55, 20, 90, 56) in rows  # each rectangle, exactly (continuous xyxy)
    again = selective_search(image)
    assert np.array_equal(boxes, again)  # same order every call: ids are reproducible
    assert [tuple(b) for b in boxes.tolist()] == sorted(rows)
    # max_side: searched on a smaller copy, boxes mapped back to the original pixels
    small = selective_search(image, ProposalParams(max_side=48))
    assert (small[:, 2] <= 96).all() and small.max() > 48


# ------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_reuse(tmp_path):
    paths = write_images(tmp_path / "imgs")
    cache = tmp_path / "c.proposals.json"
    entries, summary = ensure_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=cache, workers=1)
    assert summary["computed"] == 3 and summary["images"] == 3 and cache.is_file()
    doc = json.loads(cache.read_text())
    assert doc["format"] == "semssl.proposals" and doc["params"] == ProposalParams().key()
    assert [e["file"] for e in doc["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert all(e["wh"] == [96, 64] and "boxes" in e for e in doc["images"])
    again, summary2 = ensure_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=cache, workers=1)
    assert summary2["computed"] == 0 and again == entries
    assert check_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=cache).fresh


def test_cache_detects_a_changed_file_and_recomputes_only_it(tmp_path, caplog):
    paths = write_images(tmp_path / "imgs")
    base = tmp_path / "imgs"
    cache = tmp_path / "c.proposals.json"
    ensure_proposals(paths, base, base, cache_path=cache, workers=1)
    Image.fromarray(np.full((64, 96, 3), 128, dtype=np.uint8)).save(paths[1])  # new content
    os.utime(paths[1], ns=(1, 1))
    state = check_proposals(paths, base, base, cache_path=cache)
    assert not state.fresh and state.changed == ["img1.png"] and "changed" in state.describe()
    with pytest.raises(DataError, match="img1.png"):  # never used silently
        ensure_proposals(paths, base, base, cache_path=cache, compute=False)
    entries, summary = ensure_proposals(paths, base, base, cache_path=cache, workers=1)
    assert summary["computed"] == 1
    assert entries[1]["mtime_ns"] == 1 and entries[1]["n_raw"] >= 1
    # a new file is "missing" from the cache; other parameters make the whole cache stale
    extra = write_images(tmp_path / "more", 1)[0]
    (base / "img3.png").write_bytes(extra.read_bytes())
    state = check_proposals(paths + [base / "img3.png"], base, base, cache_path=cache)
    assert state.missing == ["img3.png"]
    state = check_proposals(paths, base, base, ProposalParams(min_side=16), cache_path=cache)
    assert state.reason and "min_side" in state.reason
    _, summary = ensure_proposals(paths, base, base, ProposalParams(min_side=16), cache_path=cache, workers=1)
    assert summary["computed"] == 3


def test_a_foreign_or_broken_cache_is_reported(tmp_path):
    paths = write_images(tmp_path / "imgs", 1)
    cache = tmp_path / "c.proposals.json"
    cache.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        check_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=cache)
    cache.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a semssl proposals cache"):
        check_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=cache)


def test_whole_image_fallback_and_size_check(tmp_path):
    folder = tmp_path / "thin"
    folder.mkdir()
    Image.fromarray(np.full((8, 100, 3), 90, dtype=np.uint8)).save(folder / "a.png")  # nothing passes any filter
    params = ProposalParams(reference_size=None)  # absolute 32 px: an 8 px high image has no box
    props = SourceProposals([folder / "a.png"], folder, folder, params=params, cache_path=tmp_path / "t.json")
    assert props.summary["fallback_levels"]["whole image"] == 1
    assert props.for_image(0, (100, 8)).tolist() == [[0.0, 0.0, 100.0, 8.0]]
    with pytest.raises(DataError, match="decodes to"):
        props.for_image(0, (50, 8))
    with pytest.raises(DataError):
        SourceProposals([folder / "a.png"], folder, folder, mode="sometimes")
    with pytest.raises(DataError, match="not usable"):  # "require" never computes
        SourceProposals([folder / "a.png"], folder, folder, mode="require", cache_path=tmp_path / "none.json")


def test_default_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMSSL_CACHE_DIR", str(tmp_path / "user"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "ann.json").write_text("{}")
    assert default_cache_path(data / "ann.json") == data / "ann.json.proposals.json"
    assert default_cache_path(data) == tmp_path / "data.proposals.json"
    ro = tmp_path / "ro"
    (ro / "set").mkdir(parents=True)
    ro.chmod(0o555)  # no write bit: read-only by intent (root ignores the bits)
    try:
        path = default_cache_path(ro / "set")
        assert path.parent == tmp_path / "user" / "proposals" and path.name.startswith("set-")
    finally:
        ro.chmod(0o755)


def test_worker_processes_give_the_same_boxes(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", 2)
    monkeypatch.setattr(P, "_MIN_POOL_TASKS", 0)  # use the spawn pool even for two images
    pooled, _ = ensure_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=tmp_path / "a.json",
                                 workers=2)
    single, _ = ensure_proposals(paths, tmp_path / "imgs", tmp_path / "imgs", cache_path=tmp_path / "b.json",
                                 workers=1)
    assert [e["boxes"] for e in pooled] == [e["boxes"] for e in single]


# ------------------------------------------------------------------------------------------------ sources, CLI
def test_sources_attach_proposals(tmp_path, tiny_synth):
    write_images(tmp_path / "imgs", 2)
    folder = ImageFolderSource(tmp_path / "imgs", proposals=True)
    sample = folder[1]
    assert sample["proposals"].dtype == torch.float32 and sample["proposals"].shape[1] == 4
    assert (tmp_path / "imgs.proposals.json").is_file()
    assert "proposals" not in ImageFolderSource(tmp_path / "imgs")[0]
    scenes = CocoSource(tiny_synth / "scenes" / "train" / "annotations.json", proposals=True)
    sample = scenes[0]
    w, h = sample["image"].size
    p = sample["proposals"]
    assert p.shape[0] >= 1 and (p[:, 2] <= w).all() and (p[:, 3] <= h).all() and (p[:, :2] >= 0).all()
    assert scenes.proposals.summary["images"] == len(scenes)


def test_a_weighted_file_list_gets_proposals_once_per_file(tmp_path, capsys):
    paths = write_images(tmp_path / "imgs", 2)
    lst = tmp_path / "mixed.txt"
    lst.write_text("\n".join(str(p) for p in [paths[0], paths[1], paths[0]]) + "\n")  # image 0 weighted x2
    source = FileListSource(lst, proposals=True)
    assert len(source) == 3 and (tmp_path / "mixed.txt.proposals.json").is_file()
    cached = json.loads((tmp_path / "mixed.txt.proposals.json").read_text())["images"]
    assert len(cached) == 2  # one entry per distinct file
    assert torch.equal(source[0]["proposals"], source[2]["proposals"])
    assert source.proposals.summary["computed"] == 2
    assert cli_main(["data", "proposals", str(lst), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["fresh"] is True


def test_cli_computes_checks_and_reports(tmp_path, capsys):
    write_images(tmp_path / "imgs", 2)
    cache = tmp_path / "cli.json"
    assert cli_main(["data", "proposals", str(tmp_path / "imgs"), "--workers", "1", "--cache", str(cache)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 2 and summary["computed"] == 2 and summary["boxes_per_image"]["mean"] > 0
    assert cli_main(["data", "proposals", str(tmp_path / "imgs"), "--check", "--cache", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["fresh"] is True
    assert cli_main(["data", "proposals", str(tmp_path / "imgs"), "--check", "--cache", str(cache),
                     "--param", "reference_size=null"]) == 1
    assert "other parameters" in json.loads(capsys.readouterr().out)["status"]
    assert cli_main(["data", "proposals", str(tmp_path / "imgs"), "--cache", str(cache), "--param", "bad"]) == 1
