"""Name -> factory registries, and discovery of the modules that fill them.

Adding an architecture, a method or a dataset kind is one file: `discover` imports every module
of its package (sorted by name, so registration order is the same on every machine), and each
module registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from benchmark.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping of names to objects with an error that lists the valid names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove `name` (for tests that register a throw-away entry); KeyError if absent."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def discover(package: str, paths: list[str]) -> list[str]:
    """Import every module of `package` (its `__path__` is `paths`) in sorted order, skipping
    private `_name` modules; importing a module registers what it defines. Returns the names."""
    names = sorted(m.name for m in pkgutil.iter_modules(paths) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
