"""String registries so configs and the CLI can name every component."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from mtlkit.errors import unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> factory map with helpful errors.

    Names are case-insensitive and ``-`` and ``_`` are treated alike, so
    ``"Shared-Bottom"`` and ``"shared_bottom"`` find the same entry.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    @staticmethod
    def normalise(name: str) -> str:
        return name.strip().lower().replace("-", "_")

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = self.normalise(name)
            if key in self._entries and self._entries[key] is not factory:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[key] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        key = self.normalise(name)
        if key not in self._entries:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[key]

    def create(self, name: str, **kwargs: Any) -> T:
        """Instantiate the component registered under ``name``."""
        return self.get(name)(**kwargs)

    def available(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.normalise(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.available())
