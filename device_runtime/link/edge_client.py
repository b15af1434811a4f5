"""The device's client of the edge service: one channel, streaming, deadlines.

A blocking API for the turn orchestrator:

    with EdgeClient("127.0.0.1:50051") as edge:
        sid = edge.open_session()
        stream = edge.generate(sid, [{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=64))
        for text in stream:
            print(text, end="")
        stream.result.prefill_tokens   # what the edge computed (ΔC_t of eq. 1 plus the prompt)

Failures split in two: :class:`EdgeUnavailable` (cannot connect, UNAVAILABLE,
deadline exceeded, a TLS handshake that fails), on which the device runs the
turn itself, and :class:`EdgeError` for every other status (UNAUTHENTICATED:
the edge refused the credentials).  Both carry the gRPC status as ``code`` (a
``grpc.StatusCode``), so callers decide by the status, never by the message
text.  Every call has a deadline (``timeout_s``).

The channel is secured by a :class:`~device_runtime.link.credentials.ChannelSecurity`
(TLS, mTLS, and the bearer token sent as metadata on every call).  What the edge
sends back is checked before anyone uses it: a final message whose timings are
not finite, negative or longer than the call itself, or whose counts do not add
up, is an :class:`EdgeError` (INTERNAL), never a ``ValueError``, so the device
answers the turn instead of crashing: anything on the path could send one.

The client also keeps W_q, the edge's expected wait for a KV slot
(:class:`EdgeQueue`, read by the orchestrator before each decision): every
final message's ``queue_s``, every ``GetServerInfo`` report, and a call refused
with RESOURCE_EXHAUSTED after waiting feed it, so no call is added for it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import grpc

from device_runtime.link.breaker import DEFAULT_COOL_DOWN_S, CircuitBreaker, parse_edge_targets
from device_runtime.link.credentials import ChannelSecurity
from device_runtime.link.estimation import QueueWaitEstimator, QueueWaitSettings
from edgeroute.v1 import edge_pb2, edge_pb2_grpc
from edgeroute.v1.types import GenerationParams, GenerationSummary, ServerInfo, messages_to_pb

__all__ = [
    "EdgeClient",
    "EdgeError",
    "EdgeQueue",
    "EdgeStream",
    "EdgeTurnResult",
    "EdgeUnavailable",
    "GenerationParams",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: More tokens than any context window holds: a count above it is a malformed report.
MAX_REPORTED_TOKENS = 1 << 24
#: How much longer than the call, as timed here, the edge may say it worked
#: (its clock and ours tick at slightly different rates; the link adds none).
TIMING_SLACK_S = 1.0
#: The longest server-supplied detail kept in an error message.
MAX_DETAIL_CHARS = 300


class EdgeUnavailable(RuntimeError):
    """The edge cannot be reached in time; the device should serve the turn.

    ``code``: UNAVAILABLE (also for a connection that never came up) or
    DEADLINE_EXCEEDED."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


