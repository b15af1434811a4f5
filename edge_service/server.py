"""The edge gRPC service (``edgeroute.v1.EdgeLLM``) on ``grpc.aio``.

The event loop only moves messages: the model runs in worker threads (one
per slot), and each Generate streams the worker's chunks through an
``asyncio.Queue``.  Cancelling a call sets the turn's cancel event; the worker
stops at the next token, and the slot is reused only after it has stopped.

Besides EdgeLLM the server exposes ``grpc.health.v1.Health`` (NOT_SERVING
while shutting down; open to anyone, for load balancers) and, with
``--reflection``, server reflection.

Security (docs/security.md): TLS and mTLS from the settings' files, the
:class:`~edge_service.auth.AuthInterceptor` outermost (every call but health
authenticated, one audit line per call), sessions bound to the caller's
principal, and a refusal to serve a non-loopback address unprotected.

Load and abuse (docs/operations.md): a Generate that finds every slot busy
waits in a :class:`~edge_service.fair_queue.FairWaitQueue` (principals take
turns) for at most ``--queue-timeout``; each principal has quotas of sessions
and of calls in flight; sizes, counts and times are bounded (output and input
tokens, messages, stop strings, Echo size and rate, generation time, a
client that stops reading); the transport has keepalive, ping-abuse, idle
and age limits; and :class:`~edge_service.metrics.EdgeMetrics` counts it all
(``--metrics-port``).

    server, port = create_server("127.0.0.1:0", settings)
    await server.start()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_service.auth import AuthInterceptor, TokenFileError, current_principal
from edge_service.backends import BACKENDS, Backend, Slot
from edge_service.errors import (
    Aborted,
    DeadlineExceeded,
    ErrorMappingInterceptor,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from edge_service.fair_queue import FairWaitQueue, QueueFull, QueueTimeout
from edge_service.limits import ConcurrencyLimit, RateLimiter, StallWatch
from edge_service.metrics import EdgeMetrics
from edge_service.security import ServerSecurity, check_exposure, is_loopback_host
from edge_service.sessions import EVICT_KV, Lease, SessionPool, SlotsBusy
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2, edge_pb2_grpc
from edgeroute.v1.types import GenerationParams, GenerationSummary, Message, ServerInfo

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.llm.conversation import GenerationStats

log = logging.getLogger(__name__)

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeLLM"].full_name
# The slot share rule (EdgeServicer._may_take_slot): principals that asked for
# a generation this recently count as sharing the edge.
_SHARE_WINDOW_S = 60.0
_SHARE_MEMORY = 4096
# How long a Generate waits for a cancelled generation to let go of its session,
# and how long for any generation on it (a client whose deadline passed may
# send its next turn before the server has heard that the last one is over).
_CANCEL_WAIT_S = 5.0
_BUSY_GRACE_S = 0.5
# Chunks a model thread may produce ahead of what its stream has written: a
# client that reads slowly slows its generation instead of growing a buffer.
_BUFFERED_CHUNKS = 64
# Pings faster than --min-ping-interval a client may send before its
# connection is closed (GOAWAY ENHANCE_YOUR_CALM); gRPC's default.
MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class GenerationRecord:
    """What one Generate did, kept in a short log for profiling and tests."""

    session_id: str
    slot: int
    kv_restored: bool
    prompt_tokens: int
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    max_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"


# What the model thread hands the Generate handler, in order: chunks, then
# exactly one Done or Failed.


@dataclass(frozen=True)
class Chunk:
    """A piece of the answer's text."""

    text: str


@dataclass(frozen=True)
class Done:
    """The answer is finished (or was cancelled); the slot's counts for the summary."""

    stats: GenerationStats


@dataclass(frozen=True)
class Failed:
    """The slot raised; the handler re-raises it for the error interceptor to map."""

    error: BaseException


TurnEvent = Chunk | Done | Failed


