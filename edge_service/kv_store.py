"""Host memory for the KV caches of sessions that lost their slot.

With fewer slots than conversations, a slot goes from one session to another
and the first session's keys and values used to be dropped: its next turn
prefilled the whole transcript again, in one batch.  That costs time under
load, and it changes answers: a batch prefill sums in another order than the
turn-by-turn computation did, and under greedy decoding a near-tie token can
flip (the load benchmark saw "It's a map." become "Because it's a map.").

So a slot that changes hands first copies its KV cache here (a byte copy of
the sequence's cells, about a millisecond), and a session that gets a slot
back finds its cache here and continues from exactly the state it left.
Entries are keyed by the session's ``kv_owner`` (a process-unique session
id, or the principal with ``--kv-sharing principal``), so nobody finds
another owner's cache; they are dropped when their session closes or expires
(the TTL is retention), and the least recently stored go first when the
budget (``--kv-offload-mib``) is full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable


@dataclass(frozen=True)
class KvSnapshot:
    """One sequence's KV cells and the tokens they were computed for."""

    blob: bytes
    tokens: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return len(self.blob) + 8 * len(self.tokens)


class HostKvStore:
    """A byte-bounded, least-recently-stored-first-out map of owner -> snapshot (thread-safe)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, KvSnapshot] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        #: Counters for logs and tests.
        self.stored = 0
        self.restored = 0
        self.dropped = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: Hashable, snapshot: KvSnapshot) -> bool:
        """Keep ``snapshot`` for ``owner`` (replacing its older one); False when
        it alone is larger than the budget, or the store is off (budget 0)."""
        if owner is None or snapshot.nbytes > self.budget_bytes:
            self.forget(owner)
            return False
        with self._lock:
            self._pop(owner)
            while self._entries and self._bytes + snapshot.nbytes > self.budget_bytes:
                self._pop(next(iter(self._entries)))
                self.dropped += 1
            self._entries[owner] = snapshot
            self._bytes += snapshot.nbytes
            self.stored += 1
        return True

    def take(self, owner: Hashable) -> KvSnapshot | None:
        """``owner``'s snapshot, removed from the store (its slot holds it now)."""
        with self._lock:
            snapshot = self._pop(owner)
            if snapshot is not None:
                self.restored += 1
            return snapshot

    def forget(self, owner: Hashable) -> None:
        """Drop ``owner``'s snapshot (its session closed or expired)."""
        with self._lock:
            self._pop(owner)

    def _pop(self, owner: Hashable) -> KvSnapshot | None:
        snapshot = self._entries.pop(owner, None)
        if snapshot is not None:
            self._bytes -= snapshot.nbytes
        return snapshot
