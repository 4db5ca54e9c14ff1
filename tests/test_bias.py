"""Coupling rate and positional bias (semssl.eval.bias): canvas geometry, exact values for local /
translation-invariant stubs, > 1 / < 1 for stubs with global context / position, sampling, CLI JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semssl.cli import main
from semssl.eval.bias import (
    BiasConfig,
    canvas_geometry,
    coupling_rate,
    evaluate_bias,
    pair_canvases,
    positional_mcs,
    sample_objects,
    sample_pairs,
    tile_canvas,
)
from semssl.eval.objects import open_coco

#: stub strides per stage. With a 168 px canvas the cell is 56 px and the CR pair starts at x 28, y 56: every box
#: edge is on the cell grid of strides 1, 2, 4 and a box is 56 / 28 / 14 cells, so RoIAlign 7x7's samples fall
#: on cell centres and nothing outside a box is read (see roi_features' note).
STRIDES = {"layer1": 1, "layer2": 2, "layer3": 4}
SIZE = 168


class StageStub(nn.Module):
    """``features(images, kind)`` = ``fn(images, stride of kind)``."""

    branches = ("online",)
    default_branch = "online"
    feature_kinds = ("pooled", *STRIDES)

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def resolve_branch(self, branch=None) -> str:
        return "online"

    def features(self, images, branch=None, kind="layer3"):
        return self.fn(images, STRIDES[kind])


def local(x, s):  # purely local, positive: each cell sees its own s x s pixels only
    return F.avg_pool2d(x + 3.0, s)


def global_context(x, s):  # local + the whole canvas' mean: every cell sees everything
    return local(x, s) + (x + 3.0).mean(dim=(2, 3), keepdim=True)


def with_position(x, s):  # local + coordinate channels: the feature knows where it is
    f = local(x, s)
    h, w = f.shape[-2:]
    ys = torch.linspace(0, 8, h).view(1, 1, h, 1).expand(f.shape[0], 1, h, w)
    xs = torch.linspace(0, 8, w).view(1, 1, 1, w).expand(f.shape[0], 1, h, w)
    return torch.cat([f, ys, xs], dim=1)


def crops(n: int, side: int, seed: int, tint: tuple[float, float, float]) -> torch.Tensor:
    """Textured crops in [0, 1] with a colour tint (so A and B differ in colour, not only in texture)."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.rand(n, 3, side, side, generator=g) + 0.5 * torch.tensor(tint).view(1, 3, 1, 1)).clamp(0, 1)


# ------------------------------------------------------------------------------------------------ geometry
def test_canvas_is_three_cells_and_the_pair_touches_on_black():
    assert canvas_geometry(224) == (222, 74) and canvas_geometry(SIZE) == (SIZE, 56)
    a, b = torch.full((3, 10, 10), 0.5), torch.full((3, 10, 10), 0.8)
    both, alone, box_a, box_b = pair_canvases(a, b, 30)
    assert box_a.tolist() == [5, 10, 15, 20] and box_b.tolist() == [15, 10, 25, 20]  # a third each, no gap
    assert torch.all(both[:, 10:20, 5:15] == 0.5) and torch.all(both[:, 10:20, 15:25] == 0.8)
    assert torch.all(alone[:, 10:20, 5:15] == 0.5)
    inside = torch.zeros(30, 30, dtype=torch.bool)
    inside[10:20, 5:25] = True
    assert torch.all(both[:, ~inside] == 0)  # black everywhere else
    inside[10:20, 15:25] = False
    assert torch.all(alone[:, ~inside] == 0)


def test_tiling_repeats_the_crop_in_nine_cells():
    crop = torch.rand(3, 7, 7)
    canvas, boxes = tile_canvas(crop)
    assert canvas.shape == (3, 21, 21) and boxes.shape == (9, 4)
    assert boxes[4].tolist() == [7, 7, 14, 14]
    for x1, y1, x2, y2 in boxes.int().tolist():
        assert torch.equal(canvas[:, y1:y2, x1:x2], crop)


