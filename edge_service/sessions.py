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
is then dropped, so both sides hold the same conversation.  With the digest of
those messages (``transcript_digest``) the cut is made only if the server's
prefix has the same content; a call refused before the model runs gets its
cut back (:meth:`SessionPool.give_back`).

Each principal holds at most ``max_sessions_per_principal`` sessions, and the
server at most ``max_sessions``.  At either limit, opening a session closes
the opener's own least-recently-used idle session (a device that crashed or
lost its link never closes its sessions); its client gets NOT_FOUND on its
next turn and opens a new session with the whole conversation.  A session is
never closed to make room for another principal's: when the server is full
and the opener has no idle session, the open is RESOURCE_EXHAUSTED.  An idle
session is deleted ``ttl_s`` seconds after its last use (retention), with the
same NOT_FOUND for its client.  Session ids are checked on every call.

One Generate per session at a time: a second one while the first runs gets
FAILED_PRECONDITION (rather than a queue, so a confused client learns at once).
The server makes one exception: a call that finds its session or the slots
held by a generation that is already cancelled waits for it to stop (a
client that cancels and immediately sends its next turn is not refused).
A slot is reused only when both the request handler and the model thread of
the previous lease are done, so a cancelled generation can never race the next.

Sessions belong to the principal that opened them: every method takes the
caller's ``owner`` and looks sessions up by ``(owner, session_id)``, so another
principal's session is simply not there (NOT_FOUND with the detail of an id
nobody holds), two principals may use the same client-chosen id, and neither
ALREADY_EXISTS nor OUT_OF_RANGE can say anything about another's sessions.

A slot's KV cache is reused only by whoever computed it: each lease carries
a ``kv_owner`` (the session, or with ``kv_sharing="principal"`` the
principal), and the backend drops a slot's KV before the prefix match when it
was computed for another, so ``cached_tokens`` never depends on another
principal's prompts.

