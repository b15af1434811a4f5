"""The backend interface: a model that can open KV slots, and the slots themselves.

A backend loads one model file; each :class:`Slot` is one context with its own
KV cache, holding one conversation at a time.  The session pool decides which
session a slot serves; the slot reuses whatever prefix of the new prompt its
cache already holds, and reports what it computed in
:class:`~device_runtime.llama_session.GenerationStats`.

Backends raise :class:`edge_service.errors.InvalidArgument` for requests they
cannot serve (a prompt longer than the context window, ...), and only before
touching the slot's KV cache: the slot then still holds the conversation it
held, and goes back to it.  Anything else is an internal error.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from edgeroute.v1.types import GenerationParams

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.llama_session import GenerationStats
    from edge_service.settings import EdgeSettings


class Slot(ABC):
    """One KV cache; one generation at a time (the session pool guarantees it)."""

    #: Stats of the last :meth:`stream`, set once the iterator is exhausted or closed.
    last_stats: "GenerationStats | None" = None

    @abstractmethod
    def stream(
        self, messages: Sequence[dict], params: GenerationParams, cancel: threading.Event
    ) -> Iterator[str]:
        """Answer the last (user) message of ``messages``, yielding text chunks.

        Must return soon after ``cancel`` is set.
        """

    def close(self) -> None:
        """Free the slot's memory."""


class Backend(ABC):
    """A loaded model that hands out slots."""

    name: str = ""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """A short name of the model (file name) for ServerInfo and logs."""

    @property
    @abstractmethod
    def prompt_format(self) -> str:
        """The prompt format in use (``chat-template``, ``plain``)."""

    @property
    @abstractmethod
    def n_ctx(self) -> int:
        """Context window of each slot, in tokens."""

    @abstractmethod
    def kv_bytes_per_slot(self) -> int | None:
        """KV cache bytes of one slot at ``n_ctx``, or None if unknown."""

    @abstractmethod
    def new_slot(self) -> Slot:
        """Create one more slot (a context with its own KV cache)."""

    def close(self) -> None:
        """Free the model."""


BackendFactory = Callable[["EdgeSettings"], Backend]

_REGISTRY: dict[str, BackendFactory] = {}
# Imported only when asked for, so the service can list backends whose
# dependencies are absent.
_LAZY: dict[str, str] = {"llama_cpp": "edge_service.backends.llama_cpp"}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class decorator: make a backend constructible by name."""

    def wrap(factory: BackendFactory) -> BackendFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def create_backend(name: str, settings: "EdgeSettings") -> Backend:
    """Build the backend registered as ``name``."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {available_backends()}") from None
    return factory(settings)
