"""SCD (scd_mocov2, scd_byol) and BYOL: losses against hand-computed values and lightly, weighted pooling, the
saliency net under saturation, every variant through the engine's step, fg features, saliency figures, recipes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from semssl.bench import MethodStep, random_views
from semssl.config import list_recipes, load_config, to_dict
from semssl.errors import ConfigError
from semssl.losses.byol import byol_loss
from semssl.losses.triplet import fg_bg_triplet
from semssl.methods import build_method
from semssl.methods.scd import weighted_average_pool
from semssl.schedules import Progress

SCD_MOCO = "scd_mocov2_resnet18_1x64-400it_synthetic"
SCD_BYOL = "scd_byol_resnet18_1x64-400it_synthetic"
BYOL_SYM = "byol_resnet18_1x64-400it_synthetic"
BYOL_ASYM = "byol-asym_resnet18_1x64-400it_synthetic"
P0 = Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1)


def tiny(recipe: str, *overrides: str):
    """A recipe shrunk for tests: batch 4 at 64 px (2x2 layer4 cells on ResNet-18), small queue, BN in 2 splits."""
    extra = ["data.batch_size=4", "data.views.0.size=64", "data.views.1.size=64", "model.arch=resnet18"]
    if "mocov2" in recipe:
        extra += ["method.queue_size=16", "model.bn_splits=2"]
    return load_config(recipe, [*extra, *overrides])


def two_views(cfg, seed: int = 0) -> dict:
    return {"views": random_views(cfg, cfg.data.batch_size, seed=seed)}


# ----------------------------------------------------------------------------------------------- losses
def test_byol_loss_is_two_plus_two_lightly_negative_cosine():
    from lightly.loss import NegativeCosineSimilarity

    torch.manual_seed(0)
    p, z = torch.randn(8, 16) * 3, torch.randn(8, 16) * 0.5
    torch.testing.assert_close(byol_loss(p, z), 2 + 2 * NegativeCosineSimilarity()(p, z))
    # by hand: aligned vectors (any norms) give 0, opposite ones 4, orthogonal ones 2
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(byol_loss(e1 * 5, e1)) == pytest.approx(0.0, abs=1e-7)
    assert float(byol_loss(e1, -e1 * 2)) == pytest.approx(4.0)
    assert float(byol_loss(e1, e2)) == pytest.approx(2.0)
    # stop-gradient on the target
    p.requires_grad_(True), z.requires_grad_(True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def _unit(*xy: float) -> torch.Tensor:
    return F.normalize(torch.tensor([list(xy)], dtype=torch.float64), dim=1)


def test_triplet_hand_computed_both_terms_and_margin_only_on_fg():
    c = math.cos(math.radians(60))  # 0.5
    # anchor fg along x; positive fg at 60 deg (cos 0.5); negative bg along x (cos 1): FG = 1 - 0.5 + alpha
    z1_fg, z2_fg, z2_bg = _unit(1, 0), _unit(c, math.sin(math.radians(60))), _unit(1, 0)
    # anchor bg along y: cos(bg1, fg2) = sin 60 = 0.866, cos(bg1, bg2) = 0 -> BG = 0.866 (no margin)
    z1_bg = _unit(0, 1)
    s60 = math.sin(math.radians(60))
    for alpha in (0.0, 0.4, 1.0):
        t = fg_bg_triplet(z1_fg, z1_bg, z2_fg, z2_bg, margin=alpha)
        assert float(t.fg) == pytest.approx(1 - c + alpha)
        assert float(t.bg) == pytest.approx(s60)  # the margin never enters the background term
        assert float(t.loss) == pytest.approx(0.5 * ((1 - c + alpha) + s60))
        assert float(fg_bg_triplet(z1_fg, z1_bg, z2_fg, z2_bg, alpha, bg_term=False).loss) == pytest.approx(
            0.5 * (1 - c + alpha))
        assert float(fg_bg_triplet(z1_fg, z1_bg, z2_fg, z2_bg, alpha, fg_term=False).loss) == pytest.approx(
            0.5 * s60)
    # both hinges inactive: a well separated pair gives 0 up to the margin, and the BG hinge clips at 0
    good = fg_bg_triplet(_unit(1, 0), _unit(0, 1), _unit(1, 0), _unit(0, 1), margin=1.0)
    assert float(good.fg) == pytest.approx(0.0) and float(good.bg) == pytest.approx(0.0)
    assert float(fg_bg_triplet(_unit(1, 0), _unit(0, 1), _unit(1, 0), _unit(0, 1), margin=1.5).fg) == \
        pytest.approx(0.5)
    # a batch of the two cases is their mean; cosine similarity ignores the norms
    batch = fg_bg_triplet(torch.cat([z1_fg, _unit(1, 0)]) * 3, torch.cat([z1_bg, _unit(0, 1)]),
                          torch.cat([z2_fg, _unit(1, 0)]) * 0.2, torch.cat([z2_bg, _unit(0, 1)]), margin=1.0)
    assert float(batch.loss) == pytest.approx(0.5 * (0.5 * ((1 - c + 1) + s60) + 0.0))
    assert float(fg_bg_triplet(z1_fg, z1_bg, z2_fg, z2_bg, fg_term=False, bg_term=False).loss) == 0.0


def test_weighted_pooling_is_the_plain_mean_for_a_constant_map_and_finite_for_zero_weights():
    torch.manual_seed(0)
    fmap = torch.randn(3, 5, 4, 4)
    for value in (0.3, 1.0, 1e-6):
        pooled = weighted_average_pool(fmap, torch.full((3, 1, 4, 4), value))
        torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    # a one-hot map picks its cell; an all-zero map gives zeros, not NaN
    w = torch.zeros(3, 1, 4, 4)
    w[:, :, 1, 2] = 0.7
    torch.testing.assert_close(weighted_average_pool(fmap, w), fmap[:, :, 1, 2])
    assert torch.equal(weighted_average_pool(fmap, torch.zeros(3, 1, 4, 4)), torch.zeros(3, 5))


# ----------------------------------------------------------------------------------------------- methods
VARIANTS = {
    "scd_mocov2": (SCD_MOCO, []),
    "scd_mocov2_symmetric": (SCD_MOCO, ["method.symmetric=true"]),
    "scd_byol_asym": (SCD_BYOL, []),
    "scd_byol_sym": (SCD_BYOL, ["method.symmetric=true"]),
    "scd_byol_fg_only": (SCD_BYOL, ["method.bg_term=false"]),
    "scd_byol_bg_only": (SCD_BYOL, ["method.fg_term=false"]),
    "scd_mocov2_bg_only": (SCD_MOCO, ["method.fg_term=false", "method.margin=0.4", "method.lambda_d=2.0"]),
    "byol_sym": (BYOL_SYM, []),
    "byol_asym": (BYOL_ASYM, []),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_through_the_engine_step(variant: str):
    recipe, overrides = VARIANTS[variant]
    cfg = tiny(recipe, *overrides)
    torch.manual_seed(0)
    step = MethodStep(cfg, two_views(cfg), steps_per_epoch=2)
    method = step.method
    scd = hasattr(method, "sem")
    if scd:
        teacher_before = [p.detach().clone() for p in method.sem_t.parameters()]
    for i in range(2):
        out = step.run(two_views(cfg, seed=i))
        assert torch.isfinite(out["loss"]), (variant, i, out)
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(out["z_std"]) > 0
    if scd:
        for key in ("loss_c", "loss_d", "loss_fg", "loss_bg", "mask_mean", "mask_std", "zfg_std"):
            assert torch.isfinite(out[key]), key
        assert 0 < float(out["mask_mean"]) < 1
        # gradients reach the saliency net and the semantic projector; its EMA copy moved and has no gradient
        sal = method.sem.saliency.net
        assert sal[0].weight.grad is not None and sal[0].weight.grad.abs().sum() > 0
        assert sal[-1].weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in method.sem_t.parameters())
        assert any(not torch.equal(a, b.detach()) for a, b in zip(teacher_before, method.sem_t.parameters()))
        trainable = {id(p) for g in method.param_groups(1e-4) for p in g["params"]}
        assert {id(p) for p in method.sem.parameters()} <= trainable
        assert not trainable & {id(p) for p in method.sem_t.parameters()}


@pytest.mark.parametrize("recipe", [SCD_MOCO, SCD_BYOL])
@pytest.mark.parametrize("bias", [50.0, -50.0])
def test_saturated_saliency_stays_in_the_open_interval_without_nan(recipe: str, bias: float):
    cfg = tiny(recipe)
    torch.manual_seed(0)
    step = MethodStep(cfg, two_views(cfg), steps_per_epoch=1)
    method = step.method
    for heads in (method.sem, method.sem_t):
        last = heads.saliency.net[-1]
        last.weight.data.zero_()
        last.bias.data.fill_(bias)
    x = two_views(cfg)["views"][cfg.method.views[0]]
    m = method.saliency(x)
    assert torch.all(m > 0) and torch.all(m < 1) and torch.all(1 - m > 0)
    out = step.run(two_views(cfg, seed=1))
    assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v)), out
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
    assert all(torch.isfinite(p).all() for p in method.parameters())
    method.eval()
    assert torch.isfinite(method.features(x, kind="fg")).all()


def test_fg_features_equal_pooled_for_a_constant_map_and_follow_the_branch():
    cfg = tiny(SCD_BYOL)
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    assert "fg" in method.feature_kinds and "pooled" in method.feature_kinds
    x = torch.randn(3, 3, 64, 64)
    fg = method.features(x, kind="fg")
    assert fg.shape == (3, 512) and not torch.allclose(fg, method.features(x))  # a learned map weighs cells
    for heads in (method.sem, method.sem_t):
        heads.saliency.net[-1].weight.data.zero_()
        heads.saliency.net[-1].bias.data.fill_(0.3)
    torch.testing.assert_close(method.features(x, kind="fg"), method.features(x, kind="pooled"))
    # the teacher branch reads the target backbone and the target saliency net
    method.target.backbone.conv1.weight.data.mul_(2)
    torch.testing.assert_close(method.features(x, "teacher", kind="fg"), method.features(x, "teacher"))
    assert not torch.allclose(method.features(x, "teacher", kind="fg"), method.features(x, kind="fg"))
    with pytest.raises(ConfigError, match="feature kind 'fg'"):
        build_method(tiny(BYOL_ASYM)).features(x, kind="fg")


def test_view2_semantics_come_from_the_target_network():
    """SCD-BYOL's loss = BYOL's one direction + lambda * Eq. 5 with anchors from the online network on view 1
    and positive/negative from the target network (EMA backbone, saliency net and projector) on view 2."""
    cfg = tiny(SCD_BYOL, "method.shuffle_bn=false", "method.lambda_d=0.7", "method.margin=0.3")
    torch.manual_seed(0)
    method = build_method(cfg).train()
    with torch.no_grad():  # make the target differ from the online network
        for p in [*method.target.parameters(), *method.sem_t.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    views = two_views(cfg)["views"]
    xa, xb = views["strong"], views["weak"]
    out = method.training_step({"views": views}, P0)
    with torch.no_grad():
        online, target = method.online(xa), method.target(xb)
        one, two = method.sem(online["layer4"]), method.sem_t(target["layer4"])
        loss_c = byol_loss(method.predictor(online["z"]), target["z"])
        loss_d = fg_bg_triplet(one["z_fg"], one["z_bg"], two["z_fg"], two["z_bg"], margin=0.3).loss
    torch.testing.assert_close(out["loss_c"], loss_c)
    torch.testing.assert_close(out["loss_d"], loss_d)
    torch.testing.assert_close(out["loss"].detach(), loss_c + 0.7 * loss_d)


def test_scd_moco_total_by_hand():
    """SCD-MoCo's loss = MoCo-v2's InfoNCE (tau 0.2, the queue before the step) + lambda * L_d, written out here:
    M = sigmoid saliency of the layer4 map, h = sum M F / sum M (fg) and with 1 - M (bg), z = H^s(h), anchors
    from the online network on the query view, positive/negative from the target network on the key view,
    L_d = 1/2 mean[max(cos(z1fg, z2bg) - cos(z1fg, z2fg) + alpha, 0) + max(cos(z1bg, z2fg) - cos(z1bg, z2bg), 0)]."""
    cfg = tiny(SCD_MOCO, "method.lambda_d=0.7", "method.margin=0.3")
    torch.manual_seed(0)
    method = build_method(cfg).train()
    with torch.no_grad():  # a target network that differs from the online one
        for p in [*method.encoder_k.parameters(), *method.sem_t.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    views = two_views(cfg)["views"]
    x_q, x_k = views[cfg.method.views[0]], views[cfg.method.views[1]]
    queue = method.queue.queue.clone()
    torch.manual_seed(2)  # the key shuffle's permutation is the step's first random draw
    out = method.training_step({"views": views}, P0)
    torch.manual_seed(2)
    with torch.no_grad():
        q = method.encoder_q(x_q)
        k = method.keys(x_k)

        def semantics(heads, fmap):
            m = heads.saliency(fmap)  # [B, 1, H, W]
            h_fg = (fmap * m).sum((2, 3)) / m.sum((2, 3))
            h_bg = (fmap * (1 - m)).sum((2, 3)) / (1 - m).sum((2, 3))
            return heads.projector(torch.cat([h_fg, h_bg])).chunk(2)

        z1_fg, z1_bg = semantics(method.sem, q["layer4"])
        z2_fg, z2_bg = semantics(method.sem_t, k["layer4"])
    cos = lambda a, b: F.cosine_similarity(a, b, dim=1)
    loss_d = 0.5 * (F.relu(cos(z1_fg, z2_bg) - cos(z1_fg, z2_fg) + 0.3).mean()
                    + F.relu(cos(z1_bg, z2_fg) - cos(z1_bg, z2_bg)).mean())
    pos = torch.exp((q["z"] * k["z"]).sum(1) / 0.2)
    loss_c = -torch.log(pos / (pos + torch.exp(q["z"] @ queue.t() / 0.2).sum(1))).mean()
    assert float(out["loss_c"]) == pytest.approx(float(loss_c), rel=1e-5)
    assert float(out["loss_d"]) == pytest.approx(float(loss_d), rel=1e-5)
    # measured 0.159
    assert float(loss_d) > 0.01  # the triplet term is active, so lambda is checked
    assert float(out["loss"].detach()) == pytest.approx(float(loss_c + 0.7 * loss_d), rel=1e-5)


def test_byol_symmetric_sums_both_directions_and_asymmetric_is_one():
    cfg = tiny(BYOL_SYM)
    torch.manual_seed(0)
    method = build_method(cfg).train()
    views = two_views(cfg)["views"]
    xq, xk = views["q"], views["k"]
    total = method.training_step({"views": views}, P0)["loss"].detach()
    with torch.no_grad():
        expected = method.regress(xq, xk)["loss"] + method.regress(xk, xq)["loss"]
    torch.testing.assert_close(total, expected)
    asym = tiny(BYOL_ASYM)
    m = build_method(asym)
    assert (m.cfg.symmetric, m.cfg.proj_dim, m.cfg.momentum, m.cfg.momentum_end) == (False, 128, 0.99, None)
    assert m.schedules()["momentum"].kind == "constant"
    assert build_method(cfg).schedules()["momentum"].kind == "cosine"


def test_byol_target_shuffle_returns_outputs_in_batch_order():
    cfg = tiny(BYOL_ASYM, "model.norm=frozen_bn", "method.shuffle_bn=true")
    torch.manual_seed(0)
    method = build_method(cfg).train()
    method.target.projector.eval()  # BatchNorm1d statistics do not depend on the order, but keep it exact
    method.target_outputs = ("z", "layer4")
    x = torch.randn(6, 3, 64, 64)
    out = method.targets(x)
    with torch.no_grad():
        plain = method.target(x)
    torch.testing.assert_close(out["z"], plain["z"])
    torch.testing.assert_close(out["layer4"], plain["layer4"])


def test_a_one_cell_stage_map_is_a_config_error():
    cfg = tiny(SCD_BYOL)
    method = build_method(cfg)
    x = torch.randn(4, 3, 32, 32)  # ResNet-18: layer4 is 1x1 at 32 px
    with pytest.raises(ConfigError, match="1x1"):
        method.training_step({"views": {"strong": x, "weak": x}}, P0)


# ----------------------------------------------------------------------------------------------- figures
def _write_images(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


def test_viz_saliency_writes_a_png_for_a_checkpoint(tmp_path: Path):
    from semssl.cli import main

    cfg = tiny(SCD_MOCO)
    torch.manual_seed(0)
    method = build_method(cfg)
    ckpt = tmp_path / "scd.ckpt"
    torch.save({"semssl_config": to_dict(cfg), "global_step": 3,
                "state_dict": {f"method.{k}": v for k, v in method.state_dict().items()}}, ckpt)
    images = _write_images(tmp_path / "imgs", 5)
    out = tmp_path / "fig" / "saliency.png"
    assert main(["viz", "saliency", "--checkpoint", str(ckpt), "--images", str(images), str(images / "img0.png"),
                 "--size", "96", "--n", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a checkpoint without a saliency network is a clear config error (exit code 2)
    plain = tiny("mocov2_resnet18_1x64-400it_synthetic")
    mocov2 = build_method(plain)
    torch.save({"semssl_config": to_dict(plain), "state_dict": {f"method.{k}": v for k, v in
                                                                mocov2.state_dict().items()}}, tmp_path / "m.ckpt")
    assert main(["viz", "saliency", "--checkpoint", str(tmp_path / "m.ckpt"), "--images", str(images),
                 "--out", str(tmp_path / "no.png")]) == 2
    assert not (tmp_path / "no.png").exists()


def test_saliency_during_training_draws_the_live_method(tmp_path: Path):
    from semssl.viz import training_figure

    module = training_figure("saliency")
    cfg = tiny(SCD_BYOL)
    method = build_method(cfg).eval()
    images = _write_images(tmp_path / "test" / "class_a", 3)
    paths = {"train": None, "eval_train": None, "eval_test": str(images.parent)}

    def drawn(name: str) -> np.ndarray:
        out = tmp_path / "figures" / f"saliency-{name}.png"
        module.during_training(method, cfg, paths, out, n=8, size=64)
        return np.asarray(Image.open(out).convert("RGB")).astype(np.float64)

    learned = drawn("learned")
    last = method.sem.saliency.net[-1]
    last.weight.data.zero_()
    last.bias.data.fill_(50.0)  # M^fg = 1 everywhere: the jet overlay is red
    red = drawn("all-foreground")
    last.bias.data.fill_(-50.0)  # M^fg = 0 everywhere: blue
    blue = drawn("all-background")
    assert learned.shape == red.shape == blue.shape
    # the figure follows the live method: three networks, three pictures (mean |difference| on 0..255, measured
    # 7.8 red/blue, 13.4 learned/red, 10.4 learned/blue; an unchanged picture gives 0)
    for one, other in ((red, blue), (learned, red), (learned, blue)):
        assert np.abs(one - other).mean() > 3
    # ... and it shows their maps: red minus blue over the figure (measured +9.6 all-foreground, -8.8 all-background)
    assert (red[..., 0] - red[..., 2]).mean() > (blue[..., 0] - blue[..., 2]).mean() + 10


# ----------------------------------------------------------------------------------------------- recipes
def test_recipes_load_with_the_papers_settings():
    names = [n for n in list_recipes() if n.startswith(("scd_", "byol"))]
    assert len(names) >= 12
    for name in names:
        load_config(name)
    moco = load_config("scd_mocov2_resnet50_2x128-200e_imagenet")
    assert (moco.method.name, moco.method.lambda_d, moco.method.margin, moco.optim.lr) == ("scd_mocov2", 0.5, 1.0,
                                                                                            0.06)
    assert moco.data.batch_size * moco.trainer.devices == 256 and moco.method.queue_size == 65536
    byol = load_config("scd_byol_resnet50_2x256-200e_imagenet")
    m = byol.method
    assert (m.symmetric, m.proj_hidden_dim, m.proj_dim, m.momentum, m.momentum_end) == (False, 4096, 512, 0.99,
                                                                                         None)
    assert byol.data.batch_size * byol.trainer.devices == 512
    assert byol.optim.lr * 512 / 256 == pytest.approx(0.05)  # the paper's lr at its batch
    assert [v.recipe for v in byol.data.views] == ["mocov2", "weak"] and list(m.views) == ["strong", "weak"]
    assert load_config("scd_byol-2x_resnet50_2x256-200e_imagenet").method.symmetric is True
    sym = load_config("byol_resnet50_8x32-200e_imagenet")
    assert (sym.optim.name, sym.method.momentum, sym.method.momentum_end, sym.method.proj_dim) == ("lars", 0.996,
                                                                                                 1.0, 256)
