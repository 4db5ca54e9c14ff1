"""The three random-init baselines: BatchNorm statistics re-estimated on the data (hand cases), centred and
L2-normalised pixels (hand case), the printed gain over the best baseline, and ``semssl eval linear
--random-init``. (The baselines in ``metrics.json`` after a tiny run, and their equality with ``semssl eval knn
--random-init``, are checked in tests/test_cli.py, next to the run they need.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from semssl.cli import main
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.engine.run import print_summary
from semssl.errors import EvalInputError
from semssl.eval.evaluate import PixelModel, folder_features, reestimate_bn
from semssl.methods import method_class
from semssl.models.backbones import BackboneModel, ResNetBackbone, SplitBatchNorm2d


def _data(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # channels with clearly different means and variances, far from BatchNorm's initial 0 / 1
    return torch.randn(n, 3, 4, 5, generator=g) * torch.tensor([0.5, 2.0, 3.0])[:, None, None] + \
        torch.tensor([1.0, -4.0, 10.0])[:, None, None]


@pytest.mark.parametrize("norm", ["plain", "split"])
def test_reestimated_bn_holds_the_datas_mean_and_unbiased_variance(norm: str) -> None:
    x = _data()
    bn = nn.BatchNorm2d(3) if norm == "plain" else SplitBatchNorm2d(3, num_splits=2)
    model = nn.Sequential(bn, nn.ReLU())
    out = reestimate_bn(model, [{"image": x, "label": torch.zeros(12)}])
    new = out[0]
    assert torch.allclose(new.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    # unbiased, as torch's BatchNorm stores it (over all N*H*W values of a channel); with splits it would be
    # the mean of the two halves' variances, which differs here
    assert torch.allclose(new.running_var, x.var(dim=(0, 2, 3), correction=1), rtol=1e-5)
    assert not new.training and new.momentum == 0.1  # the copy gets its settings back
    if norm == "split":
        assert new.num_splits == 2
    # the model given is not changed
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_reestimated_bn_is_the_cumulative_average_over_batches() -> None:
    x = _data(12)
    batches = [x[:4], x[4:8], x[8:]]  # equal sizes: the mean of batch means is the data's mean
    out = reestimate_bn(nn.BatchNorm2d(3), batches)
    assert torch.allclose(out.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    expected_var = torch.stack([b.var(dim=(0, 2, 3), correction=1) for b in batches]).mean(0)
    assert torch.allclose(out.running_var, expected_var, rtol=1e-5)
    # ``batches`` limits the passes
    first = reestimate_bn(nn.BatchNorm2d(3), batches, batches=1)
    assert torch.allclose(first.running_mean, x[:4].mean(dim=(0, 2, 3)), atol=1e-5)
    with pytest.raises(EvalInputError, match="no batch"):
        reestimate_bn(nn.BatchNorm2d(3), [])


def test_reestimate_bn_touches_only_the_evaluated_branch() -> None:
    cfg = load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "model.width=64", "model.small_input=false",
                                       "model.bn_splits=2", "method.queue_size=16"])
    torch.manual_seed(0)
    method = method_class("mocov2")(cfg.method, cfg.model).eval()
    x = _data(6)[:, :, :4, :4].repeat(1, 1, 8, 8)  # 32 px
    out = reestimate_bn(method, [x])
    q, k = out.encoder_q.backbone, out.encoder_k.backbone
    assert torch.allclose(q.bn1.running_mean, method.encoder_q.backbone.conv1(x).mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.equal(k.bn1.running_mean, method.encoder_k.backbone.bn1.running_mean)  # teacher untouched
    assert q.bn1.num_splits == 2 and q.layer4[1].bn2.momentum == 0.1  # settings given back on the copy
    assert not out.training
    # a BackboneModel (the CLI's random init) is re-estimated through the same features() path
    torch.manual_seed(0)
    backbone = BackboneModel(ResNetBackbone("resnet18")).eval()
    assert torch.allclose(reestimate_bn(backbone, [x]).backbone.bn1.running_mean, q.bn1.running_mean, atol=1e-5)


def test_pixel_features_are_centred_by_the_train_mean_and_l2_normalised() -> None:
    train = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]).view(3, 1, 1, 2)  # mean pixel vector (3, 2)
    model = PixelModel().fit([{"image": train[:2]}, {"image": train[2:]}])
    assert torch.allclose(model.mean, torch.tensor([3.0, 2.0]))
    test = torch.tensor([[6.0, 2.0], [3.0, 5.0], [0.0, -2.0]]).view(3, 1, 1, 2)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]])  # (3,0), (0,3), (-3,-4) normalised
    assert torch.allclose(model.features(test), expected)
    with pytest.raises(EvalInputError, match="evaluation size"):
        model.features(torch.zeros(1, 1, 2, 2))


def test_pixel_model_on_a_folder(tiny_synth: Path, tiny_cfg) -> None:
    from semssl.eval.data import eval_loader

    train = str(tiny_synth / "objects" / "train")
    model = PixelModel().fit(eval_loader(train, tiny_cfg))
    x, _ = folder_features(model, train, tiny_cfg)
    assert x.shape == (96, 3 * 32 * 32)
    assert torch.allclose(x.norm(dim=1), torch.ones(96), atol=1e-5)
    raw = torch.cat([b["image"].flatten(1) for b in eval_loader(train, tiny_cfg)])  # eval-transformed images
    assert torch.allclose(model.mean, raw.mean(0), atol=1e-5)
    assert torch.allclose(x, nn.functional.normalize(raw - raw.mean(0), dim=1), atol=1e-5)
    uncentred, _ = folder_features(PixelModel(), train, tiny_cfg)  # no mean fitted: only normalised
    assert torch.allclose(uncentred, nn.functional.normalize(raw, dim=1), atol=1e-5)
    assert not torch.allclose(x, uncentred, atol=1e-3)


def _metrics(trained: tuple, **baselines: tuple) -> dict:
    out = {"trained": {"knn_top1": trained[0], "linear_top1": trained[1]},
           "run": {"method": "mocov2", "arch": "resnet18", "width": 32, "global_step": 10, "train_seconds": 1.0}}
    out.update({k: {"knn_top1": v[0], "linear_top1": v[1]} for k, v in baselines.items()})
    return out


def test_the_printed_gain_is_over_the_best_baseline_per_column(tmp_path: Path) -> None:
    console = Console(record=True, width=200)
    metrics = _metrics((40.0, 50.0), random_init=(30.0, 35.0), random_init_bn=(20.0, 47.5), pixels=(33.5, 40.0))
    print_summary(tmp_path, metrics, console)
    text = console.export_text()
    for label in ("random init", "random init, BN re-estimated", "pixels", "trained", "width 32"):
        assert label in text
    gain = next(line for line in text.splitlines() if "gain over best baseline" in line)
    assert "+6.50" in gain and "+2.50" in gain  # kNN over pixels' 33.5, linear over random_init_bn's 47.5
    # below the best baseline the gain is negative
    console = Console(record=True, width=200)
    print_summary(tmp_path, _metrics((30.0, 30.0), random_init=(31.0, 35.0), random_init_bn=(20.0, 20.0),
                                     pixels=(25.0, 25.0)), console)
    gain = next(line for line in console.export_text().splitlines() if "gain" in line)
    assert "-1.00" in gain and "-5.00" in gain


def test_eval_linear_random_init_reports_the_three_baselines(tiny_synth: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "lin.json"
    assert main(["eval", "linear", "--random-init", "--arch", "resnet18", "--width", "16", "--train",
                 str(tiny_synth / "objects" / "train"), "--test", str(tiny_synth / "objects" / "test"),
                 "--size", "32", "--resize-ratio", "1", "--epochs", "2", "--workers", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"random_init", "random_init_bn", "pixels"} <= set(res)
    for name in ("random_init", "random_init_bn", "pixels"):
        assert 0.0 <= res[name]["linear"]["linear_top1"] <= 100.0
    assert res["random_init"]["model"]["width"] == 16 and res["pixels"]["model"]["source"] == "pixels (centred)"
    printed = capsys.readouterr().out
    assert "random init, BN re-estimated" in printed and "pixels (centred)" in printed
