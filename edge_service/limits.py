"""Per-principal limits and the stream watchdog of the edge service.

- :class:`RateLimiter`: a token bucket per principal (the ``Echo`` rate), in
  a bounded table so that many principals cannot grow it without end.
- :class:`ConcurrencyLimit`: how many Generate calls each principal has
  running or waiting; past the limit a call is refused at once, so one
  principal's burst neither fills the wait queue nor touches anyone else.
- :class:`StallWatch`: a stream whose client stops reading leaves its
  handler suspended in ``yield`` (gRPC's flow control holds the write once
  the transport's buffers are full); the watch times each write and, past
  the limit, ends the call from outside the handler and stops its model.

Everything but :class:`RateLimiter` runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import grpc

from edge_service.errors import EdgeServiceError, ResourceExhausted, status_for


class RateLimiter:
    """``rate`` calls per second per principal, ``burst`` at once (a token bucket).

    The table holds at most ``max_principals`` buckets; when it is full the
    least recently seen principal's bucket is dropped (it starts full again
    on its next call, so the bound costs some precision, never correctness).
    """

    def __init__(self, rate: float, burst: int, *, max_principals: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.max_principals = max_principals
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # principal -> (tokens, at)

    def allow(self, principal: str) -> bool:
        """Take one token of ``principal``'s bucket; False when it is empty."""
        now = self._clock()
        tokens, at = self._buckets.pop(principal, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[principal] = (tokens, now)
        while len(self._buckets) > self.max_principals:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class ConcurrencyLimit:
    """At most ``limit`` calls in flight per principal."""

    def __init__(self, limit: int, *, on_refuse: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._on_refuse = on_refuse
        self._inflight: dict[str, int] = {}

    @contextmanager
    def admit(self, principal: str) -> Iterator[None]:
        """Hold one of ``principal``'s places for the ``with`` block, or
        RESOURCE_EXHAUSTED when it has none left."""
        held = self._inflight.get(principal, 0)
        if held >= self.limit:
            if self._on_refuse is not None:
                self._on_refuse()
            raise ResourceExhausted(
                f"you already have {self.limit} Generate calls running or waiting "
                "(--max-concurrent-per-principal); wait for one to finish"
            )
        self._inflight[principal] = held + 1
        try:
            yield
        finally:
            left = self._inflight[principal] - 1
            if left:
                self._inflight[principal] = left
            else:
                del self._inflight[principal]

    def inflight(self, principal: str) -> int:
        return self._inflight.get(principal, 0)


class StreamStalled(EdgeServiceError):
    """The client did not read the stream for the stall timeout."""

    code = grpc.StatusCode.CANCELLED


class StallWatch:
    """Times each write of one stream: :meth:`arm` before a ``yield``,
    :meth:`disarm` after it returns (gRPC resumes the generator only once the
    previous message is written).

    When a write takes longer than ``timeout_s``, ``on_stall()`` runs (the
    server stops the model and releases the slot there), then the handler's
    task is cancelled (its generator is closed, so its ``finally`` blocks
    run and the audit line says CANCELLED), and the call is ended with
    CANCELLED and a detail that names the limit.  Cancelling first matters:
    an abort alone would fail the pending write inside gRPC, which logs it as
    an error and never closes the handler.

    Create it inside the handler: it cancels the task it was created in.
    """

    def __init__(self, context: grpc.aio.ServicerContext, timeout_s: float,
                 on_stall: Callable[[], None]) -> None:
        self._context = context
        self._timeout_s = timeout_s
        self._on_stall = on_stall
        self._task = asyncio.current_task()
        self._handle: asyncio.TimerHandle | None = None
        self.stalled = False

    def arm(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._timeout_s, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self.stalled = True
        self._on_stall()
        if self._task is not None:
            self._task.cancel()
        asyncio.get_running_loop().create_task(self._end_call())

    async def _end_call(self) -> None:
        code, message = status_for(StreamStalled(
            f"the client did not read the stream for {self._timeout_s:g} s (--stream-stall-timeout); "
            "the generation was cancelled"
        ))
        try:
            await self._context.abort(code, message)
        except grpc.aio.AbortError:
            pass
        except Exception:  # noqa: BLE001 - the call ended meanwhile: nothing left to end
            pass
