"""Every error semssl raises on purpose, in one place.

Each one is a :class:`SemsslError` (so the command line can turn any of them into one clear line) and keeps the
built-in base it always had (``ValueError`` for bad input, ``FloatingPointError`` for a diverging loss), so
``except ValueError`` around a call keeps working. Messages name the file, key or value at fault. The one
exception that is no error, :class:`RunPreempted` (a run stopped by a signal after its checkpoint), lives here too.
"""

from __future__ import annotations


class SemsslError(Exception):
    """Base of every error semssl raises on purpose."""


class ConfigError(SemsslError, ValueError):
    """A recipe, override or option that does not fit the config tree (names the key at fault)."""


class DataError(SemsslError, ValueError):
    """A dataset path, file or annotation that cannot be used (names the file or entry at fault)."""


class ImageDecodeError(DataError):
    """One image file cannot be decoded (the source skips it or raises, per ``data.on_error``); ``path`` and
    ``reason`` say which and why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image '{self.path}': {reason}")


class SyntheticDataError(SemsslError, RuntimeError):
    """The built-in dataset cannot be generated or its folder is not the generator's."""


class SynthConfigError(ConfigError):
    """A setting of the built-in data generator is invalid."""


class RecipeError(ConfigError):
    """An unknown photometric recipe name or an invalid recipe parameter."""


class ViewError(ConfigError):
    """A view specification, or a geometry/box argument, is invalid."""


class SampleError(DataError):
    """A source sample (or a list of transformed samples given to the collate) is malformed."""


class OptimError(ConfigError):
    """An optimiser setting is invalid; the message names the option and the value at fault."""


class ScheduleError(ConfigError):
    """A schedule specification or lookup is invalid; the message names the field and the value at fault."""


class CheckpointError(SemsslError, ValueError):
    """A checkpoint that cannot be read or does not hold what is asked of it (names the file)."""


class EvalInputError(SemsslError, ValueError):
    """Features, labels or a batch handed to an evaluation protocol are malformed."""


class BenchError(SemsslError, ValueError):
    """A benchmark setting that cannot be measured (names the option at fault)."""


class NonFiniteLossError(SemsslError, FloatingPointError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


class IncompleteRunError(SemsslError, RuntimeError):
    """A run ended at another step than the one its config asks for (names both); nothing is evaluated."""


class RunLockedError(SemsslError, RuntimeError):
    """A run folder is in use by another process (names the pid, the host and the lock file)."""


class ExportError(SemsslError, RuntimeError):
    """An exported file that would not compute the backbone's features (names the format and the difference)."""


class ReportError(SemsslError, ValueError):
    """A run folder, or a file in it, that ``semssl report`` cannot read (names the file at fault)."""


__all__ = [
    "SemsslError", "ConfigError", "DataError", "ImageDecodeError", "SyntheticDataError", "SynthConfigError",
    "RecipeError", "ViewError", "SampleError", "OptimError", "ScheduleError", "CheckpointError", "EvalInputError",
    "BenchError", "NonFiniteLossError", "IncompleteRunError", "RunLockedError",
    "ExportError", "ReportError",
]


class RunPreempted(SystemExit):
    """A run stopped by SIGTERM or SIGUSR1 after writing the checkpoint of the step it was in
    (:mod:`semssl.engine.preempt`). Not an error: exit code 0, and ``message`` (on global rank 0; None on the
    others) says where the checkpoint is and how to resume.

    Decision: a ``SystemExit``, like Lightning's own ``SIGTERMException``, so that code catching ``Exception`` (or
    :class:`SemsslError`) around a run does not take it for a failure and carry on: the process was asked to stop.
    """

    def __init__(self, message: str | None, step: int, signals: tuple[str, ...], checkpoint: str,
                 requeued: str | None = None) -> None:
        super().__init__(0)
        self.message, self.step, self.signals = message, step, signals
        self.checkpoint, self.requeued = checkpoint, requeued
