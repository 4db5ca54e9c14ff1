"""Linear probes (semssl.eval.linear) and feature extraction (semssl.eval.features)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from semssl.eval.features import EvalInputError, extract_features
from semssl.eval.linear import (
    FastLinearConfig,
    LinearConfig,
    _fit_linear_stack,
    _init_linear,
    linear_fast,
    linear_standard,
)


def _blobs(seed: int, n: int, dim: int, num_classes: int, separation: float):
    """Gaussian classes; centres at distance ~``separation`` from each other, unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * separation / math.sqrt(2)
    labels = torch.arange(n) % num_classes
    return centres[labels] + torch.randn(n, dim, generator=g), labels


# ------------------------------------------------------------------------------------------------- linear_fast
def test_fast_separable_blobs_reach_100_percent():
    x, y = _blobs(0, 600, 32, 4, separation=12.0)
    result = linear_fast(x[:400], y[:400], x[400:], y[400:])
    assert result["linear_top1"] == 100.0
    assert result["linear_top5"] == 100.0
    assert result["protocol"] == "fast"
    assert result["epochs"] == 100


def test_fast_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 64, generator=g)
    y = torch.randint(0, 5, (2000,), generator=g)
    result = linear_fast(x[:1000], y[:1000], x[1000:], y[1000:], config=FastLinearConfig(epochs=30))
    # seed 1: 22.9; the binomial sd at chance is 1.3 points, so +-6 is 4.7 sd
    assert 14.0 < result["linear_top1"] < 26.0  # chance = 20 %, 1000 test samples
    assert result["linear_top5"] == 100.0  # top-5 of 5 classes


def test_fast_is_deterministic_and_picks_an_lr_from_the_list():
    x, y = _blobs(2, 500, 16, 3, separation=2.0)
    config = FastLinearConfig(epochs=20, lrs=(0.1, 1.0, 10.0), seed=5)
    first = linear_fast(x[:300], y[:300], x[300:], y[300:], config=config)
    second = linear_fast(x[:300], y[:300], x[300:], y[300:], config=config)
    assert first == second
    assert first["best_lr"] in config.lrs
    assert set(first["val_top1_per_lr"]) == {"0.1", "1", "10"}
    best_val = first["val_top1_per_lr"][f"{first['best_lr']:g}"]
    assert best_val == max(first["val_top1_per_lr"].values())
    assert first["seed"] == 5


def test_fast_is_invariant_to_feature_scale_and_offset():
    x, y = _blobs(3, 400, 16, 4, separation=2.0)
    config = FastLinearConfig(epochs=10)
    plain = linear_fast(x[:300], y[:300], x[300:], y[300:], config=config)
    scaled = linear_fast(x[:300] * 1000 + 7, y[:300], x[300:] * 1000 + 7, y[300:], config=config)
    assert scaled["best_lr"] == plain["best_lr"]
    assert scaled["linear_top1"] == pytest.approx(plain["linear_top1"], abs=0.51)  # at most one test sample


def test_stacked_training_matches_nn_linear_with_torch_sgd():
    """The batched, hand-written SGD equals nn.Linear + torch.optim.SGD + per-step cosine, lr by lr."""
    x, y = _blobs(4, 70, 6, 3, separation=1.0)
    config = FastLinearConfig(epochs=3, batch_size=16, lrs=(0.05, 0.5), weight_decay=0.01)
    stack = _fit_linear_stack(x, y, 3, config.lrs, config)
    for i, lr in enumerate(config.lrs):
        generator = torch.Generator().manual_seed(config.seed)
        model = _init_linear(6, 3, generator)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
        total, step = config.epochs * math.ceil(70 / 16), 0
        for _ in range(config.epochs):
            order = torch.randperm(70, generator=generator)
            for start in range(0, 70, 16):
                batch = order[start : start + 16]
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
                step += 1
        torch.testing.assert_close(stack.weight[:, i, :], model.weight.detach().T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stack.bias[i], model.bias.detach(), rtol=1e-4, atol=1e-6)