Thread-safe: the model runs in worker threads, the handlers on the event loop.
"""

from __future__ import annotations

import hmac
import itertools
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

from device_runtime.core.messages import transcript_digest
from edge_service.auth import ANONYMOUS, cap
from edge_service.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from edgeroute.v1.types import Message

SlotT = TypeVar("SlotT")

_SESSION_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
KV_SHARING = ("session", "principal")
_uids = itertools.count(1)


@dataclass
class Session:
    session_id: str
    #: The principal that opened it; only that principal finds it.
    owner: str = ANONYMOUS
    #: Unique for the life of the process, unlike ``session_id`` (an id may be
    #: closed and opened again): whose KV a slot holds.
    uid: int = field(default_factory=lambda: next(_uids))
    transcript: list[Message] = field(default_factory=list)
    #: Index of the slot holding this session's KV, or None (never had one, or evicted).
    slot: int | None = None
    #: LRU clock value of the last use (a counter, not wall time).
    last_used: int = 0
    #: When the session last became idle (the pool's clock): the TTL counts from it.
    idle_since: float = 0.0
    lease: "Lease | None" = None
    closed: bool = False

    @property
    def busy(self) -> bool:
        """A Generate is running on the session (generating, or paused)."""
        return self.lease is not None

    @property
    def generating(self) -> bool:
        """A Generate holds a slot for the session now (not paused)."""
        return self.lease is not None and not self.lease.suspended


@dataclass(eq=False)
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
    #: When the lease was taken (``time.monotonic``): how long calls hold slots.
    acquired_at: float = field(default_factory=time.monotonic)
    #: The idle session whose KV this lease's slot held (taken from it), or None.
    displaced: "Session | None" = None
    #: Whose KV the slot may reuse for this turn; the backend drops KV computed for anyone else.
    kv_owner: object = None
    #: Messages cut off the transcript by ``transcript_length`` for this call,
    #: put back by :meth:`SessionPool.give_back` if the call is refused.
    cut: list[Message] = field(default_factory=list)
    #: Set by the server to pre-empt the generation: it pauses between two
    #: tokens (:meth:`SessionPool.suspend`), and goes on from ``continuation``
    #: once :meth:`SessionPool.resume` finds it a slot.
    pause: threading.Event = field(default_factory=threading.Event)
    suspended: bool = False
    continuation: object = None
    #: The stats of the parts of the answer made before each pause.
    segments: list = field(default_factory=list)
    #: Whether the call holding the lease has ended or passed its deadline
    #: (set by the server; its handler may not have been told yet).
    call_over: Callable[[], bool] = lambda: False
    _holders: int = 2
    _commit: list[Message] | None = None


class SlotsBusy(ResourceExhausted):
    """Every KV slot is generating: the call may wait for one (the server's queue)."""


#: Kinds of eviction, for :attr:`SessionPool.on_evict` and the metrics (``kv``: counted by the server).
EVICT_KV, EVICT_SESSION, EVICT_TTL = "kv", "session", "ttl"


class SessionPool(Generic[SlotT]):
    """Sessions mapped onto a fixed set of slots, least-recently-used first out."""

    def __init__(
        self,
        slots: Sequence[SlotT],
        *,
        max_sessions: int,
        kv_sharing: str = "session",
        max_sessions_per_principal: int | None = None,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
        on_forget: Callable[[Hashable], None] | None = None,
    ) -> None:
        """``max_sessions_per_principal``: None is ``max_sessions``; ``ttl_s``:
        None keeps idle sessions until evicted; ``clock``: seconds, for the TTL;
        ``on_evict(kind)``: called (lock held) for each session closed to make
        room (``session``) or past the TTL (``ttl``).  KV slots taken from idle
        sessions are counted in :attr:`evictions` (a refused call gives its slot
        back, :meth:`give_back`); ``on_forget(kv_owner)``: called (lock held)
        when no session is left whose KV is ``kv_owner``'s, so that copies of
        it kept elsewhere (the host KV store) go with the session."""
        if not slots:
            raise ValueError("a session pool needs at least one slot")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        per_principal = max_sessions if max_sessions_per_principal is None else max_sessions_per_principal
        if per_principal < 1:
            raise ValueError(f"max_sessions_per_principal must be >= 1, got {per_principal}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.max_sessions_per_principal = per_principal
        self.ttl_s = ttl_s
        self._now = clock
        self.on_evict = on_evict
        self.on_forget = on_forget
        self._per_owner: Counter[str] = Counter()
        if kv_sharing not in KV_SHARING:
            raise ValueError(f"kv_sharing must be one of {', '.join(KV_SHARING)}, got {kv_sharing!r}")
        self.kv_sharing = kv_sharing
        self.slots: list[SlotT] = list(slots)
        self.max_sessions = max_sessions
        # Slot index -> the session whose KV it holds.
        self._owners: list[Session | None] = [None] * len(self.slots)
        self._sessions: dict[tuple[str, str], Session] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()
        #: Counters for logs and tests: KV slots taken from idle sessions, idle
        #: sessions closed to open new ones, idle sessions past the TTL deleted.
        self.evictions = 0
        self.session_evictions = 0
        self.expirations = 0

    # --- sessions -------------------------------------------------------------

    def open(self, session_id: str | None = None, *, owner: str = ANONYMOUS) -> str:
        """Open a session of ``owner``; ALREADY_EXISTS only for an id ``owner`` holds.

        At ``owner``'s quota or the server's maximum, ``owner``'s least recently
        used idle session is closed first; RESOURCE_EXHAUSTED if it has none.
        """
        if session_id:
            check_session_id(session_id)
        with self._lock:
            self._expire_idle()
            if session_id and (owner, session_id) in self._sessions:
                raise AlreadyExists(f"session {cap(session_id)!r} already exists")
            if self._per_owner[owner] >= self.max_sessions_per_principal:
                self._evict_own_idle(owner, f"you hold your maximum of {self.max_sessions_per_principal} sessions")
            elif len(self._sessions) >= self.max_sessions:
                self._evict_own_idle(owner, f"the server holds its maximum of {self.max_sessions} sessions")
            sid = session_id or uuid.uuid4().hex
            now = next(self._clock)
            self._sessions[(owner, sid)] = Session(sid, owner=owner, last_used=now, idle_since=self._now())
            self._per_owner[owner] += 1
            return sid

    def ensure(self, session_id: str, *, owner: str = ANONYMOUS) -> bool:
        """Open ``session_id`` unless it is open already; True if it was opened.

        For ``Generate`` with ``open_session``: the client chose the id and sends
        the whole conversation, so a session it already holds is used as it is.
        """
        if not session_id:
            raise InvalidArgument("open_session needs the session_id to open")
        with self._lock:
            try:
                self._get(session_id, owner)  # checks the id, and the TTL
                return False
            except NotFound:
                pass
        try:
            self.open(session_id, owner=owner)
        except AlreadyExists:  # opened by a concurrent call in between
            return False
        return True

    def close(self, session_id: str, *, owner: str = ANONYMOUS) -> None:
        """Forget a session.  A Generate still running on it is cancelled."""
        with self._lock:
            self._remove(self._get(session_id, owner))

    def _remove(self, session: Session) -> None:
        """Forget ``session`` (lock held); a running lease is cancelled and
        frees its slot when it ends."""
        del self._sessions[(session.owner, session.session_id)]
        self._per_owner[session.owner] -= 1
        if self._per_owner[session.owner] <= 0:
            del self._per_owner[session.owner]
        session.closed = True
        if self.on_forget is not None and (self.kv_sharing == "session" or session.owner not in self._per_owner):
            self.on_forget(self._kv_owner(session))
        if session.lease is not None:
            session.lease.cancel.set()
        elif session.slot is not None:
            self._owners[session.slot] = None
            session.slot = None

    def _evict_own_idle(self, owner: str, why: str) -> None:
        """Close ``owner``'s least-recently-used session that is not generating
        (lock held).  Only the opener's own sessions are candidates, so one
        principal's churn never closes another's session."""
        idle = [s for s in self._sessions.values() if s.owner == owner and not s.busy]
        if not idle:
            raise ResourceExhausted(
                f"{why} and none of yours is idle; close sessions you no longer need or retry later"
            )
        self._remove(min(idle, key=lambda s: s.last_used))
        self.session_evictions += 1
        self._notify(EVICT_SESSION)

    def _expire_idle(self) -> int:
        """Delete the idle sessions past the TTL (lock held); how many."""
        if self.ttl_s is None:
            return 0
        limit = self._now() - self.ttl_s
        expired = [s for s in self._sessions.values() if not s.busy and s.idle_since <= limit]
        for session in expired:
            self._remove(session)
            self.expirations += 1
            self._notify(EVICT_TTL)
        return len(expired)

    def expire_idle(self) -> int:
        """Delete the idle sessions past the TTL now (the server calls it
        periodically; lookups also check); returns how many."""
        with self._lock:
            return self._expire_idle()

    def _notify(self, kind: str) -> None:
        if self.on_evict is not None:
            try:
                self.on_evict(kind)
            except Exception:  # noqa: BLE001 - metrics must never break the pool
                pass

    def count(self, owner: str) -> int:
        """Sessions ``owner`` holds."""
        with self._lock:
            return self._per_owner[owner]

    def slots_held(self, owner: str) -> int:
        """Slots held by ``owner``'s generations (running or stopping; not paused)."""
        with self._lock:
            return sum(1 for s in self._owners if s is not None and s.generating and s.owner == owner)

    def busy_slots(self) -> int:
        """Slots whose session is generating (or stopping a cancelled generation)."""
        with self._lock:
            return sum(1 for s in self._owners if s is not None and s.generating)

    def transcript(self, session_id: str, *, owner: str = ANONYMOUS) -> list[Message]:
        with self._lock:
            return list(self._get(session_id, owner).transcript)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def slot_of(self, session_id: str, *, owner: str = ANONYMOUS) -> int | None:
        with self._lock:
            return self._get(session_id, owner).slot

    def cancel_all(self) -> None:
        """Cancel every running generation (shutdown)."""
        with self._lock:
            for session in self._sessions.values():
                if session.lease is not None:
                    session.lease.cancel.set()

    def winding_down(self, session_id: str, *, owner: str = ANONYMOUS) -> bool:
        """Whether ``owner``'s session is generating for a call that is on its
        way out: cancelled, or ended or past its deadline before its handler
        heard of it.  Its slot frees within a token."""
        with self._lock:
            session = self._sessions.get((owner, session_id))
            lease = session.lease if session is not None else None
            return lease is not None and (lease.cancel.is_set() or lease.call_over())

    # --- leases ---------------------------------------------------------------

    def acquire(
        self,
        session_id: str,
        transcript_length: int | None = None,
        *,
        digest: bytes | None = None,
        owner: str = ANONYMOUS,
    ) -> Lease[SlotT]:
        """Take the session's slot (or the LRU idle one) for one Generate.

        ``transcript_length``: the messages the client holds; a longer
        transcript is cut back to it (the cut is kept on the lease, for
        :meth:`give_back`).  ``digest``: the client's
        :func:`~device_runtime.core.messages.transcript_digest` of those
        messages; the cut is made only if the server's prefix has the same
        one.  A shorter transcript or another digest is OUT_OF_RANGE.
        """
        with self._lock:
            session = self._get(session_id, owner)
            if session.busy:
                raise _busy(session_id)
            # The slot first (SlotsBusy changes nothing, so the call may wait
            # and try again), then the transcript check, which cuts only once
            # nothing can refuse the call any more.
            index = session.slot if session.slot is not None else self._free_slot()
            cut = self._check_transcript(session, transcript_length, digest)
            previous = None
            kv_restored = False
            if session.slot is None:
                previous = self._move_in(session, index)
                kv_restored = bool(session.transcript)
            session.last_used = next(self._clock)
            lease = Lease(
                session=session,
                slot_index=index,
                slot=self.slots[index],
                kv_restored=kv_restored,
                transcript=tuple(session.transcript),
                displaced=previous,
                kv_owner=self._kv_owner(session),
                cut=cut,
            )
            session.lease = lease
            return lease

    def check(self, session_id: str, *, owner: str = ANONYMOUS) -> None:
        """What :meth:`acquire` would refuse before looking for a slot (a bad
        id, NOT_FOUND, a session already generating), so that such a call is
        refused before it waits for a slot."""
        with self._lock:
            if self._get(session_id, owner).busy:
                raise _busy(session_id)

    def _kv_owner(self, session: Session) -> tuple[str, object]:
        if self.kv_sharing == "principal":
            return ("principal", session.owner)
        return ("session", session.uid)

    @staticmethod
    def _check_transcript(session: Session, length: int | None, digest: bytes | None) -> list[Message]:
        """Cut ``session``'s transcript back to the client's ``length`` (lock
        held) and return what was cut.  The OUT_OF_RANGE detail is the same
        whatever the mismatch, and names nothing the client did not send."""
        if length is None:
            if digest is not None:
                raise InvalidArgument("transcript_digest needs transcript_length")
            return []
        if digest is not None and len(digest) != 32:
            raise InvalidArgument(f"transcript_digest must be 32 bytes (SHA-256), got {len(digest)}")
        held = session.transcript
        matches = length <= len(held)
        if matches and digest is not None:
            mine = transcript_digest([m.to_dict() for m in held[:length]])
            matches = hmac.compare_digest(mine, bytes(digest))
        if not matches:
            raise OutOfRange(
                f"session {cap(session.session_id)!r} does not hold the {length} messages this "
                "client holds; open a new session and send the whole conversation"
            )
        # A turn whose final message the client never received: its KV is
        # overwritten by the prefix match of the next prompt.
        cut = held[length:]
        del held[length:]
        return cut

    def give_back(self, lease: Lease[SlotT]) -> None:
        """The lease's request was refused before the model ran: the transcript
        gets back the messages cut for it, and the session it displaced gets the
        slot back (the backend touches no KV before refusing, so it is intact)."""
        with self._lock:
            previous, session, index = lease.displaced, lease.session, lease.slot_index
            lease.displaced = None
            if lease.cut:
                session.transcript.extend(lease.cut)
                lease.cut = []
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

    def done(self, lease: Lease[SlotT]) -> bool:
        """One holder of the lease is done; the second call releases it (True)."""
        with self._lock:
            lease._holders -= 1
            if lease._holders > 0:
                return False
            session = lease.session
            session.lease = None
            if lease._commit is not None and not session.closed:
                session.transcript.extend(lease._commit)
            session.last_used = next(self._clock)
            session.idle_since = self._now()
            if session.closed and session.slot is not None:
                self._owners[session.slot] = None
                session.slot = None
            return True

    def suspend(self, lease: Lease[SlotT]) -> None:
        """The lease's generation paused (its model thread has stopped): its
        slot may go to another session, as an idle session's does (the KV
        moves to the host store then); the session stays busy, and
        :meth:`resume` takes a slot for the rest of the answer."""
        with self._lock:
            lease.suspended = True
            lease.displaced = None
            lease._holders = 2
            lease.acquired_at = time.monotonic()

    def resume(self, lease: Lease[SlotT]) -> Lease[SlotT]:
        """A slot for the suspended ``lease`` (its session's own if nobody took
        it); :class:`SlotsBusy` while none is free, ABORTED if the session
        was closed meanwhile."""
        with self._lock:
            session = lease.session
            if session.closed or lease.cancel.is_set():
                raise Aborted("the generation was cancelled because its session was closed")
            index = session.slot if session.slot is not None else self._free_slot()
            if session.slot is None:
                lease.displaced = self._move_in(session, index)
            session.last_used = next(self._clock)
            lease.slot_index, lease.slot = index, self.slots[index]
            lease.suspended = False
            lease.pause.clear()
            lease.acquired_at = time.monotonic()
            return lease

    def _move_in(self, session: Session, index: int) -> Session | None:
        """Give slot ``index`` to ``session`` (lock held), taking it from the
        session whose KV it held (returned; an eviction)."""
        previous = self._owners[index]
        if previous is not None:
            previous.slot = None
            self.evictions += 1
        self._owners[index] = session
        session.slot = index
        return previous

    def _free_slot(self) -> int:
        for index, owner in enumerate(self._owners):
            if owner is None:
                return index
        # A closed session still generating keeps its slot until its lease ends.
        idle = [
            (owner.last_used, index)
            for index, owner in enumerate(self._owners)
            if owner is not None and not owner.generating
        ]
        if not idle:
            raise SlotsBusy(f"all {len(self.slots)} KV slots are busy generating; retry shortly")
        return min(idle)[1]

    def _get(self, session_id: str, owner: str) -> Session:
        """``owner``'s session (lock held); another principal's, or one past
        the TTL, is not found, with the detail of an id nobody holds."""
        check_session_id(session_id)
        session = self._sessions.get((owner, session_id))
        if session is not None and self.ttl_s is not None and not session.busy:
            if session.idle_since <= self._now() - self.ttl_s:
                self._remove(session)
                self.expirations += 1
                self._notify(EVICT_TTL)
                session = None
        if session is None:
            raise NotFound(f"unknown session {cap(session_id)!r}; open one first")
        return session


def _busy(session_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"a Generate is already running on session {cap(session_id)!r}; wait for it to finish or cancel it"
    )


def check_session_id(session_id: str) -> str:
    """INVALID_ARGUMENT unless ``session_id`` is 1-128 characters of the id
    alphabet; checked on every call, so no other string reaches a lookup, a
    log line or a detail."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise InvalidArgument("session_id must be 1-128 characters from A-Z a-z 0-9 . _ : -")
    return session_id
