"""The contracts methods stand on: evaluation through ``Method.features`` on one branch everywhere, composable
bases (dict encoders, key maps in batch order, view names from the config), method-owned schedules run by the
engine, one optimisation step shared by the engine and the benchmark harness, and a tiny run that learns."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_overrides

from semssl.bench import MethodStep
from semssl.cli import main
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.engine import step as engine_step
from semssl.engine.data import build_train_dataset, resolve_paths
from semssl.engine.module import SSLModule
from semssl.engine.run import SSLDataModule, pretrain
from semssl.errors import ConfigError
from semssl.methods import method_class
from semssl.methods.mocov2 import MoCoV2
from semssl.schedules import Progress


# ----------------------------------------------------------------------------------------- evaluation branch
def test_features_branch_is_the_same_on_every_path(tiny_synth: Path, tmp_path: Path, monkeypatch,
                                                   branches_read: list[str]) -> None:
    """A method whose evaluated branch is its teacher (as DINO/SCFS) is evaluated on the teacher by the online
    kNN monitor, the final evaluation, the random-init baseline and ``semssl eval`` from the checkpoint."""
    monkeypatch.setattr(MoCoV2, "default_branch", "teacher")
    seen = branches_read
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "trainer.max_epochs=1", "trainer.knn_every_n_epochs=1", "trainer.run_name=teacher", "eval.linear.epochs=2"])
    run_dir = pretrain(cfg)
    during_run = len(seen)
    assert during_run > 0 and set(seen) == {"teacher"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["knn_monitor"][0]["knn_top1"] == metrics["trained"]["knn_top1"]

    out = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(run_dir), "--train", str(tiny_synth / "objects" / "train"),
                 "--test", str(tiny_synth / "objects" / "test"), "--k", "5", "20", "--workers", "0",
                 "--out", str(out)]) == 0
    assert len(seen) > during_run and set(seen) == {"teacher"}
    res = json.loads(out.read_text())
    assert res["model"]["branch"] == "teacher"
    assert res["knn"]["k20_top1"] == metrics["trained"]["k20_top1"]  # the same network, from the checkpoint
    # the online branch is a different network: asking for it is honoured and gives other features
    model = method_class("mocov2")(cfg.method, cfg.model).eval()
    x = torch.randn(2, 3, 32, 32)
    model.encoder_k.backbone.conv1.weight.data.mul_(2)
    assert not torch.allclose(model.features(x, "online"), model.features(x))
    with pytest.raises(ConfigError, match="branch 'student'"):
        model.features(x, "student")
    assert model.features(x, kind="layer3").shape[1] == model.encoder_q.backbone.channels["layer3"]


# ----------------------------------------------------------------------------------------- composable bases
def _moco(overrides: list[str]) -> tuple:
    cfg = load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "method.queue_size=32", *overrides])
    torch.manual_seed(0)
    return cfg, method_class("mocov2")(cfg.method, cfg.model).train()


@pytest.mark.parametrize("splits", [1, 2])
def test_queue_holds_exactly_the_unshuffled_keys_after_a_step(splits: int) -> None:
    cfg, method = _moco([f"model.bn_splits={splits}", "method.shuffle_bn=true"])
    x_q, x_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    torch.manual_seed(5)
    method.training_step({"views": {"q": x_q, "k": x_k}}, Progress(epoch=0, step=0, steps_per_epoch=1,
                                                                   total_steps=1))
    torch.manual_seed(5)
    perm = torch.randperm(8)  # the shuffle-BN permutation the step drew (its first random draw)
    with torch.no_grad():
        expected = method.encoder_k(x_k[perm])["z"][torch.argsort(perm)]
    torch.testing.assert_close(method.queue.queue[:8], expected, rtol=0, atol=1e-6)
    assert int(method.queue.ptr) == 8
    if splits > 1:  # with split BatchNorm the shuffle matters: keys computed unshuffled differ
        with torch.no_grad():
            assert not torch.allclose(method.encoder_k(x_k)["z"], expected, atol=1e-4)


def test_encoders_return_dicts_and_key_maps_come_back_in_batch_order() -> None:
    cfg, method = _moco(["model.bn_splits=1", "model.norm=frozen_bn"])
    method.key_outputs = ("z", "layer4")  # what a plug-in (SCD, DSC) asks for
    x = torch.randn(6, 3, 32, 32)
    out = method.contrast(x, x)
    assert {"layer1", "layer4", "pooled", "z"} <= set(out["q"]) and set(out["k"]) == {"z", "layer4"}
    with torch.no_grad():
        plain = method.encoder_k(x)  # frozen BN: the shuffle changes nothing but the order
    torch.testing.assert_close(out["k"]["layer4"], plain["layer4"])
    torch.testing.assert_close(out["k"]["z"], plain["z"])


def test_view_names_come_from_the_config_and_are_checked() -> None:
    cfg = load_config(DEFAULT_RECIPE, ["method.views=[weak,strong]", "data.views.0.name=weak",
                                       "data.views.1.name=strong", "model.arch=resnet18", "method.queue_size=16",
                                       "model.bn_splits=2"])
    assert MoCoV2.required_views(cfg.method) == ("weak", "strong")
    method = method_class("mocov2")(cfg.method, cfg.model)
    x = torch.randn(4, 3, 32, 32)
    out = method.training_step({"views": {"weak": x, "strong": x}}, Progress(epoch=0, step=0, steps_per_epoch=1,
                                                                              total_steps=1))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ConfigError, match=r"data.views: method 'mocov2' reads views \['weak', 'strong'\].*'q'"):
        load_config(DEFAULT_RECIPE, ["method.views=[weak,strong]"])


# ----------------------------------------------------------------------------------------- schedules and steps
def test_engine_runs_the_method_schedules_by_value(tiny_synth: Path, tmp_path: Path, monkeypatch) -> None:
    """EMA cosine per step (BYOL/SoCo formula) and the lr per epoch (MoCo --cos) as the engine runs them."""
    applied: list[float] = []
    real = engine_step.ema_update

    def recording(student, teacher, momentum):
        applied.append(momentum)
        real(student, teacher, momentum)

    monkeypatch.setattr(engine_step, "ema_update", recording)
    cfg = load_config(None, tiny_overrides(tiny_synth, tmp_path / "runs") + [
        "trainer.max_epochs=3", "method.momentum=0.9", "method.momentum_end=1.0", "optim.per=epoch",
        "optim.lr=0.256", "optim.min_lr=0.001", "eval.enabled=false", "trainer.run_name=sched"])
    run_dir = pretrain(cfg)
    steps = 3 * 6  # 96 images / batch 16
    assert applied == pytest.approx([1 - 0.1 * (math.cos(math.pi * k / steps) + 1) / 2 for k in range(steps)],
                                    abs=1e-12)
    rows = list(csv.DictReader((run_dir / "logs" / "csv" / "metrics.csv").open()))
    lr = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    peak = 0.256 * 16 / 256  # scaled by the batch; min_lr absolute
    expected = [0.001 + 0.5 * (peak - 0.001) * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert lr == pytest.approx([expected[k // 6] for k in range(steps)])
    momentum = [float(r["train/momentum"]) for r in rows if r.get("train/momentum")]
    assert momentum == pytest.approx(applied)


def test_benchmark_step_equals_engine_step(tiny_cfg) -> None:
    """The benchmark harness runs the engine's step: one Lightning step and one MethodStep from the same weights
    on the same batch give the same weights."""
    tiny_cfg.method.shuffle_bn = False  # no random permutation between the two runs
    tiny_cfg.trainer.max_steps = 4
    dataset = build_train_dataset(tiny_cfg, resolve_paths(tiny_cfg)["train"])
    torch.manual_seed(0)
    module = SSLModule(tiny_cfg)
    start = copy.deepcopy(module.method.state_dict())
    seen: list[dict] = []

    class Recorded(SSLModule):
        def training_step(self, batch, batch_idx):
            seen.append(copy.deepcopy(batch))
            return super().training_step(batch, batch_idx)

    recorded = Recorded(tiny_cfg)
    recorded.method.load_state_dict(start)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, use_distributed_sampler=False)
    trainer.fit(recorded, datamodule=SSLDataModule(tiny_cfg, dataset))
    harness = MethodStep(tiny_cfg, seen[0], steps_per_epoch=len(dataset) // tiny_cfg.data.batch_size)
    harness.method.load_state_dict(start)
    harness()
    engine_state, bench_state = recorded.method.state_dict(), harness.method.state_dict()
    changed = 0
    for name, value in engine_state.items():
        torch.testing.assert_close(bench_state[name], value, rtol=0, atol=1e-7, msg=name)
        changed += int(not torch.equal(value, start[name]))
    # measured: all 250 entries change
    assert changed > 10  # the step did train something


def test_a_tiny_run_learns() -> None:
    """MoCo-v2 on a trivially easy set (32 fixed images, views = the image plus a little noise): over a few dozen
    steps the InfoNCE loss falls and the pretext accuracy rises."""
    cfg = load_config(DEFAULT_RECIPE, ["model.arch=resnet18", "method.queue_size=32", "model.bn_splits=2",
                                       "data.batch_size=16", "optim.lr=1.6", "optim.warmup=0",
                                       "optim.weight_decay=0", "trainer.max_steps=40"])
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.avg_pool2d(torch.randn(32, 3, 32, 32, generator=g), 3, 1, 1) * 3

    def batch(i: int) -> dict:
        idx = torch.arange(16) + 16 * (i % 2)
        noise = lambda: 0.1 * torch.randn(16, 3, 32, 32, generator=g)  # noqa: E731
        return {"views": {"q": images[idx] + noise(), "k": images[idx] + noise()}}

    torch.manual_seed(0)
    step = MethodStep(cfg, batch(0), steps_per_epoch=2)
    outs = [step.run(batch(i)) for i in range(40)]
    loss = [float(o["loss"].detach()) for o in outs]
    acc = [float(o["acc1"]) for o in outs]
    early, late = slice(2, 10), slice(32, 40)  # after the queue holds real keys (2 steps)
    assert sum(loss[late]) / 8 < 0.6 * sum(loss[early]) / 8, loss
    assert sum(acc[late]) / 8 > sum(acc[early]) / 8 + 20, acc


def test_figures_are_drawn_during_training(tiny_synth: Path, tmp_path: Path, monkeypatch) -> None:
    """``trainer.figures`` draws a figure module's ``during_training`` every N epochs and after the last one, with
    the method in eval mode; an unknown figure is a ConfigError before any run folder exists."""
    import types

    import semssl.viz

    calls: list[tuple] = []

    def during_training(method, cfg, paths, out, size=1):
        calls.append((out.name, method.training, size, sorted(paths)))
        out.write_bytes(b"png")

    fake = types.SimpleNamespace(HELP="test", add_arguments=lambda p: None, run=lambda a: 0,
                                 during_training=during_training)
    monkeypatch.setattr(semssl.viz, "figure_modules", lambda: {"fake": fake})
    overrides = tiny_overrides(tiny_synth, tmp_path / "runs") + ["trainer.max_epochs=3", "eval.enabled=false"]
    cfg = load_config(None, overrides + ["trainer.run_name=fig", "trainer.figures=[{name: fake, every_n_epochs: 2, size: 7}]"])
    run_dir = pretrain(cfg)
    assert [c[0] for c in calls] == ["fake-epoch0002.png", "fake-epoch0003.png"]
    assert all(c[1] is False and c[2] == 7 and c[3] == ["eval_test", "eval_train", "train"] for c in calls)
    assert (run_dir / "figures" / "fake-epoch0002.png").read_bytes() == b"png"
    bad = load_config(None, overrides + ["trainer.run_name=bad", "trainer.figures=[{name: nope}]"])
    with pytest.raises(ConfigError, match="'nope' is not a figure"):
        pretrain(bad)
    assert not (tmp_path / "runs" / "bad").exists()