class EdgeError(RuntimeError):
    """The edge answered with an error status ``code`` (e.g. ``grpc.StatusCode.NOT_FOUND``);
    ``details`` is the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


def _cap(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _map_rpc_error(exc: grpc.RpcError) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    code = code if code is not None else grpc.StatusCode.UNKNOWN
    details = _cap((exc.details() if hasattr(exc, "details") else None) or "")
    if code in _UNAVAILABLE_CODES:
        return EdgeUnavailable(f"edge unavailable ({code.name}): {details}", code)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EdgeError(code, (
            f"the edge refused the credentials ({details}): check --token-file or EDGEROUTE_TOKEN "
            "and, for mTLS, --tls-cert/--tls-key"
        ))
    return EdgeError(code, details)


def _handshake_hint(details: str, tls: bool) -> str:
    """Why a channel that never came up probably did not: a plaintext client
    on a TLS port sees the socket closed, a TLS client on a plaintext port (or
    with the wrong CA) a failed handshake.  Only words for a person; nothing
    decides by them."""
    low = details.lower()
    closed = any(w in low for w in ("socket closed", "connection reset", "end of file"))
    if closed and not tls:
        return ("; the edge closed the connection: if it serves TLS, give --tls-ca CA "
                "(or --tls for a certificate the system roots trust)")
    if closed:
        return ("; the edge closed the connection after the TLS handshake: it may require a client "
                "certificate signed by its client CA (--tls-cert/--tls-key)")
    if tls and any(w in low for w in ("handshake", "ssl", "tls", "certificate")):
        return ("; the TLS handshake failed: check that the edge serves TLS, that --tls-ca is the "
                "CA that signed its certificate for this address and, for mTLS, --tls-cert/--tls-key")
    return ""


def summary_problem(summary: GenerationSummary, max_tokens: int | None, elapsed_s: float) -> str | None:
    """What is impossible about an edge's final message, or None.

    ``GenerationSummary`` already refuses negative counts and timings that are
    not finite or negative; here the counts must add up
    (``prefill + cached == prompt``), stay below :data:`MAX_REPORTED_TOKENS`
    and within the ``max_tokens`` asked for, and the edge's own time must fit
    in the ``elapsed_s`` the call took as timed here: the online estimators and
    the telemetry take these numbers as measurements.
    """
    s = summary
    counts = {"prompt_tokens": s.prompt_tokens, "prefill_tokens": s.prefill_tokens,
              "cached_tokens": s.cached_tokens, "output_tokens": s.output_tokens}
    for name, value in counts.items():
        if value > MAX_REPORTED_TOKENS:
            return f"{name} = {value} is more than any context window holds"
    if s.prefill_tokens + s.cached_tokens != s.prompt_tokens:
        return (f"prefill_tokens ({s.prefill_tokens}) + cached_tokens ({s.cached_tokens}) "
                f"!= prompt_tokens ({s.prompt_tokens})")
    if max_tokens is not None and s.output_tokens > max_tokens:
        return f"output_tokens ({s.output_tokens}) > the max_tokens asked for ({max_tokens})"
    server_s = max(s.ttft_s, s.queue_s + s.prefill_s + s.decode_s)
    if not math.isfinite(server_s) or server_s > elapsed_s * 1.01 + TIMING_SLACK_S:
        return f"the edge reports {server_s:.6g} s of work in a call that took {elapsed_s:.3f} s"
    return None


@dataclass(frozen=True)
class EdgeTurnResult:
    """One edge turn as the device saw it.

    Token counts and ``prefill_s``/``decode_s`` come from the server;
    ``ttft_s`` (first chunk) and ``total_s`` (final message) are measured on
    the client from the call, so they include the link (eq. 7's comm term).
    """

    text: str
    output_tokens: int
    prompt_tokens: int
    prefill_tokens: int
    cached_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float
    total_s: float
    finish_reason: str = "stop"
    kv_restored: bool = False
    server_ttft_s: float = 0.0
    #: Seconds the call waited on the edge for a free slot (the edge's ``queue_s``).
    queue_s: float = 0.0
    #: The edge could not say how many prompt tokens it reused (an engine
    #: behind the ``openai`` backend that reports no cached-token count):
    #: ``cached_tokens`` (0) is no measurement then.
    cached_tokens_unknown: bool = False


def reported_wait_s(info: ServerInfo) -> float | None:
    """The wait the edge expects for a call arriving now, from its
    ``GetServerInfo``; None when it cannot say (every slot busy and nothing
    measured yet).

    Its own ``expected_queue_wait_s`` when it sends one (0 with a slot free);
    otherwise a free slot and nobody waiting is no wait, and a queue is its
    recent median wait.  An older edge without the load fields reads as idle
    (0), which is what it is to a caller: it refuses rather than queues.
    """
    expected = info.expected_queue_wait_s
    if expected is not None and math.isfinite(expected) and expected >= 0:
        return float(expected)
    if info.queue_depth == 0 and info.busy_slots < info.n_slots:
        return 0.0
    recent = info.queue_wait_s
    if info.queue_depth > 0 and math.isfinite(recent) and recent > 0:
        return float(recent)
    return None


class EdgeQueue:
    """W_q as this client has seen the edge: a :class:`QueueWaitEstimator` on
    the monotonic clock, safe to feed from the idle probe's thread.

    ``settings.edge_queue`` False: it still listens, but :meth:`expected_s`
    says nothing, so decisions predict an idle edge (the paper's model).
    """

    def __init__(self, settings: QueueWaitSettings | None = None) -> None:
        self.settings = settings or QueueWaitSettings()
        self._estimator = QueueWaitEstimator(self.settings)
        self._lock = threading.Lock()

    def expected_s(self) -> float | None:
        """W_q for a decision now; None when disabled or nothing is known yet."""
        if not self.settings.edge_queue:
            return None
        with self._lock:
            return self._estimator.estimate(time.monotonic())

    def observe_wait(self, queue_s: float) -> None:
        with self._lock:
            self._estimator.observe_wait(queue_s, time.monotonic())

    def observe_floor(self, waited_s: float) -> None:
        with self._lock:
            self._estimator.observe_floor(waited_s, time.monotonic())

    def observe_server_info(self, info: ServerInfo) -> None:
        wait = reported_wait_s(info)
        if wait is not None:
            with self._lock:
                self._estimator.observe_report(wait, time.monotonic())

    @property
    def counts(self) -> tuple[int, int]:
        """(waits observed, edge reports taken), for tests and benchmarks."""
        with self._lock:
            return self._estimator.n_waits, self._estimator.n_reports


class EdgeStream:
    """The chunks of one Generate call; :attr:`result` once exhausted; :meth:`cancel` to stop.

    ``max_tokens``: the answer cap the call asked for; a final message that
    reports more output tokens is malformed.  ``queue``: told the call's wait
    for a slot (its ``queue_s``, or the time until a RESOURCE_EXHAUSTED)."""

    def __init__(
        self, call, t_start: float, max_tokens: int | None = None, queue: EdgeQueue | None = None,
        on_unavailable: Callable[[Exception], None] | None = None,
    ) -> None:
        self._call = call
        self._on_unavailable = on_unavailable
        self._t_start = t_start
        self._max_tokens = max_tokens
        self._queue = queue
        self._texts: list[str] = []
        self._ttft_s: float | None = None
        self._result: EdgeTurnResult | None = None
        self._cancelled = False
        self._consumed = False

    def __iter__(self) -> Iterator[str]:
        if self._consumed:
            raise RuntimeError("an EdgeStream can be iterated only once")
        self._consumed = True
        try:
            for response in self._call:
                kind = response.WhichOneof("event")
                if kind == "chunk":
                    if self._ttft_s is None:
                        self._ttft_s = time.perf_counter() - self._t_start
                    self._texts.append(response.chunk.text)
                    yield response.chunk.text
                elif kind == "done":
                    self._finish(self._checked_summary(response.done))
        except grpc.RpcError as exc:
            if self._cancelled and exc.code() == grpc.StatusCode.CANCELLED:
                return
            if self._result is not None:
                # The answer is complete and the edge recorded it; a status
                # that fails after `done` changes neither.
                log.debug("edge stream ended with %s after its final message", exc.code())
                return
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not self._texts and self._queue:
                # No slot (the edge's queue timed out, or a quota): the wait
                # is at least as long as this call took.
                self._queue.observe_floor(time.perf_counter() - self._t_start)
            error = _map_rpc_error(exc)
            if isinstance(error, EdgeUnavailable) and self._on_unavailable is not None:
                self._on_unavailable(error)  # the client's circuit breaker
            raise error from None
        if self._result is None and not self._cancelled:
            raise EdgeError(grpc.StatusCode.INTERNAL, "the edge closed the stream without a final message")

    def _checked_summary(self, done: edge_pb2.GenerateDone) -> GenerationSummary:
        """The final message as a summary, or :class:`EdgeError` (INTERNAL) when
        it cannot be true; the call is cancelled then, and nothing of it is kept."""
        elapsed_s = time.perf_counter() - self._t_start
        try:
            summary = GenerationSummary.from_pb(done)
            problem = summary_problem(summary, self._max_tokens, elapsed_s)
        except ValueError as exc:
            problem = str(exc)
        if problem is None:
            return summary
        if hasattr(self._call, "cancel"):
            self._call.cancel()
        raise EdgeError(grpc.StatusCode.INTERNAL, f"the edge sent a malformed final message: {_cap(problem)}")

    def _finish(self, summary: GenerationSummary) -> None:
        total_s = time.perf_counter() - self._t_start
        self._result = EdgeTurnResult(
            text="".join(self._texts),
            output_tokens=summary.output_tokens,
            prompt_tokens=summary.prompt_tokens,
            prefill_tokens=summary.prefill_tokens,
            cached_tokens=summary.cached_tokens,
            prefill_s=summary.prefill_s,
            decode_s=summary.decode_s,
            ttft_s=self._ttft_s if self._ttft_s is not None else total_s,
            total_s=total_s,
            finish_reason=summary.finish_reason,
            kv_restored=summary.kv_restored,
            server_ttft_s=summary.ttft_s,
            queue_s=summary.queue_s,
            # A field newer edges send (an engine that reports no cached-token
            # count); an older edge's summary has no such field: known.
            cached_tokens_unknown=bool(getattr(summary, "cached_tokens_unknown", False)),
        )
        if self._queue is not None:
            self._queue.observe_wait(summary.queue_s)

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def result(self) -> EdgeTurnResult:
        if self._result is None:
            state = "was cancelled" if self._cancelled else "has not finished"
            raise RuntimeError(f"the edge stream {state}; no result")
        return self._result

    def cancel(self) -> None:
        """Stop the generation on the edge; iteration ends quietly."""
        self._cancelled = True
        self._call.cancel()

    def consume(self) -> EdgeTurnResult:
        """Read the whole stream and return its result."""
        for _ in self:
            pass
        return self.result


class _Endpoint:
    """One edge address and its gRPC channel, secured by the client's
    :class:`ChannelSecurity` (the same TLS settings and token for every
    address of a list: each gateway's certificate must name its own address)."""

    def __init__(self, target: str, security: ChannelSecurity, options: list, connect_now: bool,
                 connect_timeout_s: float) -> None:
        self.target = target
        self.security = security
        self.connect_timeout_s = connect_timeout_s
        # Every call carries it; computed once, so a refusal comes now.
        self.metadata = security.metadata(target) or None
        credentials = security.channel_credentials()
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.stub = edge_pb2_grpc.EdgeLLMStub(self.channel)
        self._state = grpc.ChannelConnectivity.IDLE
        self._state_lock = threading.Lock()
        self.channel.subscribe(self._on_state, try_to_connect=connect_now)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        with self._state_lock:
            self._state = state

    @property
    def state(self) -> grpc.ChannelConnectivity:
        with self._state_lock:
            return self._state

    def ensure_connected(self, timeout_s: float | None = None) -> None:
        """Wait up to ``connect_timeout_s`` (or the call's shorter ``timeout_s``)
        for the channel, so a dead edge fails fast."""
        with self._state_lock:
            if self._state == grpc.ChannelConnectivity.READY:
                return
        wait_s = min(self.connect_timeout_s, timeout_s or self.connect_timeout_s)
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=wait_s)
        except grpc.FutureTimeoutError:
            ready.cancel()  # otherwise it stays subscribed to the channel
            reason = self._last_connect_error()
            raise EdgeUnavailable(
                f"cannot connect to the edge at {self.target} within {wait_s} s"
                + (f" ({reason})" if reason else "")
                + _handshake_hint(reason, self.security.tls)
            ) from None

    def _last_connect_error(self) -> str:
        """gRPC's account of the last failed connection attempt (e.g. "Socket
        closed", "Tls handshake failed"), for the message: a call that does not
        wait for the channel fails at once with it."""
        try:
            self.stub.Echo(edge_pb2.EchoRequest(), timeout=0.5, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                return _cap(exc.details() or "")
        return ""

    def close(self) -> None:
        try:
            self.channel.unsubscribe(self._on_state)
            # grpc's connectivity poller notices the last unsubscribe only at
            # its next 0.2 s tick; closing the channel before that makes the
            # poller thread raise "Channel closed!".  Let it exit first.
            state = getattr(self.channel, "_connectivity_state", None)
            deadline = time.monotonic() + 1.0
            while getattr(state, "polling", False) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            self.channel.close()


class EdgeClient:
    """Blocking client of ``edgeroute.v1.EdgeLLM`` over one gRPC channel per
    edge address.

    With several addresses (``"A,B"``, stateless gateways of one fleet) each
    call goes to the first one whose circuit breaker is closed
    (:class:`~device_runtime.link.breaker.CircuitBreaker`): a call that cannot
    connect moves on to the next address at once; one that fails UNAVAILABLE
    or past its deadline opens the breaker, so the next call goes elsewhere.
    :attr:`target` is the address in use.  A gateway does not know the
    sessions of another: the orchestrator reopens its session on the new one
    with the whole conversation (see :meth:`connect`).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        security: ChannelSecurity | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_now: bool = True,
        queue: QueueWaitSettings | None = None,
        cool_down_s: float = DEFAULT_COOL_DOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``target``: ``HOST:PORT``, or several as ``"A,B"`` or a list, tried in
        order (:func:`~device_runtime.link.breaker.parse_edge_targets`; a
        ValueError names a bad one).
        ``security``: TLS, mTLS and the bearer token, for every address (default:
        plaintext, no token; a :class:`~device_runtime.link.credentials.CredentialsError`
        here for unreadable files or a token that would cross the network in clear).
        ``connect_now``: start connecting in the background at once, so the
        first turn does not pay for the TCP, TLS and HTTP/2 handshakes (2-3
        round trips over the link); False connects on the first call.
        ``queue``: how W_q, the edge's expected slot wait, is kept
        (:attr:`queue`, :meth:`expected_queue_s`).
        ``cool_down_s``: how long an address that failed is skipped; ``clock``
        the breaker's clock (tests step it)."""
        self.targets = parse_edge_targets(target)
        if not timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError("timeout_s and connect_timeout_s must be > 0")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.security = security or ChannelSecurity()
        self.queue = EdgeQueue(queue)
        self.breaker = CircuitBreaker(self.targets, cool_down_s, clock)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Reconnect quickly after the edge comes back; the default
            # backoff starts at 1 s and grows to two minutes.  The cap stays
            # well under connect_timeout_s, so a restarted edge is retried
            # several times within one connect wait.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._endpoints: dict[str, _Endpoint] = {}
        try:
            for address in self.targets:
                self._endpoints[address] = _Endpoint(
                    address, self.security, options, connect_now, connect_timeout_s
                )
        except BaseException:
            for endpoint in self._endpoints.values():
                endpoint.close()
            raise
        self._current = self.targets[0]
        self._closed = False

    @property
    def target(self) -> str:
        """The address the last call went to (the first one before any call)."""
        return self._current

    @property
    def state(self) -> grpc.ChannelConnectivity:
        """The connectivity of :attr:`target`'s channel."""
        return self._endpoints[self._current].state

    def connect(self, timeout_s: float | None = None) -> str:
        """Connect to the address the next call goes to, and return it.

        The breaker's candidates are tried in order; one that does not connect
        within ``connect_timeout_s`` opens its breaker and the next is tried.
        :class:`EdgeUnavailable` (the last one's) when none connects.  A caller
        that keeps state on the edge (a session) compares the address with the
        one the state is on."""
        if self._closed:
            raise RuntimeError("the edge client is closed")
        error: EdgeUnavailable | None = None
        for address in self.breaker.candidates():
            try:
                self._endpoints[address].ensure_connected(timeout_s)
            except EdgeUnavailable as exc:
                self._failed(address, exc)
                error = exc
                continue
            self._current = address
            return address
        assert error is not None
        raise error

    def mark_failed(self, address: str) -> None:
        """A call to ``address`` failed UNAVAILABLE or past its deadline: skip
        it for the cool-down (a stream does this itself; for callers whose
        failure the client did not see; one it saw already is not counted twice)."""
        if address in self._endpoints and not self.breaker.cooling(address):
            self.breaker.failed(address)

    def _failed(self, address: str, exc: Exception) -> None:
        if len(self.targets) > 1:
            log.warning("edge at %s failed (%s); skipping it for %.0f s", address, exc, self.breaker.cool_down_s)
        self.breaker.failed(address)

    def _endpoint(self, address: str | None, timeout_s: float | None) -> _Endpoint:
        """The endpoint of ``address`` (connected), or of :meth:`connect`'s choice."""
        if address is None:
            return self._endpoints[self.connect(timeout_s)]
        if self._closed:
            raise RuntimeError("the edge client is closed")
        if address not in self._endpoints:
            raise ValueError(f"{address} is not one of this client's edge addresses {self.targets}")
        endpoint = self._endpoints[address]
        try:
            endpoint.ensure_connected(timeout_s)
        except EdgeUnavailable as exc:
            self._failed(address, exc)
            raise
        self._current = address
        return endpoint

    def _unary(self, name: str, request, timeout_s: float | None, address: str | None = None):
        endpoint = self._endpoint(address, timeout_s)
        try:
            return getattr(endpoint.stub, name)(
                request, timeout=timeout_s or self.timeout_s, metadata=endpoint.metadata
            )
        except grpc.RpcError as exc:
            error = _map_rpc_error(exc)
            if isinstance(error, EdgeUnavailable):
                self._failed(endpoint.target, error)
            raise error from None

    # --- API ------------------------------------------------------------------

    def open_session(self, session_id: str | None = None) -> str:
        """Open a session on the edge (``session_id`` or a new id)."""
        request = edge_pb2.OpenSessionRequest(session_id=session_id or "")
        return self._unary("OpenSession", request, None).session_id

    def close_session(self, session_id: str) -> None:
        """Close a session on the address the last call went to (where a
        conversation's session is), never on another gateway."""
        self._unary("CloseSession", edge_pb2.CloseSessionRequest(session_id=session_id), None, self._current)

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        """What the edge runs, and its queue now (fed to :attr:`queue`)."""
        info = ServerInfo.from_pb(
            self._unary("GetServerInfo", edge_pb2.GetServerInfoRequest(), timeout_s)
        )
        self.queue.observe_server_info(info)
        return info

    def expected_queue_s(self) -> float | None:
        """W_q, the wait for a KV slot this client expects for its next call
        (None: nothing known yet, or ``--no-edge-queue``)."""
        return self.queue.expected_s()

    def generate(
        self,
        session_id: str,
        new_messages: Sequence[Mapping[str, str]],
        params: GenerationParams | None = None,
        *,
        timeout_s: float | None = None,
        open_session: bool = False,
        transcript_length: int | None = None,
        transcript_digest: bytes | None = None,
        address: str | None = None,
    ) -> EdgeStream:
        """Append ``new_messages`` (the turns the edge has not seen) and stream the answer.

        The call starts at once; iterate the returned stream for the chunks.
        ``open_session``: the edge opens ``session_id`` first if it holds no such
        session (one round trip fewer than :meth:`open_session`); only for a call
        whose ``new_messages`` are the whole conversation.
        ``transcript_length``: the messages this client holds as the session's
        transcript (those of earlier calls that ended with their result); the
        edge drops a turn it recorded but whose result never arrived, and
        answers OUT_OF_RANGE if it holds fewer.
        ``transcript_digest``: :func:`device_runtime.core.messages.transcript_digest`
        of those ``transcript_length`` messages (32 bytes); the edge cuts back
        only a transcript whose prefix has this digest, and answers
        OUT_OF_RANGE otherwise.  A count alone says nothing about content:
        send both.
        ``address``: call this one of the client's addresses (the one
        :meth:`connect` returned, where the session is), with no failover;
        None: :meth:`connect`'s choice.
        """
        if open_session and not session_id:
            raise ValueError("open_session needs a session_id (see edge_client.new_session_id)")
        if transcript_length is not None and not 0 <= transcript_length < 2**32:
            raise ValueError(f"transcript_length must be in [0, 2**32), got {transcript_length!r}")
        if transcript_digest is not None and (
            transcript_length is None or not isinstance(transcript_digest, bytes) or len(transcript_digest) != 32
        ):
            raise ValueError("transcript_digest must be 32 bytes (SHA-256), sent with transcript_length")
        params = params or GenerationParams()
        request = edge_pb2.GenerateRequest(
            session_id=session_id,
            messages=messages_to_pb(new_messages),
            params=params.to_pb(),
            open_session=open_session,
            transcript_length=transcript_length,
            transcript_digest=transcript_digest,
        )
        endpoint = self._endpoint(address, None)
        t_start = time.perf_counter()
        try:
            call = endpoint.stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=endpoint.metadata)
        except grpc.RpcError as exc:
            error = _map_rpc_error(exc)
            if isinstance(error, EdgeUnavailable):
                self._failed(endpoint.target, error)
            raise error from None
        return EdgeStream(
            call, t_start, params.max_tokens, self.queue,
            on_unavailable=lambda exc: self._failed(endpoint.target, exc),
        )

    def warm_up(self, timeout_s: float | None = None) -> float | None:
        """Connect and send one empty Echo; its round-trip seconds, or None when
        the edge cannot be reached (logged, not raised: turns fall back then).

        For a runtime about to serve turns: the channel and the server's
        handler path are warm before the first turn is timed."""
        try:
            return self.ping(0, 0, timeout_s=timeout_s)
        except (EdgeUnavailable, EdgeError) as exc:
            log.warning("edge at %s not reachable yet: %s", self.target, exc)
            return None

    def ping(self, payload_bytes: int, response_bytes: int = 0, *, timeout_s: float | None = None) -> float:
        """Round-trip seconds of an Echo carrying ``payload_bytes`` up and ``response_bytes`` down."""
        if payload_bytes < 0 or response_bytes < 0:
            raise ValueError("payload_bytes and response_bytes must be >= 0")
        request = edge_pb2.EchoRequest(payload=bytes(payload_bytes), response_bytes=response_bytes)
        endpoint = self._endpoint(None, timeout_s)
        t0 = time.perf_counter()
        try:
            response = endpoint.stub.Echo(request, timeout=timeout_s or self.timeout_s, metadata=endpoint.metadata)
        except grpc.RpcError as exc:
            error = _map_rpc_error(exc)
            if isinstance(error, EdgeUnavailable):
                self._failed(endpoint.target, error)
            raise error from None
        rtt = time.perf_counter() - t0
        if len(response.payload) != response_bytes:
            raise EdgeError(
                grpc.StatusCode.DATA_LOSS, f"echo returned {len(response.payload)} bytes, asked {response_bytes}"
            )
        return rtt

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for endpoint in self._endpoints.values():
            endpoint.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def new_session_id() -> str:
    """A fresh client-side session id (for OpenSession, or Generate with ``open_session``)."""
    return uuid.uuid4().hex
