"""The ``openai`` backend: the recorded stream shape of each engine, the
request it sends, its bounds, and its status codes over a real gRPC channel
(upstream faults injected by tests/_upstream_faults.py; the real engine is in
tests/test_gateway_integration.py)."""

from __future__ import annotations

import json
import os
import random

import grpc
import pytest

from edge_service.backends.openai import read_api_key
from edge_service.backends.openai_wire import (
    MAX_LINE_BYTES,
    EngineUsage,
    SSEDecoder,
    UpstreamProtocolError,
    affinity_key,
    cache_salt,
    parse_chunk,
    request_body,
)
from edge_service.server import EdgeServerThread
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2
from edgeroute.v1.types import GenerationParams, Message
from tests._callers import Caller, status_of
from tests._upstream_faults import ENGINES, FaultyEngine

EXPECTED = json.loads((ENGINES / "expected.json").read_text())


def read_stream(raw: bytes, pieces: int = 13) -> tuple[str, str | None, EngineUsage, int]:
    """Feed ``raw`` to the decoder in random pieces: text, finish reason, usage, text chunks."""
    rng = random.Random(pieces)
    decoder = SSEDecoder(1 << 20)
    text, finish, usage, chunks = "", None, EngineUsage(), 0
    i = 0
    while i < len(raw):
        step = rng.randint(1, pieces)
        for payload in decoder.feed(raw[i:i + step]):
            if payload == "[DONE]":
                continue
            chunk = parse_chunk(payload)
            text += chunk.text
            chunks += bool(chunk.text)
            finish = chunk.finish_reason or finish
            usage = usage.merged(chunk.usage) if chunk.usage else usage
        i += step
    return text, finish, usage, chunks


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_engines_recorded_stream_is_read(name):
    want = EXPECTED[name]
    text, finish, usage, chunks = read_stream((ENGINES / name).read_bytes())
    assert text == want["text"] and finish == want["finish_reason"]
    assert usage.prompt_tokens == want["prompt_tokens"]
    assert usage.output_tokens == want["output_tokens"]
    assert usage.cached_tokens == want["cached_tokens"]  # None: unknown, never 0
    assert usage.prefill_s == pytest.approx(want["prefill_s"]) if want["prefill_s"] else usage.prefill_s is None
    if "chunks" in want:
        assert chunks == want["chunks"]


def test_an_error_event_mid_stream_is_seen():
    payloads = list(SSEDecoder(1 << 20).feed((ENGINES / "vllm_error.sse").read_bytes()))
    assert parse_chunk(payloads[0]).text == "Par"
    assert "EngineCore" in parse_chunk(payloads[1]).error


def test_the_decoder_bounds_lines_and_the_body():
    with pytest.raises(UpstreamProtocolError, match="line over"):
        list(SSEDecoder(1 << 30).feed(b"data: " + b"x" * (MAX_LINE_BYTES + 1)))
    decoder = SSEDecoder(100)
    with pytest.raises(UpstreamProtocolError, match="passed 100 bytes"):
        for _ in range(20):
            list(decoder.feed(b"data: {}\n\n"))
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        parse_chunk("{nope")


def test_the_request_names_the_principal_and_salts_its_cache():
    params = GenerationParams(max_tokens=7, stop=("\n\n",))
    msgs = [{"role": "user", "content": "hi"}]
    body = request_body("m", msgs, params, principal="alice", salt="owner-1")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["user"] == "alice" and body["max_tokens"] == 7 and body["stop"] == ["\n\n"]
    assert body["cache_salt"] == cache_salt("owner-1") != cache_salt("owner-2")
    assert "cache_salt" not in request_body("m", msgs, params, principal="alice", salt=None)
    # The affinity key is stable, per principal, and names neither.
    key = affinity_key("alice", "s1")
    assert key == affinity_key("alice", "s1") != affinity_key("bob", "s1")
    assert "alice" not in key and "s1" not in key


def test_the_api_key_file_must_be_private(tmp_path):
    path = tmp_path / "key"
    path.write_text("sk-secret\n")
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_api_key(path)
    os.chmod(path, 0o600)
    assert read_api_key(path) == "sk-secret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="one key"):
        read_api_key(path)


# --- over gRPC ------------------------------------------------------------------


class Gen(Caller):
    def request(self, session_id, text="Hi", *, history=(), max_tokens=16):
        msgs = [Message(r, c).to_pb() for r, c in (*history, ("user", text))]
        return edge_pb2.GenerateRequest(session_id=session_id, open_session=True, messages=msgs,
                                        params=edge_pb2.GenerationParams(max_tokens=max_tokens))


def gateway(*engines: FaultyEngine, **kw) -> EdgeServerThread:
    settings = EdgeSettings(backend="openai", upstream=tuple(e.url for e in engines),
                            upstream_health_interval_s=3600, upstream_read_timeout_s=10, **kw)
    return EdgeServerThread(settings)


def test_a_turn_streams_with_the_engines_counts_and_headers():
    with FaultyEngine("replay:vllm.sse") as engine, gateway(engine, upstream_cache_isolated=True) as edge, \
            Gen(edge.target) as c:
        text, done = c.generate("s1")
        assert text == "Paris is the capital."
        assert (done.usage.prompt_tokens, done.usage.cached_tokens, done.usage.prefill_tokens) == (42, 32, 10)
        assert done.usage.output_tokens == 5 and not done.usage.cached_tokens_unknown
        headers, body = engine.requests[-1]
        assert headers["X-Session-ID"] == affinity_key("anonymous", "s1")
        assert body["user"] == "anonymous" and body["model"] == "fake-model"
        # The session's own salt: not even another session of the same principal shares its cache.
        assert body["cache_salt"] == cache_salt(affinity_key("anonymous", "s1"))
        c.generate("s2")
        assert engine.requests[-1][1]["cache_salt"] != body["cache_salt"]


