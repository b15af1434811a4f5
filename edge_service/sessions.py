"""Sessions, their transcripts, and the pool of KV slots they share.

A slot is one llama.cpp context (its own KV cache).  There are fewer slots
than sessions: a session keeps its slot between turns, so a follow-up turn
prefills only its new messages, until a session that needs a slot finds none
free and takes the least-recently-used one.  The evicted session keeps its
transcript; when it returns it is re-prefilled from it (``kv_restored``).

Every session keeps its full transcript (all messages and the edge's own
answers), so a session that returns after turns served elsewhere sends only
those turns and the edge prefills only them.

A client may say how many transcript messages it holds (``transcript_length``):
a turn the server recorded but whose final message never reached the client
is then dropped, so both sides hold the same conversation.

At ``max_sessions``, opening a session closes the least-recently-used idle
one (a device that crashed or lost its link never closes its sessions); its
client gets NOT_FOUND on its next turn and opens a new session with the
whole conversation.

One Generate per session at a time: a second one while the first runs gets
FAILED_PRECONDITION (rather than a queue, so a confused client learns at once).
The server makes one exception: a call that finds its session or the slots
held by a generation that is already cancelled waits for it to stop (a
client that cancels and immediately sends its next turn is not refused).
A slot is reused only when both the request handler and the model thread of
the previous lease are done, so a cancelled generation can never race the next.

Thread-safe: the model runs in worker threads, the handlers on the event loop.
"""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

from edge_service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from edgeroute.v1.types import Message

SlotT = TypeVar("SlotT")

_SESSION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class Session:
    session_id: str
    transcript: list[Message] = field(default_factory=list)
    #: Index of the slot holding this session's KV, or None (never had one, or evicted).
    slot: int | None = None
    #: LRU clock value of the last use (a counter, not wall time).
    last_used: int = 0
    lease: "Lease | None" = None
    closed: bool = False

    @property
    def busy(self) -> bool:
        return self.lease is not None


@dataclass
class Lease(Generic[SlotT]):
    """One Generate's hold on a session and its slot.

    Released when both holders, the handler and the model thread, are done.
    """

    session: Session
    slot_index: int
    slot: SlotT
    #: The session's KV had been evicted and will be rebuilt from its transcript.
    kv_restored: bool
    #: Transcript as it was when the lease was taken (the turn's prompt is this
    #: plus the request's messages).
    transcript: tuple[Message, ...]
    cancel: threading.Event = field(default_factory=threading.Event)
    #: The idle session whose KV this lease's slot held (taken from it), or None.
    displaced: "Session | None" = None
    _holders: int = 2
    _commit: list[Message] | None = None


