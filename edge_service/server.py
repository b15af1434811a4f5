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

    server, port = create_server("127.0.0.1:0", settings)
    await server.start()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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
    ErrorMappingInterceptor,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from edge_service.security import ServerSecurity, check_exposure
from edge_service.sessions import Lease, SessionPool
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2, edge_pb2_grpc
from edgeroute.v1.types import GenerationParams, GenerationSummary, Message, ServerInfo

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.llm.conversation import GenerationStats

log = logging.getLogger(__name__)

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeLLM"].full_name
# Room for the protobuf/gRPC framing around an Echo payload.
_ECHO_OVERHEAD_BYTES = 1024
# How long a Generate waits for a cancelled generation to let go of its slot.
_CANCEL_WAIT_S = 5.0


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
        self.pool: SessionPool[Slot] = SessionPool(
            slots, max_sessions=settings.max_sessions, kv_sharing=settings.kv_sharing
        )
        self.health = health.aio.HealthServicer()
        self.records: deque[GenerationRecord] = deque(maxlen=256)
        # One worker per slot: a lease owns its slot, so there are never more
        # model calls than slots.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=n_slots, thread_name_prefix="edge-slot"
        )
        self._records_changed = threading.Condition()
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
        return ServerInfo(
            backend=self.backend.name,
            model=self.backend.model_name,
            prompt_format=self.backend.prompt_format,
            n_ctx=self.backend.n_ctx,
            n_slots=self.n_slots,
            max_sessions=self.settings.max_sessions,
            max_message_bytes=self.settings.max_message_bytes,
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
        limit = self.settings.max_message_bytes - _ECHO_OVERHEAD_BYTES
        if request.response_bytes > limit:
            raise InvalidArgument(f"response_bytes must be <= {limit}, got {request.response_bytes}")
        return edge_pb2.EchoResponse(payload=bytes(request.response_bytes))

    async def Generate(self, request, context) -> AsyncIterator[edge_pb2.GenerateResponse]:
        t_arrival = time.perf_counter()
        messages, params = _parse_turn(request)
        owner = current_principal()
        if request.open_session:
            self.pool.ensure(request.session_id, owner=owner)
        lease = await self._acquire(request, owner)
        future: asyncio.Future | None = None
        turn: list[Message] | None = None  # the finished turn, once the answer is complete
        # Every way out (finished, refused, failed, cancelled by the client or
        # the deadline) goes through the one release in ``finally``.
        try:
            future, events = self._start_model(lease, messages, params)
            queue_s = time.perf_counter() - t_arrival
            answer: list[str] = []
            while not isinstance(event := await events.get(), Done):
                if isinstance(event, Failed):
                    self._fail(lease, event.error, answered=bool(answer))
                answer.append(event.text)
                yield edge_pb2.GenerateResponse(chunk=edge_pb2.TokenChunk(text=event.text))
            summary = _summary(event.stats, queue_s, lease.kv_restored)
            await future  # the thread has nothing left to do
            turn = [*messages, Message("assistant", "".join(answer))]
        finally:
            self._release(lease, future, turn)
        # Released before the final message: a client that sends its next turn
        # the moment it has this one must find the session idle and its
        # transcript updated.
        yield edge_pb2.GenerateResponse(done=summary.to_pb())

    def _start_model(
        self, lease: Lease, messages: list[Message], params: GenerationParams
    ) -> tuple[asyncio.Future, asyncio.Queue[TurnEvent]]:
        """Run the turn on the lease's slot in a worker thread; its events arrive on the queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TurnEvent] = asyncio.Queue()
        prompt = [m.to_dict() for m in (*lease.transcript, *messages)]
        future = loop.run_in_executor(self._executor, self._run_slot, lease, prompt, params, loop, events)
        return future, events

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
        holds it until its thread has stopped.
        """
        if turn is None:
            lease.cancel.set()
        self.pool.commit(lease, turn)
        self.pool.done(lease)  # this handler's hold
        if future is None or future.done():  # the thread never started, or has stopped
            self.pool.done(lease)
        else:
            future.add_done_callback(lambda _: self.pool.done(lease))

    async def _acquire(self, request: edge_pb2.GenerateRequest, owner: str) -> Lease:
        length = request.transcript_length if request.HasField("transcript_length") else None
        digest = request.transcript_digest if request.HasField("transcript_digest") else None
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while True:
            try:
                return self.pool.acquire(request.session_id, length, digest=digest, owner=owner)
            except (FailedPrecondition, ResourceExhausted):
                # A cancelled generation stops within a token; wait for it
                # rather than refuse a client that cancelled and moved on.
                if not self.pool.cancelling() or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    # --- model thread -------------------------------------------------------

    def _run_slot(self, lease: Lease, prompt, params, loop, queue: asyncio.Queue[TurnEvent]) -> None:
        """Runs in a worker thread: stream the slot into the handler's queue."""
        slot: Slot = lease.slot
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        stats = None
        try:
            for chunk in slot.stream(prompt, params, lease.cancel, lease.kv_owner):
                put(Chunk(chunk))
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
            self._record(lease, params, stats)

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
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, server: grpc.aio.Server, grace_s: float | None = None) -> None:
        """Stop taking calls, give running streams ``grace_s`` to finish, then free the model."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await server.stop(grace)
        # Streams still running after the grace period were cancelled by
        # server.stop; wait for their model threads before freeing the model.
        self.pool.cancel_all()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """Wait for the model threads to stop, then free the model."""
        self._executor.shutdown(wait=True)
        self.backend.close()


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


def _summary(stats: GenerationStats, queue_s: float, kv_restored: bool) -> GenerationSummary:
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
        kv_restored=kv_restored,
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
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # Auth first: nothing (not even the error mapping) runs for a caller
    # without credentials, and the audit line sees the final status code.
    interceptors = [AuthInterceptor(security.policy), ErrorMappingInterceptor()]
    server = grpc.aio.server(interceptors=interceptors, options=options)
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
