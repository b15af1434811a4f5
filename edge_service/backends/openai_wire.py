"""What the ``openai`` backend sends and reads: request bodies, bounded SSE
framing, and the usage each engine reports.  Pure (no I/O), so the recorded
response shapes of each engine (tests/fixtures/engines/) test it directly.

Where engines report the cached part of the prompt:

- vLLM and SGLang: ``usage.prompt_tokens_details.cached_tokens`` in the last
  chunk (``stream_options.include_usage``), present only when the engine was
  started with ``--enable-prompt-tokens-details`` (vLLM) or
  ``--enable-cache-report`` (SGLang); ``null`` or missing means unknown, not 0.
- llama.cpp's server: ``timings.cache_n`` (reused) and ``timings.prompt_n``
  (computed) in the last chunk, and the same ``usage`` as vLLM in newer builds.
- llama-cpp-python's server: no usage in streams at all; the answer's tokens
  are counted from its chunks (one token each) and the prompt is unknown.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

#: Longest SSE line taken from an upstream (one chunk is a few hundred bytes).
MAX_LINE_BYTES = 256 * 1024
#: Response bytes allowed per requested output token, on top of a fixed
#: allowance (role chunk, usage, pings): bounds a runaway upstream.
RESPONSE_BYTES_PER_TOKEN = 16 * 1024
RESPONSE_BYTES_BASE = 1024 * 1024


class UpstreamProtocolError(ValueError):
    """The upstream's stream broke the format or a bound (a line or the body too long)."""


@dataclass(frozen=True)
class EngineUsage:
    """The counts an engine reported for one turn; None where it said nothing."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    #: Prompt processing time the engine measured (llama.cpp ``timings.prompt_ms``).
    prefill_s: float | None = None

    def merged(self, other: "EngineUsage") -> "EngineUsage":
        """``other``'s values where it has them (a later chunk wins)."""
        return EngineUsage(*(b if b is not None else a for a, b in zip(self._values(), other._values())))

    def _values(self) -> tuple:
        return (self.prompt_tokens, self.output_tokens, self.cached_tokens, self.prefill_s)


@dataclass(frozen=True)
class StreamChunk:
    """One ``data:`` event of a chat completion stream."""

    text: str = ""
    finish_reason: str | None = None
    usage: EngineUsage | None = None
    #: The message of an error event (vLLM and others send ``{"error": ...}`` mid-stream).
    error: str | None = None


def affinity_key(principal: str, session_id: str) -> str:
    """The ``X-Session-ID`` sent upstream: a hash of the principal and the
    session id, the same on every gateway (so routers and the rendezvous
    hashing agree) and naming neither (two principals may use one id)."""
    return hashlib.sha256(f"edgeroute-session\0{principal}\0{session_id}".encode()).hexdigest()[:32]


def cache_salt(owner: str) -> str:
    """The ``cache_salt`` of one KV owner (a session's affinity key, or a
    principal with ``--kv-sharing principal``): an engine that takes it shares
    prefix cache only between requests with the same salt."""
    return hashlib.sha256(f"edgeroute-cache-salt\0{owner}".encode()).hexdigest()[:32]


def request_body(
    model: str, messages: Sequence[dict], params: Any, *, principal: str, salt: str | None
) -> dict:
    """The ``/chat/completions`` body of one turn (``params``: a GenerationParams)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "user": principal,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if salt is not None:
        body["cache_salt"] = cache_salt(salt)
    return body


class SSEDecoder:
    """Splits an SSE byte stream into the payloads of its ``data:`` lines,
    refusing a line over ``MAX_LINE_BYTES`` or a body over ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._total = 0

    def feed(self, data: bytes) -> Iterator[str]:
        self._total += len(data)
        if self._total > self.max_bytes:
            raise UpstreamProtocolError(f"the upstream's answer passed {self.max_bytes} bytes")
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8", errors="replace")
            # Comments (": ping"), event names and blank separators carry no data.
        if len(self._buffer) > MAX_LINE_BYTES:
            raise UpstreamProtocolError(f"the upstream sent a line over {MAX_LINE_BYTES} bytes")


def parse_chunk(payload: str) -> StreamChunk:
    """One ``data:`` payload (not ``[DONE]``) as text, finish reason, usage or error."""
    try:
        event = json.loads(payload)
    except ValueError as exc:
        raise UpstreamProtocolError(f"the upstream sent a chunk that is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise UpstreamProtocolError("the upstream sent a chunk that is not a JSON object")
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        return StreamChunk(error=str(message)[:200])
    text, finish = "", None
    choices = event.get("choices") or []
    if choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is None:
            content = choice.get("text")  # /completions-style chunks
        text = content if isinstance(content, str) else ""
        finish = choice.get("finish_reason") or None
    return StreamChunk(text=text, finish_reason=finish, usage=parse_usage(event))


def parse_usage(event: dict) -> EngineUsage | None:
    """The counts in one chunk: ``usage`` (vLLM, SGLang, llama.cpp) and
    ``timings`` (llama.cpp); None when the chunk has neither."""
    usage = event.get("usage") if isinstance(event.get("usage"), dict) else None
    timings = event.get("timings") if isinstance(event.get("timings"), dict) else None
    if usage is None and timings is None:
        return None
    out = EngineUsage()
    if usage is not None:
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        out = EngineUsage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")),
                          _count(cached))
    if timings is not None:
        cache_n, prompt_n = _count(timings.get("cache_n")), _count(timings.get("prompt_n"))
        prompt_ms = timings.get("prompt_ms")
        out = out.merged(EngineUsage(
            prompt_tokens=cache_n + prompt_n if cache_n is not None and prompt_n is not None else None,
            output_tokens=_count(timings.get("predicted_n")),
            cached_tokens=cache_n,
            prefill_s=prompt_ms / 1000 if isinstance(prompt_ms, (int, float)) and prompt_ms >= 0 else None,
        ))
    return out


def _count(value: object) -> int | None:
    """A token count the engine sent, or None (absent, null, not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def error_message(body: bytes) -> str:
    """The message of an engine's error body (OpenAI ``{"error": {"message"}}``,
    FastAPI ``{"detail"}``), cut short; never the request's headers."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", errors="replace")
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message", "")))
        if isinstance(error, dict):
            error = error.get("message", "")
        return str(error)[:200]
    return str(data)[:200]
