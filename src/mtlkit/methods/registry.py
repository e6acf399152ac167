"""The method registry: ``create(name, **options)``, ``available()`` and named variants.

A variant is a registry name for a class with other defaults (``mgda_ub`` is MGDA at the
representation level), not a new class: one class may serve several names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from mtlkit.core.registry import Registry

M = TypeVar("M")

METHODS: Registry[Any] = Registry("method")
register = METHODS.register


def register_variant(name: str, cls: Callable[..., M], **defaults: Any) -> None:
    """Register ``name`` as ``cls`` with ``defaults`` (explicit options still override them)."""

    @functools.wraps(cls, updated=())
    def factory(**options: Any) -> M:
        return cls(**{**defaults, **options})

    factory.variant_of = cls  # type: ignore[attr-defined]
    factory.variant_defaults = dict(defaults)  # type: ignore[attr-defined]
    METHODS.register(name)(factory)


def create(name: str, **options: Any) -> Any:
    """Instantiate the method registered under ``name`` (see :func:`available`)."""
    return METHODS.create(name, **options)


def available() -> list[str]:
    """Names of every registered method (variants included)."""
    return METHODS.available()


def method_class(name: str) -> type:
    """The class behind a registry name (a variant's class for a variant)."""
    factory: Any = METHODS.get(name)
    return getattr(factory, "variant_of", factory)


def variant_defaults(name: str) -> dict[str, Any]:
    """The defaults a variant sets (``{}`` for a class's own name)."""
    return dict(getattr(METHODS.get(name), "variant_defaults", {}))
