"""Tests for semssl.optim: parameter groups, LARS on hand-computed steps, lr/wd updates, clipping."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from semssl.optim import (
    LARS,
    OptimError,
    build_optimizer,
    clip_gradients,
    param_groups,
    scaled_lr,
    set_lr_wd,
)


def small_convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True),  # 0.weight (wd), 0.bias (no wd)
        nn.BatchNorm2d(4),  # 1.weight, 1.bias (no wd)
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),  # 3.weight (wd)
        nn.GroupNorm(2, 4),  # 4.weight, 4.bias (no wd)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),  # 7.weight (wd), 7.bias (no wd)
    )


def names_by_group(groups: list[dict]) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in groups}


# ------------------------------------------------------------------------------------------------ param_groups
def test_param_groups_split_norm_and_bias() -> None:
    net = small_convnet()
    groups = param_groups(net.named_parameters(), weight_decay=1e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert names_by_group(groups) == {
        "decay": {"0.weight", "3.weight", "7.weight"},
        "no_decay": {"0.bias", "1.weight", "1.bias", "4.weight", "4.bias", "7.bias"},
    }
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and not decay["wd_exclude"] and not decay["lars_exclude"]
    assert no_decay["weight_decay"] == 0.0 and no_decay["wd_exclude"] and no_decay["lars_exclude"]
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)


def test_param_groups_skip_frozen_and_duplicates_and_options() -> None:
    net = small_convnet()
    net[0].weight.requires_grad_(False)
    doubled = list(net.named_parameters()) + [("again.3.weight", net[3].weight)]
    groups = param_groups(doubled, weight_decay=0.1, lars_exclude=False)
    assert names_by_group(groups)["decay"] == {"3.weight", "7.weight"}
    assert groups[1]["lars_exclude"] is False and groups[1]["wd_exclude"] is True

    single = param_groups(small_convnet().named_parameters(), 0.1, exclude_norm_and_bias=False)
    assert len(single) == 1 and len(single[0]["params"]) == 9 and single[0]["weight_decay"] == 0.1


def test_param_groups_errors() -> None:
    net = small_convnet().requires_grad_(False)
    with pytest.raises(OptimError, match="no trainable parameter"):
        param_groups(net.named_parameters(), 1e-4)
    with pytest.raises(OptimError, match="weight_decay"):
        param_groups(small_convnet().named_parameters(), -1.0)
    with pytest.raises(OptimError, match="pairs"):
        param_groups(small_convnet().parameters(), 1e-4)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ LARS
def one_weight(values: list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_lars_two_steps_match_hand_computation() -> None:
    lr, m, wd, eta, eps = 0.5, 0.9, 0.1, 1e-3, 1e-8
    w = one_weight([3.0, 4.0])  # ||w|| = 5
    opt = LARS([{"params": [w], "weight_decay": wd}], lr=lr, momentum=m, trust_coefficient=eta, eps=eps)

    # Step 1: g = (0.8, -0.6); d = g + wd w = (1.1, -0.2); ||d|| = sqrt(1.25).
    w.grad = torch.tensor([0.8, -0.6], dtype=torch.float64)
    opt.step()
    q1 = eta * 5.0 / (math.sqrt(1.25) + eps)
    buf1 = [q1 * 1.1, q1 * -0.2]
    w1 = [3.0 - lr * buf1[0], 4.0 - lr * buf1[1]]
    torch.testing.assert_close(w.detach(), torch.tensor(w1, dtype=torch.float64), rtol=0, atol=1e-14)
    assert w.grad.tolist() == [0.8, -0.6]  # the gradient itself is not modified

    # Step 2: new gradient, momentum buffer carries q1 * d1.
    w.grad = torch.tensor([0.0, 1.0], dtype=torch.float64)
    opt.step()
    d2 = [0.0 + wd * w1[0], 1.0 + wd * w1[1]]
    q2 = eta * math.hypot(*w1) / (math.hypot(*d2) + eps)
    buf2 = [m * buf1[0] + q2 * d2[0], m * buf1[1] + q2 * d2[1]]
    w2 = [w1[0] - lr * buf2[0], w1[1] - lr * buf2[1]]
    torch.testing.assert_close(w.detach(), torch.tensor(w2, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.tensor(buf2, dtype=torch.float64))


def test_lars_paper_denominator() -> None:
    lr, wd, eta, eps = 0.5, 0.1, 1e-3, 1e-8
    w = one_weight([3.0, 4.0])
    opt = LARS([w], lr=lr, momentum=0.9, weight_decay=wd, denominator="paper")
    w.grad = torch.tensor([0.8, -0.6], dtype=torch.float64)  # ||g|| = 1, wd ||w|| = 0.5
    opt.step()
    q = eta * 5.0 / (1.0 + 0.5 + eps)
    expected = torch.tensor([3.0 - lr * q * 1.1, 4.0 - lr * q * -0.2], dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_excluded_group_is_plain_sgd(nesterov: bool) -> None:
    torch.manual_seed(1)
    init = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    lars = LARS([{"params": [a], "lars_exclude": True, "weight_decay": 0.01}], lr=0.3, nesterov=nesterov)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)


def test_lars_zero_weight_uses_unit_trust_ratio() -> None:
    w = one_weight([0.0, 0.0])
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([-0.1, -0.2], dtype=torch.float64))


def test_lars_state_dict_round_trip_with_weights_only() -> None:
    torch.manual_seed(2)
    net = nn.Linear(3, 2)
    opt = build_optimizer("lars", param_groups(net.named_parameters(), 1e-5), lr=0.2)
    x = torch.randn(8, 3)
    net(x).pow(2).mean().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    twin = nn.Linear(3, 2)
    twin.load_state_dict(net.state_dict())
    twin_opt = build_optimizer("lars", param_groups(twin.named_parameters(), 1e-5), lr=0.2)
    twin_opt.load_state_dict(state)
    for model, optimizer in ((net, opt), (twin, twin_opt)):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_lars_reduces_a_simple_loss() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = build_optimizer("lars", param_groups(net.named_parameters(), 1e-6), lr=0.3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # seed 3: 0.012
    assert losses[-1] < 0.05 * losses[0]


def test_lars_rejects_bad_settings() -> None:
    w = one_weight([1.0])
    with pytest.raises(OptimError, match="momentum"):
        LARS([w], lr=0.1, momentum=1.5)
    with pytest.raises(OptimError, match="denominator"):
        LARS([w], lr=0.1, denominator="other")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ builders
def test_build_optimizer_kinds_and_group_settings() -> None:
    net = small_convnet()
    groups = param_groups(net.named_parameters(), 1e-4)
    groups[0]["lr_scale"] = 10.0
    sgd = build_optimizer("sgd", groups, lr=0.03, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["lr"] for g in sgd.param_groups] == [pytest.approx(0.3), pytest.approx(0.03)]
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[1]["name"] == "no_decay"
    assert "lr" not in groups[0]  # the caller's dicts are not mutated

    assert isinstance(build_optimizer("lars", groups, lr=1.0), LARS)
    adamw = build_optimizer("adamw", groups, lr=5e-4, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[1]["betas"] == (0.9, 0.95)

    bare = build_optimizer("sgd", [{"params": list(nn.Linear(2, 2).parameters())}], lr=0.1, weight_decay=0.5)
    assert bare.param_groups[0]["weight_decay"] == 0.5


def test_build_optimizer_errors() -> None:
    groups = param_groups(small_convnet().named_parameters(), 1e-4)
    with pytest.raises(OptimError, match="'rmsprop'"):
        build_optimizer("rmsprop", groups, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(OptimError, match="nesterov"):
        build_optimizer("adamw", groups, lr=0.1, nesterov=True)
    with pytest.raises(OptimError, match="no parameter groups"):
        build_optimizer("sgd", [], lr=0.1)
    with pytest.raises(OptimError, match="lr"):
        build_optimizer("sgd", groups, lr=float("nan"))


def test_scaled_lr() -> None:
    assert scaled_lr(0.1, 512) == pytest.approx(0.2)  # SCFS: 0.1 x bs/256
    assert scaled_lr(1.0, 1024) == pytest.approx(4.0)  # SoCo: 1.0 x bs/256
    assert scaled_lr(0.05, 64, reference=512) == pytest.approx(0.00625)
    with pytest.raises(OptimError, match="global_batch"):
        scaled_lr(0.1, 0)
    with pytest.raises(OptimError, match="base_lr"):
        scaled_lr(-0.1, 256)


def test_set_lr_wd_leaves_excluded_groups_at_zero() -> None:
    net = small_convnet()
    groups = param_groups(net.named_parameters(), 1e-4)
    groups[1]["lr_scale"] = 0.5
    head = nn.Linear(2, 2)
    opt = build_optimizer("sgd", groups, lr=0.1)
    opt.add_param_group({"params": [head.weight, head.bias], "param_names": ["head.weight", "head.bias"]})
    set_lr_wd(opt, lr=0.2, wd=0.04)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.2), pytest.approx(0.1), pytest.approx(0.2)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0, 0.04]
    with pytest.raises(OptimError, match="wd"):
        set_lr_wd(opt, lr=0.1, wd=-1.0)


# ------------------------------------------------------------------------------------------------ clipping
def two_grads() -> tuple[nn.Parameter, nn.Parameter]:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5
    b.grad = torch.tensor([0.0, 0.3, 0.4])  # norm 0.5
    return a, b


def test_per_param_clipping_clips_each_tensor_independently() -> None:
    a, b = two_grads()
    frozen = nn.Parameter(torch.zeros(1))  # no grad: skipped
    norms = clip_gradients([a, frozen, b], max_norm=1.0, mode="per_param")
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    assert torch.linalg.vector_norm(a.grad).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.3, 0.4]))  # under the limit: untouched


def test_global_clipping_scales_all_by_one_factor() -> None:
    a, b = two_grads()
    total = clip_gradients([a, b], max_norm=1.0, mode="global")
    assert total.item() == pytest.approx(math.sqrt(25.25))
    factor = 1.0 / (math.sqrt(25.25) + 1e-6)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * factor)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.3, 0.4]) * factor)


def test_clipping_errors_and_empty() -> None:
    a, _ = two_grads()
    with pytest.raises(OptimError, match="'norm'"):
        clip_gradients([a], 1.0, mode="norm")  # type: ignore[arg-type]
    with pytest.raises(OptimError, match="max_norm"):
        clip_gradients([a], 0.0)
    assert clip_gradients([nn.Parameter(torch.zeros(2))], 1.0).numel() == 0
