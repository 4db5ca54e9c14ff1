"""``semssl.transfer.export``: the torchvision and timm files load strictly into the real builders and give the
backbone's features; onnxruntime gives them at another batch size; the detectron2 keys follow MoCo's documented
conversion rules; the side JSON's sha256 and config; the branch of a semssl checkpoint; clear errors and atomic
writes.

Backbones: random-init ResNet-18 / ResNet-50 of width 64, and a 2-step MoCo-v2 run on the tiny built-in objects
(ResNet-18, width 16, the small-input stem; tests/conftest.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from semssl.cli import main
from semssl.errors import ConfigError
from semssl.models.backbones import ResNetBackbone
from semssl.transfer.common import BackboneSource, load_backbone
from semssl.transfer.export import FORMATS, detectron2_key, export, torchvision_state_dict

R18 = BackboneSource(random_init=True, arch="resnet18", seed=3)
R50 = BackboneSource(random_init=True, arch="resnet50", seed=4)
SMALL = BackboneSource(random_init=True, arch="resnet18", width=16, small_input=True)


def _features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        out = backbone(x)
    return out["pooled"] if isinstance(out, dict) else out


def _images(batch: int, size: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def r18_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("r18")
    return out, export(R18, out, onnx_size=64)  # all four formats


@pytest.fixture(scope="module")
def r50_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("r50")
    return out, export(R50, out, formats=("torchvision", "timm", "detectron2"))


@pytest.fixture(scope="module")
def tiny_run(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step MoCo-v2 run (ResNet-18, width 16, the small-input stem)."""
    out = tmp_path_factory.mktemp("export_ckpt")
    args = tiny_overrides(tiny_synth, out) + ["eval.enabled=false", "trainer.max_steps=2", "model.width=16",
                                              "model.small_input=true", "trainer.run_name=moco"]
    assert main(["pretrain", *args]) == 0
    return out / "moco"