class SessionPool(Generic[SlotT]):
    """Sessions mapped onto a fixed set of slots, least-recently-used first out."""

    def __init__(self, slots: Sequence[SlotT], *, max_sessions: int) -> None:
        if not slots:
            raise ValueError("a session pool needs at least one slot")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.slots: list[SlotT] = list(slots)
        self.max_sessions = max_sessions
        # Slot index -> the session whose KV it holds.
        self._owners: list[Session | None] = [None] * len(self.slots)
        self._sessions: dict[str, Session] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        #: Counters for logs and tests: KV slots taken from idle sessions, idle
        #: sessions closed to open new ones.
        self.evictions = 0
        self.session_evictions = 0

    # --- sessions -------------------------------------------------------------

    def open(self, session_id: str | None = None) -> str:
        if session_id:
            if not _SESSION_ID.match(session_id):
                raise InvalidArgument(
                    "session_id must be 1-128 characters from A-Z a-z 0-9 . _ : -"
                )
        with self._lock:
            if session_id and session_id in self._sessions:
                raise AlreadyExists(f"session {session_id!r} already exists")
            if len(self._sessions) >= self.max_sessions:
                self._evict_idle_session()
            sid = session_id or uuid.uuid4().hex
            self._sessions[sid] = Session(sid, last_used=next(self._clock))
            return sid

    def ensure(self, session_id: str) -> bool:
        """Open ``session_id`` unless it is open already; True if it was opened.

        For ``Generate`` with ``open_session``: the client chose the id and sends
        the whole conversation, so a session it already holds is used as it is.
        """
        if not session_id:
            raise InvalidArgument("open_session needs the session_id to open")
        with self._lock:
            if session_id in self._sessions:
                return False
        try:
            self.open(session_id)
        except AlreadyExists:  # opened by a concurrent call in between
            return False
        return True

    def close(self, session_id: str) -> None:
        """Forget a session.  A Generate still running on it is cancelled."""
        with self._lock:
            session = self._get(session_id)
            del self._sessions[session_id]
            session.closed = True
            if session.lease is not None:
                session.lease.cancel.set()  # its slot is freed when the lease ends
            elif session.slot is not None:
                self._owners[session.slot] = None
                session.slot = None

    def _evict_idle_session(self) -> None:
        """Close the least-recently-used session not generating (lock held)."""
        idle = [s for s in self._sessions.values() if not s.busy]
        if not idle:
            raise ResourceExhausted(
                f"the server holds its maximum of {self.max_sessions} sessions, all generating; retry shortly"
            )
        victim = min(idle, key=lambda s: s.last_used)
        del self._sessions[victim.session_id]
        victim.closed = True
        if victim.slot is not None:
            self._owners[victim.slot] = None
            victim.slot = None
        self.session_evictions += 1

    def transcript(self, session_id: str) -> list[Message]:
        with self._lock:
            return list(self._get(session_id).transcript)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def slot_of(self, session_id: str) -> int | None:
        with self._lock:
            return self._get(session_id).slot

    def cancel_all(self) -> None:
        """Cancel every running generation (shutdown)."""
        with self._lock:
            for session in self._sessions.values():
                if session.lease is not None:
                    session.lease.cancel.set()

    def cancelling(self) -> bool:
        """Whether some lease is cancelled but its model thread has not stopped yet."""
        with self._lock:
            return any(
                owner is not None and owner.lease is not None and owner.lease.cancel.is_set()
                for owner in self._owners
            )

    # --- leases ---------------------------------------------------------------

    def acquire(self, session_id: str, transcript_length: int | None = None) -> Lease[SlotT]:
        """Take the session's slot (or the LRU idle one) for one Generate.

        ``transcript_length``: the messages the client holds; a longer
        transcript is cut back to it, a shorter one is OUT_OF_RANGE.
        """
        with self._lock:
            session = self._get(session_id)
            if session.busy:
                raise FailedPrecondition(
                    f"a Generate is already running on session {session_id!r}; "
                    "wait for it to finish or cancel it"
                )
            if transcript_length is not None:
                held = len(session.transcript)
                if transcript_length > held:
                    raise OutOfRange(
                        f"session {session_id!r} holds {held} messages, not {transcript_length}; "
                        "open a new session and send the whole conversation"
                    )
                # A turn whose final message the client never received: its
                # KV is overwritten by the prefix match of the next prompt.
                del session.transcript[transcript_length:]
            kv_restored = False
            previous = None
            if session.slot is None:
                index = self._free_slot()
                previous = self._owners[index]
                if previous is not None:
                    previous.slot = None
                    self.evictions += 1
                self._owners[index] = session
                session.slot = index
                kv_restored = bool(session.transcript)
            session.last_used = next(self._clock)
            lease = Lease(
                session=session,
                slot_index=session.slot,
                slot=self.slots[session.slot],
                kv_restored=kv_restored,
                transcript=tuple(session.transcript),
                displaced=previous,
            )
            session.lease = lease
            return lease

    def give_back(self, lease: Lease[SlotT]) -> None:
        """The lease's request was refused before its slot's KV was touched:
        the session it displaced gets the slot back (its KV is still there)."""
        with self._lock:
            previous, session, index = lease.displaced, lease.session, lease.slot_index
            lease.displaced = None
            if previous is None or previous.closed or previous.slot is not None:
                return
            if self._owners[index] is not session:
                return
            self._owners[index] = previous
            previous.slot = index
            session.slot = None
            self.evictions -= 1

    def commit(self, lease: Lease[SlotT], messages: Sequence[Message] | None) -> None:
        """Record the finished turn (None: none); appended to the transcript when the lease ends."""
        lease._commit = None if messages is None else list(messages)

    def done(self, lease: Lease[SlotT]) -> None:
        """One holder of the lease is done; the second call releases it."""
        with self._lock:
            lease._holders -= 1
            if lease._holders > 0:
                return
            session = lease.session
            session.lease = None
            if lease._commit is not None and not session.closed:
                session.transcript.extend(lease._commit)
            session.last_used = next(self._clock)
            if session.closed and session.slot is not None:
                self._owners[session.slot] = None
                session.slot = None

    def _free_slot(self) -> int:
        for index, owner in enumerate(self._owners):
            if owner is None:
                return index
        # A closed session still generating keeps its slot until its lease ends.
        idle = [
            (owner.last_used, index)
            for index, owner in enumerate(self._owners)
            if owner is not None and not owner.busy
        ]
        if not idle:
            raise ResourceExhausted(
                f"all {len(self.slots)} KV slots are busy generating; retry shortly"
            )
        return min(idle)[1]

    def _get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise NotFound(f"unknown session {session_id!r}; open one first") from None
