"""A tiny name -> factory registry, one instance per kind of component.

Every kind of component (ops, spaces, strategies, datasets, relaxations) is looked up by
the words used in configs and genotypes, so a new one is a new file plus one decorator.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (usually classes or factories) of one kind."""

    _every: ClassVar[list[Registry]] = []  # for registrations_undone_on_error

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        Registry._every.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a duplicate name is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``; anything else (another name, or not a string
        at all, e.g. a mapping a config gave where a name belongs) is an
        :class:`UnknownNameError` that lists the registered names."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        what = repr(name) if isinstance(name, str) else \
            f"{name!r} (of type {type(name).__name__}: a {self.kind} is named by a string)"
        raise UnknownNameError(
            f"unknown {self.kind} {what}; known: {', '.join(sorted(self._items))} "
            "(one registered in your own Python code: name its module or file in the "
            "config's plugins)"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def builtin(module: str | None) -> bool:
    """Whether ``module`` (a component's ``__module__``) is diffnas's own, not a plugin's."""
    return module is not None and (module == "diffnas" or module.startswith("diffnas."))


@contextmanager
def registrations_undone_on_error() -> Iterator[None]:
    """If the block (a plugin's import) raises, undo what it did, so the fixed plugin can
    be imported again in the same process (a notebook) instead of failing on its own
    first names as duplicates: the names registered meanwhile are unregistered, except
    diffnas's built-ins (a diffnas module the plugin happened to import first stays
    imported, so its names must stay too), and the newly imported modules that defined
    them leave ``sys.modules`` (a helper beside the plugin is imported afresh next time;
    libraries, which register nothing here, stay)."""
    modules = set(sys.modules)
    before = {id(r): set(r._items) for r in Registry._every}
    try:
        yield
    except BaseException:
        defined_in = set()
        for registry in Registry._every:
            for name in set(registry._items) - before.get(id(registry), set()):
                module = getattr(registry._items[name], "__module__", None)
                if not builtin(module):
                    del registry._items[name]
                    defined_in.add(module)
        for name in defined_in & (set(sys.modules) - modules):
            del sys.modules[name]
        raise
