"""D3SSL on SoCo: every module and augmentation switch trains on real collated batches of the tiny built-in scenes
(with selective-search proposals, PRC / PRM / RBJ and the de-positioning view), the loss is Eq. 10's sum, and
the recipes carry the paper's settings."""

import pytest
import torch
import torch.nn.functional as F
from region_testing import load_region_recipe, region_batch, tiny_scene_overrides

from semssl.bench import MethodStep
from semssl.errors import ConfigError, SampleError
from semssl.methods import build_method, method_class
from semssl.schedules import Progress

SMALL = "d3ssl_resnet18_1x32-300it_scenes"
NO_DP = "data.batch_transforms=[{name: prc, views: [x1, x2s]}, {name: prm, views: [x1, x2s]}]"


def d3ssl_cfg(synth, tmp_path, *extra):
    overrides = tiny_scene_overrides(synth, tmp_path / "runs", small_view=True)
    return load_region_recipe(SMALL, overrides + ["model.bn_splits=2", "method.bank_size=64", *extra])


def test_d3ssl_trains_with_both_modules_and_sums_them(tiny_synth, tmp_path):
    torch.manual_seed(0)
    cfg = d3ssl_cfg(tiny_synth, tmp_path, "method.bank_size=100")
    batch = region_batch(cfg, 4)
    assert set(batch["views"]) == {"x1", "x2", "x2s", "x3"} and batch["views"]["x2s"].shape[-1] == 32
    assert torch.equal(batch["proposal_ids"]["x3"], batch["proposal_ids"]["x2"])
    step = MethodStep(cfg, batch)
    method = step.method
    assert method.predictor is None and method.bank is not None and method.cfg.loss == "nce"
    with torch.no_grad():  # a teacher that differs from the student, so every pairing gives its own value
        for p in method.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bank = method.bank.queue.clone()
    torch.manual_seed(1)  # the teacher's shuffle-BN permutations (x^1, then x2) are the step's first random draws
    first = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=100, total_steps=300))
    torch.manual_seed(1)
    with torch.no_grad():
        t = {v: method.teacher(batch, v)["z"] for v in ("x1", "x2")}
        s = {v: method.student(batch, v)["q"] for v in ("x1", "x2s", "x3")}

    def nce(a: str, b: str) -> float:
        """Eq. 5 written out: per pair of slots holding the same proposal, -log of the positive's share against
        the bank; averaged over an image's pairs (Eq. 10's 1/K), then over images."""
        ids, valid, rows = batch["proposal_ids"], batch["proposal_valid"], []
        for n in range(s[a].shape[0]):
            terms = []
            for i in range(ids[a].shape[1]):
                for j in range(ids[b].shape[1]):
                    if valid[a][n, i] and valid[b][n, j] and ids[a][n, i] == ids[b][n, j]:
                        q, k = F.normalize(s[a][n, i], dim=0), F.normalize(t[b][n, j], dim=0)
                        pos = torch.exp(q @ k / 0.2)
                        terms.append(float(-torch.log(pos / (pos + torch.exp(bank @ q / 0.2).sum()))))
            rows.append(sum(terms) / (len(terms) + 1e-6))
        return sum(rows) / len(rows)

    # L_dc = NCE(z_s1, z_t2) + NCE(z_s2, z_t1) (Eq. 4), L_dp = NCE(z_s3, z_t2) + NCE(z_s3, z_t1) (Eq. 9)
    assert float(first["loss_dc"]) == pytest.approx(nce("x1", "x2") + nce("x2s", "x1"), rel=1e-5)
    assert float(first["loss_dp"]) == pytest.approx(nce("x3", "x2") + nce("x3", "x1"), rel=1e-5)
    assert float(first["loss"].detach()) == pytest.approx(float(first["loss_dc"] + first["loss_dp"]), rel=1e-6)
    wrong = nce("x1", "x1") + nce("x2s", "x2")  # same-view pairs: a different value, so the pairing is checked
    # measured 0.93 apart
    assert abs(wrong - float(first["loss_dc"])) > 1e-3
    # the bank received the teacher embeddings of x^1, then of x2, every slot (the 4 x 4 slots are all valid)
    assert batch["proposal_valid"]["x1"].all() and batch["proposal_valid"]["x2"].all()
    torch.testing.assert_close(method.bank.queue[:16], F.normalize(t["x1"].reshape(16, -1), dim=1))
    torch.testing.assert_close(method.bank.queue[16:32], F.normalize(t["x2"].reshape(16, -1), dim=1))
    outs = [step.run() for _ in range(2)]
    for out in outs:
        assert torch.isfinite(out["loss"])
        torch.testing.assert_close(out["loss"].detach(), out["loss_dc"] + out["loss_dp"])
    assert int(method.bank.ptr) == (3 * (2 * 4 * 4)) % 100  # z_t1 and z_t2, every slot, three steps