# --------------------------------------------------------------------------------------------------------------
# torchvision / timm
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_and_timm_files_load_strictly_and_give_the_same_features(arch: str, request) -> None:
    import timm
    import torchvision

    out, info = request.getfixturevalue("r18_export" if arch == "resnet18" else "r50_export")
    assert info["torchvision_builder_compatible"] is True and info["timm_builder_compatible"] is True
    backbone, _ = load_backbone(R18 if arch == "resnet18" else R50)
    x = _images(3, 64)
    ref = _features(backbone, x)

    tv = getattr(torchvision.models, arch)()
    tv.fc = nn.Identity()
    tv_state = torch.load(out / "random-init.torchvision.pth", weights_only=True)
    assert not any(k.startswith("fc.") for k in tv_state)
    # key for key what the builders write (strict loading alone would pass without num_batches_tracked)
    assert list(tv_state) == list(tv.state_dict())
    tv.load_state_dict(tv_state, strict=True)
    tm = timm.create_model(arch, pretrained=False, num_classes=0)
    tm_state = torch.load(out / "random-init.timm.pth", weights_only=True)
    assert list(tm_state) == list(tm.state_dict())
    tm.load_state_dict(tm_state, strict=True)
    for model in (tv, tm):
        got = _features(model, x)
        assert got.shape == ref.shape == (3, backbone.dim)
        assert torch.equal(got, ref) or float((got - ref).abs().max()) <= 1e-6
    assert ref.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_other_widths_are_written_but_marked_incompatible(tiny_run: Path, tmp_path: Path) -> None:
    import torchvision

    info = export(BackboneSource(checkpoint=str(tiny_run)), tmp_path, formats=["torchvision"])
    assert info["torchvision_builder_compatible"] is False and info["timm_builder_compatible"] is False
    assert any("width 16" in r for r in info["builder_incompatibility"])
    assert any("small-input" in r for r in info["builder_incompatibility"])
    assert info["detectron2_compatible"] is False
    state = torch.load(tmp_path / "moco.torchvision.pth", weights_only=True)
    own = ResNetBackbone("resnet18", small_input=True, width=16)
    own.load_state_dict(state, strict=True)  # the semssl builder named in the JSON takes it
    backbone, _ = load_backbone(BackboneSource(checkpoint=str(tiny_run)))
    x = _images(2, 32)
    assert torch.equal(_features(own, x), _features(backbone, x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18().load_state_dict(state, strict=False)  # what "incompatible" means


def test_frozen_batchnorm_backbone_loads_into_torchvision() -> None:
    import torchvision

    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", norm="frozen_bn")
    with torch.no_grad():
        for name, buf in backbone.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    state = torchvision_state_dict(backbone)
    assert set(state) == set(tv.state_dict())  # num_batches_tracked added: every key torchvision writes
    tv.load_state_dict(state, strict=True)
    x = _images(2, 64)
    ref = _features(backbone, x)
    assert float((_features(tv, x) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


# --------------------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------------------
def test_onnxruntime_gives_the_features_at_another_batch_size(r18_export: tuple[Path, dict[str, Any]]) -> None:
    import onnxruntime as ort

    out, info = r18_export
    (entry,) = [f for f in info["files"] if f["format"] == "onnx"]
    assert entry["onnx"]["check"]["batch"] != entry["onnx"]["check"]["export_batch"]
    assert entry["onnx"]["check"]["max_abs_diff"] <= 1e-4
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(out / "random-init.onnx"), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and list(inp.shape[1:]) == [3, 64, 64]
    backbone, _ = load_backbone(R18)
    for batch in (5, 1):  # neither is the export's sample batch of 2
        x = _images(batch, 64, seed=batch)
        got = session.run(["features"], {"images": x.numpy()})[0]
        ref = _features(backbone, x).numpy()
        assert got.shape == ref.shape == (batch, 512)
        assert float(np.abs(got - ref).max()) <= 1e-4


# --------------------------------------------------------------------------------------------------------------
# detectron2
# --------------------------------------------------------------------------------------------------------------
# MoCo's detection/convert-pretrain-to-detectron2.py rules applied by hand (stem prefix, layerN -> resN+1,
# bnN -> convN.norm, downsample.0/1 -> shortcut / shortcut.norm)
DETECTRON2_KEYS = {
    "conv1.weight": "stem.conv1.weight",
    "bn1.weight": "stem.conv1.norm.weight",
    "bn1.bias": "stem.conv1.norm.bias",
    "bn1.running_mean": "stem.conv1.norm.running_mean",
    "bn1.running_var": "stem.conv1.norm.running_var",
    "bn1.num_batches_tracked": "stem.conv1.norm.num_batches_tracked",
    "layer1.0.conv1.weight": "res2.0.conv1.weight",
    "layer1.0.bn1.weight": "res2.0.conv1.norm.weight",
    "layer1.0.conv2.weight": "res2.0.conv2.weight",
    "layer1.0.bn2.running_mean": "res2.0.conv2.norm.running_mean",
    "layer1.0.conv3.weight": "res2.0.conv3.weight",
    "layer1.0.bn3.bias": "res2.0.conv3.norm.bias",
    "layer1.0.bn3.num_batches_tracked": "res2.0.conv3.norm.num_batches_tracked",
    "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
    "layer1.0.downsample.1.weight": "res2.0.shortcut.norm.weight",
    "layer1.0.downsample.1.running_var": "res2.0.shortcut.norm.running_var",
    "layer2.3.bn2.weight": "res3.3.conv2.norm.weight",
    "layer3.5.conv1.weight": "res4.5.conv1.weight",
    "layer4.0.downsample.0.weight": "res5.0.shortcut.weight",
    "layer4.0.downsample.1.num_batches_tracked": "res5.0.shortcut.norm.num_batches_tracked",
    "layer4.2.conv3.weight": "res5.2.conv3.weight",
    "layer4.2.bn3.running_var": "res5.2.conv3.norm.running_var",
}


def test_detectron2_keys_follow_the_documented_rules() -> None:
    assert {k: detectron2_key(k) for k in DETECTRON2_KEYS} == DETECTRON2_KEYS


def test_detectron2_pickle_holds_numpy_arrays_of_the_state_dict(r50_export: tuple[Path, dict[str, Any]]) -> None:
    assert importlib.util.find_spec("detectron2") is None  # read without detectron2
    out, info = r50_export
    with open(out / "random-init.detectron2.pkl", "rb") as f:
        obj = pickle.load(f)
    assert set(obj) == {"model", "__author__", "matching_heuristics"}
    assert obj["__author__"] == "semssl" and obj["matching_heuristics"] is True
    backbone, _ = load_backbone(R50)
    state = backbone.state_dict()
    assert set(obj["model"]) == {detectron2_key(k) for k in state} and len(obj["model"]) == len(state)
    assert set(DETECTRON2_KEYS.values()) <= set(obj["model"])
    for key, value in state.items():
        array = obj["model"][detectron2_key(key)]
        assert isinstance(array, np.ndarray) and array.shape == tuple(value.shape)
    assert np.array_equal(obj["model"]["res2.0.shortcut.weight"], state["layer1.0.downsample.0.weight"].numpy())
    assert np.array_equal(obj["model"]["stem.conv1.norm.running_var"], state["bn1.running_var"].numpy())
    cfg = info["detectron2_config"]
    assert cfg["MODEL.RESNETS.DEPTH"] == 50 and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert cfg["INPUT.FORMAT"] == "RGB" and cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375]


# --------------------------------------------------------------------------------------------------------------
# The side JSON and the branch
# --------------------------------------------------------------------------------------------------------------
def test_side_json_holds_the_sha256_and_the_run_config(tiny_run: Path, tmp_path: Path,
                                                      r18_export: tuple[Path, dict[str, Any]]) -> None:
    info = export(BackboneSource(checkpoint=str(tiny_run)), tmp_path / "out",
                  formats="torchvision,detectron2")  # a comma list, as the command line passes it
    assert json.loads((tmp_path / "out" / "moco.json").read_text()) == info
    assert info["name"] == "moco" and info["complete"] is True
    assert info["source"]["kind"] == "semssl" and info["source"]["checkpoint"] == str(tiny_run)
    assert info["source"]["file"].endswith("last.ckpt")
    assert (info["method"], info["branch"]) == ("mocov2", "online")
    assert (info["arch"], info["width"], info["small_input"]) == ("resnet18", 16, True)
    cfg = info["config"]
    assert cfg["method"]["name"] == "mocov2" and cfg["model"]["width"] == 16 and cfg["trainer"]["max_steps"] == 2
    assert [f["format"] for f in info["files"]] == ["torchvision", "detectron2"]
    names = {"torchvision": "moco.torchvision.pth", "detectron2": "moco.detectron2.pkl"}
    _, r18_info = r18_export
    for entry in info["files"] + r18_info["files"]:
        path = Path(entry["path"])
        if entry in info["files"]:
            assert path == (tmp_path / "out" / names[entry["format"]]).resolve()
        assert len(entry["sha256"]) == 64 and entry["sha256"] == _sha256(path)
    assert [f["format"] for f in r18_info["files"]] == list(FORMATS) and r18_info["config"] is None
    assert r18_info["source"]["kind"] == "random_init" and r18_info["source"]["seed"] == 3


def test_branch_picks_the_network_of_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = "conv1.weight"
    online, teacher = ckpt[f"method.encoder_q.backbone.{key}"], ckpt[f"method.encoder_k.backbone.{key}"]
    assert not torch.equal(online, teacher)  # two steps of EMA: the test can tell the branches apart
    for branch, expected in (("online", online), ("teacher", teacher), (None, online)):
        info = export(BackboneSource(checkpoint=str(tiny_run), branch=branch), tmp_path, formats=["torchvision"],
                      name=f"b-{branch}")
        assert info["branch"] == (branch or "online")
        state = torch.load(tmp_path / f"b-{branch}.torchvision.pth", weights_only=True)
        assert torch.equal(state[key], expected)
    stat = "layer4.1.bn2.running_mean"  # a buffer: the teacher's own statistics, not an average of the online's
    teacher_stat = ckpt[f"method.encoder_k.backbone.{stat}"]
    assert not torch.equal(teacher_stat, ckpt[f"method.encoder_q.backbone.{stat}"])
    assert torch.equal(torch.load(tmp_path / "b-teacher.torchvision.pth", weights_only=True)[stat], teacher_stat)


# --------------------------------------------------------------------------------------------------------------
# Bad input and atomic writes
# --------------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_clear_error_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="format: unknown 'tensorrt' \\(torchvision, timm, detectron2, onnx\\)"):
        export(SMALL, out, formats=["torchvision", "tensorrt"])
    with pytest.raises(ConfigError, match="format: unknown 'nope'"):
        export(SMALL, out, formats="timm,nope")
    with pytest.raises(ConfigError, match="onnx_size"):
        export(SMALL, out, onnx_size=0)
    with pytest.raises(ConfigError, match="name: 'a/b'"):
        export(SMALL, out, name="a/b")
    assert not out.exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"out_dir: '{afile}' is a file"):
        export(SMALL, afile, formats=["torchvision"])
    assert afile.read_text() == "x"


def test_a_failed_file_loses_nothing_already_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "small.onnx"
    old.write_bytes(b"the previous export")

    def broken(model: Any, args: Any, f: str, **kwargs: Any) -> None:
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("exporter broke")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter broke"):
        export(SMALL, tmp_path, formats=["torchvision", "onnx"], name="small", onnx_size=32)
    assert old.read_bytes() == b"the previous export"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    info = json.loads((tmp_path / "small.json").read_text())
    assert info["complete"] is False and [f["format"] for f in info["files"]] == ["torchvision"]
    assert info["files"][0]["sha256"] == _sha256(tmp_path / "small.torchvision.pth")
