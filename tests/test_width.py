"""``model.width``: the ResNet base width. Width 64 is torchvision's network (keys, shapes and, for one seed, the
initial values); narrower networks build and train with every architecture, their heads follow the width, and
the checkpoint loader reads a narrow run and a narrow plain ``state_dict`` back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import tiny_overrides

from semssl.bench import MethodStep, random_views
from semssl.checkpoints import load_model
from semssl.cli import main
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.engine.run import pretrain
from semssl.errors import CheckpointError, ConfigError
from semssl.models.backbones import ResNetBackbone, build_backbone


def _trunk(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_width_64_is_torchvisions_resnet(arch: str) -> None:
    torch.manual_seed(7)
    ref = _trunk(getattr(torchvision.models, arch)(zero_init_residual=True).state_dict())
    torch.manual_seed(7)
    ours = ResNetBackbone(arch, zero_init_residual=True, width=64).state_dict()
    assert list(ours) == list(ref)  # same keys, same order
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    # the random stream is consumed as torchvision consumes it: the same seed gives the same initial network
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("arch,width", [("resnet18", 32), ("resnet34", 16), ("resnet50", 16)])
def test_channels_follow_the_width(arch: str, width: int) -> None:
    net = ResNetBackbone(arch, width=width, small_input=True)
    expansion = 4 if arch == "resnet50" else 1
    assert net.channels == {f"layer{i + 1}": width * 2**i * expansion for i in range(4)}
    assert net.dim == 8 * width * expansion and net.width == width
    assert net.conv1.weight.shape == (width, 3, 3, 3)
    out = net(torch.randn(2, 3, 32, 32))
    for name, stride in net.strides.items():
        assert out[name].shape == (2, net.channels[name], 32 // stride, 32 // stride)
    assert out["pooled"].shape == (2, net.dim)
    # the keys are torchvision's whatever the width
    assert list(net.state_dict()) == list(_trunk(getattr(torchvision.models, arch)().state_dict()))


def test_a_bad_width_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.width"):
        build_backbone(load_config(DEFAULT_RECIPE, ["model.width=0"]).model)
    with pytest.raises(ConfigError, match="model.norm=gn"):
        ResNetBackbone("resnet18", width=25, norm="gn")  # 25 channels in 6 groups


@pytest.mark.parametrize("arch,width", [("resnet18", 16), ("resnet18", 32), ("resnet18", 64), ("resnet34", 16),
                                        ("resnet34", 32), ("resnet34", 64), ("resnet50", 16)])
def test_a_method_builds_and_trains_at_every_width(arch: str, width: int) -> None:
    cfg = load_config(DEFAULT_RECIPE, [f"model.arch={arch}", f"model.width={width}", "model.bn_splits=2",
                                       "method.queue_size=16", "data.batch_size=4", "data.views.0.size=32",
                                       "data.views.1.size=32"])
    torch.manual_seed(0)
    step = MethodStep(cfg, {"views": random_views(cfg, 4)}, steps_per_epoch=2)
    method = step.method
    backbone = method.backbone_for("online")
    assert backbone.width == width and backbone.dim == 8 * width * (4 if arch == "resnet50" else 1)
    assert method.encoder_q.projector[0].in_features == backbone.dim  # heads read the backbone's width
    before = backbone.conv1.weight.detach().clone()
    losses = [step(), step()]  # the first step's lr is the warm-up's 0
    assert all(torch.isfinite(loss) for loss in losses) and not torch.equal(before, backbone.conv1.weight)
    assert method.eval().features(torch.randn(2, 3, 32, 32)).shape == (2, backbone.dim)


def test_checkpoint_loader_round_trips_a_width_32_run(tiny_synth: Path, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "trainer.max_epochs=1", "trainer.run_name=w32", "model.width=32", "eval.random_init=false",
        "eval.linear.epochs=2"])
    run = pretrain(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["width"] == 32
    for skipped in ("random_init", "random_init_bn", "pixels"):  # eval.random_init: false skips all three
        assert skipped not in metrics
    model, info, stored = load_model(run)
    assert info["width"] == 32 and stored.model.width == 32
    assert model.backbone_for("online").dim == 256 and model.backbone_for("teacher").width == 32
    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(run), "--train", str(tiny_synth / "objects" / "train"),
                 "--test", str(tiny_synth / "objects" / "test"), "--k", "5", "20", "--workers", "0",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["model"]["width"] == 32
    assert res["knn"]["k20_top1"] == metrics["trained"]["k20_top1"]  # the same network, read back


@pytest.mark.parametrize("small_input", [False, True])
def test_checkpoint_loader_reads_a_width_32_state_dict(tmp_path: Path, small_input: bool) -> None:
    torch.manual_seed(1)
    net = ResNetBackbone("resnet18", width=32, small_input=small_input).eval()
    state = {**net.torchvision_state_dict(), "fc.weight": torch.randn(10, 256), "fc.bias": torch.zeros(10)}
    torch.save(state, tmp_path / "w32.pth")
    model, info, cfg = load_model(tmp_path / "w32.pth")
    assert cfg is None and info["width"] == 32 and info["arch"] == "resnet18"
    assert model.backbone.small_input == small_input
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.features(x), net(x)["pooled"])
    # a state_dict whose shapes do not match the named depth is a clear error, not a crash
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match="shapes differ|missing"):
        load_model(tmp_path / "r50.pth", arch="resnet18")