# ------------------------------------------------------------------------------------------------ measures
def test_local_network_has_coupling_rate_one_and_global_context_more():
    _, cell = canvas_geometry(SIZE)
    a, b = crops(6, cell, 0, (1.0, 0.2, 0.1)), crops(6, cell, 1, (0.1, 0.3, 1.0))
    res = coupling_rate(StageStub(local), a, b, SIZE, stages=tuple(STRIDES))
    for stage in STRIDES:
        assert abs(res["coupling_rate"][stage] - 1.0) < 1e-5, (stage, res)
        assert res["excluded"][stage] == 0
    res = coupling_rate(StageStub(global_context), a, b, SIZE, stages=tuple(STRIDES))
    for stage in STRIDES:
        assert res["coupling_rate"][stage] > 1.01, (stage, res)


def test_translation_invariant_network_has_mcs_one_and_a_positional_one_less():
    _, cell = canvas_geometry(SIZE)
    objects = crops(4, cell, 2, (0.6, 0.5, 0.4))
    res = positional_mcs(StageStub(local), objects, stages=tuple(STRIDES))
    for stage in STRIDES:
        assert abs(res["positional_mcs"][stage] - 1.0) < 1e-5, (stage, res)
    res = positional_mcs(StageStub(with_position), objects, stages=tuple(STRIDES))
    for stage in STRIDES:
        assert res["positional_mcs"][stage] < 0.99, (stage, res)


def test_pairs_have_different_classes_and_sampling_is_seeded():
    labels = [0, 0, 1, 2, 2, 2]
    pairs = sample_pairs(labels, 50, seed=0)
    assert len(pairs) == 50 and all(labels[a] != labels[b] for a, b in pairs)
    assert pairs == sample_pairs(labels, 50, seed=0) and pairs != sample_pairs(labels, 50, seed=1)
    assert sample_objects(6, 100) == [0, 1, 2, 3, 4, 5] and len(sample_objects(100, 10)) == 10


def test_driver_on_scenes_is_deterministic(tiny_synth: Path):
    source = open_coco(tiny_synth / "scenes" / "train")
    cfg = BiasConfig(size=SIZE, pairs=5, objects=4, stages=tuple(STRIDES), min_side=8, batch_size=4)
    first = evaluate_bias(StageStub(global_context), source, cfg)
    second = evaluate_bias(StageStub(global_context), source, cfg)
    assert first == second
    assert set(first["coupling_rate"]) == set(STRIDES) and set(first["positional_mcs"]) == set(STRIDES)
    assert first["n_pairs"] == 5 and first["n_objects"] == 4 and first["canvas"] == SIZE
    assert all(v > 1.0 for v in first["coupling_rate"].values())


def test_cli_writes_per_stage_json_and_plots(tiny_synth: Path, tmp_path: Path):
    out, plot, examples = tmp_path / "bias.json", tmp_path / "bias.png", tmp_path / "canvases.png"
    assert main(["eval", "bias", "--random-init", "--arch", "resnet18", "--data", str(tiny_synth / "scenes" / "test"),
                 "--size", "64", "--pairs", "4", "--objects", "3", "--min-side", "8", "--batch-size", "4",
                 "--out", str(out), "--plot", str(plot), "--examples", str(examples)]) == 0
    payload = json.loads(out.read_text())
    stages = ["layer1", "layer2", "layer3", "layer4"]
    for name in ("random_init", "random_init_bn"):
        assert list(payload[name]["coupling_rate"]) == stages and list(payload[name]["positional_mcs"]) == stages
        assert all(v > 0 for v in payload[name]["positional_mcs"].values())
    assert plot.stat().st_size > 0 and examples.stat().st_size > 0
    figure = tmp_path / "viz.png"
    assert main(["viz", "bias", "--inputs", str(out), str(out), "--labels", "a", "b", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
