"""The backend interface: a model that can open KV slots, and the slots themselves.

A backend loads one model file; each :class:`Slot` is one context with its own
KV cache, holding one conversation at a time.  The session pool decides which
session a slot serves; the slot reuses whatever prefix of the new prompt its
cache already holds, and reports what it computed in
:class:`~device_runtime.llm.conversation.GenerationStats`.

Backends raise :class:`edge_service.errors.InvalidArgument` for requests they
cannot serve (a prompt longer than the context window, ...), and only before
touching the slot's KV cache: the slot then still holds the conversation it
held, and goes back to it.  Anything else is an internal error.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Hashable, Iterator, Sequence

from device_runtime.core.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.llm.conversation import Continuation, GenerationStats
    from edge_service.settings import EdgeSettings
    from edgeroute.v1.types import GenerationParams


class Slot(ABC):
    """One KV cache; one generation at a time (the session pool guarantees it)."""

    #: Stats of the last :meth:`stream`, set once the iterator is exhausted or closed.
    last_stats: "GenerationStats | None" = None
    #: After a :meth:`stream` that paused (finish_reason "paused"): what the
    #: next one goes on from.
    last_continuation: "Continuation | None" = None
    #: Whether :meth:`stream` honours ``pause`` (the server's pre-emption);
    #: a backend whose engine schedules its own requests does not.
    supports_pause: bool = False

    @abstractmethod
    def stream(
        self,
        messages: Sequence[dict],
        params: GenerationParams,
        cancel: threading.Event,
        kv_owner: Hashable = None,
        pause: threading.Event | None = None,
        continuation: "Continuation | None" = None,
    ) -> Iterator[str]:
        """Answer the last (user) message of ``messages``, yielding text chunks.

        ``kv_owner``: who this turn's KV belongs to (a session, or a principal;
        see :class:`edge_service.sessions.SessionPool`).  A slot whose cache
        holds KV computed for another owner must drop it before matching the
        prompt's prefix, so that ``cached_tokens`` never depends on another
        owner's prompts (a side channel otherwise).  Must return soon after
        ``cancel`` is set.  ``pause`` and ``continuation``: see
        :meth:`device_runtime.llm.conversation.LlamaConversation.stream`
        (ignored unless :attr:`supports_pause`).
        """

    def begin_turn(self, session_id: str, principal: str) -> None:
        """Who the next :meth:`stream` is for.  Backends whose KV lives in
        another process (``openai``) route and label the upstream request by
        it; the others need nothing beyond ``kv_owner``."""

    def count_tokens(self, messages: Sequence[dict]) -> int | None:
        """Tokens of ``messages`` formatted as this slot's prompt, without
        touching the KV cache (for ``--max-input-tokens``); None when the
        backend cannot tell, and the limit is then left to the backend's own
        context window."""
        return None

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

    def forget_kv(self, kv_owner: Hashable) -> None:
        """No session is left whose KV is ``kv_owner``'s: drop any copy of it
        the backend keeps beyond its slots (the llama_cpp backend's host KV
        store).  Called by the session pool with its lock held: be quick."""

    def close(self) -> None:
        """Free the model."""


BackendFactory = Callable[["EdgeSettings"], Backend]

#: Edge backends by name (``edgeroute serve --backend``).  Backends with
#: optional dependencies are named here and imported only when asked for, so
#: the service lists them (and this module stays free of protobuf and
#: llama_cpp, the CLI's ``choices`` reading it).  An unknown name is a
#: ``ValueError``, which ``edgeroute serve`` reports in one line.
BACKENDS: Registry[BackendFactory] = Registry(
    "backend",
    lazy={"llama_cpp": "edge_service.backends.llama_cpp", "openai": "edge_service.backends.openai"},
    error=ValueError,
)
