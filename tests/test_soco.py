"""SoCo (C4): RoI features, correspondence by proposal id, the BYOL-style region loss and the region InfoNCE
(hand-computed and against lightly), and training steps on real batches of the tiny built-in scenes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from region_testing import load_region_recipe, region_batch, tiny_scene_overrides

from semssl.bench import MethodStep
from semssl.errors import ConfigError, SampleError
from semssl.losses.infonce import info_nce
from semssl.losses.region import (
    region_correspondence,
    region_nce,
    roi_features,
    soco_loss,
)
from semssl.methods import build_method
from semssl.models.backbones import ResNetBackbone
from semssl.schedules import Progress

SMALL = "soco_resnet18_1x32-300it_scenes"


@pytest.fixture
def soco_cfg(tiny_synth, tmp_path):
    return load_region_recipe(SMALL, tiny_scene_overrides(tiny_synth, tmp_path / "runs"))


# ------------------------------------------------------------------------------------------------ pure functions
def test_roi_features_of_the_whole_image_equal_the_pooled_feature():
    torch.manual_seed(0)
    net = ResNetBackbone("resnet18", width=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f3 = net(x, stages=("layer3",), upto="layer3")["layer3"]  # 4 x 4
        whole = torch.tensor([[0.0, 0.0, 64.0, 64.0]]).expand(2, 1, 4)
        feats = roi_features(f3, whole, torch.ones(2, 1, dtype=torch.bool), net.stage("layer4"), out=4,
                             spatial_scale=4 / 64)
        torch.testing.assert_close(feats[:, 0], net(x)["pooled"], rtol=1e-5, atol=1e-6)


def test_roi_features_read_their_own_row_and_zero_invalid_slots():
    torch.manual_seed(0)
    net = ResNetBackbone("resnet18", width=16).eval()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 64.0, 40.0]],
                          [[8.0, 8.0, 40.0, 56.0], [0.0, 0.0, 64.0, 64.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        f3 = net(x, stages=("layer3",), upto="layer3")["layer3"]
        feats = roi_features(f3, boxes, valid, net.stage("layer4"), out=4, spatial_scale=1 / 16)
        swapped = roi_features(f3.flip(0), boxes.flip(0), valid.flip(0), net.stage("layer4"), out=4,
                               spatial_scale=1 / 16)
    assert feats.shape == (2, 2, net.dim)
    assert (feats[1, 1] == 0).all() and feats[1, 0].abs().sum() > 0
    torch.testing.assert_close(swapped.flip(0)[valid], feats[valid])


def test_region_correspondence_by_id_with_duplicates_and_validity():
    ids_a = torch.tensor([[0, 1, 2, 2], [5, -1, 6, 7]])
    valid_a = torch.tensor([[True, True, True, True], [True, True, True, False]])
    ids_b = torch.tensor([[0, 2, 3, 2], [5, -1, 7, 6]])
    valid_b = torch.tensor([[True, True, True, False], [True, True, True, True]])
    corr = region_correspondence(ids_a, valid_a, ids_b, valid_b)
    assert corr.tolist() == [
        [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]],  # the duplicate id 2 matches twice; b3 invalid
        [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]],  # id -1 (padding) never matches; a3 invalid
    ]


def test_soco_loss_by_hand():
    p = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]], requires_grad=True)
    z = torch.tensor([[[1.0, 1.0], [0.0, -3.0]], [[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)
    corr = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    loss = soco_loss(p, z, corr)
    # row 0: cos = 1/sqrt(2) and -1 -> -2 (0.7071 - 1) / 2; row 1 has no pair -> 0; mean over the 2 rows
    expected = (-2 * (2**-0.5 - 1) / (2 + 1e-6)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert z.grad is None and p.grad is not None  # stop-gradient on the target
    # a duplicated pair counts as often as C says: C = [[2]] equals C = [[1]] after the per-image normalisation
    one = soco_loss(p[:1, :1], z[:1, :1], torch.ones(1, 1, 1))
    two = soco_loss(p[:1, :1], z[:1, :1], torch.full((1, 1, 1), 2.0))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


def test_region_nce_equals_info_nce_and_lightly_for_one_box_per_image():
    from lightly.loss import NTXentLoss

    torch.manual_seed(0)
    n, d, k = 6, 8, 16
    q, key = F.normalize(torch.randn(n, d), dim=1), F.normalize(torch.randn(n, d), dim=1)
    bank = F.normalize(torch.randn(k, d), dim=1)
    ours, acc = region_nce(q[:, None], key[:, None], torch.ones(n, 1, 1), bank, 0.2)
    ref, logits = info_nce(q, key, bank, 0.2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert float(acc) == float((logits.argmax(1) == 0).float().mean())
    lightly = NTXentLoss(temperature=0.2, memory_bank_size=(k, d))
    lightly.memory_bank.bank = bank.clone()
    torch.testing.assert_close(ours, lightly(q, key), rtol=1e-5, atol=1e-6)


def test_region_nce_by_hand_over_matched_pairs():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    k = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    bank = torch.tensor([[0.0, 1.0]])
    corr = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss, _ = region_nce(q, k, corr, bank, temperature=1.0)
    l0 = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + torch.exp(torch.tensor(0.0))))
    l1 = -torch.log(torch.exp(torch.tensor(0.0)) / (torch.exp(torch.tensor(0.0)) + torch.exp(torch.tensor(1.0))))
    torch.testing.assert_close(loss, (l0 + l1) / (2 + 1e-6))


# ------------------------------------------------------------------------------------------------ the method
def test_soco_trains_on_real_scene_batches(soco_cfg):
    torch.manual_seed(0)
    batch = region_batch(soco_cfg, 4)
    assert batch["proposals"]["x1"].shape == (4, 4, 4) and batch["proposal_valid"]["x2"].all()
    assert torch.equal(batch["proposal_ids"]["x1"], batch["proposal_ids"]["x2"])
    step = MethodStep(soco_cfg, batch)
    method = step.method
    assert method.predictor is not None and method.bank is None
    with torch.no_grad():  # a target that differs from the online network, so the two directions differ
        for p in method.target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # the loss, written out: view 1 online -> view 2 target plus view 2 online -> view 1 target, each the per-image
    # mean over the slot pairs holding the same proposal of -2 cos(predictor output, target projection)
    first = method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=100, total_steps=300))
    with torch.no_grad():
        q = {v: method.student(batch, v)["q"] for v in ("x1", "x2")}
        z = {v: method.teacher(batch, v)["z"] for v in ("x1", "x2")}
    ids, valid = batch["proposal_ids"], batch["proposal_valid"]

    def direction(a: str, b: str) -> float:
        rows = []
        for n in range(q[a].shape[0]):
            pairs = [(i, j) for i in range(ids[a].shape[1]) for j in range(ids[b].shape[1])
                     if valid[a][n, i] and valid[b][n, j] and ids[a][n, i] == ids[b][n, j] and ids[a][n, i] >= 0]
            total = sum(-2 * float(F.cosine_similarity(q[a][n, i], z[b][n, j], dim=0)) for i, j in pairs)
            rows.append(total / (len(pairs) + 1e-6))
        return sum(rows) / len(rows)

    by_hand = direction("x1", "x2") + direction("x2", "x1")
    assert float(first["loss"].detach()) == pytest.approx(by_hand, rel=1e-5)
    # measured 0.116 apart
    assert abs(direction("x1", "x2") - direction("x2", "x1")) > 1e-3  # two different terms, not one doubled
    before = copy.deepcopy(method.target.state_dict())
    outs = [step.run() for _ in range(3)]
    assert all(torch.isfinite(o["loss"]) for o in outs)
    assert float(outs[0]["pairs"]) >= 4
    moved = [k for k, v in method.target.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved  # the EMA teacher follows the student
    assert method.schedules()["momentum"].base == 0.99 and method.schedules()["momentum"].final == 1.0
    feats = method.region_features(batch["views"]["x1"], batch["proposals"]["x1"])
    assert feats.shape == (4, 4, method.online.backbone.dim)


def test_soco_with_the_nce_loss_fills_its_bank(soco_cfg):
    soco_cfg.method.loss = "nce"
    soco_cfg.method.bank_size = 64
    batch = region_batch(soco_cfg, 4)
    step = MethodStep(soco_cfg, batch)
    assert step.method.predictor is None and step.method.bank is not None
    out = step.run()
    assert torch.isfinite(out["loss"]) and "acc1" in out
    assert int(step.method.bank.ptr) == 2 * 4 * 4  # both views' teacher slots, every step


def test_shuffled_teacher_gives_the_same_embeddings_with_plain_batchnorm(soco_cfg):
    torch.manual_seed(0)
    batch = region_batch(soco_cfg, 4)
    method = build_method(soco_cfg).train()
    plain = method.teacher(batch, "x1")["z"]
    method.cfg.shuffle_bn = True
    shuffled = method.teacher(batch, "x1")["z"]
    torch.testing.assert_close(shuffled, plain, rtol=1e-4, atol=1e-5)


def test_soco_errors_name_what_is_missing(soco_cfg):
    method = build_method(soco_cfg)
    batch = {"views": {"x1": torch.randn(2, 3, 64, 64), "x2": torch.randn(2, 3, 64, 64)}}
    with pytest.raises(SampleError, match="data.proposals"):
        method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, total_steps=1))
    soco_cfg.method.roi_size = 0
    with pytest.raises(ConfigError):
        build_method(soco_cfg)


def test_soco_recipes():
    paper = load_region_recipe("soco_resnet50_8x128-400e_imagenet", [])
    m, d, o = paper.method, paper.data, paper.optim
    assert (m.roi_size, m.proj_hidden_dim, m.proj_dim, m.loss, m.momentum, m.momentum_end) == (14, 4096, 256, "byol",
                                                                                                 0.99, 1.0)
    assert paper.model.arch == "resnet50" and paper.model.zero_init_residual and paper.model.sync_bn
    assert d.batch_size == 128 and paper.trainer.devices == 8 and paper.trainer.max_epochs == 400
    assert d.views[0].whole_image and d.views[0].size == 224 and d.views[0].recipe == "byol_view1"
    assert d.views[1].scale == (0.6, 1.0) and d.views[1].box_cutout_p == 0.5 and d.views[1].recipe == "byol_view2"
    assert d.region_sampling.k == 4 and d.region_sampling.max_tries == 5 and d.region_sampling.pad
    assert (o.name, o.lr, o.weight_decay, o.warmup, o.warmup_start, o.min_lr) == ("lars", 1.0, 1e-5, 10, 0.01, 1e-6)
    assert o.exclude_norm_and_bias and o.lr_scaling == "linear"
    for name in (SMALL, "soco_resnet18_1x32-300it_coco128"):
        small = load_region_recipe(name, [])
        assert small.method.name == "soco" and small.model.arch == "resnet18" and small.data.region_sampling.k == 4
