"""DenseCL: correspondence, dense InfoNCE, the dense neck, both queues, the loss split, a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semssl.bench import MethodStep
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.losses.dense import (
    dense_correspondence,
    dense_info_nce,
    flatten_map,
    gather_positions,
)
from semssl.losses.infonce import info_nce
from semssl.methods import build_method
from semssl.models.heads import ConvMLP
from semssl.schedules import Progress

TINY = ["model.arch=resnet18", "model.width=64", "model.small_input=false", "method.queue_size=16",
        "method.dense_queue_size=12", "model.bn_splits=2", "data.batch_size=4", "data.views.0.size=64", "data.views.1.size=64", "optim.warmup=0"]


def densecl(overrides: list[str] = ()) -> tuple:
    cfg = load_config(DEFAULT_RECIPE, ["method.name=densecl", *TINY, *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg).train()


def progress(step: int = 0) -> Progress:
    return Progress(epoch=0, step=step, steps_per_epoch=10, total_steps=10)


# ----------------------------------------------------------------------------------------- pure functions
def test_flatten_map_is_row_major() -> None:
    fmap = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    flat = flatten_map(fmap)
    assert flat.shape == (2, 8, 3)
    y, x = 1, 2
    torch.testing.assert_close(flat[1, y * 4 + x], fmap[1, :, y, x])


def test_correspondence_of_a_flipped_view_matches_mirrored_positions() -> None:
    torch.manual_seed(0)
    h, w = 3, 4
    f_q = torch.randn(2, 16, h, w)
    f_k = f_q.flip(-1) * torch.rand(2, 1, h, w).add(0.5)  # mirrored, each position rescaled (cosine ignores it)
    idx = dense_correspondence(flatten_map(f_q), flatten_map(f_k))
    expected = torch.tensor([yy * w + (w - 1 - xx) for yy in range(h) for xx in range(w)])
    assert torch.equal(idx, expected.expand(2, -1))


def test_correspondence_uses_cosine_not_dot_product() -> None:
    f_q = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # [B=1, S=2, C=2]
    f_k = torch.tensor([[[10.0, 0.0], [1.0, 1.0], [0.0, -3.0]]])  # dot picks 0 for both, cosine picks 1 then 0
    assert dense_correspondence(f_q, f_k).tolist() == [[1, 0]]


def test_gather_positions() -> None:
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    idx = torch.tensor([[2, 2, 0], [1, 0, 0]])
    assert gather_positions(x, idx)[..., 0].tolist() == [[2, 2, 0], [4, 3, 3]]
    assert gather_positions(x, idx.unsqueeze(-1).repeat(1, 1, 2)).shape == (2, 3, 2, 1)


def test_dense_info_nce_by_hand() -> None:
    s = 1 / math.sqrt(2)
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    k = torch.tensor([[[s, s], [0.0, 1.0]]])
    queue = torch.tensor([[-1.0, 0.0], [s, -s]])
    loss, logits = dense_info_nce(q, k, queue, temperature=0.5)
    # position 0: pos cos s, negatives -1 and s;  position 1: pos 1, negatives 0 and -s
    l0 = -math.log(math.exp(s / 0.5) / (math.exp(s / 0.5) + math.exp(-1 / 0.5) + math.exp(s / 0.5)))
    l1 = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-s / 0.5)))
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert logits.shape == (2, 3)
    ref, _ = info_nce(q[0], k[0], queue, 0.5)
    torch.testing.assert_close(loss, ref)


# ----------------------------------------------------------------------------------------- the method
def test_dense_neck_follows_the_backbone_and_is_a_1x1_conv_mlp() -> None:
    _, method = densecl()
    neck = method.encoder_q.dense_projector
    assert isinstance(neck, ConvMLP)
    convs = [m for m in neck if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(512, 512, (1, 1)), (512, 128, (1, 1))]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in neck)
    assert method.key_outputs == ("z", "dense", "dense_pooled", "layer4")
    _, proj = densecl(["method.match_on=projection"])
    assert "layer4" not in proj.key_outputs


def test_both_queues_enqueue_the_right_keys_and_the_loss_is_the_released_split() -> None:
    _, method = densecl(["model.norm=frozen_bn", "model.bn_splits=1"])  # shuffle-BN changes only the order
    g = torch.Generator().manual_seed(1)
    x_q, x_k = torch.randn(4, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
    queue_before, queue2_before = method.queue.queue.clone(), method.queue2.queue.clone()
    out = method.training_step({"views": {"q": x_q, "k": x_k}}, progress())
    with torch.no_grad():
        k = method.encoder_k(x_k)
        q = method.encoder_q(x_q)
        maps = method.encoder_k.dense_projector(method.encoder_k.backbone(x_k)["layer4"])
    # queue: the global keys; queue2: one vector per key image, the normalised mean of its dense projection map
    torch.testing.assert_close(method.queue.queue[:4], k["z"], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue2.queue[:4], F.normalize(maps.mean((2, 3)), dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue2.queue[4:], queue2_before[4:])
    assert int(method.queue.ptr) == 4 and int(method.queue2.ptr) == 4 and method.queue2.size == 12
    # the loss: 0.5 global (queue before the step) + 0.5 dense (queue2 before the step, backbone matching)
    with torch.no_grad():
        l_glob, _ = info_nce(q["z"], k["z"], queue_before, 0.2)
        match = dense_correspondence(flatten_map(q["layer4"]), flatten_map(k["layer4"]))
        l_dense, _ = dense_info_nce(q["dense"], gather_positions(k["dense"], match), queue2_before, 0.2)
    assert out["loss"].item() == pytest.approx(0.5 * l_glob.item() + 0.5 * l_dense.item(), rel=1e-5)
    assert out["loss_pix"].item() == pytest.approx(l_dense.item(), rel=1e-5)


def test_dense_features_kind() -> None:
    _, method = densecl()
    method.eval()
    x = torch.randn(2, 3, 64, 64)
    dense = method.features(x, kind="dense")
    assert dense.shape == (2, 128, 2, 2)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 2, 2))
    assert method.features(x, kind="layer4").shape == (2, 512, 2, 2)
    assert method.features(x, branch="teacher", kind="dense").shape == (2, 128, 2, 2)


@pytest.mark.parametrize("match_on", ["backbone", "projection"])
def test_densecl_trains_a_few_steps(match_on: str) -> None:
    cfg = load_config(DEFAULT_RECIPE, ["method.name=densecl", *TINY, f"method.match_on={match_on}",
                                       "trainer.max_steps=3"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    batch = {"views": {"q": x, "k": x.flip(-1) + 0.1 * torch.randn(4, 3, 64, 64, generator=g)}}
    torch.manual_seed(0)
    step = MethodStep(cfg, batch, steps_per_epoch=3)
    method = step.method
    before = method.encoder_q.dense_projector[0].weight.detach().clone()
    start, start2 = method.queue.queue.clone(), method.queue2.queue.clone()
    keys = []  # what the key encoder returns in each step (shuffle-BN undone)
    plain_keys = method.keys
    method.keys = lambda x: keys.append(plain_keys(x)) or keys[-1]
    outs = [step.run() for _ in range(3)]
    assert all(torch.isfinite(o["loss"]) for o in outs)
    assert {"loss_ins", "loss_pix", "acc_dense", "std_dense"} <= set(outs[0])
    assert not torch.equal(before, method.encoder_q.dense_projector[0].weight)  # the neck trains
    # 3 steps x 4 keys: queue (16 rows) holds the global keys in rows 0-11, its last 4 rows untouched; queue2
    # (12 rows) holds the pooled dense keys of the 3 steps in order, having wrapped round to its start
    assert len(keys) == 3 and int(method.queue.ptr) == 12 and int(method.queue2.ptr) == 0
    for i, k in enumerate(keys):
        torch.testing.assert_close(method.queue.queue[4 * i: 4 * i + 4], k["z"], rtol=0, atol=1e-6)
        torch.testing.assert_close(method.queue2.queue[4 * i: 4 * i + 4], k["dense_pooled"], rtol=0, atol=1e-6)
        assert not torch.allclose(k["dense_pooled"], start2[4 * i: 4 * i + 4])
    torch.testing.assert_close(method.queue.queue[12:], start[12:])
