"""Per-iteration schedules: learning rate, weight decay, EMA momentum, teacher temperature.

A schedule here is an explicit array with one value per optimisation step (or per epoch), built once before
training and indexed by progress — the style of DINO's ``utils.cosine_scheduler``
(docs/methods/dino.md §Schedules): you can print it, plot it and test it, and resuming at step ``s`` reads exactly
the value a straight run would have read.

Conventions (docs/design.md §Schedules):

* Every length (warm-up, ramp, milestone) may be given in epochs or as a fraction of the run, so that a short
  run on this machine keeps the shape of the paper's schedule; see :func:`resolve_length`.
* ``Progress.step`` is the global, 0-based optimisation step; a per-step schedule is indexed by it, a per-epoch
  schedule (DINO/SCFS teacher temperature, MoCo's per-epoch cosine and 60/80 steps) by ``Progress.epoch``.

The released codes' schedules map onto the builders below as follows:

* DINO / SCFS lr: ``cosine_schedule(lr, min_lr, K, warmup_steps=10 ep, warmup_start=0)``
  (docs/methods/dino.md §Schedules).
* DINO / SCFS / BYOL / SoCo EMA momentum: ``cosine_schedule(m0, 1.0, K)`` — DINO's ``cosine_scheduler(m0, 1,
  ...)``; at every step ``k = 0..K-1`` it equals BYOL's and SoCo's ``1 - (1 - m0)(cos(pi k / K) + 1) / 2``
  (docs/methods/soco.md), the value for ``k = K`` is never applied. It is the only EMA cosine in semssl
  (``Method.schedules`` declares it, the engine builds it).
* DINO / SCFS teacher temperature: per-epoch ``linear_then_constant(0.04, 0.07, 50, epochs)``
  (docs/methods/scfs.md §Schedules).
* MoCo-v2 ``--cos``: per-epoch ``cosine_schedule(lr, 0, epochs)`` — MoCo's ``0.5 (1 + cos(pi e / E))`` is exactly
  DINO's formula with ``n = E`` (docs/methods/mocov2.md §Schedules).
* SoCo lr: ``cosine_schedule(lr, 1e-6, K, warmup_steps=10 ep, warmup_start=lr / 100)`` (docs/methods/soco.md). SoCo's
  ``GradualWarmupScheduler`` reaches the peak one iteration later than DINO's ``linspace`` warm-up; we keep the
  DINO convention for every method (a one-iteration offset at the end of warm-up, nothing else).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from semssl.errors import ScheduleError

__all__ = [
    "Progress",
    "Schedule",
    "ScheduleConfig",
    "ScheduleError",
    "build_schedule",
    "constant_schedule",
    "cosine_schedule",
    "linear_then_constant",
    "resolve_length",
    "step_schedule",
]

ScheduleKind = Literal["cosine", "step", "constant", "linear"]
ScheduleUnit = Literal["step", "epoch"]
LengthSpec = float | int | str

_KINDS: tuple[str, ...] = ("cosine", "step", "constant", "linear")
_UNITS: tuple[str, ...] = ("step", "epoch")
_LENGTH_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|epoch|epochs|%|step|steps)?\s*$")



# --------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Where training is: handed by the engine to ``Method.training_step`` and to every schedule.

    ``step`` is the global 0-based optimisation step (optimizer updates, not micro-batches); ``epoch`` is the
    0-based epoch that step belongs to; ``total_steps`` = epochs x ``steps_per_epoch`` of the whole run.
    """

    epoch: int
    step: int
    steps_per_epoch: int
    total_steps: int
    #: this step's value of every schedule the engine runs (``lr``, ``wd``, ``momentum``, a method's own ones)
    values: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("epoch", "step", "steps_per_epoch", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ScheduleError(f"Progress.{name} must be an integer, got {value!r}")
        if self.epoch < 0 or self.step < 0:
            raise ScheduleError(f"Progress epoch/step must be >= 0, got epoch={self.epoch}, step={self.step}")
        if self.steps_per_epoch < 1 or self.total_steps < 1:
            raise ScheduleError(
                f"Progress steps_per_epoch and total_steps must be >= 1, got "
                f"steps_per_epoch={self.steps_per_epoch}, total_steps={self.total_steps}"
            )

    @property
    def fraction(self) -> float:
        """Fraction of the run completed before this step: ``step / total_steps`` (0 at the first step)."""
        return self.step / self.total_steps

    @property
    def epoch_float(self) -> float:
        """Fractional epoch of this step, ``step / steps_per_epoch`` (e.g. 2.5 = half-way through epoch 2)."""
        return self.step / self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        """Number of epochs in the run (a trailing partial epoch counts as one)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


# --------------------------------------------------------------------------------------------------------------
# Lengths given in epochs or as fractions of the run
# --------------------------------------------------------------------------------------------------------------
def _round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even: 2.5 -> 2)."""
    return int(math.floor(x + 0.5))


def resolve_length(value: LengthSpec, steps_per_epoch: int, total_steps: int) -> int:
    """Convert a schedule length from a recipe into a number of steps.

    Accepted forms:

    * ``int >= 0`` — epochs: ``10`` -> ``10 * steps_per_epoch``.
    * ``float >= 1`` — epochs, may be fractional: ``2.5`` -> ``round(2.5 * steps_per_epoch)``.
    * ``0 <= float < 1`` — fraction of the run: ``0.05`` -> ``round(0.05 * total_steps)``.
    * ``str``: ``"10ep"`` / ``"10 epochs"`` (epochs), ``"5%"`` (percent of the run, 0-100),
      ``"500steps"`` / ``"500 step"`` (steps, an integer), or a bare number read as above (``"0.05"``, ``"10"``).

    Decision: the float ``1.0`` means one epoch, not the whole run (use ``"100%"`` for that); ``0`` means no
    warm-up. Results are rounded half-up, so a non-zero fraction of a tiny run can round to 0 steps.
    For per-epoch schedules call it with ``steps_per_epoch=1`` and ``total_steps=number of epochs``.

    Raises:
        ScheduleError: negative, non-finite or unparsable values, booleans, or bad step counts.
    """
    for name, count in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ScheduleError(f"resolve_length: {name} must be a positive integer, got {count!r}")
    if isinstance(value, str):
        return _resolve_string_length(value, steps_per_epoch, total_steps)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ScheduleError(
            f"schedule length {value!r} is neither a number of epochs, a fraction of the run in [0, 1), "
            "nor a string like '10ep', '5%' or '500steps'"
        )
    if not math.isfinite(float(value)) or value < 0:
        raise ScheduleError(f"schedule length {value!r} must be a finite number >= 0")
    if isinstance(value, (int, np.integer)):
        return int(value) * steps_per_epoch
    if value < 1.0:
        return _round_half_up(float(value) * total_steps)
    return _round_half_up(float(value) * steps_per_epoch)


def _resolve_string_length(text: str, steps_per_epoch: int, total_steps: int) -> int:
    """Parse the string forms of :func:`resolve_length`."""
    match = _LENGTH_RE.match(text)
    if match is None:
        raise ScheduleError(
            f"schedule length {text!r} is not understood: use epochs ('10ep', '2.5ep', 10), "
            "a fraction of the run ('5%', 0.05) or steps ('500steps')"
        )
    number_text, unit = match.group(1), match.group(2)
    number = float(number_text)
    if unit is None:
        is_integer = re.fullmatch(r"\s*[0-9]+\s*", number_text) is not None
        return resolve_length(int(number_text) if is_integer else number, steps_per_epoch, total_steps)
    if unit.startswith("ep"):
        return _round_half_up(number * steps_per_epoch)
    if unit == "%":
        if number > 100.0:
            raise ScheduleError(f"schedule length {text!r}: a percentage of the run must be in [0, 100]")
        return _round_half_up(number / 100.0 * total_steps)
    if not number.is_integer():
        raise ScheduleError(f"schedule length {text!r}: a number of steps must be an integer")
    return int(number)


# --------------------------------------------------------------------------------------------------------------
# Array builders
# --------------------------------------------------------------------------------------------------------------
def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ScheduleError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ScheduleError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ScheduleError(f"{name} must be finite, got {value!r}")


def _warmup(start: float, end: float, warmup_steps: int) -> np.ndarray:
    """DINO's linear warm-up: ``linspace(start, end, W)`` — the last warm-up step already holds ``end``."""
    return np.linspace(float(start), float(end), int(warmup_steps), dtype=np.float64)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up then half-cosine decay, value-for-value equal to DINO's ``utils.cosine_scheduler``.

    With ``W = warmup_steps`` and ``n = total_steps - W``::

        values[:W]   = linspace(warmup_start, base, W)
        values[W + i] = final + 0.5 (base - final) (1 + cos(pi i / n)),   i = 0 .. n-1

    Decision: the cosine divides by ``n`` (DINO's ``len(iters)``), not ``n - 1``, so the last value is slightly
    above ``final`` and ``final`` itself would be the value at step ``total_steps`` — exactly as the released
    DINO/SCFS code and PyTorch's ``CosineAnnealingLR`` (SoCo, MoCo's per-epoch cosine) behave.
    """
    _check_finite("base", base)
    _check_finite("final", final)
    _check_finite("warmup_start", warmup_start)
    _check_count("total_steps", total_steps, minimum=1)
    _check_count("warmup_steps", warmup_steps)
    if warmup_steps > total_steps:
        raise ScheduleError(f"warmup_steps={warmup_steps} exceeds total_steps={total_steps}")
    n = total_steps - warmup_steps
    i = np.arange(n, dtype=np.float64)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate((_warmup(warmup_start, base, warmup_steps), decay))


def step_schedule(
    base: float, milestones_steps: Sequence[int], gamma: float = 0.1, *, total_steps: int
) -> np.ndarray:
    """Piecewise-constant decay: ``values[i] = base * gamma ** (number of milestones m with m <= i)``.

    This is MoCo's ``lr *= 0.1 if epoch >= milestone`` (linear probe steps at 60/80,
    docs/methods/mocov2.md §Linear protocol) and PyTorch's ``MultiStepLR``. Milestones are absolute positions
    from the start of the run, strictly increasing and inside ``[0, total_steps)`` — a milestone past the end would
    silently do nothing, so it is rejected (usually a recipe whose epochs were shortened without converting its
    milestones to fractions).
    """
    _check_finite("base", base)
    _check_finite("gamma", gamma)
    _check_count("total_steps", total_steps, minimum=1)
    for raw in milestones_steps:
        _check_count("milestone", raw)
    milestones = [int(m) for m in milestones_steps]
    for m in milestones:
        if m >= total_steps:
            raise ScheduleError(f"milestone {m} is past the end of the run (total_steps={total_steps})")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ScheduleError(f"milestones must be strictly increasing, got {milestones}")
    drops = np.searchsorted(np.asarray(milestones, dtype=np.int64), np.arange(total_steps), side="right")
    return float(base) * np.power(float(gamma), drops).astype(np.float64)


def constant_schedule(value: float, total_steps: int) -> np.ndarray:
    """``total_steps`` copies of ``value`` (e.g. MoCo's key momentum 0.999, DINO-RN50's constant wd 1e-4)."""
    _check_finite("value", value)
    _check_count("total_steps", total_steps, minimum=1)
    return np.full(total_steps, float(value), dtype=np.float64)


def linear_then_constant(start: float, end: float, ramp_steps: int, total_steps: int) -> np.ndarray:
    """``linspace(start, end, ramp_steps)`` then ``end`` — DINO/SCFS teacher temperature (0.04 -> 0.07 over 50
    epochs, looked up per epoch; docs/methods/scfs.md §Schedules). The last ramp entry already equals ``end``, as
    in DINO.
    """
    _check_finite("start", start)
    _check_finite("end", end)
    _check_count("total_steps", total_steps, minimum=1)
    _check_count("ramp_steps", ramp_steps)
    if ramp_steps > total_steps:
        raise ScheduleError(f"ramp_steps={ramp_steps} exceeds total_steps={total_steps}")
    tail = np.full(total_steps - ramp_steps, float(end), dtype=np.float64)
    return np.concatenate((_warmup(start, end, ramp_steps), tail))


# --------------------------------------------------------------------------------------------------------------
# Schedule object and its config
# --------------------------------------------------------------------------------------------------------------
class Schedule:
    """A precomputed schedule: ``values`` (read-only array) plus how to index it.

    ``schedule(progress)`` reads ``values[progress.step]`` for a per-step schedule and
    ``values[progress.epoch]`` for a per-epoch one. ``schedule(k)`` with an integer always means global step
    ``k`` (a per-epoch schedule maps it to epoch ``k // steps_per_epoch``). Out-of-range lookups raise, so a
    run longer than its schedule fails loudly instead of silently reusing the last value.
    """

    def __init__(self, values: np.ndarray, per: ScheduleUnit = "step", steps_per_epoch: int = 1) -> None:
        if per not in _UNITS:
            raise ScheduleError(f"Schedule per={per!r} must be one of {_UNITS}")
        _check_count("steps_per_epoch", steps_per_epoch, minimum=1)
        array = np.array(values, dtype=np.float64, copy=True)
        if array.ndim != 1 or array.size == 0:
            raise ScheduleError(f"Schedule values must be a non-empty 1-D array, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ScheduleError("Schedule values contain NaN or infinity")
        array.setflags(write=False)
        self._values = array
        self.per: ScheduleUnit = per
        self.steps_per_epoch = int(steps_per_epoch)

    @property
    def values(self) -> np.ndarray:
        """The whole schedule, one entry per step (or per epoch when ``per == "epoch"``)."""
        return self._values

    def __len__(self) -> int:
        return int(self._values.size)

    def index(self, progress_or_step: Progress | int) -> int:
        """Index into :attr:`values` for a progress or a global step (see the class docstring)."""
        if isinstance(progress_or_step, Progress):
            return progress_or_step.epoch if self.per == "epoch" else progress_or_step.step
        if isinstance(progress_or_step, bool) or not isinstance(progress_or_step, (int, np.integer)):
            raise ScheduleError(f"a schedule is indexed by a Progress or an int step, got {progress_or_step!r}")
        step = int(progress_or_step)
        if step < 0:
            raise ScheduleError(f"step must be >= 0, got {step}")
        return step // self.steps_per_epoch if self.per == "epoch" else step

    def __call__(self, progress_or_step: Progress | int) -> float:
        i = self.index(progress_or_step)
        if i >= self._values.size:
            raise ScheduleError(
                f"{self.per} {i} is past the end of this {len(self)}-{self.per} schedule "
                "(was the run made longer than the schedule it was built for?)"
            )
        return float(self._values[i])

    def __repr__(self) -> str:
        v = self._values
        return f"Schedule(per={self.per!r}, len={v.size}, first={v[0]:.6g}, last={v[-1]:.6g})"


@dataclass(kw_only=True)
class ScheduleConfig:
    """Recipe entry for one schedule (lr, weight decay, EMA momentum, teacher temperature).

    Fields:
        kind: ``cosine`` (DINO cosine to ``final``), ``step`` (``base * gamma**k`` after each milestone),
            ``constant`` (``base``), ``linear`` (``base -> final`` over ``ramp``, then ``final``).
        base: peak / initial value (after warm-up).
        final: end value of ``cosine`` and ``linear``.
        warmup: warm-up length (epochs or fraction of the run, :func:`resolve_length`); every kind starts with
            ``linspace(warmup_start, base, warmup)``. For ``cosine`` and ``linear`` the decay fills the rest of
            the run (DINO); for ``step`` and ``constant`` warm-up replaces the first steps and milestones stay
            absolute.
        warmup_start: first warm-up value (DINO: 0; SoCo: lr / 100).
        milestones: ``step`` kind — positions of the drops, each an epoch count or fraction of the run.
        gamma: ``step`` kind — factor per milestone.
        ramp: ``linear`` kind — length of the ramp after warm-up; ``None`` = the rest of the run.
            Decision: this field is an addition to the brief's list so that the teacher-temperature ramp
            (``kind: linear, base: 0.04, final: 0.07, ramp: 50, per: epoch``) and a linear decay over the whole
            run (``ramp: null``) are both expressible without overloading ``warmup``.
        per: ``step`` (per-iteration, the default for lr/wd/EMA in every released code) or ``epoch``.
    """

    kind: ScheduleKind = "cosine"
    base: float
    final: float = 0.0
    warmup: LengthSpec = 0
    warmup_start: float = 0.0
    milestones: tuple[LengthSpec, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    ramp: LengthSpec | None = None
    per: ScheduleUnit = "step"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ScheduleError(f"schedule kind {self.kind!r} must be one of {_KINDS}")
        if self.per not in _UNITS:
            raise ScheduleError(f"schedule per={self.per!r} must be one of {_UNITS}")
        for name in ("base", "final", "warmup_start", "gamma"):
            _check_finite(f"schedule {name}", getattr(self, name))
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Sequence):
            raise ScheduleError(f"schedule milestones must be a list of lengths, got {self.milestones!r}")
        self.milestones = tuple(self.milestones)
        if self.kind == "step" and not self.milestones:
            raise ScheduleError("schedule kind 'step' needs at least one milestone")
        if self.kind != "step" and self.milestones:
            raise ScheduleError(f"schedule milestones {self.milestones!r} are only used by kind 'step'")
        if self.kind != "linear" and self.ramp is not None:
            raise ScheduleError(f"schedule ramp={self.ramp!r} is only used by kind 'linear'")


def build_schedule(cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> Schedule:
    """Build the array a :class:`ScheduleConfig` describes for a run of ``total_steps`` optimisation steps.

    A per-epoch schedule has one entry per epoch (``ceil(total_steps / steps_per_epoch)``) and its lengths are
    resolved in epochs; a per-step schedule has ``total_steps`` entries.
    """
    _check_count("steps_per_epoch", steps_per_epoch, minimum=1)
    _check_count("total_steps", total_steps, minimum=1)
    if cfg.per == "epoch":
        unit_per_epoch, length = 1, math.ceil(total_steps / steps_per_epoch)
    else:
        unit_per_epoch, length = steps_per_epoch, total_steps

    def steps(value: LengthSpec, what: str) -> int:
        if cfg.per == "epoch" and isinstance(value, str) and value.rstrip().endswith(("step", "steps")):
            raise ScheduleError(f"schedule {what}={value!r}: a per-epoch schedule cannot take a length in steps")
        n = resolve_length(value, unit_per_epoch, length)
        if n > length:
            raise ScheduleError(
                f"schedule {what}={value!r} resolves to {n} {cfg.per}s, longer than the run ({length} {cfg.per}s)"
            )
        return n

    warmup = steps(cfg.warmup, "warmup")
    values = _build_values(cfg, warmup, length, steps)
    return Schedule(values, per=cfg.per, steps_per_epoch=steps_per_epoch)


def _build_values(
    cfg: ScheduleConfig, warmup: int, length: int, steps: Callable[[LengthSpec, str], int]
) -> np.ndarray:
    """The array of one config kind; ``steps`` resolves a length spec in the schedule's unit."""
    if cfg.kind == "cosine":
        return cosine_schedule(cfg.base, cfg.final, length, warmup, cfg.warmup_start)
    head = _warmup(cfg.warmup_start, cfg.base, warmup)
    if cfg.kind == "linear":
        rest = length - warmup
        ramp = rest if cfg.ramp is None else steps(cfg.ramp, "ramp")
        if ramp > rest:
            raise ScheduleError(f"schedule ramp={cfg.ramp!r} ({ramp}) does not fit after warm-up ({rest} left)")
        if rest == 0:
            return head
        return np.concatenate((head, linear_then_constant(cfg.base, cfg.final, ramp, rest)))
    if cfg.kind == "constant":
        body = constant_schedule(cfg.base, length)
    else:
        milestones = [steps(m, "milestone") for m in cfg.milestones]
        if milestones and milestones[0] < warmup:
            raise ScheduleError(f"schedule milestone {cfg.milestones[0]!r} falls inside the warm-up ({warmup})")
        body = step_schedule(cfg.base, milestones, cfg.gamma, total_steps=length)
    body[:warmup] = head
    return body
