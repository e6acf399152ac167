"""Exceptions raised by mtlkit.

Every error says what was wrong and how to fix it. Each class subclasses ``ValueError`` (bad
input) or ``RuntimeError`` (a failure during a run), plus the more specific built-in a caller
might catch (``KeyError``, ``TypeError``, ``FloatingPointError``), so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MtlkitError(Exception):
    """Base class of every mtlkit error."""


class TaskError(MtlkitError, ValueError):
    """A task definition is invalid (empty task set, duplicate names, unknown loss)."""


class ShapeMismatchError(MtlkitError, ValueError):
    """A prediction and its target do not fit together for a task."""


class InputError(MtlkitError, ValueError):
    """A model's input has values it cannot use (a partly missing modality, nothing to route)."""


class DTypeMismatchError(MtlkitError, TypeError, ValueError):
    """A target has a dtype the task's loss cannot use."""


class MissingTaskError(MtlkitError, KeyError, ValueError):
    """A batch or a model output lacks an entry for a task."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class NonFiniteLossError(MtlkitError, FloatingPointError, ValueError):
    """A task loss is NaN or infinite; raised before any update is made."""


class NonPositiveLossError(MtlkitError, FloatingPointError, ValueError):
    """A method that takes logarithms of the losses (SI, GLS, FAMO, STCH) got a loss <= 0."""


class NonFiniteGradientError(MtlkitError, FloatingPointError, RuntimeError):
    """A task gradient is NaN or infinite although the losses are finite."""


class UnknownNameError(MtlkitError, KeyError, ValueError):
    """A registry lookup failed; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(MtlkitError, ValueError):
    """A configuration file has a bad or unknown key or value."""


class CheckpointError(MtlkitError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not match the run."""


class EmptyDataError(MtlkitError, ValueError):
    """A loader yielded no batch (training or evaluation on no data)."""


class DatasetNotAvailableError(MtlkitError, RuntimeError):
    """A dataset's donor package is not installed or its files are not the expected ones."""


class EngineError(MtlkitError, RuntimeError):
    """The gradient engine cannot serve a request (e.g. no shared representation)."""


class LifecycleError(MtlkitError, RuntimeError):
    """A method was driven without one of its lifecycle calls (``setup``, ``after_step``, epoch
    boundaries) or its parameters are in no optimiser; raised on the step after the omission,
    before anything is updated, instead of silently running a different algorithm."""


class DistributedError(MtlkitError, RuntimeError):
    """A multi-task step cannot run as asked under data parallelism (e.g. a method's forward ran with
    DDP's gradient sync on although the method averages the gradients itself)."""


class ModelContractError(MtlkitError, TypeError, ValueError):
    """A model does not fulfil the multi-task model contract (see ``docs/design.md``)."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build an :class:`UnknownNameError` naming close matches among ``known``."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"Unknown {kind} {name!r}.{hint} Available: {', '.join(known) or '(none)'}.")
