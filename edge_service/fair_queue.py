"""The wait queue for KV slots: round-robin across principals, FIFO within one.

A Generate that finds no free slot waits here instead of failing at once (as
llama.cpp's server queues requests for a free slot), for at most
``queue_timeout_s``; then it gets RESOURCE_EXHAUSTED with the expected wait in
its details.  Turns are handed out one principal at a time, so a principal
with many waiting calls cannot starve one with a single call: each principal
that waits gets the next free slot in turn.

Everything here runs on the event loop.  The model threads that free slots
call :meth:`FairWaitQueue.notify_threadsafe`.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class QueueTimeout(Exception):
    """No slot within the queue timeout; ``expected_wait_s`` is the estimate
    for a retry (None when nothing has been measured yet)."""

    def __init__(self, waited_s: float, expected_wait_s: float | None) -> None:
        self.waited_s = waited_s
        self.expected_wait_s = expected_wait_s
        hint = f"; expected wait about {expected_wait_s:.1f} s" if expected_wait_s is not None else ""
        super().__init__(f"no KV slot free within {waited_s:.1f} s{hint}; retry later")


class QueueFull(Exception):
    """Too many calls already wait."""


@dataclass(frozen=True)
class QueueStats:
    """What ``GetServerInfo`` reports: calls waiting now, and recent waits."""

    depth: int
    recent_wait_s: float  # median of the last waits (0 when none waited)
    expected_wait_s: float | None


class FairWaitQueue(Generic[T]):
    """Hands free slots to waiting calls, one principal at a time."""

    def __init__(self, *, max_waiting: int = 1024, history: int = 64, parallel: int = 1) -> None:
        """``parallel``: how many calls are served at once (the slots), for the expected wait."""
        self.max_waiting = max_waiting
        self.parallel = max(1, parallel)
        # principal -> its waiters, oldest first; the dict's order is the round-robin order.
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()
        self._waits: deque[float] = deque(maxlen=history)
        self._holds: deque[float] = deque(maxlen=history)
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Whether a principal may take a slot now (the server's share rule).
        self._eligible: Callable[[str], bool] = lambda _principal: True

    @property
    def depth(self) -> int:
        # list() copies the values in one step under the GIL, so a metrics
        # scrape from another thread may read it while the loop changes it.
        return sum(map(len, list(self._waiting.values())))

    def depth_of(self, principal: str) -> int:
        return len(self._waiting.get(principal, ()))

    async def acquire(self, principal: str, try_acquire: Callable[[], T | None], timeout_s: float,
                      eligible: Callable[[str], bool] | None = None) -> tuple[T, float]:
        """``try_acquire()``'s first non-None result and the seconds waited.

        A call that finds nobody waiting and a free slot goes at once; otherwise
        it queues behind its own principal's earlier calls, and principals take
        turns.  Raises :class:`QueueTimeout` after ``timeout_s`` and
        :class:`QueueFull` when ``max_waiting`` calls already wait.
        """
        self._loop = asyncio.get_running_loop()
        if eligible is not None:
            self._eligible = eligible
        t0 = time.monotonic()
        if self._eligible(principal) and not any(self._eligible(p) for p in self._waiting):
            got = try_acquire()
            if got is not None:
                return got, 0.0
        if self.depth >= self.max_waiting:
            raise QueueFull(f"{self.depth} calls already wait for a KV slot; retry later")
        deadline = t0 + timeout_s
        first = True
        while True:
            # Woken but beaten to the slot: back to the head of the line.
            waiter = self._enqueue(principal, front=not first)
            first = False
            try:
                await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self._drop(principal, waiter)
                self._pass_on(waiter)
                raise QueueTimeout(time.monotonic() - t0, self.expected_wait_s()) from None
            except BaseException:  # cancelled by the client
                self._drop(principal, waiter)
                self._pass_on(waiter)
                raise
            try:
                got = try_acquire()
            except BaseException:
                self.notify()  # refused for another reason: the free slot goes to the next
                raise
            if got is not None:
                waited = time.monotonic() - t0
                self._waits.append(waited)
                self.notify()  # maybe more than one slot is free
                return got, waited
            if time.monotonic() >= deadline:
                raise QueueTimeout(time.monotonic() - t0, self.expected_wait_s())

    def notify(self) -> None:
        """A slot may be free: wake the head of the next principal's queue
        (skipping principals that hold their share of the slots now)."""
        for principal in list(self._waiting):
            if not self._eligible(principal):
                continue
            queue = self._waiting[principal]
            while queue and queue[0].done():
                queue.popleft()
            if not queue:
                del self._waiting[principal]
                continue
            waiter = queue.popleft()
            if not queue:
                del self._waiting[principal]
            else:
                self._waiting.move_to_end(principal)  # round-robin: this principal goes last
            waiter.set_result(None)
            return

    def notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.notify)
            except RuntimeError:  # the loop closed in between
                pass

    def record_hold(self, seconds: float) -> None:
        """How long a lease held its slot: the basis of the expected wait."""
        self._holds.append(seconds)

    def expected_wait_s(self) -> float | None:
        """A rough estimate for a call arriving now: the median hold time for
        each round of ``parallel`` calls ahead of it and itself, or the recent
        median wait."""
        if self._holds:
            return statistics.median(self._holds) * math.ceil((1 + self.depth) / self.parallel)
        return statistics.median(self._waits) if self._waits else None

    def stats(self) -> QueueStats:
        return QueueStats(
            depth=self.depth,
            recent_wait_s=statistics.median(self._waits) if self._waits else 0.0,
            expected_wait_s=self.expected_wait_s(),
        )

    def _enqueue(self, principal: str, *, front: bool = False) -> asyncio.Future:
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(principal, deque())
        if front:
            queue.appendleft(waiter)
            self._waiting.move_to_end(principal, last=False)
        else:
            queue.append(waiter)
        return waiter

    def _drop(self, principal: str, waiter: asyncio.Future) -> None:
        queue = self._waiting.get(principal)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[principal]

    def _pass_on(self, waiter: asyncio.Future) -> None:
        """A waiter that was woken but leaves: its wake-up goes to the next one."""
        if waiter.done() and not waiter.cancelled():
            self.notify()
        elif not waiter.done():
            waiter.cancel()
