"""One small name -> entry registry, shared by embedding methods, models and stage pipelines.

A registry knows what kind of thing it holds (for its error messages) and, optionally,
the modules that register the built-in entries: they are imported on the first lookup,
so importing a registry stays light (``embtables --help`` imports no torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> entry``. ``kind`` names the entries in messages ("embedding method");
    ``plural`` names them in the list of valid ones ("methods"); ``builtins`` are modules
    imported before the first lookup (they register entries)."""

    def __init__(self, kind: str, plural: str = "", builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = not builtins

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a second, different entry of that name is an error."""
        old = self._entries.get(name)
        if old is not None and old != entry:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = entry
        return entry

    def load(self) -> None:
        """Import the modules that register the built-in entries (once)."""
        if not self._loaded:
            self._loaded = True
            for module in self.builtins:
                importlib.import_module(module)

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def get(self, name: str, key: str = "") -> T:
        """The entry ``name``; unknown: a ValueError naming the config ``key`` (if given)
        and listing the valid names."""
        self.load()
        if name not in self._entries:
            where = f" at {key}" if key else ""
            valid = ", ".join(sorted(self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}{where}; valid {self.plural}: {valid}")
        return self._entries[name]

    def find(self, name: str) -> T | None:
        """The entry ``name``, or None."""
        self.load()
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