class EdgeServicer(edge_pb2_grpc.EdgeLLMServicer):
    """EdgeLLM on a backend whose slots are shared by sessions (see :mod:`edge_service.sessions`)."""

    def __init__(self, backend: Backend, settings: EdgeSettings, n_slots: int | None = None) -> None:
        n_slots = settings.slots_within_budget(backend.kv_bytes_per_slot()) if n_slots is None else n_slots
        slots: list[Slot] = [backend.new_slot() for _ in range(n_slots)]
        self.backend = backend
        self.settings = settings
        self.metrics = EdgeMetrics.create()
        self.pool: SessionPool[Slot] = SessionPool(
            slots, max_sessions=settings.max_sessions, kv_sharing=settings.kv_sharing,
            max_sessions_per_principal=settings.max_sessions_per_principal, ttl_s=settings.session_ttl_s,
            on_evict=lambda kind: self.metrics.evictions.labels(kind=kind).inc(),
            on_forget=backend.forget_kv,
        )
        self.queue: FairWaitQueue[Lease] = FairWaitQueue(max_waiting=settings.max_queue, parallel=n_slots)
        #: principal -> when it last asked for a generation (the slot share rule).
        self._last_generate: dict[str, float] = {}
        self.concurrency = ConcurrencyLimit(
            settings.max_concurrent_per_principal, on_refuse=lambda: self.metrics.hit("concurrent_per_principal")
        )
        self.echo_limiter = RateLimiter(settings.echo_rate, settings.echo_burst)
        self.metrics.bind(sessions=lambda: len(self.pool), busy_slots=self.pool.busy_slots,
                          queue_depth=lambda: self.queue.depth)
        self.health = health.aio.HealthServicer()
        self.records: deque[GenerationRecord] = deque(maxlen=256)
        # One worker per slot: a lease owns its slot, so there are never more
        # model calls than slots.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=n_slots, thread_name_prefix="edge-slot"
        )
        self._records_changed = threading.Condition()
        #: Leases asked to pause whose model has not stopped yet (each serves one waiting call).
        self._pausing: set[Lease] = set()
        self._sweeper: asyncio.Task | None = None
        self._metrics_http = None
        log.info(
            "edge backend %s: model %s, prompt format %s, n_ctx %d, %d slot(s), KV %s per slot",
            backend.name,
            backend.model_name,
            backend.prompt_format,
            backend.n_ctx,
            n_slots,
            _mib(backend.kv_bytes_per_slot()),
        )

    @property
    def n_slots(self) -> int:
        return len(self.pool.slots)

    def info(self) -> ServerInfo:
        s = self.settings
        queue = self.queue.stats()
        busy = self.pool.busy_slots()
        expected = 0.0 if busy < self.n_slots and queue.depth == 0 else queue.expected_wait_s
        return ServerInfo(
            backend=self.backend.name,
            model=self.backend.model_name,
            prompt_format=self.backend.prompt_format,
            n_ctx=self.backend.n_ctx,
            n_slots=self.n_slots,
            max_sessions=s.max_sessions,
            max_message_bytes=s.max_message_bytes,
            queue_depth=queue.depth,
            busy_slots=busy,
            queue_wait_s=queue.recent_wait_s,
            expected_queue_wait_s=expected,
            max_output_tokens=s.max_output_tokens,
            # The prompt must leave the window room for one token at least.
            max_input_tokens=min(s.max_input_tokens or self.backend.n_ctx, self.backend.n_ctx - 1),
            max_echo_bytes=s.echo_cap_bytes,
            max_sessions_per_principal=s.max_sessions_per_principal,
            max_concurrent_per_principal=s.max_concurrent_per_principal,
            queue_timeout_s=s.queue_timeout_s,
        )

    # --- RPCs ---------------------------------------------------------------

    # Every session call is made as the caller's principal (set by the auth
    # interceptor): another principal's sessions are invisible to it.

    async def OpenSession(self, request, context):
        sid = self.pool.open(request.session_id or None, owner=current_principal())
        return edge_pb2.OpenSessionResponse(session_id=sid)

    async def CloseSession(self, request, context):
        self.pool.close(request.session_id, owner=current_principal())
        return edge_pb2.CloseSessionResponse()

    async def GetServerInfo(self, request, context):
        return self.info().to_pb()

    async def Echo(self, request, context):
        s = self.settings
        if not self.echo_limiter.allow(current_principal()):
            self.metrics.hit("echo_rate")
            raise ResourceExhausted(
                f"Echo is limited to {s.echo_rate:g} calls per second per principal (burst {s.echo_burst}); "
                "slow down", retry_after_s=1.0 / s.echo_rate,
            )
        limit = s.echo_cap_bytes
        if request.response_bytes > limit:
            self.metrics.hit("echo_bytes")
            raise InvalidArgument(f"response_bytes must be <= {limit}, got {request.response_bytes}")
        return edge_pb2.EchoResponse(payload=bytes(request.response_bytes))

    async def Generate(self, request, context) -> AsyncIterator[edge_pb2.GenerateResponse]:
        t_arrival = time.perf_counter()
        messages, params, clipped_to = self._parse_turn(request)
        owner = current_principal()
        with self.concurrency.admit(owner):  # --max-concurrent-per-principal
            if request.open_session:
                self.pool.ensure(request.session_id, owner=owner)
            lease = await self._acquire(request, owner)
            lease.call_over = lambda: _call_over(context)
            queue_s = time.perf_counter() - t_arrival
            async for response in self._serve_turn(lease, messages, params, context, queue_s, clipped_to):
                yield response

    async def _serve_turn(
        self, lease: Lease, messages: list[Message], params: GenerationParams, context,
        queue_s: float, clipped_to: int | None,
    ) -> AsyncIterator[edge_pb2.GenerateResponse]:
        """Stream the turn on its lease: chunks as the model makes them, each
        write watched for a client that stopped reading, the whole bounded by
        ``--max-generation-s``; then release the lease and send ``done``."""
        turn = _Turn(self, lease)
        watch = StallWatch(context, self.settings.stream_stall_timeout_s, lambda: self._stalled(turn))
        # Every way out (finished, refused, failed, cancelled by the client,
        # the deadline or a limit) goes through the one release in ``finally``.
        try:
            deadline = time.monotonic() + self.settings.max_generation_s
            answer: list[str] = []
            paused_s = 0.0
            while True:  # one pass per part of the answer: more than one if it was pre-empted
                turn.future, events, credits = self._start_model(lease, messages, params)
                while not isinstance(event := await self._next_event(events, deadline), Done):
                    if isinstance(event, Failed):
                        self._fail(lease, event.error, answered=bool(answer))
                    answer.append(event.text)
                    self._maybe_preempt(lease)
                    watch.arm()
                    yield edge_pb2.GenerateResponse(chunk=edge_pb2.TokenChunk(text=event.text))
                    watch.disarm()
                    credits.release()
                await turn.future  # the thread has nothing left to do
                self._pausing.discard(lease)
                if event.stats.finish_reason != "paused":
                    break
                paused_s += await self._resume(lease, deadline, params)
            stats = _merged([*lease.segments, event.stats])
            summary = _summary(stats, queue_s + paused_s, lease.kv_restored, clipped_to)
            turn.messages = [*messages, Message("assistant", "".join(answer))]
        finally:
            self._pausing.discard(lease)
            watch.disarm()
            turn.release()
        self._observe(summary, paused_s)
        # Released before the final message: a client that sends its next turn
        # the moment it has this one must find the session idle and its
        # transcript updated.
        watch.arm()
        yield edge_pb2.GenerateResponse(done=summary.to_pb())
        watch.disarm()

    def _maybe_preempt(self, lease: Lease) -> None:
        """Ask the lease's generation to pause (``--preempt-after-s``) when it
        has held its slot that long and a call of a principal with less slot
        time used waits for one."""
        after = self.settings.preempt_after_s
        if not after or lease.pause.is_set() or not lease.slot.supports_pause:
            return
        running_s = time.monotonic() - lease.acquired_at
        if running_s < after:
            return
        # One pause per waiting call: the calls already asked to pause serve the first ones.
        if self.queue.waiting_ahead_of(lease.session.owner, running_s) > len(self._pausing):
            lease.pause.set()
            self._pausing.add(lease)

    async def _resume(self, lease: Lease, deadline: float, params: GenerationParams) -> float:
        """The generation paused: give its slot up (its principal is charged
        the time it held it), wait in the fair queue for one again, and
        return the seconds waited.  The session stays busy meanwhile; an
        answer that never goes on is recorded as cancelled."""
        owner = lease.session.owner
        lease.segments.append(lease.slot.last_stats)
        lease.continuation = lease.slot.last_continuation
        if lease.displaced is not None:  # the part's slot was taken from an idle session
            self.metrics.evictions.labels(kind=EVICT_KV).inc()
        self.queue.charge(owner, time.monotonic() - lease.acquired_at)
        self.pool.suspend(lease)
        self.metrics.preemptions.inc()
        t0 = time.monotonic()
        try:
            await self._wait_to_resume(lease, deadline)
        except BaseException:
            parts = _merged(lease.segments)
            self._record(lease, params, dataclasses.replace(parts, finish_reason="cancelled"))
            raise
        return time.monotonic() - t0

    async def _wait_to_resume(self, lease: Lease, deadline: float) -> None:
        """Wait in the fair queue, as the lease's principal, for a slot to go
        on with; ABORTED at once when the lease is cancelled meanwhile (its
        session closed, the server stopping), DEADLINE_EXCEEDED at
        ``--max-generation-s``."""
        owner = lease.session.owner

        def attempt() -> Lease | None:
            if not self._may_take_slot(owner):
                return None
            try:
                return self.pool.resume(lease)
            except SlotsBusy:
                return None

        wait = asyncio.ensure_future(self.queue.acquire(
            owner, attempt, max(0.0, deadline - time.monotonic()), eligible=self._may_take_slot, queue_first=True,
        ))
        try:
            while not wait.done():
                await asyncio.wait({wait}, timeout=0.05)
                if not wait.done() and lease.cancel.is_set():
                    raise Aborted("the generation was cancelled while it was paused "
                                  "(its session was closed or the server is stopping)")
            wait.result()
        except QueueTimeout:
            self.metrics.hit("max_generation_s")
            raise DeadlineExceeded(
                f"the generation, paused for other callers, could not go on within the server's limit of "
                f"{self.settings.max_generation_s:g} s (--max-generation-s) and was cancelled"
            ) from None
        finally:
            if not wait.done():
                wait.cancel()

    async def _next_event(self, events: asyncio.Queue[TurnEvent], deadline: float) -> TurnEvent:
        """The model's next event, or DEADLINE_EXCEEDED once ``--max-generation-s`` has passed."""
        if not events.empty() and time.monotonic() < deadline:
            return events.get_nowait()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self.metrics.hit("max_generation_s")
            raise DeadlineExceeded(
                f"the generation ran past the server's limit of {self.settings.max_generation_s:g} s "
                "(--max-generation-s) and was cancelled"
            ) from None

    def _stalled(self, turn: "_Turn") -> None:
        """The stream's client stopped reading: stop its model and let go of
        the lease now (the handler may never run again), so the slot frees."""
        turn.release()
        self.metrics.hit("stream_stall")
        log.info("a Generate stream was not read for %.1f s; cancelled", self.settings.stream_stall_timeout_s)

    def _observe(self, summary: GenerationSummary, paused_s: float = 0.0) -> None:
        """The metrics of a finished answer; its pauses (after its first
        token) count as waiting for a slot, not towards its TTFT."""
        self.metrics.observe_generation(
            queue_s=summary.queue_s, ttft_s=summary.queue_s - paused_s + summary.ttft_s, decode_s=summary.decode_s,
            prefill=summary.prefill_tokens, cached=summary.cached_tokens, output=summary.output_tokens,
        )

    def _start_model(
        self, lease: Lease, messages: list[Message], params: GenerationParams
    ) -> tuple[asyncio.Future, asyncio.Queue[TurnEvent], threading.Semaphore]:
        """Run the turn on the lease's slot in a worker thread; its events
        arrive on the queue, and the thread waits for a credit (released once
        the chunk is written) after each chunk beyond ``_BUFFERED_CHUNKS``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TurnEvent] = asyncio.Queue()
        credits = threading.Semaphore(_BUFFERED_CHUNKS)
        prompt = [m.to_dict() for m in (*lease.transcript, *messages)]
        future = loop.run_in_executor(
            self._executor, self._run_slot, lease, prompt, params, loop, events, credits
        )
        return future, events, credits

    def _fail(self, lease: Lease, error: BaseException, *, answered: bool) -> NoReturn:
        """Raise the model thread's error for the interceptor to map."""
        if isinstance(error, InvalidArgument) and not answered:
            # Refused before the model ran: the slot's KV is still the
            # displaced session's, and a transcript cut for this call is undone.
            self.pool.give_back(lease)
        raise error

    def _release(self, lease: Lease, future: asyncio.Future | None, turn: list[Message] | None) -> None:
        """Let go of the lease: commit ``turn``, or, without one (the client
        cancelled, the deadline passed, an error), stop the model and keep the
        transcript unchanged.

        The lease has two holders, this handler and the model thread; the slot
        is free again only when both are done, so a cancelled generation still
        holds it until its thread has stopped.  Then the wait queue hears of it.
        """
        if turn is None:
            lease.cancel.set()
        elif lease.displaced is not None:
            self.metrics.evictions.labels(kind=EVICT_KV).inc()
        self.pool.commit(lease, turn)
        held = time.monotonic() - lease.acquired_at
        done = lambda *_: self._lease_done(lease, held if turn is not None else None)  # noqa: E731
        done()  # this handler's hold
        if future is None or future.done():  # the thread never started, or has stopped
            done()
        else:
            future.add_done_callback(done)

    def _lease_done(self, lease: Lease, held_s: float | None) -> None:
        """Both holders are done: the slot is free.  Its principal is charged
        the whole time the slot was held (the fair queue's counter), then the
        queue hears of it; both on the event loop, whichever thread gets here."""
        if self.pool.done(lease):
            # A lease that ends paused held no slot since it was charged, at the pause.
            if not lease.suspended:
                used_s = time.monotonic() - lease.acquired_at
                if held_s is not None:
                    self.queue.record_hold(held_s)
                self.queue.call_threadsafe(self.queue.charge, lease.session.owner, used_s)
            self.queue.notify_threadsafe()

    async def _acquire(self, request: edge_pb2.GenerateRequest, owner: str) -> Lease:
        """The session's lease, waiting in the fair queue while every slot is busy."""
        length = request.transcript_length if request.HasField("transcript_length") else None
        digest = request.transcript_digest if request.HasField("transcript_digest") else None

        def attempt() -> Lease | None:
            if not self._may_take_slot(owner):
                return None
            try:
                return self.pool.acquire(request.session_id, length, digest=digest, owner=owner)
            except SlotsBusy:
                return None

        self._seen(owner)

        t_start = time.monotonic()
        while True:
            try:
                # Refused at once for what no wait can change (a bad or unknown id).
                self.pool.check(request.session_id, owner=owner)
                lease, _ = await self.queue.acquire(owner, attempt, self.settings.queue_timeout_s,
                                                    eligible=self._may_take_slot)
                return lease
            except FailedPrecondition:
                # A cancelled generation stops within a token; wait for it
                # rather than refuse a client that cancelled and moved on.
                waited = time.monotonic() - t_start
                winding_down = self.pool.winding_down(request.session_id, owner=owner)
                if waited > (_CANCEL_WAIT_S if winding_down else _BUSY_GRACE_S):
                    raise
                await asyncio.sleep(0.01)
            except QueueTimeout as exc:
                raise self._queue_refusal("queue_timeout", exc.waited_s, exc.expected_wait_s) from None
            except QueueFull:
                raise self._queue_refusal("queue_full", None, self.queue.expected_wait_s()) from None

    def _seen(self, principal: str) -> None:
        """Remember that ``principal`` asked for a generation now (bounded: old entries go)."""
        now = time.monotonic()
        self._last_generate[principal] = now
        if len(self._last_generate) > _SHARE_MEMORY:
            for name, at in list(self._last_generate.items()):
                if now - at > _SHARE_WINDOW_S:
                    del self._last_generate[name]

    def _may_take_slot(self, principal: str) -> bool:
        """The slot share rule: while another principal has asked for a
        generation within the last minute, one principal holds at most
        ``max_slots_per_principal`` slots (default all but one), so that long
        generations of one principal cannot hold every slot; a principal
        alone on the edge may use them all."""
        cap = self.settings.max_slots_per_principal or max(1, self.n_slots - 1)
        if cap >= self.n_slots:
            return True
        now = time.monotonic()
        shared = any(p != principal and now - at <= _SHARE_WINDOW_S for p, at in self._last_generate.items())
        return not shared or self.pool.slots_held(principal) < cap

    def _queue_refusal(self, limit: str, waited_s: float | None, expected_s: float | None) -> ResourceExhausted:
        """RESOURCE_EXHAUSTED with the expected wait (in the details and the
        trailing metadata); without a measurement yet, the queue timeout is
        the estimate."""
        self.metrics.hit(limit)
        expected = expected_s if expected_s is not None else self.settings.queue_timeout_s
        if waited_s is None:
            why = f"{self.settings.max_queue} calls already wait for a KV slot (--max-queue)"
        else:
            why = f"no KV slot was free within {waited_s:.1f} s (--queue-timeout)"
        return ResourceExhausted(f"{why}; expected wait about {expected:.1f} s; retry later",
                                 retry_after_s=expected)

    def _parse_turn(self, request: edge_pb2.GenerateRequest) -> tuple[list[Message], GenerationParams, int | None]:
        """The request's new messages and generation parameters, checked
        against the limits; a ``max_tokens`` above ``--max-output-tokens`` is
        clipped to it (the third value: the limit when it was, else None)."""
        s = self.settings
        if len(request.messages) > s.max_messages:
            raise InvalidArgument(f"at most {s.max_messages} messages per request, got {len(request.messages)}")
        stop = request.params.stop
        if len(stop) > s.max_stop_strings:
            raise InvalidArgument(f"at most {s.max_stop_strings} stop strings, got {len(stop)}")
        if sum(len(x) for x in stop) > s.max_stop_chars:
            raise InvalidArgument(f"the stop strings must total at most {s.max_stop_chars} characters")
        messages, params = _parse_turn(request)
        if params.max_tokens <= s.max_output_tokens:
            return messages, params, None
        self.metrics.hit("max_output_tokens")
        return messages, dataclasses.replace(params, max_tokens=s.max_output_tokens), s.max_output_tokens

    # --- model thread -------------------------------------------------------

    def _run_slot(self, lease: Lease, prompt, params, loop, queue: asyncio.Queue[TurnEvent],
                  credits: threading.Semaphore) -> None:
        """Runs in a worker thread: stream the slot into the handler's queue,
        at most ``_BUFFERED_CHUNKS`` ahead of the writes."""
        slot: Slot = lease.slot
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        stats = None
        try:
            self._check_input_tokens(slot, prompt)
            slot.begin_turn(lease.session.session_id, lease.session.owner)
            more = {"pause": lease.pause, "continuation": lease.continuation} if slot.supports_pause else {}
            for chunk in slot.stream(prompt, params, lease.cancel, lease.kv_owner, **more):
                put(Chunk(chunk))
                # A cancelled turn stops at the slot's next token.
                while not credits.acquire(timeout=0.05) and not lease.cancel.is_set():
                    pass
            stats = slot.last_stats
            if stats is None:
                raise RuntimeError("backend slot finished without stats")
            put(Done(stats))
        except BaseException as exc:  # noqa: BLE001 - handed to the handler, which maps it
            stats = getattr(slot, "last_stats", None)
            try:
                put(Failed(exc))
            except RuntimeError:  # loop closed: the server is gone
                log.debug("generation error after the loop closed", exc_info=True)
        finally:
            if stats is None or stats.finish_reason != "paused":  # the whole answer, once
                self._record(lease, params, _merged([*lease.segments, stats]) if stats is not None else None)

    def _check_input_tokens(self, slot: Slot, prompt: list[dict]) -> None:
        """INVALID_ARGUMENT for a prompt above ``--max-input-tokens`` (before
        the slot's KV is touched; without the flag the context window is the
        backend's own check)."""
        if self.settings.max_input_tokens is None:
            return
        n_tokens = slot.count_tokens(prompt)
        if n_tokens is not None and n_tokens > self.settings.max_input_tokens:
            self.metrics.hit("max_input_tokens")
            raise InvalidArgument(
                f"the prompt is {n_tokens} tokens; this server takes at most "
                f"{self.settings.max_input_tokens} (--max-input-tokens): start a new conversation"
            )

    def _record(self, lease: Lease, params: GenerationParams, stats) -> None:
        if lease.cancel.is_set() or (stats is not None and stats.finish_reason == "cancelled"):
            reason = "cancelled"
        elif stats is None:
            reason = "error"
        else:
            reason = stats.finish_reason
        record = GenerationRecord(
            session_id=lease.session.session_id,
            slot=lease.slot_index,
            kv_restored=lease.kv_restored,
            prompt_tokens=getattr(stats, "prompt_tokens", 0),
            prefill_tokens=getattr(stats, "prefill_tokens", 0),
            cached_tokens=getattr(stats, "cached_tokens", 0),
            output_tokens=getattr(stats, "output_tokens", 0),
            max_tokens=params.max_tokens,
            finish_reason=reason,
        )
        log.debug("generation %s", record)
        with self._records_changed:
            self.records.append(record)
            self._records_changed.notify_all()

    def wait_for_record(self, predicate, timeout_s: float) -> GenerationRecord | None:
        """The newest record matching ``predicate``, waiting up to ``timeout_s`` for it."""
        deadline = time.monotonic() + timeout_s
        with self._records_changed:
            while True:
                for record in reversed(self.records):
                    if predicate(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._records_changed.wait(left)

    # --- lifecycle ----------------------------------------------------------

    async def mark_serving(self) -> None:
        """Start the background work (the TTL sweep, the metrics endpoint),
        then report SERVING.  Call once the gRPC server has started."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_expired())
        self._start_metrics()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _sweep_expired(self) -> None:
        """Delete idle sessions past ``--session-ttl`` now and then (lookups
        check the TTL too, so a session is never served past it)."""
        interval = min(max(self.settings.session_ttl_s / 4, 0.05), 60.0)
        while True:
            await asyncio.sleep(interval)
            n = self.pool.expire_idle()
            if n:
                log.info("deleted %d idle session(s) past the %g s TTL", n, self.settings.session_ttl_s)

    def _start_metrics(self) -> None:
        port, host = self.settings.metrics_port, self.settings.metrics_host
        if not port:
            return
        if not is_loopback_host(host):
            log.warning("the metrics endpoint on %s:%d has no authentication: anyone who reaches it "
                        "reads the load and the counters", host, port)
        try:
            self._metrics_http = self.metrics.serve(port, host)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host}:{port}: {exc}") from None
        log.info("metrics on http://%s:%d/metrics", host, port)

    def _stop_background(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._metrics_http is not None:
            http_server, thread = self._metrics_http
            http_server.shutdown()
            http_server.server_close()
            self._metrics_http = None

    async def shutdown(self, server: grpc.aio.Server, grace_s: float | None = None) -> None:
        """Stop taking calls, give running streams ``grace_s`` to finish, then free the model."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await server.stop(grace)
        self._stop_background()
        # Streams still running after the grace period were cancelled by
        # server.stop; wait for their model threads before freeing the model.
        self.pool.cancel_all()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """Wait for the model threads to stop, then free the model."""
        self._executor.shutdown(wait=True)
        self.backend.close()


def _call_over(context) -> bool:
    """Whether the call has ended or its deadline has passed (its handler
    may not have been cancelled yet)."""
    remaining = context.time_remaining()
    return context.done() or (remaining is not None and remaining <= 0)


class _Turn:
    """One Generate's hold on its lease, released once (by the handler's
    ``finally``, or earlier by the stall watchdog); ``messages`` is the
    finished turn to commit, None to keep the transcript as it was."""

    def __init__(self, servicer: EdgeServicer, lease: Lease) -> None:
        self.servicer = servicer
        self.lease = lease
        self.future: asyncio.Future | None = None
        self.messages: list[Message] | None = None
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.servicer._release(self.lease, self.future, self.messages)


def _parse_turn(request: edge_pb2.GenerateRequest) -> tuple[list[Message], GenerationParams]:
    """The request's new messages and generation parameters, checked."""
    try:
        messages = [Message.from_pb(m) for m in request.messages]
        params = GenerationParams.from_pb(request.params) if request.HasField("params") else GenerationParams()
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    if not messages:
        raise InvalidArgument("messages must not be empty: send the new turns, ending with a user message")
    if messages[-1].role != "user":
        raise InvalidArgument("the last message must have role user")
    return messages, params


def _merged(parts: list[GenerationStats]) -> GenerationStats:
    """The stats of an answer made in parts (pre-empted): the prompt's counts
    and TTFT from the first part, the tokens and decode time of all (a later
    part's prefill, the KV it got back, counts as decode time), the finish of
    the last."""
    if len(parts) == 1:
        return parts[0]
    first, last = parts[0], parts[-1]
    return dataclasses.replace(
        first,
        output_tokens=sum(p.output_tokens for p in parts),
        decode_s=sum(p.decode_s for p in parts) + sum(p.prefill_s for p in parts[1:]),
        finish_reason=last.finish_reason,
    )


def _summary(stats: GenerationStats, queue_s: float, kv_restored: bool, clipped_to: int | None = None) -> GenerationSummary:
    """The final message of a finished answer."""
    if stats.finish_reason == "cancelled":
        # Cancelled on the server (the session was closed): the answer is
        # incomplete, so no final message.
        raise Aborted("the generation was cancelled because its session was closed")
    return GenerationSummary(
        prompt_tokens=stats.prompt_tokens,
        prefill_tokens=stats.prefill_tokens,
        cached_tokens=stats.cached_tokens,
        output_tokens=stats.output_tokens,
        prefill_s=stats.prefill_s,
        decode_s=stats.decode_s,
        ttft_s=stats.ttft_s,
        queue_s=queue_s,
        finish_reason="length" if stats.finish_reason == "length" else "stop",
        # A backend whose KV lives upstream knows better than the session pool.
        kv_restored=getattr(stats, "kv_restored", kv_restored),
        max_tokens_clipped_to=clipped_to,
        cached_tokens_unknown=getattr(stats, "cached_tokens_unknown", False),
    )


def _mib(n_bytes: int | None) -> str:
    return "unknown" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"


def build_servicer(settings: EdgeSettings, backend: Backend | None = None) -> EdgeServicer:
    """Load the backend named in ``settings`` (unless given) and its slots."""
    backend = backend if backend is not None else BACKENDS.create(settings.backend, settings)
    try:
        return EdgeServicer(backend, settings)
    except BaseException:
        backend.close()
        raise


def server_options(settings: EdgeSettings) -> list[tuple[str, int]]:
    """The gRPC channel arguments of the server: message size, keepalive and
    ping abuse, connection idle and age limits, streams per connection."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # The server pings every connection; a peer that does not answer
        # within the timeout (a phone that vanished, a frozen process) is
        # closed, and its calls cancelled, which frees their slots.
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC 1.6x+ applies the ack timeout of a ping (any ping: keepalive or
        # a flow-control probe) only through this argument.
        ("grpc.http2.ping_timeout_ms", ms(settings.keepalive_timeout_s)),
        # A call that is waiting (a slot, a frozen client) sends no data; the
        # keepalive pings must go out all the same.
        ("grpc.http2.max_pings_without_data", 0),
        # Clients may ping too (their own keepalive), but not faster than this.
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
    ]


def create_server(
    address: str,
    settings: EdgeSettings,
    *,
    servicer: EdgeServicer | None = None,
    security: ServerSecurity | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` server with EdgeLLM, health and (if asked for)
    reflection, bound to ``address``: with TLS when the settings name a
    certificate, and refused on a non-loopback address without TLS and auth
    (:func:`~edge_service.security.check_exposure`).

    Call from inside the event loop that will run it.  ``servicer`` defaults to
    :func:`build_servicer` (which loads the model); pass your own to keep a
    handle on it: ``await servicer.mark_serving()`` after ``await
    server.start()``, and ``await servicer.shutdown(server)`` to stop.
    ``security`` defaults to the one the settings describe.
    """
    check_exposure(address, settings)
    security = security if security is not None else ServerSecurity.from_settings(settings)
    servicer = servicer if servicer is not None else build_servicer(settings)
    # Auth first: nothing (not even the error mapping) runs for a caller
    # without credentials, and the audit line (and the metrics) see the final
    # status code.
    interceptors = [AuthInterceptor(security.policy, on_call=servicer.metrics.call), ErrorMappingInterceptor()]
    server = grpc.aio.server(
        interceptors=interceptors, options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    edge_pb2_grpc.add_EdgeLLMServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    try:
        if security.credentials is not None:
            port = server.add_secure_port(address, security.credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise OSError(f"could not bind the edge service to {address}: {exc}") from None
    if port == 0:
        raise OSError(f"could not bind the edge service to {address}")
    return server, port


def reload_tokens(security: ServerSecurity) -> None:
    """SIGHUP: re-read the token file; a bad file keeps the old principals."""
    if security.policy.tokens is None:
        log.warning("SIGHUP: this server has no --auth-tokens file to reload")
        return
    try:
        n = security.reload_tokens()
    except TokenFileError as exc:
        log.error("token file not reloaded, the previous principals stay in force: %s", exc)
        return
    log.info("token file reloaded: %d principal(s)", n)


def _watch_sighup(security: ServerSecurity) -> Callable[[], None]:
    """Reload the token file on SIGHUP (main thread only); returns the undo.
    Installed without a token file too, so that a stray SIGHUP (the default
    action ends the process) is logged rather than fatal."""
    import signal

    if not hasattr(signal, "SIGHUP"):
        return lambda: None
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, reload_tokens, security)
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
        log.warning("SIGHUP cannot reload the token file here (not the main thread)")
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


async def serve(
    settings: EdgeSettings,
    address: str,
    stop: asyncio.Event,
    ready=None,
    *,
    security: ServerSecurity | None = None,
) -> None:
    """Run until ``stop`` is set, then shut down gracefully; SIGHUP reloads
    the token file.

    ``ready(port)`` is called once the server is accepting calls.  The
    exposure rule and the security files are checked before the model loads.
    """
    check_exposure(address, settings)
    security = security if security is not None else ServerSecurity.from_settings(settings)
    servicer = build_servicer(settings)
    try:
        server, port = create_server(address, settings, servicer=servicer, security=security)
    except BaseException:
        servicer.close()
        raise
    unwatch = _watch_sighup(security)
    try:
        await server.start()
        await servicer.mark_serving()
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("shutting down (grace %.1f s)", settings.shutdown_grace_s)
    finally:
        unwatch()
        await servicer.shutdown(server)


class EdgeServerThread:
    """An edge server on its own event loop in a background thread.

    For tests, benchmarks and ``edgeroute demo``; blocking code talks to it
    with :class:`device_runtime.link.edge_client.EdgeClient` at :attr:`target`.

        with EdgeServerThread(settings) as edge:
            client = EdgeClient(edge.target)
    """

    def __init__(
        self, settings: EdgeSettings, *, host: str = "127.0.0.1", port: int = 0,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self._requested_port = port
        self._backend = backend
        self.port: int | None = None
        self.servicer: EdgeServicer | None = None
        self.security: ServerSecurity | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def target(self) -> str:
        if self.port is None:
            raise RuntimeError("the edge server is not running")
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 300.0) -> "EdgeServerThread":
        self._thread = threading.Thread(target=self._run, name="edge-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the edge server did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        host = f"[{self.host}]" if ":" in self.host else self.host
        address = f"{host}:{self._requested_port}"
        # Checked before the model loads, as ``serve`` does.
        check_exposure(address, self.settings)
        self.security = ServerSecurity.from_settings(self.settings)
        self.servicer = build_servicer(self.settings, self._backend)
        try:
            server, port = create_server(address, self.settings, servicer=self.servicer, security=self.security)
        except BaseException:
            self.servicer.close()
            raise
        try:
            await server.start()
            await self.servicer.mark_serving()
            self.port = port
            self._started.set()
            await self._stop.wait()
        finally:
            await self.servicer.shutdown(server)

    def reload_tokens(self) -> int:
        """Re-read the token file, as SIGHUP does for ``edgeroute serve``: the
        number of principals; ``TokenFileError`` (old principals kept) otherwise."""
        if self.security is None:
            raise RuntimeError("the edge server is not running")
        return self.security.reload_tokens()

    def stop(self, timeout_s: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.port = None

    def __enter__(self) -> "EdgeServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
