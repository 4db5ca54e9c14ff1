"""DINO: loss and head parity with lightly, centering (also across 2 processes), teacher-temperature schedule,
frozen last layer, one forward per resolution, training steps through the engine's step on a tiny backbone."""

from __future__ import annotations

import math
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semssl.errors import ConfigError
from semssl.losses.dino import Center, DINOLoss, dino_loss, teacher_targets

# Decision: the config, engine and method modules are imported inside the tests that use them, so the two spawned
# ranks of the center test (which import this module) load only torch and semssl.losses.

B = 4


def tiny_cfg(name: str = "dino", n_local: int = 3, method: dict | None = None, **sections):
    """A tiny DINO-family config: ResNet-18, 2 x 32 px global + ``n_local`` x 16 px local crops, batch 4."""
    from semssl.config import Config, from_dict

    views = [{"name": "global", "size": 32, "n_crops": 2, "recipe": ["dino_global1", "dino_global2"]}]
    if n_local:
        views.append({"name": "local", "size": 16, "n_crops": n_local, "recipe": "dino_local"})
    m = {"name": name, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp": 0.04,
         "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 1,
         "views": ["global", "local"] if n_local else ["global"], **(method or {})}
    data = {"batch_size": B, "views": views}
    optim = {"lr": 0.4, "clip_grad": 3.0, "clip_mode": "per_param", "min_lr": 0.0, **sections.get("optim", {})}
    trainer = {"max_epochs": 2, **sections.get("trainer", {})}
    return from_dict(Config, {"method": m, "model": {"arch": "resnet18"}, "data": data, "optim": optim,
                              "trainer": trainer})


