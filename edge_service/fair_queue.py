"""The wait queue for KV slots: fair across principals by the slot time they used, FIFO within one.

A Generate that finds no free slot waits here instead of failing at once (as
llama.cpp's server queues requests for a free slot), for at most
``queue_timeout_s``; then it gets RESOURCE_EXHAUSTED with the expected wait in
its details.

Turns are handed out one principal at a time, so a principal with many
waiting calls cannot starve one with a single call.  Taking turns per *call*
is not enough, though: a principal whose calls each hold a slot for a
512-token answer would get as many turns as one asking for 20 tokens, and so
most of the slot time.  So each principal has a service counter, the
slot-seconds its calls held (charged when a slot is let go), and a free slot
goes to the waiting principal with the smallest counter; equal counters take
turns in round-robin order.  This is the virtual token counter of Sheng et
al., "Fairness in Serving Large Language Models" (OSDI 2024), counted in
slot-seconds, the resource a slot-per-conversation backend actually shares.
A principal that starts waiting is lifted to the smallest counter of those
already waiting (or of the last one served when nobody waits), so time spent
idle is not credit to spend later starving the others.

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

#: Principals whose service counters are kept (see :meth:`FairWaitQueue.charge`).
_MAX_COUNTERS = 4096


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
        #: Slot-seconds each principal has used (the fairness counter; bounded, see :meth:`charge`).
        self._service: dict[str, float] = {}
        #: The counter of the last principal given a slot: the floor for one that starts waiting.
        self._last_served = 0.0

    @property
    def depth(self) -> int:
        # list() copies the values in one step under the GIL, so a metrics
        # scrape from another thread may read it while the loop changes it.
        return sum(map(len, list(self._waiting.values())))

    def depth_of(self, principal: str) -> int:
        return len(self._waiting.get(principal, ()))

    async def acquire(self, principal: str, try_acquire: Callable[[], T | None], timeout_s: float,
                      eligible: Callable[[str], bool] | None = None, *, queue_first: bool = False
                      ) -> tuple[T, float]:
        """``try_acquire()``'s first non-None result and the seconds waited.

        A call that finds nobody waiting and a free slot goes at once; otherwise
        it queues behind its own principal's earlier calls, and principals take
        turns.  ``queue_first``: queue even so, and let the queue choose at
        once (a pre-empted call that just gave its slot up goes on only if no
        one ahead of it in the queue takes that slot).  Raises
        :class:`QueueTimeout` after ``timeout_s`` and :class:`QueueFull` when
        ``max_waiting`` calls already wait.
        """
        self._loop = asyncio.get_running_loop()
        if eligible is not None:
            self._eligible = eligible
        t0 = time.monotonic()
        if not queue_first and self._eligible(principal) and not any(self._eligible(p) for p in self._waiting):
            got = try_acquire()
            if got is not None:
                self._lift(principal)
                self._last_served = self._service.get(principal, 0.0)
                return got, 0.0
        if self.depth >= self.max_waiting and not queue_first:  # a paused call already had its place
            raise QueueFull(f"{self.depth} calls already wait for a KV slot; retry later")
        deadline = t0 + timeout_s
        first = True
        while True:
            # Woken but beaten to the slot: back to the head of the line.  A
            # paused call goes ahead of its own principal's later calls.
            waiter = self._enqueue(principal, front=not first, own_first=queue_first)
            if first and queue_first:
                self.notify()
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
        """A slot may be free: wake the head of the queue of the waiting
        principal with the least slot time used (skipping principals that hold
        their share of the slots now); ties go round-robin."""
        chosen: str | None = None
        for principal in list(self._waiting):
            queue = self._waiting[principal]
            while queue and queue[0].done():
                queue.popleft()
            if not queue:
                del self._waiting[principal]
                continue
            if not self._eligible(principal):
                continue
            if chosen is None or self._service.get(principal, 0.0) < self._service.get(chosen, 0.0):
                chosen = principal
        if chosen is None:
            return
        queue = self._waiting[chosen]
        waiter = queue.popleft()
        if not queue:
            del self._waiting[chosen]
        else:
            self._waiting.move_to_end(chosen)  # round-robin among equals: this principal goes last
        self._last_served = self._service.get(chosen, 0.0)
        waiter.set_result(None)

    def waiting_ahead_of(self, principal: str, running_s: float) -> int:
        """How many calls of other principals wait (and may take a slot now)
        whose counters are below ``principal``'s plus ``running_s``, the slot
        time its running call has used so far: for each, one such running
        call should yield its slot (the server's pre-emption)."""
        mine = self._service.get(principal, 0.0) + running_s
        ahead = 0
        for other, queue in list(self._waiting.items()):
            if other != principal and self._eligible(other) and self._service.get(other, 0.0) < mine:
                ahead += sum(1 for w in queue if not w.done())
        return ahead

    def notify_threadsafe(self) -> None:
        self.call_threadsafe(self.notify)

    def call_threadsafe(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the queue's event loop (from a model thread);
        before the first wait there is no loop yet, and ``fn`` runs here."""
        loop = self._loop
        if loop is None:
            fn(*args)
            return
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed in between
                pass

    def record_hold(self, seconds: float) -> None:
        """How long a completed turn held its slot: the basis of the expected wait."""
        self._holds.append(seconds)

    def charge(self, principal: str, seconds: float) -> None:
        """Add ``seconds`` of slot time to ``principal``'s counter (every
        lease, cancelled and failed ones included: they held the slot too).

        The table stays bounded: past ``_MAX_COUNTERS`` principals, those not
        waiting with the smallest counters are forgotten; they would be lifted
        to the floor on their next wait anyway.
        """
        if not math.isfinite(seconds) or seconds <= 0:
            return
        self._service[principal] = self._service.get(principal, 0.0) + seconds
        if len(self._service) > _MAX_COUNTERS:
            idle = sorted((c, p) for p, c in self._service.items() if p not in self._waiting)
            for _, name in idle[: len(self._service) - _MAX_COUNTERS // 2]:
                del self._service[name]

    def service_of(self, principal: str) -> float:
        """Slot-seconds charged to ``principal`` (0 for one never charged or forgotten)."""
        return self._service.get(principal, 0.0)

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

    def _lift(self, principal: str) -> None:
        """A principal that starts waiting (or is served at once) after a
        pause joins at the smallest counter of those waiting, or at the last
        served one's when nobody waits: idle time is not banked."""
        if principal in self._waiting:
            return
        floors = [self._service.get(p, 0.0) for p in self._waiting]
        floor = min(floors) if floors else self._last_served
        if self._service.get(principal, 0.0) < floor:
            self._service[principal] = floor

    def _enqueue(self, principal: str, *, front: bool = False, own_first: bool = False) -> asyncio.Future:
        """A new waiter of ``principal``: ``front``, at the head of the line
        (woken but beaten to the slot); ``own_first``, ahead of its own
        principal's calls but in the principals' order as it stands."""
        if not front:  # a call woken but beaten to the slot was already waiting: no lift
            self._lift(principal)
        waiter = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(principal, deque())
        if front or own_first:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        if front:
            self._waiting.move_to_end(principal, last=False)
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
