"""Hyper-parameters declared once, in the class body of a method.

A method lists its hyper-parameters as annotated class attributes whose value is :func:`hparam`::

    class MGDA(GramianWeighting):
        normalization: str = hparam("none", one_of("none", "l2", "loss", "loss+"), "solver normalisation")

From that one declaration come the keyword-only constructor (with its signature, for ``help()``
and IDEs), the validation of every value with an error that names the method, the parameter, what
it accepts and what it got, the ``repr``, the configuration dict written to ``run.json`` and
checkpoints, and the close-match hints for unknown config options. Like scikit-learn's parameter
constraints, the checks are small predicates that describe themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtlkit.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A predicate on a value and the words that say what it accepts ("a number > 0")."""

    accepts: Callable[[Any], bool]
    expected: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.accepts(value))
        except (TypeError, ValueError):
            return False

    def __or__(self, other: Check) -> Check:
        return Check(lambda v: self(v) or other(v), f"{self.expected} or {other.expected}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(
    *, gt: float | None = None, ge: float | None = None, le: float | None = None, integer: bool = False
) -> Check:
    """A finite number (an ``int`` when ``integer``) within the given bounds."""
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    kind = "an integer" if integer else "a number"

    def accepts(v: Any) -> bool:
        if not _is_number(v) or (integer and not isinstance(v, int)):
            return False
        return (gt is None or v > gt) and (ge is None or v >= ge) and (le is None or v <= le)

    return Check(accepts, f"{kind} {' and '.join(parts)}".strip())


def one_of(*values: Any) -> Check:
    """One of the listed values (compared with ``==``; booleans are not numbers here)."""
    return Check(
        lambda v: any(type(v) is type(c) and v == c for c in values),
        "one of " + ", ".join(repr(c) for c in values),
    )


def boolean() -> Check:
    return Check(lambda v: isinstance(v, bool), "true or false")


def none() -> Check:
    return Check(lambda v: v is None, "None")


def numbers(item: Check, *, keyed: bool = False) -> Check:
    """A sequence of values that pass ``item`` (or, with ``keyed``, also a ``{task: value}`` map)."""

    def accepts(v: Any) -> bool:
        if keyed and isinstance(v, Mapping):
            return all(isinstance(k, str) and item(x) for k, x in v.items())
        return isinstance(v, Sequence) and not isinstance(v, str) and all(item(x) for x in v)

    what = f"a list of {item.expected.replace('a number', 'numbers')}"
    return Check(accepts, what + (" or a {task: value} map" if keyed else ""))


def instance_of(*types: type) -> Check:
    return Check(lambda v: isinstance(v, types), " or ".join(f"a {t.__name__}" for t in types))


def anything() -> Check:
    return Check(lambda v: True, "any value")


@dataclass(frozen=True)
class HParam:
    """One declared hyper-parameter (see :func:`hparam`)."""

    default: Any
    check: Check
    doc: str = ""
    #: Part of the method's configuration: shown by ``repr``, written to ``run.json`` and to
    #: checkpoints (a resume refuses a different value), settable from a YAML config. Objects that
    #: are collaborators rather than settings (a gradient engine) are not.
    config: bool = True


def hparam(default: Any, check: Check | None = None, doc: str = "", *, config: bool = True) -> Any:
    """Declare a hyper-parameter in a method's class body (returns an :class:`HParam` marker; the
    annotation on the attribute is its type for the type checker)."""
    if check is None:
        check = anything()
    return HParam(default, check, doc, config)


def collect(cls: type) -> dict[str, HParam]:
    """The hyper-parameters of ``cls`` and its bases, in declaration order (bases first); a
    subclass may redeclare a base's parameter with another default."""
    found: dict[str, HParam] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, HParam):
                found[name] = value
    return found


def validate(owner: str, declared: Mapping[str, HParam], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared hyper-parameter's value (given or default), checked; unknown names raise
    :class:`~mtlkit.errors.ConfigError` with close matches."""
    from mtlkit.errors import unknown_name

    unknown = [k for k in given if k not in declared]
    if unknown:
        err = unknown_name(f"option of {owner}", unknown[0], declared)
        raise ConfigError(str(err))
    values = {}
    for name, spec in declared.items():
        value = given.get(name, spec.default)
        if name in given and not spec.check(value):
            raise ConfigError(f"{owner}: {name} must be {spec.check.expected}; got {value!r}.")
        values[name] = value
    return values


def as_config_value(value: Any) -> Any:
    """A JSON-friendly rendering of a hyper-parameter value (sequences as lists, objects by type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): as_config_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_config_value(v) for v in value]
    return f"<{type(value).__name__}>"
