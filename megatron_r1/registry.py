"""Name -> implementation registries, filled by a `@register(name)` decorator where each implementation lives.

One generic piece for the ops (advantage estimators, policy losses) and the rewards. A registry knows the modules
that hold its built-ins by name and imports them on its first lookup: listing or reading a registry is what
loads them, so the registry module imports none of them (no import cycle: the built-in modules import the
registry, never the reverse) and reading a config that names one stays cheap until it is looked up.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`kind` names the registry in errors ("reward", "policy loss"); `builtins` are the modules (dotted names)
    whose `@register` decorators fill it, imported on the first lookup."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._sources: dict[str, object] = {}
        self._loaded = False

    def register(self, name: str, make: Optional[Callable[[object], T]] = None) -> Callable:
        """Decorator: register the decorated object (or `make(obj)`) under `name`. Registering the same object
        again is a no-op (a module imported twice); another object under a taken name is an error."""

        def wrap(obj):
            source = self._sources.get(name)
            if source is not None and source is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {getattr(source, '__module__', '?')}")
            self._sources[name] = obj
            self._entries[name] = make(obj) if make is not None else obj
            return obj

        return wrap

    def load_builtins(self) -> None:
        if not self._loaded:
            for module in self.builtins:
                importlib.import_module(module)
            self._loaded = True

    def names(self) -> tuple[str, ...]:
        """The registered names: built-ins first, in registration order."""
        self.load_builtins()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry registered as `name`; ValueError naming the known ones otherwise."""
        self.load_builtins()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        return self._entries[name]
