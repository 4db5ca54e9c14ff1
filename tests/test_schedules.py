"""Tests for semssl.schedules: DINO parity, length resolution, step/EMA/teacher-temperature shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semssl.schedules import (
    Progress,
    Schedule,
    ScheduleConfig,
    ScheduleError,
    build_schedule,
    constant_schedule,
    cosine_schedule,
    linear_then_constant,
    resolve_length,
    step_schedule,
)


def dino_reference(base: float, final: float, epochs: int, niter: int, warmup_epochs: int, start: float) -> list[float]:
    """DINO ``utils.cosine_scheduler`` transcribed from its definition, element by element:
    warm-up = ``warmup_epochs * niter`` points evenly spaced from ``start`` to ``base`` inclusive; then, for
    ``i = 0 .. n-1`` with ``n`` the remaining iterations, ``final + 0.5 (base - final)(1 + cos(pi i / n))``.
    """
    total, warm = epochs * niter, warmup_epochs * niter
    out: list[float] = []
    for it in range(warm):
        out.append(start if warm == 1 else start + (base - start) * it / (warm - 1))
    n = total - warm
    for i in range(n):
        out.append(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n)))
    return out


@pytest.mark.parametrize(
    "base, final, epochs, niter, warmup_epochs, start",
    [
        (0.1, 0.0048, 20, 7, 10, 0.0),  # SCFS lr shape (10-epoch warm-up to 0.1, cosine to min_lr)
        (0.03, 1e-6, 5, 3, 0, 0.0),  # DINO-RN50 lr without warm-up
        (1.0, 1e-6, 4, 5, 1, 0.01),  # SoCo: warm-up from lr/100
        (1e-4, 1e-4, 3, 4, 0, 0.0),  # constant wd written as a cosine (SCFS)
        (0.996, 1.0, 6, 2, 0, 0.0),  # DINO EMA momentum
        (0.5, 0.0, 3, 1, 1, 0.2),  # single warm-up step: linspace(start, base, 1) == [start]
    ],
)
def test_cosine_matches_dino(base, final, epochs, niter, warmup_epochs, start) -> None:
    ours = cosine_schedule(base, final, epochs * niter, warmup_epochs * niter, start)
    ref = dino_reference(base, final, epochs, niter, warmup_epochs, start)
    assert ours.shape == (epochs * niter,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_cosine_ends_and_warmup_shape() -> None:
    values = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    np.testing.assert_allclose(values[:4], [0.0, 1 / 3, 2 / 3, 1.0])
    assert values[4] == pytest.approx(1.0)  # cosine starts at base: base appears twice, as in DINO
    # DINO divides by n (= 6), not n - 1: the last value stays above `final`.
    assert values[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6)))
    assert values[-1] > 0.1
    assert np.all(np.diff(values[4:]) < 0)


def test_cosine_rejects_bad_arguments() -> None:
    with pytest.raises(ScheduleError, match="warmup_steps=11"):
        cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=11)
    with pytest.raises(ScheduleError, match="total_steps"):
        cosine_schedule(1.0, 0.0, total_steps=0)
    with pytest.raises(ScheduleError, match="base"):
        cosine_schedule(float("nan"), 0.0, total_steps=5)


# ---------------------------------------------------------------------------------------------------- lengths
@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0),
        (10, 100),  # int: epochs
        (2.5, 25),  # float >= 1: epochs
        (1.0, 10),  # 1.0 is one epoch, not the whole run
        (0.05, 10),  # float < 1: fraction of the 200-step run
        (0.0025, 1),  # 0.5 step rounds half up
        ("10ep", 100),
        ("2.5 epochs", 25),
        ("1epoch", 10),
        ("5%", 10),
        ("100%", 200),
        ("500steps", 500),
        ("7 step", 7),
        ("0.05", 10),
        ("10", 100),
        ("3.0", 30),
        (np.int64(3), 30),
    ],
)
def test_resolve_length(value, expected) -> None:
    assert resolve_length(value, steps_per_epoch=10, total_steps=200) == expected


@pytest.mark.parametrize(
    "value", [-1, -0.1, "abc", "-3ep", "150%", "2.5steps", "10 lightyears", True, None, float("nan"), float("inf"), [1]]
)
def test_resolve_length_rejects_garbage(value) -> None:
    with pytest.raises(ScheduleError) as info:
        resolve_length(value, steps_per_epoch=10, total_steps=200)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_resolve_length_rejects_bad_run_sizes() -> None:
    with pytest.raises(ScheduleError, match="steps_per_epoch"):
        resolve_length(1, steps_per_epoch=0, total_steps=10)


# ---------------------------------------------------------------------------------------------- other shapes
def test_step_schedule_milestones() -> None:
    values = step_schedule(1.0, [3, 6], gamma=0.1, total_steps=8)
    np.testing.assert_allclose(values, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ScheduleError, match="milestone 8"):
        step_schedule(1.0, [3, 8], total_steps=8)
    with pytest.raises(ScheduleError, match="strictly increasing"):
        step_schedule(1.0, [6, 3], total_steps=8)
    with pytest.raises(ScheduleError, match="milestone"):
        step_schedule(1.0, [2.5], total_steps=8)


def test_linear_then_constant_is_dino_teacher_temperature() -> None:
    values = linear_then_constant(0.04, 0.07, ramp_steps=50, total_steps=200)
    expected = np.concatenate((np.linspace(0.04, 0.07, 50), np.full(150, 0.07)))
    np.testing.assert_allclose(values, expected)
    assert values[0] == 0.04 and values[49] == pytest.approx(0.07)
    np.testing.assert_allclose(linear_then_constant(0.04, 0.07, 0, 3), [0.07] * 3)
    with pytest.raises(ScheduleError, match="ramp_steps=5"):
        linear_then_constant(0.04, 0.07, 5, 3)


def test_constant_schedule() -> None:
    np.testing.assert_array_equal(constant_schedule(0.999, 4), [0.999] * 4)


def test_ema_cosine_is_byol_soco_formula_and_dino() -> None:
    """The EMA cosine (``cosine_schedule(m0, 1, K)``) is BYOL's / SoCo's ``1 - (1 - m0)(cos(pi k/K) + 1)/2`` at
    every applied step k = 0..K-1, and DINO's cosine_scheduler."""
    k_total = 12
    m = cosine_schedule(0.99, 1.0, k_total)
    byol = [1 - (1 - 0.99) * (math.cos(math.pi * k / k_total) + 1) / 2 for k in range(k_total)]
    np.testing.assert_allclose(m, byol, rtol=0, atol=1e-15)
    assert m[0] == pytest.approx(0.99) and m[k_total // 2] == pytest.approx(0.995)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0
    np.testing.assert_allclose(m, dino_reference(0.99, 1.0, 4, 3, 0, 0.0), atol=1e-15)


# ---------------------------------------------------------------------------------------------- Schedule objects
def test_progress_properties_and_validation() -> None:
    p = Progress(epoch=2, step=25, steps_per_epoch=10, total_steps=100)
    assert p.fraction == 0.25 and p.epoch_float == 2.5 and p.num_epochs == 10
    with pytest.raises(ScheduleError, match="step"):
        Progress(epoch=0, step=-1, steps_per_epoch=10, total_steps=100)
    with pytest.raises(ScheduleError, match="steps_per_epoch"):
        Progress(epoch=0, step=0, steps_per_epoch=0, total_steps=100)


def test_per_epoch_lookup_teacher_temperature() -> None:
    cfg = ScheduleConfig(kind="linear", base=0.04, final=0.07, ramp="50%", per="epoch")
    sched = build_schedule(cfg, steps_per_epoch=4, total_steps=24)
    np.testing.assert_allclose(sched.values, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])
    assert sched(Progress(epoch=1, step=5, steps_per_epoch=4, total_steps=24)) == pytest.approx(0.055)
    assert sched(5) == pytest.approx(0.055)  # an int is a global step: step 5 is in epoch 1
    assert sched(23) == pytest.approx(0.07)
    with pytest.raises(ScheduleError, match="past the end"):
        sched(24)


