"""Method options no other test ran, each checked by its effect: MoCo-v2's, DenseCL's and DSC's ``symmetric``
(the loss is the mean of both directions, written out, and both directions' keys are queued), DSC's
``kmeans_warm_start: false`` (every step starts k-means afresh), DINO's ``norm_last_layer: false`` (the last
layer's weight-norm gain g trains) and ``use_bn_in_head`` (BatchNorm in the head, batch statistics in training)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from semssl.bench import MethodStep
from semssl.config import DEFAULT_RECIPE, load_config
from semssl.losses.dense import dense_correspondence, flatten_map, gather_positions
from semssl.methods import build_method
from semssl.schedules import Progress

P0 = Progress(epoch=0, step=0, steps_per_epoch=2, total_steps=2)
B = 4
# shuffle-BN off and one BN split: the key encoder's outputs do not depend on a random permutation
TINY = ["model.arch=resnet18", "model.width=16", "model.small_input=true", "model.bn_splits=1",
        "method.shuffle_bn=false", "method.queue_size=16", "data.batch_size=4", "optim.warmup=0"]


def views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, 32, 32, generator=g)
    return x, x.flip(-1) + 0.3 * torch.randn(B, 3, 32, 32, generator=g)


def perturbed_keys(method):
    """The method with its key encoder moved off the query encoder (at initialisation it is a copy, and the two
    directions of a symmetric loss would nearly coincide)."""
    with torch.no_grad():
        for p in method.encoder_k.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return method


def nce_by_hand(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float = 0.2) -> torch.Tensor:
    """-mean_i log exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_m exp(q_i.n_m / t)) over the rows of q [N, D]."""
    pos = torch.exp((q * k).sum(1) / t)
    return -torch.log(pos / (pos + torch.exp(q @ negatives.t() / t).sum(1))).mean()


# ----------------------------------------------------------------------------------------- symmetric
@pytest.mark.parametrize("symmetric", [True, False])
def test_mocov2_symmetric_is_the_mean_of_both_directions_and_queues_both_keys(symmetric: bool) -> None:
    cfg = load_config(DEFAULT_RECIPE, [*TINY, f"method.symmetric={str(symmetric).lower()}"])
    torch.manual_seed(0)
    method = perturbed_keys(build_method(cfg).train())
    x_q, x_k = views()
    queue = method.queue.queue.clone()
    out = method.training_step({"views": {"q": x_q, "k": x_k}}, P0)
    with torch.no_grad():
        forward = nce_by_hand(method.encoder_q(x_q)["z"], method.encoder_k(x_k)["z"], queue)
        backward = nce_by_hand(method.encoder_q(x_k)["z"], method.encoder_k(x_q)["z"], queue)
    # two different terms (measured 0.0014 apart, the loss 0.158), so a wrong pairing is off by far more than
    # the rel 1e-5 of the comparison below
    assert abs(float(forward) - float(backward)) > 1e-4
    expected = (forward + backward) / 2 if symmetric else forward
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    keys = [method.encoder_k(x_k)["z"]] + ([method.encoder_k(x_q)["z"]] if symmetric else [])
    n = B * len(keys)
    assert int(method.queue.ptr) == n  # the keys of both directions, in order, after both losses
    torch.testing.assert_close(method.queue.queue[:n], torch.cat(keys).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue.queue[n:], queue[n:])


def _dense_direction(method, x_q: torch.Tensor, x_k: torch.Tensor, queue: torch.Tensor,
                     queue2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DenseCL's two InfoNCE terms of one direction, written out from the encoders' outputs."""
    with torch.no_grad():
        q, k = method.encoder_q(x_q), method.encoder_k(x_k)
        match = dense_correspondence(flatten_map(q["layer4"]), flatten_map(k["layer4"]))
        k_matched = gather_positions(k["dense"], match)
        d = q["dense"].shape[-1]
        return (nce_by_hand(q["z"], k["z"], queue),
                nce_by_hand(q["dense"].reshape(-1, d), k_matched.reshape(-1, d), queue2))


