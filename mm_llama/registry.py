"""Explicit name -> class registries with exact keys.

Each swappable kind (encoders, projectors, the contrastive objective's loss terms) has one visible
registry. Lookups use exact keys; an unknown
key raises a ``ValueError`` that lists the valid choices, and registering a key twice raises too.
Plugins add their own classes with :meth:`Registry.register` from their own files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping ``key -> class`` with exact-key lookups and helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; usable as ``register("x", cls)`` or as a decorator."""

        def add(o: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (to {self._entries[name]!r}); "
                    "pick another name"
                )
            self._entries[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """Return the entry for ``name``; raise ``ValueError`` listing the valid names otherwise."""
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order (built-ins first, then what plugins added)."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
