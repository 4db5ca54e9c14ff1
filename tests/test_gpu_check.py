"""benchmarks/gpu_check.py: ``--dry-run`` writes every part of the JSON (nine methods, three peers, the pipeline)
with positive numbers; without CUDA and without ``--dry-run`` the script stops at once with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
METHODS = {"mocov2", "byol", "dino", "densecl", "soco", "scfs", "scd", "dsc", "d3ssl"}
PEERS = ("mocov2", "byol", "dino")


def run_script(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """The script as the GPU machine runs it (from the repository root, PYTHONPATH=src), on one thread."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def positive(entry: dict, *keys: str) -> None:
    assert "error" not in entry, entry.get("error")
    for key in keys:
        assert isinstance(entry[key], (int, float)) and entry[key] > 0, (key, entry)


def check_peers(peers: dict, implementation: str) -> None:
    assert peers["implementation"] == implementation
    for name in PEERS:
        positive(peers[name], "ours_ms", "peer_ms", "ratio_median")
        assert len(peers[name]["ratios"]) >= 5 and all(r > 0 for r in peers[name]["ratios"])


def test_dry_run_writes_every_part(tmp_path: Path) -> None:
    res = run_script(["--out", str(tmp_path), "--dry-run", "--peers", "plain"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] is True and doc["skipped"] == []
    assert {"gpu", "cuda", "torch", "torchvision", "cpu_count"} <= set(doc["machine"])
    assert doc["settings"]["batch"] == 4 and doc["settings"]["precision"] == "bf16-autocast"
    positive(doc["supervised"], "step_ms", "images_per_s")
    assert set(doc["methods"]) == METHODS
    for name, entry in doc["methods"].items():
        positive(entry, "step_ms", "images_per_s", "ratio_to_supervised")
        assert len(entry["step_ms_blocks"]) == 2 and "peak_mem_mb" in entry, name  # CUDA only: None here
    assert doc["methods"]["dino"]["views"] == {"global": "2 x 64 px", "local": "6 x 32 px"}
    check_peers(doc["peers"], "plain")
    pipe = doc["pipeline"]
    positive(pipe["images"], "files", "mean_kb")
    for kind in ("two_view", "multi_crop"):
        positive(pipe["cpu_loader"][kind], "images_per_s", "views_per_s")
    gpu = pipe["gpu_decode_augment"]
    assert "not yet the training pipeline" in gpu["label"]
    for mode in ("decode_only", "per_image", "batched"):
        positive(gpu[mode], "images_per_s")
    assert "| method |" in res.stdout and "pipeline images/s" in res.stdout


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly is not installed")
def test_dry_run_peers_from_lightly(tmp_path: Path) -> None:
    res = run_script(["--out", str(tmp_path), "--dry-run", "--parts", "peers", "--peers", "lightly"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    check_peers(doc["peers"], "lightly")
    assert doc["peers"]["lightly"] and doc["methods"] == {} and doc["pipeline"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_at_once_with_one_line(tmp_path: Path) -> None:
    start = time.perf_counter()
    res = run_script(["--out", str(tmp_path)], timeout=120)
    assert res.returncode == 2
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], lines
    assert not (tmp_path / "gpu_check.json").exists()
    assert time.perf_counter() - start < 60  # importing torch only: seconds even on a loaded machine