def test_densecl_symmetric_is_the_mean_of_both_directions_and_queues_both_keys() -> None:
    cfg = load_config(DEFAULT_RECIPE, ["method.name=densecl", *TINY, "method.dense_queue_size=16",
                                       "method.symmetric=true"])
    torch.manual_seed(0)
    method = perturbed_keys(build_method(cfg).train())
    x_q, x_k = views()
    queue, queue2 = method.queue.queue.clone(), method.queue2.queue.clone()
    out = method.training_step({"views": {"q": x_q, "k": x_k}}, P0)
    ins1, pix1 = _dense_direction(method, x_q, x_k, queue, queue2)
    ins2, pix2 = _dense_direction(method, x_k, x_q, queue, queue2)  # the queues before the step, both times
    assert abs(float(pix1) - float(pix2)) > 1e-3  # measured 0.022 apart
    assert float(out["loss_ins"]) == pytest.approx(float(ins1 + ins2) / 2, rel=1e-5)
    assert float(out["loss_pix"]) == pytest.approx(float(pix1 + pix2) / 2, rel=1e-5)
    expected = (0.5 * (ins1 + pix1) + 0.5 * (ins2 + pix2)) / 2  # w_ins = w_pix = 0.5 in each direction
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        k1, k2 = method.encoder_k(x_k), method.encoder_k(x_q)
    assert int(method.queue.ptr) == 2 * B and int(method.queue2.ptr) == 2 * B
    torch.testing.assert_close(method.queue.queue[:2 * B], torch.cat([k1["z"], k2["z"]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(method.queue2.queue[:2 * B], torch.cat([k1["dense_pooled"], k2["dense_pooled"]]),
                               rtol=0, atol=1e-6)


def test_dsc_symmetric_averages_each_directions_objective_semantic_term_included() -> None:
    cfg = load_config(DEFAULT_RECIPE, ["method.name=dsc", *TINY, "method.dense_queue_size=16",
                                       "method.semantic=triplet", "method.w_sem=2.0", "method.symmetric=true"])
    torch.manual_seed(0)
    method = perturbed_keys(build_method(cfg).train())
    x_q, x_k = views()
    before = copy.deepcopy(method)  # the queues of before the step, for the two directions by hand
    out = method.training_step({"views": {"q": x_q, "k": x_k}}, P0)
    with torch.no_grad():
        one = before.objective(before.dense_contrast(x_q, x_k), P0)
        two = before.objective(before.dense_contrast(x_k, x_q), P0)
        ins1, pix1 = _dense_direction(before, x_q, x_k, before.queue.queue, before.queue2.queue)
    assert float(one["loss_ins"]) == pytest.approx(float(ins1), rel=1e-5)  # the pieces are the written-out ones
    assert float(one["loss_pix"]) == pytest.approx(float(pix1), rel=1e-5)
    assert abs(float(one["loss_sem"]) - float(two["loss_sem"])) > 1e-4  # measured 0.0063 apart
    for key in ("loss_ins", "loss_pix", "loss_sem"):
        assert float(out[key]) == pytest.approx(float(one[key] + two[key]) / 2, rel=1e-5), key
    expected = sum(1.0 * d["loss_ins"] + 1.0 * d["loss_pix"] + 2.0 * d["loss_sem"] for d in (one, two)) / 2
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert int(method.queue.ptr) == 2 * B and int(method.queue2.ptr) == 2 * B


# ----------------------------------------------------------------------------------------- DSC k-means
@pytest.mark.parametrize("warm", [True, False])
def test_dsc_kmeans_warm_start_false_starts_every_step_afresh(warm: bool, monkeypatch) -> None:
    """``kmeans_warm_start: false``: k-means is initialised from the batch at every step, so what the previous
    step left in the centroid buffer does not matter; with the warm start it is the starting point."""
    import semssl.methods.dsc as dsc

    cfg = load_config(DEFAULT_RECIPE, ["method.name=dsc", *TINY, "method.semantic=kmeans", "method.num_clusters=5",
                                       f"method.kmeans_warm_start={str(warm).lower()}"])
    inits = []
    real_init = dsc.kmeans_init
    monkeypatch.setattr(dsc, "kmeans_init", lambda x, k: inits.append(k) or real_init(x, k))
    torch.manual_seed(0)
    method = perturbed_keys(build_method(cfg).train())
    x_q, x_k = views()
    method.training_step({"views": {"q": x_q, "k": x_k}}, P0)
    assert len(inits) == 1 and bool(method.centroids_ready)
    other = copy.deepcopy(method)
    with torch.no_grad():  # what a previous step might have left: unrelated unit vectors
        other.centroids.copy_(F.normalize(torch.randn(other.centroids.shape), dim=1))
    results = []
    for m in (method, other):
        torch.manual_seed(7)  # the same draw of initial points for both
        out = m.training_step({"views": {"q": x_q, "k": x_k}}, P0)
        results.append((float(out["loss_sem"]), m.centroids.clone()))
    assert len(inits) == (3 if not warm else 1)  # once per step without warm start, once in all with it
    same = results[0][0] == pytest.approx(results[1][0], rel=1e-6) and torch.allclose(results[0][1], results[1][1])
    assert same == (not warm)


# ----------------------------------------------------------------------------------------- DINO head
def _dino_step(**method):
    from test_dino import random_batch, tiny_cfg

    cfg = tiny_cfg(method={"freeze_last_layer": 0, **method})
    torch.manual_seed(0)
    return MethodStep(cfg, random_batch(), steps_per_epoch=2)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_norm_last_layer_false_leaves_the_gain_trainable(norm_last_layer: bool) -> None:
    step = _dino_step(norm_last_layer=norm_last_layer)
    method = step.method
    gain = method.student.head.last_layer.parametrizations.weight.original0
    teacher_gain = method.teacher.head.last_layer.parametrizations.weight.original0
    optimised = {id(p) for group in step.optimizer.param_groups for p in group["params"]}
    assert gain.requires_grad == (not norm_last_layer) and (id(gain) in optimised) == (not norm_last_layer)
    assert not teacher_gain.requires_grad
    for _ in range(3):
        step.run()
    ones = torch.ones_like(gain)
    if norm_last_layer:  # g frozen at 1: every prototype stays a unit vector
        assert torch.equal(gain.detach(), ones) and torch.equal(teacher_gain, ones)
        torch.testing.assert_close(method.student.head.last_layer.weight.norm(dim=1), ones[:, 0])
    else:  # g trains, the teacher's follows by EMA, and the prototypes' norms are g
        assert gain.grad is not None and not torch.equal(gain.detach(), ones)
        assert not torch.equal(teacher_gain, ones)
        torch.testing.assert_close(method.student.head.last_layer.weight.norm(dim=1), gain.detach()[:, 0].abs())


@pytest.mark.parametrize("use_bn", [True, False])
def test_dino_use_bn_in_head_puts_batchnorm_after_every_hidden_layer(use_bn: bool) -> None:
    step = _dino_step(use_bn_in_head=use_bn, head_layers=3)
    method = step.method
    for net in (method.student, method.teacher):
        kinds = [type(m).__name__ for m in net.head.mlp]
        assert kinds == (["Linear", "BatchNorm1d", "GELU"] * 2 if use_bn else ["Linear", "GELU"] * 2) + ["Linear"]
    # in training the head's output for an image depends on the rest of its batch only through BatchNorm
    g = torch.Generator().manual_seed(3)
    pooled = torch.randn(6, method.student.backbone.dim, generator=g)
    head = method.student.head.train()
    with torch.no_grad():
        a = head(torch.cat([pooled[:3], pooled[3:]]))[:3]
        b = head(torch.cat([pooled[:3], 5 + pooled[3:]]))[:3]
    assert torch.allclose(a, b, atol=1e-6) == (not use_bn)
    out = step.run()
    assert torch.isfinite(out["loss"])
    if use_bn:  # the BatchNorm trains and keeps running statistics
        bn = method.student.head.mlp[1]
        assert bn.weight.grad is not None and bn.running_var.ne(1).all()