@pytest.mark.parametrize("variant", [
    ["method.loss=byol"],  # SoCo's regression (with its predictor) on D3SSL's pairs
    ["method.depositioning=false", NO_DP],  # Table 7: w/o L_dp
    ["method.decoupling=false"],  # de-positioning only
    # no PRC, PRM, RBJ
    ["data.batch_transforms=[{name: depositioning, source: x2, out: x3}]", "data.views.0.box_jitter_p=0.0"],
    ["data.views.1.box_cutout_p=0.5", "method.shuffle_bn=false"],  # SoCo's cutout on x2 (Table 5's first columns)
])
def test_every_d3ssl_variant_trains(tiny_synth, tmp_path, variant):
    torch.manual_seed(0)
    cfg = d3ssl_cfg(tiny_synth, tmp_path, *variant)
    batch = region_batch(cfg, 4)
    step = MethodStep(cfg, batch)
    for _ in range(2):
        out = step.run()
        assert torch.isfinite(out["loss"])
    assert ("loss_dc" in out) == cfg.method.decoupling and ("loss_dp" in out) == cfg.method.depositioning
    assert (step.method.predictor is not None) == (cfg.method.loss == "byol")


def test_decoupling_views_are_prm_prc_of_the_plain_views(tiny_synth, tmp_path):
    full = region_batch(d3ssl_cfg(tiny_synth, tmp_path), 4)
    plain = region_batch(d3ssl_cfg(tiny_synth, tmp_path, "data.batch_transforms=[]"), 4)
    assert "x3" not in plain["views"]
    torch.testing.assert_close(full["views"]["x2"], plain["views"]["x2"])  # the teacher's x2 is not augmented
    for view in ("x1", "x2s"):
        same = (full["views"][view] == plain["views"][view]).all(1)
        hidden = (full["views"][view] == 0).all(1)  # the fill of a normalised view (the mean colour)
        assert (same | hidden).all() and hidden.any()


def test_d3ssl_needs_its_composite_view_and_one_module(tiny_synth, tmp_path):
    cfg = d3ssl_cfg(tiny_synth, tmp_path, NO_DP)
    batch = region_batch(cfg, 4)
    method = build_method(cfg)
    with pytest.raises(SampleError, match="depositioning"):
        method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    cfg.method.depositioning = False
    cfg.method.decoupling = False
    with pytest.raises(ConfigError, match="at least one"):
        build_method(cfg)
    cls = method_class("d3ssl")
    cfg.method.decoupling = True
    assert cls.required_views(cfg.method) == ("x1", "x2", "x2s")
    cfg.method.decoupling = False
    assert cls.required_views(cfg.method) == ("x1", "x2")


def test_d3ssl_recipes():
    paper = load_region_recipe("d3ssl_resnet50_8x128-800e_coco", [])
    m, d = paper.method, paper.data
    assert (m.loss, m.temperature, m.bank_size, m.roi_size, m.roi_size_small) == ("nce", 0.2, 65536, 14, 7)
    assert m.decoupling and m.depositioning and m.predictor is None
    assert paper.trainer.max_epochs == 800 and paper.model.arch == "resnet50"
    views = {v.name: v for v in d.views}
    assert views["x1"].whole_image and views["x1"].box_jitter_p > 0 and not views["x1"].box_jitter_grow  # RBJ
    assert views["x2"].scale == (0.4, 1.0) and views["x2"].box_cutout_p == 0
    assert views["x2s"].size == 112 and views["x2s"].geometry_from == "x2"
    assert [t["name"] for t in d.batch_transforms] == ["depositioning", "prc", "prm"]
    assert d.batch_transforms[1]["area"] == [0.2, 0.5] and d.batch_transforms[2]["scale"] == [0.2, 0.6]
    for name in (SMALL, "d3ssl_resnet18_1x32-300it_coco128"):
        small = load_region_recipe(name, [])
        assert small.method.name == "d3ssl" and small.model.bn_splits == 8 and small.method.shuffle_bn
        assert small.method.bank_size <= 2048
