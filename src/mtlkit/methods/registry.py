"""The method registry: ``create(name, **kwargs)`` and ``available()``."""

from __future__ import annotations

from typing import Any

from mtlkit.core.registry import Registry
from mtlkit.methods.base import Method

METHODS: Registry[Method] = Registry("method")
register = METHODS.register


def create(name: str, **kwargs: Any) -> Method:
    """Instantiate the method registered under ``name`` (see :func:`available`)."""
    return METHODS.create(name, **kwargs)


def available() -> list[str]:
    """Names of every registered method."""
    return METHODS.available()