def test_without_isolated_engines_cached_counts_are_not_passed_on():
    """By default the engine is not trusted to honour cache_salt (llama.cpp's
    server ignores it and shares its prefix cache across principals): its
    count would tell one principal what another sent, so it is reported unknown."""
    with FaultyEngine("replay:vllm.sse") as engine, gateway(engine) as edge, Gen(edge.target) as c:
        _, done = c.generate("s1")
        assert done.usage.cached_tokens_unknown and done.usage.cached_tokens == 0
        assert done.usage.prefill_tokens == done.usage.prompt_tokens == 42


def test_an_engine_without_cached_counts_says_unknown():
    with FaultyEngine("replay:llama_cpp_python.sse") as engine, gateway(engine) as edge, Gen(edge.target) as c:
        text, done = c.generate("s1")
        assert text == "Paris is the capital."
        assert done.usage.cached_tokens_unknown and done.usage.cached_tokens == 0
        assert done.usage.output_tokens == 3  # counted from the chunks


def test_a_busy_engine_is_not_marked_down_and_a_turn_tries_at_most_two_upstreams():
    """A 429 moves the turn on but leaves the engine in service (busy is not
    dead: one client must not push other sessions off their replicas), and
    however many upstreams fail, one turn asks at most two of them."""
    engines = [FaultyEngine("replay:vllm_no_details.sse") for _ in range(3)]
    with engines[0] as a, engines[1] as b, engines[2] as d:
        with gateway(a, b, d) as edge, Gen(edge.target) as c:
            backend = edge.servicer.backend
            c.generate("s1")
            home = next(e for e in (a, b, d) if e.url == backend.served[-1][1])
            home.mode = "status:429"
            c.generate("s1", "again")
            assert backend.served[-1][1] != home.url and home.url in backend.upstreams.healthy()
            for e in (a, b, d):
                e.mode = "status:503"
            before = sum(len(e.requests) for e in (a, b, d))
            code, _ = status_of(lambda: c.generate("s1", "once more"))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert sum(len(e.requests) for e in (a, b, d)) - before == 2


def test_a_5xx_before_the_first_token_fails_over_and_says_kv_restored():
    with FaultyEngine("replay:vllm_no_details.sse") as a, FaultyEngine("replay:vllm_no_details.sse") as b:
        with gateway(a, b) as edge, Gen(edge.target) as c:
            backend = edge.servicer.backend
            c.generate("s1")
            home = backend.served[-1][1]
            broken, other = (a, b) if home == a.url else (b, a)
            broken.mode = "status:503"
            _, done = c.generate("s1", "again", history=[("user", "Hi"), ("assistant", "Paris is the capital.")])
            assert backend.served[-1][1] == other.url and done.kv_restored
            assert len(broken.requests) == 2  # tried once more, then the turn moved


def test_a_failure_after_the_first_token_is_unavailable_without_a_retry():
    with FaultyEngine("drop") as a, FaultyEngine("drop") as b, gateway(a, b) as edge, Gen(edge.target) as c:
        code, detail = status_of(lambda: c.stream("s1"))
        assert code == grpc.StatusCode.UNAVAILABLE and "middle of the answer" in detail
        assert len(a.requests) + len(b.requests) == 1  # never a second copy of the turn


def test_every_upstream_down_is_unavailable():
    with FaultyEngine("status:502") as a, FaultyEngine("status:500") as b, gateway(a, b) as edge:
        with Gen(edge.target) as c:
            code, detail = status_of(lambda: c.stream("s1"))
    assert code == grpc.StatusCode.UNAVAILABLE and "2 tried" in detail


def test_a_bad_request_is_invalid_argument():
    with FaultyEngine("status:400") as engine, gateway(engine) as edge, Gen(edge.target) as c:
        code, detail = status_of(lambda: c.stream("s1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "injected 400" in detail


def test_the_api_key_is_sent_and_a_refusal_never_shows_it(tmp_path, caplog):
    key = tmp_path / "key"
    key.write_text("sk-right")
    key.chmod(0o600)
    with FaultyEngine("replay:vllm.sse", api_key="sk-right") as engine:
        with gateway(engine, upstream_api_key_file=key) as edge, Gen(edge.target) as c:
            assert c.generate("s1")[0] == "Paris is the capital."
            engine.api_key = "sk-other"
            code, detail = status_of(lambda: c.stream("s2"))
    assert code == grpc.StatusCode.UNAVAILABLE and "credentials" in detail
    assert "sk-right" not in detail and "sk-right" not in caplog.text
    assert "--upstream-api-key-file" in caplog.text  # the operator is told what to fix


def test_cancelling_the_call_closes_the_upstream_stream():
    with FaultyEngine("stall") as engine, gateway(engine) as edge, Gen(edge.target) as c:
        call = c.stream("s1")
        assert next(call).chunk.text == "Hel"
        call.cancel()
        assert engine.hung_up.wait(30)


def test_settings_check_the_upstreams():
    with pytest.raises(ValueError, match="at least one --upstream"):
        EdgeSettings(backend="openai")
    with pytest.raises(ValueError, match="credentials"):
        EdgeSettings(backend="openai", upstream=("http://u:p@h:1/v1",))
    with pytest.raises(ValueError, match="given twice"):
        EdgeSettings(backend="openai", upstream=("http://h:1/v1", "http://h:1/v1/"))
    with pytest.raises(ValueError, match="for --backend openai"):
        EdgeSettings(upstream=("http://h:1/v1",))
    assert EdgeSettings(backend="openai", upstream=("http://h:1/v1/",)).upstream == ("http://h:1/v1",)