def random_batch(n_local: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = {"global": torch.randn(2 * B, 3, 32, 32, generator=g)}
    if n_local:
        views["local"] = torch.randn(n_local * B, 3, 16, 16, generator=g)
    return {"views": views}


# ------------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("n_local,teacher_temp,student_temp", [(0, 0.04, 0.1), (2, 0.07, 0.1), (6, 0.04, 0.2)])
def test_dino_loss_and_center_match_lightly(n_local: int, teacher_temp: float, student_temp: float) -> None:
    from lightly.loss import DINOLoss as LightlyDINOLoss

    torch.manual_seed(n_local)
    k, b = 32, 5
    teacher = [torch.randn(b, k) for _ in range(2)]
    student = [torch.randn(b, k) for _ in range(2 + n_local)]
    ref = LightlyDINOLoss(output_dim=k, teacher_temp=teacher_temp, student_temp=student_temp, center_momentum=0.9)
    ours = DINOLoss(k, student_temp=student_temp, center_momentum=0.9)
    for step in range(3):  # the center moves: later steps compare centred targets too
        expected = ref(teacher, student, teacher_temp=teacher_temp)
        got, targets = ours(torch.stack(student), torch.stack(teacher), teacher_temp)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(ours.center.center, ref.center.view(1, k))
        assert targets.shape == (2, b, k)
        teacher = [t + 0.5 * step for t in teacher]
    # the pure function equals the module, and by hand for one pair: 2 x (2 + n_local) - 2 pairs
    c = torch.randn(1, k)
    s, t = torch.stack(student), torch.stack(teacher)
    by_hand = []
    for i in range(2):
        p = torch.softmax((t[i] - c) / teacher_temp, -1)
        for v in range(2 + n_local):
            if v != i:
                by_hand.append(-(p * torch.log_softmax(s[v] / student_temp, -1)).sum(-1).mean())
    assert len(by_hand) == 2 * (2 + n_local) - 2
    torch.testing.assert_close(dino_loss(s, t, c, student_temp, teacher_temp), torch.stack(by_hand).mean())


def test_center_momentum_by_hand() -> None:
    center = Center(3, momentum=0.9)
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    center.update(a)
    torch.testing.assert_close(center.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    center.update(torch.zeros(4, 3))
    torch.testing.assert_close(center.center, 0.09 * torch.tensor([[2.0, 2.0, 2.0]]))
    # centering shifts the teacher logits before the sharpened softmax
    t = torch.tensor([[0.2, 0.0, -0.2]])
    torch.testing.assert_close(teacher_targets(t, torch.tensor([[0.2, 0.0, -0.2]]), 0.04), torch.full((1, 3), 1 / 3))


def _center_rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        center = Center(4, momentum=0.9)
        center.update(torch.full((3, 4), float(rank + 1)) * torch.arange(1.0, 5.0))
        torch.save(center.center, Path(out) / f"center{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_center_is_all_reduced_across_two_processes(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_center_rank, args=(f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    single = Center(4, momentum=0.9)  # one process on both ranks' rows together
    single.update(torch.cat([torch.full((3, 4), 1.0), torch.full((3, 4), 2.0)]) * torch.arange(1.0, 5.0))
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt", weights_only=True), single.center)


# ------------------------------------------------------------------------------------------------------ head
def test_dino_head_matches_lightly_and_is_initialised_as_dino() -> None:
    from lightly.models.modules import DINOProjectionHead

    from semssl.models.heads import DINOHead

    torch.manual_seed(0)
    ours = DINOHead(48, out_dim=300, hidden_dim=64, bottleneck_dim=16)
    linears = [m for m in ours.mlp if isinstance(m, torch.nn.Linear)]
    assert [type(m).__name__ for m in ours.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in linears)
    # seed 0: 0.0204; the std of 4096 weights has a sampling sd of 0.0002, so 0.002 is 9 sd
    assert abs(float(linears[1].weight.detach().std()) - 0.02) < 0.002  # trunc-normal std 0.02 (bounds +-2)
    gain = ours.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones(300, 1))
    torch.testing.assert_close(ours.last_layer.weight.norm(dim=1), torch.ones(300))  # unit prototypes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lightly uses the deprecated nn.utils.weight_norm
        ref = DINOProjectionHead(48, 64, 16, 300, batch_norm=False, norm_last_layer=True)
    with torch.no_grad():
        for i in (0, 2, 4):
            ref.layers[i].weight.copy_(ours.mlp[i].weight)
            ref.layers[i].bias.copy_(ours.mlp[i].bias)
        ref.last_layer.weight_v.copy_(ours.last_layer.parametrizations.weight.original1)
        ref.last_layer.weight_g.copy_(gain)
    x = torch.randn(5, 48)
    torch.testing.assert_close(ours(x), ref(x))
    assert not ref.last_layer.weight_g.requires_grad


# ------------------------------------------------------------------------------------------------------ schedules
def test_teacher_temperature_schedule_through_the_engine() -> None:
    from semssl.bench import MethodStep
    from semssl.engine.step import build_schedules
    from semssl.methods import build_method

    cfg = tiny_cfg(method={"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3})
    method = build_method(cfg)
    spe, epochs = 5, 6
    schedules = build_schedules(cfg, method, spe, spe * epochs, B)
    temp = schedules["teacher_temp"]
    assert temp.per == "epoch"
    # linspace(0.04, 0.07, 3) per epoch, then 0.07: looked up once per epoch
    expected = [0.04, 0.055, 0.07, 0.07, 0.07, 0.07]
    assert [temp(k) for k in range(0, spe * epochs, spe)] == pytest.approx(expected)
    assert [temp(k) for k in range(spe, 2 * spe)] == pytest.approx([0.055] * spe)
    # the ramp as a fraction of the run; the EMA cosine from 0.996 to 1
    cfg2 = tiny_cfg(method={"warmup_teacher_temp_epochs": 0.5, "momentum": 0.996, "momentum_end": 1.0})
    s2 = build_schedules(cfg2, build_method(cfg2), spe, spe * epochs, B)
    assert list(s2["teacher_temp"].values) == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    m = s2["momentum"].values
    assert m[0] == pytest.approx(0.996) and m[-1] < 1 and bool((m[1:] >= m[:-1]).all())
    # a method sees this step's value in progress.values
    step = MethodStep(tiny_cfg(), random_batch(), steps_per_epoch=2)  # ramp of 1 epoch: 0.04, then 0.07
    outs = [step.run() for _ in range(4)]  # 2 epochs of 2 steps
    assert [o["teacher_temp"] for o in outs] == pytest.approx([0.04, 0.04, 0.07, 0.07])


def test_last_layer_is_frozen_in_epoch_0_only() -> None:
    from semssl.bench import MethodStep

    torch.manual_seed(0)
    cfg = tiny_cfg(method={"freeze_last_layer": 1}, trainer={"max_epochs": 3})
    step = MethodStep(cfg, random_batch(), steps_per_epoch=2)
    head = step.method.student.head
    last = lambda: head.last_layer.parametrizations.weight.original1.detach().clone()
    mlp = lambda: head.mlp[0].weight.detach().clone()
    v0, w0 = last(), mlp()
    step.run()
    step.run()  # epoch 0: the MLP trains, the last layer does not
    assert torch.equal(last(), v0) and not torch.equal(mlp(), w0)
    assert head.last_layer.parametrizations.weight.original1.grad is None
    step.run()  # epoch 1: it trains
    assert not torch.equal(last(), v0)
    # the frozen gain never moves, and the prototypes stay unit vectors
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))


# ------------------------------------------------------------------------------------------------------ method
def test_dino_trains_and_is_evaluated_on_the_teacher() -> None:
    from semssl.bench import MethodStep

    torch.manual_seed(0)
    cfg = tiny_cfg()
    step = MethodStep(cfg, random_batch(), steps_per_epoch=2)
    method = step.method
    calls: list[int] = []
    method.student.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    teacher_calls: list[int] = []
    method.teacher.backbone.register_forward_hook(lambda m, i, o: teacher_calls.append(i[0].shape[0]))
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    outs = []
    for i in range(3):  # every teacher parameter follows the EMA t <- m t + (1 - m) s of its student parameter
        old = [p.detach().clone() for p in method.teacher.parameters()]
        outs.append(step.run(random_batch(seed=i)))
        m = outs[-1]["momentum"]
        assert 0.99 < m < 1
        for t_old, t, s in zip(old, method.teacher.parameters(), method.student.parameters(), strict=True):
            torch.testing.assert_close(t.detach(), m * t_old + (1 - m) * s.detach())
    for out in outs:
        assert torch.isfinite(out["loss"]) and 0 < float(out["teacher_entropy"]) <= math.log(64) + 1e-4
        assert float(out["embed_std"]) > 0
    # one backbone forward per resolution group (2B global crops, 3B local crops); the teacher sees the globals
    assert calls == [2 * B, 3 * B] * 3 and teacher_calls == [2 * B] * 3
    assert all(p.grad is None for p in method.teacher.parameters())
    # after 3 steps every teacher parameter has moved (the last layer from step 3 on, when it is no longer frozen),
    # except the weight-norm gain, fixed at 1 in both networks
    still = [name for (name, p), p0 in zip(method.teacher.named_parameters(), teacher_before) if torch.equal(p, p0)]
    assert still == ["head.last_layer.parametrizations.weight.original0"]
    assert float(method.dino_loss.center.center.abs().sum()) > 0
    assert method.default_branch == "teacher"
    x = torch.randn(2, 3, 32, 32)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.features(x), method.teacher.backbone(x)["pooled"])
        assert not torch.allclose(method.features(x, "online"), method.features(x))
    assert method.features(x, kind="layer3").shape == (2, 256, 2, 2)
    trainable = {id(p) for g in method.param_groups(1e-4) for p in g["params"]}
    assert not trainable & {id(p) for p in method.teacher.parameters()}
    assert id(method.student.head.last_layer.parametrizations.weight.original0) not in trainable


def cross_entropy_by_hand(teacher_logits: torch.Tensor, student_logits: torch.Tensor, center, tau_t: float,
                          tau_s: float) -> torch.Tensor:
    """Batch mean of CE(softmax((t - c) / tau_t), log_softmax(s / tau_s)) (``center`` None: no centering)."""
    t = teacher_logits - center if center is not None else teacher_logits
    return -(torch.softmax(t / tau_t, dim=-1) * torch.log_softmax(student_logits / tau_s, dim=-1)).sum(-1).mean()


def dino_by_hand(method, batch: dict, center: torch.Tensor, tau_t: float) -> tuple[torch.Tensor, dict, list]:
    """DINO's loss written out (docs/methods/dino.md §Loss): the student's logits of every crop (one backbone call per
    resolution, the head over all crops), the teacher's of the 2 global crops; the mean over the (i, v != i)
    pairs of the batch-mean CE of the centred, sharpened teacher target i and the student crop v.
    Returns (loss, the teacher's outputs, the student's backbone outputs per view)."""
    names = [n for n in ("global", "local") if n in batch["views"]]
    with torch.no_grad():
        s_out = [method.student.backbone(batch["views"][n]) for n in names]
        s_logits = method.student.head(torch.cat([o["pooled"] for o in s_out]))
        t_out = method.teacher(batch["views"]["global"])
    s = s_logits.view(-1, B, s_logits.shape[-1])
    t = t_out["logits"].view(2, B, -1)
    pairs = [cross_entropy_by_hand(t[i], s[v], center, tau_t, method.cfg.student_temp)
             for i in range(2) for v in range(s.shape[0]) if v != i]
    assert len(pairs) == 2 * s.shape[0] - 2
    return torch.stack(pairs).mean(), t_out, s_out


def test_dino_loss_of_the_method_by_hand() -> None:
    """The method's total on a hand-made batch equals DINO's loss written out from its networks, with a non-zero
    center and a teacher that differs from the student; the center then moves by its EMA of the teacher logits."""
    from semssl.methods import build_method
    from semssl.schedules import Progress

    torch.manual_seed(0)
    method = build_method(tiny_cfg()).train()
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
        method.dino_loss.center.center.copy_(0.5 * torch.randn(1, 64))
    center = method.dino_loss.center.center.clone()
    batch = random_batch(seed=3)
    out = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    expected, t_out, _ = dino_by_hand(method, batch, center, tau_t=0.07)  # a bare Progress: the final tau_t
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    uncentred, _, _ = dino_by_hand(method, batch, torch.zeros(1, 64), tau_t=0.07)
    # measured 0.057 apart
    assert abs(float(uncentred) - float(expected)) > 1e-3  # the center takes part
    torch.testing.assert_close(method.dino_loss.center.center, 0.9 * center + 0.1 * t_out["logits"].mean(0, True))


def test_dino_without_multicrop_and_view_errors() -> None:
    from semssl.bench import MethodStep
    from semssl.methods import build_method
    from semssl.schedules import Progress

    torch.manual_seed(0)
    cfg = tiny_cfg(n_local=0)
    assert build_method(cfg).required_views(cfg.method) == ("global",)
    out = MethodStep(cfg, random_batch(n_local=0), steps_per_epoch=2).run()
    assert torch.isfinite(out["loss"])  # 2 pairs: CE(t0, s1), CE(t1, s0)
    method = build_method(tiny_cfg())
    progress = Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1)
    with pytest.raises(ConfigError, match="not a multiple of method.global_crops=2"):
        method.training_step({"views": {"global": torch.randn(3, 3, 32, 32),
                                         "local": torch.randn(3, 3, 16, 16)}}, progress)
    with pytest.raises(ConfigError, match=r"missing \['local'\]"):
        method.training_step(random_batch(n_local=0), progress)
    with pytest.raises(ConfigError, match="views: expected a list"):
        tiny_cfg(method={"views": []})


