"""One generic name registry for every pluggable part (routers, SLM backends,
edge backends, policies).

Entries are factories registered by a decorator, or modules named in advance
and imported only when their name is asked for, so that listing ``bert``
imports no onnxruntime.  A name registered twice is an error, and a name that
is not there is an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A duplicate or unknown name; ``str()`` is the plain message."""

    def __str__(self) -> str:  # KeyError quotes its argument
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name → factory, with lazily imported entries.

    ``kind`` names what is registered ("router", "edge backend") in messages;
    ``error`` is the exception type raised for an unknown name (a subclass of
    the caller's domain error keeps existing ``except`` clauses working).
    """

    def __init__(
        self,
        kind: str,
        *,
        lazy: dict[str, str] | None = None,
        error: Callable[[str], Exception] | None = None,
    ) -> None:
        self.kind = kind
        self._factories: dict[str, T] = {}
        self._lazy: dict[str, str] = dict(lazy or {})
        self._error = error or RegistryError

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``factory`` constructible as ``name``."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def wrap(factory: T) -> T:
            if name in self._factories:
                raise RegistryError(
                    f"{self.kind} {name!r} is registered twice "
                    f"({_qualname(self._factories[name])} and {_qualname(factory)})"
                )
            self._factories[name] = factory
            return factory

        return wrap

    def names(self) -> list[str]:
        """Every valid name, sorted; imports nothing."""
        return sorted(set(self._factories) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._factories or name in self._lazy

    def get(self, name: str) -> T:
        """The factory registered as ``name``, importing its module if needed."""
        if name not in self._factories and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._factories[name]
        except (KeyError, TypeError):
            raise self._error(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, *args, **kwargs):
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