def test_per_step_build_matches_functions() -> None:
    spe, total = 5, 50
    lr = build_schedule(ScheduleConfig(base=0.1, final=0.0048, warmup="2ep"), spe, total)
    np.testing.assert_allclose(lr.values, cosine_schedule(0.1, 0.0048, total, 10))
    assert lr(Progress(epoch=1, step=9, steps_per_epoch=spe, total_steps=total)) == pytest.approx(0.1)
    with pytest.raises(ScheduleError, match="past the end"):
        lr(total)

    step = build_schedule(ScheduleConfig(kind="step", base=1.0, milestones=(6, 0.8), warmup=0.1), spe, total)
    assert step.values[0] == 0.0 and step.values[4] == pytest.approx(1.0)
    assert step(29) == pytest.approx(1.0) and step(30) == pytest.approx(0.1) and step(40) == pytest.approx(0.01)

    const = build_schedule(ScheduleConfig(kind="constant", base=0.07, warmup=3, warmup_start=0.04, per="epoch"), 2, 20)
    np.testing.assert_allclose(const.values, linear_then_constant(0.04, 0.07, 3, 10))

    decay = build_schedule(ScheduleConfig(kind="linear", base=1.0, final=0.0, warmup=1), 2, 10)
    np.testing.assert_allclose(decay.values, [0.0, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0])

    ema = build_schedule(ScheduleConfig(base=0.996, final=1.0), spe, total)
    np.testing.assert_allclose(ema.values, [1 - 0.004 * (math.cos(math.pi * k / total) + 1) / 2 for k in range(total)])


def test_schedule_values_are_read_only() -> None:
    sched = Schedule(np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        sched.values[0] = 5.0
    assert len(sched) == 2 and "len=2" in repr(sched)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "poly", "base": 1.0}, "poly"),
        ({"base": 1.0, "per": "batch"}, "batch"),
        ({"kind": "step", "base": 1.0}, "milestone"),
        ({"base": 1.0, "milestones": (3,)}, "only used by kind 'step'"),
        ({"base": 1.0, "ramp": 3}, "only used by kind 'linear'"),
        ({"base": "0.1"}, "base"),
    ],
)
def test_schedule_config_rejects_bad_fields(kwargs, message) -> None:
    with pytest.raises(ScheduleError, match=message):
        ScheduleConfig(**kwargs)


def test_build_schedule_rejects_lengths_that_do_not_fit() -> None:
    with pytest.raises(ScheduleError, match="warmup=20"):
        build_schedule(ScheduleConfig(base=1.0, warmup=20), steps_per_epoch=2, total_steps=20)
    with pytest.raises(ScheduleError, match="inside the warm-up"):
        build_schedule(ScheduleConfig(kind="step", base=1.0, milestones=(1,), warmup=2), 2, 20)
    with pytest.raises(ScheduleError, match="ramp"):
        build_schedule(ScheduleConfig(kind="linear", base=1.0, warmup=5, ramp=6), 1, 10)
    with pytest.raises(ScheduleError, match="per-epoch schedule cannot take a length in steps"):
        build_schedule(ScheduleConfig(base=1.0, warmup="3steps", per="epoch"), 2, 20)
    with pytest.raises(ScheduleError, match="Progress or an int"):
        Schedule(np.ones(3))(1.5)