def test_small_recipe_loads_and_names_its_views() -> None:
    from semssl.config import load_config

    cfg = load_config("dino_resnet18_1x64-200it_synthetic")
    assert cfg.method.name == "dino" and [v.name for v in cfg.data.views] == ["global", "local"]
    assert cfg.data.views[0].recipes() == ["dino_global1", "dino_global2"]
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.clip_mode == "per_param"
    readme = load_config("dino_resnet50_8x64-100e_imagenet")
    assert (readme.optim.lr, readme.optim.min_lr, readme.method.teacher_temp) == (0.03, 1e-6, 0.04)
    assert readme.data.views[0].scale == (0.14, 1.0) and readme.data.views[1].scale == (0.05, 0.14)
    assert readme.trainer.precision == "16-mixed" and readme.data.batch_size * readme.trainer.devices == 512


def test_head_runs_once_over_all_crops_as_multicrop_wrapper() -> None:
    """DINO's MultiCropWrapper: backbone per resolution, head once over every crop, so a BatchNorm head sees the
    global and local crops in one batch (per-view head calls would normalise each resolution on its own)."""
    from semssl.methods.dino import DINONetwork
    from semssl.models.backbones import ResNetBackbone
    from semssl.models.heads import DINOHead

    torch.manual_seed(0)
    net = DINONetwork(ResNetBackbone("resnet18", width=8), DINOHead(64, 32, 16, 8, 3, batch_norm=True)).train()
    xs = [torch.randn(4, 3, 32, 32), torch.randn(6, 3, 16, 16)]
    outs = net.forward_crops(xs)
    assert [o["logits"].shape for o in outs] == [(4, 32), (6, 32)]
    pooled = torch.cat([net.backbone(x)["pooled"] for x in xs])
    assert torch.allclose(torch.cat([o["logits"] for o in outs]), net.head(pooled), atol=1e-5)
    per_view = torch.cat([net(x)["logits"] for x in xs])
    assert not torch.allclose(per_view, net.head(pooled), atol=1e-3)  # the BN batch matters