def test_fast_errors_name_the_argument():
    x, y = _blobs(5, 40, 4, 2, separation=2.0)
    with pytest.raises(EvalInputError, match="test_features"):
        linear_fast(x, y, torch.ones(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(EvalInputError, match="train_labels"):
        linear_fast(x, y + 1, x, y, num_classes=2)
    with pytest.raises(EvalInputError, match="test_labels"):
        linear_fast(x, y, x[:5], y[:4])
    with pytest.raises(EvalInputError, match="holdout"):
        linear_fast(x[:2], y[:2], x, y)  # one sample per class: nothing can be held out
    with pytest.raises(EvalInputError, match="lrs"):
        FastLinearConfig(lrs=())
    with pytest.raises(EvalInputError, match="holdout"):
        FastLinearConfig(holdout=0.0)
    # a single lr needs no held-out part
    assert linear_fast(x[:2], y[:2], x, y, config=FastLinearConfig(lrs=(1.0,), holdout=0.0, epochs=2))[
        "val_top1_per_lr"
    ] == {}


# --------------------------------------------------------------------------------------------- linear_standard
class _ColourDataset(Dataset):
    """Tiny images whose class is their brightness (dark = 0, bright = 1), plus noise."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 2
        self.images = (self.labels[:, None, None, None] * 2.0 - 1.0) + 0.3 * torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": i}


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def test_standard_probe_runs_frozen_and_returns_sensible_values():
    net = _tiny_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train = DataLoader(_ColourDataset(32, 0), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(_ColourDataset(16, 1), batch_size=8)
    config = LinearConfig(epochs=2, lr=1.0, schedule="cosine")
    result = linear_standard(net, train, test, num_classes=2, config=config)
    assert set(result) >= {"linear_top1", "linear_top5", "protocol", "epochs", "lr", "schedule", "train_loss"}
    assert result["protocol"] == "standard" and result["epochs"] == 2 and result["schedule"] == "cosine"
    assert result["lr"] == pytest.approx(1.0 * 8 / 256)
    assert result["linear_top5"] == 100.0  # two classes
    # measured 100.0
    assert result["linear_top1"] >= 90.0  # brightness is linearly readable from the frozen random features
    assert math.isfinite(result["train_loss"])
    # the backbone is untouched: same weights, same BN running stats; its mode and flags are restored
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert net.training
    assert all(p.requires_grad for p in net.parameters())


class _Affine(nn.Module):
    """A per-dimension affine change of 8-d features (scales 3..24, shift -2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.arange(1.0, 9.0) * 3 - 2


class _Counting(_ColourDataset):
    reads = 0

    def __getitem__(self, i: int) -> dict:
        type(self).reads += 1
        return super().__getitem__(i)


def _probe_loss(feature_bn: bool, affine: bool) -> dict:
    net = nn.Sequential(_tiny_net(), _Affine()) if affine else _tiny_net()
    train = DataLoader(_ColourDataset(16, 2), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same head initialisation for every call
    return linear_standard(net, train, train, num_classes=2, config=LinearConfig(epochs=1, feature_bn=feature_bn))


def test_standard_probe_feature_bn_and_feature_dim():
    # feature_bn standardises every feature dimension before the linear layer: an affine change of the features
    # leaves the probe's training unchanged (up to BatchNorm's eps); without it the loss changes (0.74 -> 0.32)
    plain, changed = _probe_loss(True, False), _probe_loss(True, True)
    assert changed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
    assert plain["lr"] == pytest.approx(30.0 * 8 / 256)
    raw, raw_changed = _probe_loss(False, False), _probe_loss(False, True)
    assert abs(raw_changed["train_loss"] - raw["train_loss"]) > 0.2 * raw["train_loss"]
    # feature_dim given: no batch is read to infer it, and the head is built with that size
    counting = _Counting(16, 2)
    loader = DataLoader(counting, batch_size=8)
    _Counting.reads = 0
    linear_standard(_tiny_net(), loader, loader, num_classes=2, config=LinearConfig(epochs=1), feature_dim=8)
    assert _Counting.reads == 16 + 16  # one epoch of training and one test pass
    _Counting.reads = 0
    linear_standard(_tiny_net(), loader, loader, num_classes=2, config=LinearConfig(epochs=1))
    assert _Counting.reads == 8 + 16 + 16  # one more batch to infer the dimension
    with pytest.raises(RuntimeError):  # a wrong size reaches the head
        linear_standard(_tiny_net(), loader, loader, num_classes=2, config=LinearConfig(epochs=1), feature_dim=7)


def test_linear_config_schedules():
    step = LinearConfig()
    assert [step.lr_at(e, 30.0) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    short = LinearConfig(epochs=10, milestones=(0.6, 0.8))
    assert [short.lr_at(e, 1.0) for e in (5, 6, 8)] == pytest.approx([1.0, 0.1, 0.01])
    cosine = LinearConfig(epochs=4, schedule="cosine")
    assert [cosine.lr_at(e, 1.0) for e in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    with pytest.raises(EvalInputError, match="schedule"):
        LinearConfig(schedule="linear")


def test_standard_probe_refuses_sharded_loaders_and_bad_batches():
    data = _ColourDataset(8, 3)
    sharded = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    plain = DataLoader(data, batch_size=4)
    with pytest.raises(EvalInputError, match="train_loader.*single-process"):
        linear_standard(_tiny_net(), sharded, plain, num_classes=2, config=LinearConfig(epochs=1))
    with pytest.raises(EvalInputError, match="label"):
        linear_standard(_tiny_net(), plain, plain, num_classes=1, config=LinearConfig(epochs=1))


# -------------------------------------------------------------------------------------------- extract_features
class _Plain(Dataset):
    """Items without an index: label = 10 + i."""

    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(n))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": 10 + i}


def test_extract_features_restores_dataset_order_from_index():
    data = _ColourDataset(13, 4)
    net = _tiny_net().eval()
    shuffled = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    features, labels = extract_features(net, shuffled, channels_last=True)
    with torch.no_grad():
        expected = net(data.images)
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert labels.tolist() == data.labels.tolist()


def test_extract_features_keeps_loader_order_without_index_and_uses_eval_mode():
    data = _Plain(9)
    net = _tiny_net()
    net.train()
    stats = net[1].running_mean.clone()
    features, labels = extract_features(net, DataLoader(data, batch_size=4))
    assert labels.tolist() == [10 + i for i in range(9)]
    with torch.no_grad():
        expected = net.eval()(data.images)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(net[1].running_mean, stats)  # eval mode during extraction: BN stats untouched


def test_extract_features_errors():
    data = _Plain(4)
    with pytest.raises(EvalInputError, match=r"\[B, D\]"):
        extract_features(lambda images: images, DataLoader(data, batch_size=2))
    with pytest.raises(EvalInputError, match="'label'"):
        extract_features(lambda images: images.flatten(1), [{"image": torch.zeros(2, 3, 4, 4)}])
    repeated = [{"image": torch.zeros(2, 3, 4, 4), "label": [0, 1], "index": [0, 0]}]
    with pytest.raises(EvalInputError, match="index 0"):
        extract_features(lambda images: images.flatten(1), repeated)
    with pytest.raises(EvalInputError, match="no samples"):
        extract_features(lambda images: images.flatten(1), [])
