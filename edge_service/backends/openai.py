"""The ``openai`` backend: the edge as a gateway in front of OpenAI-compatible
engines (vLLM, SGLang, llama.cpp's server, llama-cpp-python's server).

The engine keeps the KV cache (its prefix cache); a "slot" here is only a
permit to have one request in flight upstream (``--n-slots`` of them), so the
session pool's queueing, quotas and fairness still apply.  Each turn streams
``POST <upstream>/chat/completions`` with the whole transcript; the engine's
prefix cache makes the repeated part cheap.  The request carries
``X-Session-ID`` (a hash of principal and session, :func:`affinity_key`),
``user`` (the principal) and, with ``--upstream-cache-salt``, a per-principal
``cache_salt``.

Which upstream serves a session is :mod:`edge_service.upstreams`'s rendezvous
order.  A connect failure, a timeout or a 5xx before the first token moves the
turn to the next upstream, and ``done`` then says ``kv_restored`` (the new
replica prefilled the whole conversation); a failure after the first token is
UNAVAILABLE (the device falls back and the turn is not committed, so it is
neither lost nor duplicated).  docs/deploy.md lists every status code.

httpx is async: one event loop in a background thread owns the client (its
connection pool) and the health probes; the slot's worker thread reads the
stream's chunks from a bounded queue.  Cancelling cancels the loop's task,
which closes the upstream connection, so the engine stops generating.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Iterator, Sequence

from device_runtime.llm.conversation import GenerationStats
from edge_service.auth import ANONYMOUS
from edge_service.backends.base import BACKENDS, Backend, Slot
from edge_service.backends.openai_wire import (
    RESPONSE_BYTES_BASE,
    RESPONSE_BYTES_PER_TOKEN,
    EngineUsage,
    SSEDecoder,
    UpstreamProtocolError,
    affinity_key,
    error_message,
    parse_chunk,
    request_body,
)
from edge_service.errors import InvalidArgument, Unavailable
from edge_service.upstreams import UpstreamSet, read_bounded

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from edge_service.settings import EdgeSettings
    from edgeroute.v1.types import GenerationParams

log = logging.getLogger(__name__)

#: Upstreams one turn may try (its home, then one failover): one client's turn
#: never fans out to the whole fleet.
_MAX_ATTEMPTS = 2
#: Chunks the loop may queue ahead of the slot's thread.
_QUEUED_CHUNKS = 256
#: Sessions whose last upstream is remembered (for ``kv_restored``).
_REMEMBERED_SESSIONS = 65536
#: Longest API key file read.
_MAX_KEY_BYTES = 4096
#: How long closing a cancelled call waits for its upstream connection to close.
_CLOSE_WAIT_S = 2.0
#: Error body bytes read from a refusing upstream.
_ERROR_BODY_BYTES = 4096


@dataclass
class UpstreamStats(GenerationStats):
    """GenerationStats plus what only an upstream turn knows."""

    #: The engine reported no cached-token count: ``cached_tokens`` is 0 and
    #: ``prefill_tokens`` counts every prompt token it reported.
    cached_tokens_unknown: bool = False
    #: The session's KV had to be rebuilt on a replica (failover, or the engine said 0 cached).
    kv_restored: bool = False
    #: The upstream URL that answered ('' if none did).
    upstream: str = ""


class _Retry(Exception):
    """This upstream cannot serve the turn, and nothing was streamed: try the
    next.  ``down``: mark it down too (not for a busy engine's 408 or 429)."""

    def __init__(self, message: str, *, down: bool = True) -> None:
        super().__init__(message)
        self.down = down


def read_api_key(path: Path) -> str:
    """The upstream API key from its file (first line, stripped); a file that
    others can read is refused, as a key in it would be public on the box."""
    try:
        if path.stat().st_mode & 0o077:
            raise ValueError(f"--upstream-api-key-file {path} is readable by other users: chmod 600 it")
        with open(path, "rb") as f:
            raw = f.read(_MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read --upstream-api-key-file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_KEY_BYTES:
        raise ValueError(f"--upstream-api-key-file {path} is over {_MAX_KEY_BYTES} bytes")
    lines = raw.decode("utf-8", errors="strict").strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(f"--upstream-api-key-file {path} must hold one key on its first line")
    return key


class _LoopThread:
    """An asyncio event loop in a daemon thread, for the httpx client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edge-upstream", daemon=True)
        self._thread.start()

    def submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


class _Call:
    """One turn's upstream request, shared by the loop (producer) and the slot's thread (consumer)."""

    def __init__(self, key: str, body: dict, had_history: bool) -> None:
        self.key = key
        self.body = body
        #: The prompt holds earlier turns (answers) whose KV a replica may have cached.
        self.had_history = had_history
        self.chunks: queue.Queue[str] = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self.future: Future | None = None
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.n_chunks = 0
        self.usage = EngineUsage()
        self.finish_reason = "stop"
        self.upstream = ""
        self.failed_over = False
        #: Set by the loop once the request is over and its connection closed.
        self.closed = threading.Event()

    @property
    def started(self) -> bool:
        """Some of the answer has been streamed: no failover from here on."""
        return self.t_first is not None

    async def put(self, text: str) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.n_chunks += 1
        while True:  # the slot's thread reads at the client's pace
            try:
                self.chunks.put_nowait(text)
                return
            except queue.Full:
                await asyncio.sleep(0.005)

    def next(self, cancel: threading.Event) -> str | None:
        """The next chunk; None at the end or once ``cancel`` is set; the
        upstream's error is raised here."""
        assert self.future is not None
        while not cancel.is_set():
            try:
                return self.chunks.get(timeout=0.05)
            except queue.Empty:
                if self.future.done() and self.chunks.empty():
                    self.future.result()  # raises the upstream's error
                    return None
        return None

    def close(self) -> None:
        """Stop the upstream request (closing its connection) if it still runs."""
        if self.future is not None and not self.future.done():
            self.future.cancel()  # the loop cancels the task; its ``async with`` closes the stream
            self.closed.wait(_CLOSE_WAIT_S)


class OpenAISlot(Slot):
    """A permit for one upstream request; the KV lives in the engine."""

    def __init__(self, backend: "OpenAIBackend") -> None:
        self.backend = backend
        self._session_id = ""
        self._principal = ANONYMOUS
        self.last_stats: UpstreamStats | None = None

    def begin_turn(self, session_id: str, principal: str) -> None:
        self._session_id, self._principal = session_id, principal

    def stream(
        self,
        messages: Sequence[dict],
        params: GenerationParams,
        cancel: threading.Event,
        kv_owner: Hashable = None,
    ) -> Iterator[str]:
        # The engine's prefix cache is shared per cache_salt: the session's
        # (the default) or, with --kv-sharing principal, the principal's.
        shared = isinstance(kv_owner, tuple) and kv_owner and kv_owner[0] == "principal"
        self.last_stats = None
        call = self.backend.start(list(messages), params, self._session_id, self._principal,
                                  share_by_principal=bool(shared))
        try:
            while (text := call.next(cancel)) is not None:
                yield text
        finally:
            call.close()
            self.last_stats = self.backend.finish(call, cancelled=cancel.is_set())


@BACKENDS.register("openai")
class OpenAIBackend(Backend):
    """Streams turns from OpenAI-compatible engines (``--upstream``), with session affinity."""

    name = "openai"

    def __init__(self, settings: EdgeSettings) -> None:
        import httpx

        self.settings = settings
        self.upstreams = UpstreamSet(settings.upstream)
        key = read_api_key(settings.upstream_api_key_file) if settings.upstream_api_key_file else None
        self._auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._warn_plaintext_key()
        self._last_upstream: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        #: (session affinity key, upstream URL) of recent turns, for tests and logs.
        self.served: list[tuple[str, str]] = []
        self._loop = _LoopThread()
        s = settings
        self._timeout = httpx.Timeout(connect=s.upstream_connect_timeout_s, read=s.upstream_read_timeout_s,
                                      write=s.upstream_read_timeout_s, pool=s.upstream_connect_timeout_s)
        try:
            self._client = self._loop.submit(self._make_client()).result()
            models = self._loop.submit(self._probe_all()).result(s.upstream_connect_timeout_s + 10)
            self._model = s.upstream_model or (models[0] if models else None)
            if self._model is None:
                raise ValueError("no --upstream answered GET /models at start; give --upstream-model NAME")
            self._prober = self._loop.submit(self._probe_forever())
        except BaseException:
            self.close()
            raise
        log.info("openai backend: model %s on %d upstream(s), %d healthy", self._model,
                 len(self.upstreams.urls), len(self.upstreams.healthy()))

    def _warn_plaintext_key(self) -> None:
        from urllib.parse import urlsplit

        from edge_service.security import is_loopback_host

        for url in self.upstreams.urls:
            parts = urlsplit(url)
            if self._auth and parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
                log.warning("the upstream API key goes to %s over plain HTTP: keep it on a private network", url)

    async def _make_client(self) -> "httpx.AsyncClient":
        import httpx

        limits = httpx.Limits(max_connections=max(8, 2 * self.settings.n_slots),
                              max_keepalive_connections=max(4, self.settings.n_slots))
        return httpx.AsyncClient(timeout=self._timeout, limits=limits, follow_redirects=False,
                                 headers={"Accept-Encoding": "identity"}, trust_env=False)

    async def _probe_all(self) -> list[str]:
        timeout = self.settings.upstream_connect_timeout_s + 2.0
        return await self.upstreams.probe_all(self._client, self._auth, timeout)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.upstream_health_interval_s)
            try:
                await self._probe_all()
            except Exception:  # noqa: BLE001 - a probe bug must not stop the probing
                log.exception("upstream health probe failed")

    # --- Backend ------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model

    @property
    def prompt_format(self) -> str:
        return "upstream"  # the engine applies its own chat template

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx  # the engine's window is not in the OpenAI API: --n-ctx says it

    def kv_bytes_per_slot(self) -> int | None:
        return None  # the KV lives in the engines

    def new_slot(self) -> Slot:
        return OpenAISlot(self)

    def close(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        prober = getattr(self, "_prober", None)
        if prober is not None:
            prober.cancel()
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                loop.submit(client.aclose()).result(5.0)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing the upstream client failed", exc_info=True)
        loop.stop()
        self._loop = None

    # --- one turn -----------------------------------------------------------------

    def start(self, messages: list[dict], params: GenerationParams, session_id: str, principal: str,
              *, share_by_principal: bool = False) -> _Call:
        """Begin streaming one turn in the loop; the slot reads it from the returned call."""
        key = affinity_key(principal, session_id)
        salt = (principal if share_by_principal else key) if self.settings.upstream_cache_salt else None
        body = request_body(self._model, messages, params, principal=principal, salt=salt)
        history = any(m.get("role") == "assistant" for m in messages)
        call = _Call(key, body, history)
        call.future = self._loop.submit(self._run(call))
        return call

    async def _run(self, call: _Call) -> None:
        """Try the session's upstreams in rendezvous order until one streams the turn."""
        try:
            tried: list[str] = []
            for url in self.upstreams.plan(call.key)[:_MAX_ATTEMPTS]:
                try:
                    await self._attempt(url, call)
                except _Retry as exc:
                    if exc.down:  # a busy engine (408, 429) is not a dead one
                        self.upstreams.mark(url, False, str(exc))
                    tried.append(f"{url}: {exc}")
                    continue
                call.upstream, call.failed_over = url, bool(tried)
                return
            log.warning("no upstream could serve a turn: %s", "; ".join(tried))
            raise Unavailable(f"no upstream engine could serve the turn ({len(tried)} tried); "
                              "the edge is degraded, retry later or answer on the device")
        finally:
            call.t_end = time.perf_counter()
            call.closed.set()

    async def _attempt(self, url: str, call: _Call) -> None:
        """Stream the turn from ``url``; :class:`_Retry` when it failed before any text."""
        import httpx

        headers = {**self._auth, "X-Session-ID": call.key, "Accept": "text/event-stream"}
        try:
            async with self._client.stream("POST", f"{url}/chat/completions", json=call.body,
                                           headers=headers) as resp:
                if resp.status_code != 200:
                    await self._refused(url, resp)
                await self._read_stream(resp, call)
        except (httpx.TransportError, UpstreamProtocolError) as exc:
            why = f"{type(exc).__name__}" + (f": {exc}" if isinstance(exc, UpstreamProtocolError) else "")
            if not call.started:
                raise _Retry(why) from None
            self.upstreams.mark(url, False, why)
            raise Unavailable(f"the upstream engine failed in the middle of the answer ({why}); "
                              "the turn was not recorded, retry it") from None

    async def _refused(self, url: str, resp: "httpx.Response") -> None:
        """Map an upstream's error status (docs/deploy.md, "Status codes of the openai backend")."""
        status = resp.status_code
        message = error_message(await read_bounded(resp, _ERROR_BODY_BYTES))
        if status in (401, 403):
            log.error("upstream %s refused the gateway's credentials (HTTP %d): check "
                      "--upstream-api-key-file against the engine's --api-key", url, status)
            raise Unavailable("the edge's upstream engine refused the gateway's credentials "
                              "(an operator must fix the edge's configuration)")
        if status == 404:
            log.error("upstream %s answered 404 (%s): check --upstream (it ends in /v1) and --upstream-model",
                      url, message)
            raise Unavailable("the edge's upstream engine does not serve this model or path (misconfigured edge)")
        if status in (408, 429):
            raise _Retry(f"HTTP {status}: {message}", down=False)
        if status >= 500:
            raise _Retry(f"HTTP {status}: {message}")
        raise InvalidArgument(f"the upstream engine refused the request (HTTP {status}): {message}")

    async def _read_stream(self, resp: "httpx.Response", call: _Call) -> None:
        """Queue the text of each chunk; keep the last usage and finish reason."""
        max_bytes = RESPONSE_BYTES_BASE + RESPONSE_BYTES_PER_TOKEN * int(call.body["max_tokens"])
        decoder = SSEDecoder(max_bytes)
        finished = False
        async for data in resp.aiter_bytes():
            for payload in decoder.feed(data):
                if payload == "[DONE]":
                    return
                chunk = parse_chunk(payload)
                if chunk.error is not None:
                    raise UpstreamProtocolError(f"the engine reported an error: {chunk.error}")
                if chunk.usage is not None:
                    call.usage = call.usage.merged(chunk.usage)
                if chunk.text:
                    await call.put(chunk.text)
                if chunk.finish_reason:
                    finished = True
                    call.finish_reason = "length" if chunk.finish_reason == "length" else "stop"
        if not finished:  # every engine ends with [DONE]; a cut stream is a failure, not a short answer
            raise UpstreamProtocolError("the stream ended before the answer was finished")

    def finish(self, call: _Call, *, cancelled: bool) -> UpstreamStats:
        """The turn's stats, from what the engine reported (and the gateway's clock)."""
        end = call.t_end or time.perf_counter()
        first = call.t_first or end
        usage = call.usage
        prompt = usage.prompt_tokens or 0
        cached = min(usage.cached_tokens, prompt) if usage.cached_tokens is not None else None
        if not self.settings.upstream_cache_isolated:
            # An engine that ignores cache_salt shares its prefix cache across
            # principals: its count would tell one what another sent.
            cached = None
        moved = self._moved(call)
        kv_restored = call.had_history and (call.failed_over or moved or (cached == 0 and prompt > 0))
        stats = UpstreamStats(
            prompt_tokens=prompt,
            prefill_tokens=prompt - (cached or 0),
            cached_tokens=cached or 0,
            output_tokens=usage.output_tokens if usage.output_tokens is not None else call.n_chunks,
            prefill_s=usage.prefill_s if usage.prefill_s is not None else first - call.t0,
            decode_s=max(0.0, end - first),
            ttft_s=first - call.t0,
            finish_reason="cancelled" if cancelled else call.finish_reason,
            cached_tokens_unknown=cached is None,
            kv_restored=bool(kv_restored),
            upstream=call.upstream,
        )
        return stats

    def _moved(self, call: _Call) -> bool:
        """Remember the session's upstream; True when its previous turn (on
        this gateway) was served by another one."""
        if not call.upstream:
            return False
        with self._lock:
            previous = self._last_upstream.pop(call.key, None)
            self._last_upstream[call.key] = call.upstream
            while len(self._last_upstream) > _REMEMBERED_SESSIONS:
                self._last_upstream.popitem(last=False)
            self.served.append((call.key, call.upstream))
            del self.served[:-1024]
        return previous is not None and previous != call.upstream
