"""The edge service over a real loopback gRPC channel, with the real Gemma 3 270M GGUF.

One model server is shared by the module (two slots, n_ctx 1024, one thread)
to save CPU; fault injection (all slots busy, internal errors) uses the small
fake backend in ``_edge_fakes``.  Token budgets stay small: these tests check
behaviour, never speed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from _edge_fakes import FaultBackend
from device_runtime.link.edge_client import EdgeClient, EdgeError, GenerationParams
from edge_service.errors import AlreadyExists, FailedPrecondition, NotFound, OutOfRange, ResourceExhausted
from edge_service.server import SERVICE_NAME, EdgeServerThread
from edge_service.sessions import SessionPool
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2, edge_pb2_grpc
from edgeroute.v1.types import Message

N_CTX = 1024
GREEDY = GenerationParams(max_tokens=8)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --- the session pool alone (no model) -----------------------------------------


def test_pool_lru_eviction_and_restore_flag():
    pool = SessionPool(["s0", "s1"], max_sessions=10)
    a, b, c = pool.open("a"), pool.open("b"), pool.open("c")
    for sid in (a, b):
        lease = pool.acquire(sid)
        pool.commit(lease, [Message("user", "hi"), Message("assistant", "yo")])
        pool.done(lease)
        pool.done(lease)
    lease = pool.acquire(c)  # both slots taken: the least recently used (a) goes
    assert lease.slot_index == 0 and pool.slot_of(a) is None and pool.evictions == 1
    assert not lease.kv_restored  # c had no transcript yet
    pool.done(lease)
    pool.done(lease)
    lease = pool.acquire(a)  # a comes back: b is now the LRU
    assert lease.kv_restored and lease.slot_index == 1 and pool.slot_of(b) is None
    assert [m.role for m in lease.transcript] == ["user", "assistant"]


def test_a_session_whose_call_is_over_is_winding_down():
    """A lease whose call has ended (or passed its deadline) before its handler
    was cancelled is on its way out: the next Generate on the session waits for
    it instead of being refused."""
    pool = SessionPool(["only"], max_sessions=2)
    sid, other = pool.open(), pool.open()
    lease = pool.acquire(sid)
    assert not pool.winding_down(sid)  # running for a live call
    lease.call_over = lambda: True
    assert pool.winding_down(sid) and not pool.winding_down(other)
    assert not pool.winding_down(sid, owner="someone-else")  # not theirs to know
    lease.call_over = lambda: False
    lease.cancel.set()
    assert pool.winding_down(sid)
    pool.done(lease)
    pool.done(lease)
    assert not pool.winding_down(sid)


def test_pool_busy_exhausted_unknown_and_close_while_busy():
    pool = SessionPool(["only"], max_sessions=2)
    a, b = pool.open(), pool.open()
    with pytest.raises(AlreadyExists):
        pool.open(a)
    with pytest.raises(NotFound):
        pool.acquire("nope")
    lease = pool.acquire(a)
    with pytest.raises(FailedPrecondition):
        pool.acquire(a)
    with pytest.raises(ResourceExhausted):
        pool.acquire(b)  # the only slot is generating
    pool.close(a)  # closing a busy session cancels it; its slot frees when the lease ends
    assert lease.cancel.is_set() and pool.busy_slots() == 1  # still held until the lease ends
    with pytest.raises(ResourceExhausted):
        pool.acquire(b)
    pool.done(lease)
    pool.done(lease)
    assert pool.acquire(b).slot_index == 0
    with pytest.raises(NotFound):
        pool.close(a)


def test_a_full_pool_closes_its_least_recently_used_idle_session():
    pool = SessionPool(["s0", "s1"], max_sessions=2)
    a, b = pool.open("a"), pool.open("b")
    lease_b = pool.acquire(b)  # b generating, a idle (and less recently used)
    pool.commit(lease_b, [Message("user", "hi"), Message("assistant", "yo")])
    c = pool.open("c")  # full: a, idle, is closed to make room
    assert pool.session_evictions == 1 and len(pool) == 2
    with pytest.raises(NotFound):
        pool.acquire(a)  # its client gets NOT_FOUND and opens a new session
    lease_c = pool.acquire(c)
    with pytest.raises(ResourceExhausted, match="none of yours is idle"):
        pool.open("d")  # every session generating: none is closed
    assert pool.session_evictions == 1 and len(pool) == 2
    for lease in (lease_b, lease_c):
        pool.done(lease)
        pool.done(lease)
    assert pool.transcript(b)[1].content == "yo"  # b, busy then, kept its turn
    pool.open("d")  # now b is the least recently used idle session
    assert pool.session_evictions == 2
    with pytest.raises(NotFound):
        pool.transcript(b)
    assert pool.acquire(c).slot_index == 1  # c kept its slot


def test_pool_cuts_a_transcript_back_to_the_clients_length():
    pool = SessionPool(["only"], max_sessions=4)
    sid = pool.open("s")
    for turn in ("one", "two"):
        lease = pool.acquire(sid, transcript_length=len(pool.transcript(sid)))
        pool.commit(lease, [Message("user", turn), Message("assistant", turn.upper())])
        pool.done(lease)
        pool.done(lease)
    # The client never received "two"'s final message: it holds 2 messages.
    lease = pool.acquire(sid, transcript_length=2)
    assert [m.content for m in lease.transcript] == ["one", "ONE"]
    pool.commit(lease, [Message("user", "two again"), Message("assistant", "TWO")])
    pool.done(lease)
    pool.done(lease)
    assert [m.content for m in pool.transcript(sid)] == ["one", "ONE", "two again", "TWO"]
    lease = pool.acquire(sid)  # unset: used as it is
    assert len(lease.transcript) == 4
    pool.done(lease)
    pool.done(lease)
    with pytest.raises(OutOfRange, match="does not hold the 6 messages") as err:
        pool.acquire(sid, transcript_length=6)
    assert "4" not in str(err.value)  # the detail never says how long the transcript is
    assert pool.busy_slots() == 0 and pool.acquire(sid).transcript  # nothing left held


def test_settings_validate():
    with pytest.raises(ValueError, match="n_slots"):
        EdgeSettings(n_slots=0)
    with pytest.raises(ValueError, match="n_ctx"):
        EdgeSettings(n_ctx=8)
    with pytest.raises(ValueError, match="kv_budget_mb"):
        EdgeSettings(kv_budget_mb=-1)
    s = EdgeSettings(n_slots=8, kv_budget_mb=40)
    assert s.slots_within_budget(18 * 2**20) == 2
    assert s.slots_within_budget(None) == 8
    with pytest.raises(ValueError, match="below one slot"):
        s.slots_within_budget(50 * 2**20)


# --- the real model over loopback ----------------------------------------------


@pytest.fixture(scope="module")
def edge():
    settings = EdgeSettings(n_ctx=N_CTX, n_slots=2, n_threads=1, reflection=True)
    with EdgeServerThread(settings) as server:
        yield server


@pytest.fixture(scope="module")
def client(edge):
    with EdgeClient(edge.target, timeout_s=120) as c:
        yield c


@pytest.fixture
def stub(edge):
    with grpc.insecure_channel(edge.target) as channel:
        yield edge_pb2_grpc.EdgeLLMStub(channel)


@pytest.mark.slow
def test_streams_chunks_then_a_final_message(client, stub, edge):
    sid = client.open_session()
    request = edge_pb2.GenerateRequest(
        session_id=sid,
        messages=[edge_pb2.Message(role=edge_pb2.ROLE_USER, content="Count: 1, 2, 3, 4,")],
        params=edge_pb2.GenerationParams(max_tokens=8),
    )
    responses = list(stub.Generate(request, timeout=120))
    kinds = [r.WhichOneof("event") for r in responses]
    assert kinds.count("done") == 1 and kinds[-1] == "done"
    assert kinds.count("chunk") >= 2  # streamed, not one blob
    done = responses[-1].done
    assert 1 <= done.usage.output_tokens <= 8
    assert done.usage.prefill_tokens + done.usage.cached_tokens == done.usage.prompt_tokens
    assert done.timings.prefill_s > 0 and done.timings.decode_s >= 0
    # The transcript holds exactly what was streamed.
    text = "".join(r.chunk.text for r in responses[:-1])
    assert edge.servicer.pool.transcript(sid)[-1] == Message("assistant", text)
    assert client.server_info().prompt_format == "plain"  # Gemma 3 270M is a base model


@pytest.mark.slow
def test_follow_up_turn_prefills_only_the_new_message(client, edge):
    sid = client.open_session()
    r1 = client.generate(sid, [_user("What is the capital of France?")], GREEDY).consume()
    assert r1.prefill_tokens > 0 and r1.cached_tokens < r1.prompt_tokens
    r2 = client.generate(sid, [_user("And of Italy?")], GREEDY).consume()
    # Turn 1's prompt is reused from the KV cache; only the new user message
    # (and the template glue around it) is computed.
    assert r2.cached_tokens >= r1.prompt_tokens
    assert r2.prefill_tokens == r2.prompt_tokens - r2.cached_tokens
    assert r2.prefill_tokens <= r2.prompt_tokens - r1.prompt_tokens
    assert not r2.kv_restored
    # The same conversation on a fresh session is a cold prefill of all of it.
    cold_sid = client.open_session()
    history = [_user("What is the capital of France?"), _assistant(r1.text), _user("And of Italy?")]
    cold = client.generate(cold_sid, history, GREEDY).consume()
    assert cold.prompt_tokens == r2.prompt_tokens
    # (A slot may still hold another session's tokens, so a short shared
    # prefix such as BOS + "User:" can hit; turn 1 cannot.)
    assert cold.cached_tokens < r1.prompt_tokens
    assert cold.prefill_tokens == cold.prompt_tokens - cold.cached_tokens > r2.prefill_tokens
    # Greedy answers of the warm and cold runs need not match token for token:
    # llama.cpp's results depend slightly on how the prompt was batched.
    assert [m.role for m in edge.servicer.pool.transcript(sid)] == ["user", "assistant"] * 2


@pytest.mark.slow
def test_session_returning_after_device_turns_prefills_only_those(client):
    sid = client.open_session()
    r1 = client.generate(sid, [_user("Name a fruit.")], GREEDY).consume()
    # Two turns were served on the device; the edge gets them with the new prompt.
    device_turns = [
        _user("Name a colour."), _assistant("Blue."),
        _user("Name an animal."), _assistant("A cat."),
    ]
    r = client.generate(sid, [*device_turns, _user("Name a city.")], GREEDY).consume()
    assert r.cached_tokens >= r1.prompt_tokens  # the edge's own turn is still cached
    assert r.prefill_tokens == r.prompt_tokens - r.cached_tokens
    assert r.prefill_tokens <= r.prompt_tokens - r1.prompt_tokens
    assert not r.kv_restored


@pytest.mark.slow
def test_lru_eviction_keeps_the_kv_in_host_memory(client, edge):
    """The evicted session's KV went to the host store (``--kv-offload-mib``,
    on by default) and comes back with its slot: nothing is prefilled again.
    tests/test_kv_offload.py covers the store off, and closing."""
    pool = edge.servicer.pool
    evictions = pool.evictions
    a, b, c = (client.open_session() for _ in range(3))
    ra = client.generate(a, [_user("Tell me about the sea.")], GREEDY).consume()
    client.generate(b, [_user("Tell me about the sky.")], GREEDY).consume()
    client.generate(c, [_user("Tell me about the forest.")], GREEDY).consume()  # 2 slots: a is evicted
    assert pool.slot_of(a) is None and pool.evictions >= evictions + 1
    r = client.generate(a, [_user("And rivers?")], GREEDY).consume()
    assert r.kv_restored  # it had lost its slot...
    assert r.cached_tokens >= ra.prompt_tokens  # ...but not its cache: the whole first turn hits
    assert r.prefill_tokens == r.prompt_tokens - r.cached_tokens


@pytest.mark.slow
def test_a_refused_request_gives_the_slot_back_to_the_session_it_displaced(client, edge):
    pool = edge.servicer.pool
    a, b, c = (client.open_session() for _ in range(3))
    client.generate(a, [_user("Tell me about the sea.")], GREEDY).consume()
    client.generate(b, [_user("Tell me about the sky.")], GREEDY).consume()
    slot_a, evictions = pool.slot_of(a), pool.evictions
    with pytest.raises(EdgeError) as err:  # too long for n_ctx: refused before the model runs
        client.generate(c, [_user("word " * (2 * N_CTX))], GREEDY).consume()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # c took a's slot (least recently used) for the call, then gave it back.
    assert pool.slot_of(a) == slot_a and pool.slot_of(c) is None and pool.evictions == evictions
    r = client.generate(a, [_user("And rivers?")], GREEDY).consume()
    assert not r.kv_restored and r.cached_tokens > 0


def test_pool_give_back_only_to_an_idle_displaced_session():
    pool = SessionPool(["only"], max_sessions=4)
    a, b = pool.open("a"), pool.open("b")
    lease = pool.acquire(a)
    pool.done(lease)
    pool.done(lease)
    lease = pool.acquire(b)  # displaces a
    assert lease.displaced.session_id == "a" and pool.slot_of(a) is None
    pool.give_back(lease)
    assert pool.slot_of(a) == 0 and pool.slot_of(b) is None and pool.evictions == 0
    pool.give_back(lease)  # once only
    assert pool.slot_of(a) == 0
    pool.done(lease)
    pool.done(lease)
    lease = pool.acquire(b)
    pool.close(a)  # closed meanwhile: nothing to give back to
    pool.give_back(lease)
    assert pool.slot_of(b) == 0
    pool.done(lease)
    pool.done(lease)


@pytest.mark.slow
def test_cancel_stops_generation_on_the_server(client, edge):
    sid = client.open_session()
    max_tokens = 400
    stream = client.generate(sid, [_user("Count from 1 to 500: 1, 2, 3,")], GenerationParams(max_tokens=max_tokens))
    chunks = iter(stream)
    next(chunks)
    stream.cancel()
    assert list(chunks) == []  # iteration ends quietly
    record = edge.servicer.wait_for_record(lambda r: r.session_id == sid, timeout_s=60)
    assert record is not None and record.finish_reason == "cancelled"
    assert record.output_tokens < max_tokens
    assert edge.servicer.pool.transcript(sid) == []  # an unfinished turn is not recorded
    with pytest.raises(RuntimeError):
        stream.result
    # The session is usable at once: the next turn waits for the cancelled one to let go.
    r = client.generate(sid, [_user("Say hello.")], GREEDY).consume()
    assert r.output_tokens >= 1


@pytest.mark.slow
def test_second_generate_on_a_busy_session_is_failed_precondition(client, edge):
    sid = client.open_session()
    first = client.generate(sid, [_user("Count from 1 to 500: 1, 2,")], GenerationParams(max_tokens=400))
    chunks = iter(first)
    next(chunks)
    with pytest.raises(EdgeError) as err:
        client.generate(sid, [_user("Hi")], GREEDY).consume()
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    first.cancel()
    list(chunks)


def _code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return err.value.code(), err.value.details()


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty_messages", grpc.StatusCode.INVALID_ARGUMENT),
        ("unspecified_role", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown_role_value", grpc.StatusCode.INVALID_ARGUMENT),
        ("ends_with_assistant", grpc.StatusCode.INVALID_ARGUMENT),
        ("negative_max_tokens", grpc.StatusCode.INVALID_ARGUMENT),
        ("top_p_above_one", grpc.StatusCode.INVALID_ARGUMENT),
        ("oversized_prompt", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown_session", grpc.StatusCode.NOT_FOUND),
        ("transcript_length_too_long", grpc.StatusCode.OUT_OF_RANGE),
    ],
)
def test_bad_generate_requests_map_to_codes(stub, case, expected):
    sid = stub.OpenSession(edge_pb2.OpenSessionRequest(), timeout=10).session_id
    user = edge_pb2.Message(role=edge_pb2.ROLE_USER, content="Hello")
    req = edge_pb2.GenerateRequest(session_id=sid, messages=[user], params=edge_pb2.GenerationParams(max_tokens=4))
    if case == "empty_messages":
        del req.messages[:]
    elif case == "unspecified_role":
        req.messages[0].role = edge_pb2.ROLE_UNSPECIFIED
    elif case == "unknown_role_value":
        req.messages[0].role = 42
    elif case == "ends_with_assistant":
        req.messages.append(edge_pb2.Message(role=edge_pb2.ROLE_ASSISTANT, content="Hi"))
    elif case == "negative_max_tokens":
        req.params.max_tokens = -5
    elif case == "top_p_above_one":
        req.params.top_p = 1.5
    elif case == "oversized_prompt":
        req.messages[0].content = "word " * (2 * N_CTX)
    elif case == "unknown_session":
        req.session_id = "no-such-session"
    elif case == "transcript_length_too_long":
        req.transcript_length = 2  # the new session holds none
    code, details = _code_of(lambda: stub.Generate(req, timeout=60))
    assert code == expected, details
    assert details and "Traceback" not in details and 'File "' not in details
    # The session is untouched and usable.
    if case != "unknown_session":
        ok = edge_pb2.GenerateRequest(session_id=sid, messages=[user], params=edge_pb2.GenerationParams(max_tokens=2))
        assert list(stub.Generate(ok, timeout=60))[-1].HasField("done")


@pytest.mark.slow
def test_unparsable_requests_are_invalid_argument(edge):
    """Bytes that are not the request message (here invalid UTF-8 in a string
    field) get INVALID_ARGUMENT without the parser's text, on every method."""
    user = edge_pb2.Message(role=edge_pb2.ROLE_USER, content="Hi\u00e9").SerializeToString()
    bad_utf8 = user.replace("\u00e9".encode(), b"\xff\xfe")
    generate = edge_pb2.GenerateRequest(session_id="s").SerializeToString() + b"\x12" + bytes([len(bad_utf8)]) + bad_utf8
    with grpc.insecure_channel(edge.target) as channel:
        for method, payload, stream in (
            ("Generate", generate, True),
            ("OpenSession", b"\x0a\x02\xff\xfe", False),
            ("Echo", b"\x10\xff", False),  # a truncated varint
        ):
            path = f"/edgeroute.v1.EdgeLLM/{method}"
            call = (channel.unary_stream if stream else channel.unary_unary)(path)
            code, details = _code_of(lambda: list(call(payload, timeout=10)) if stream else call(payload, timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert details.startswith("malformed request") and "Traceback" not in details
        # The server keeps serving.
        assert edge_pb2_grpc.EdgeLLMStub(channel).GetServerInfo(edge_pb2.GetServerInfoRequest(), timeout=10).n_ctx


@pytest.mark.slow
def test_session_calls_map_to_codes(stub):
    code, _ = _code_of(lambda: stub.CloseSession(edge_pb2.CloseSessionRequest(session_id="nope"), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code_of(lambda: stub.OpenSession(edge_pb2.OpenSessionRequest(session_id="bad id!"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    sid = stub.OpenSession(edge_pb2.OpenSessionRequest(session_id="chosen-id.1"), timeout=10).session_id
    assert sid == "chosen-id.1"
    code, _ = _code_of(lambda: stub.OpenSession(edge_pb2.OpenSessionRequest(session_id=sid), timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    stub.CloseSession(edge_pb2.CloseSessionRequest(session_id=sid), timeout=10)
    req = edge_pb2.GenerateRequest(session_id=sid, messages=[edge_pb2.Message(role=edge_pb2.ROLE_USER, content="x")])
    code, _ = _code_of(lambda: stub.Generate(req, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_echo_payload_sizes(client, stub):
    cap = client.server_info().max_echo_bytes  # 1 MiB less the framing, by default
    for up, down in [(0, 0), (1024, 0), (0, 1024), (cap, cap)]:
        response = stub.Echo(edge_pb2.EchoRequest(payload=bytes(up), response_bytes=down), timeout=30)
        assert len(response.payload) == down
        assert client.ping(up, down) > 0
    for too_big in (cap + 1, client.server_info().max_message_bytes):
        code, _ = _code_of(lambda: stub.Echo(edge_pb2.EchoRequest(response_bytes=too_big), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_health_and_reflection(edge):
    with grpc.insecure_channel(edge.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]), timeout=10))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        assert responses[1].file_descriptor_response.file_descriptor_proto


@pytest.mark.slow
def test_instruct_gguf_uses_its_chat_template():
    from device_runtime.llm.models import default_slm_path

    settings = EdgeSettings(model_path=default_slm_path(), n_ctx=512, n_slots=1, n_threads=1)
    with EdgeServerThread(settings) as server, EdgeClient(server.target) as c:
        assert c.server_info().prompt_format == "chat-template"
        sid = c.open_session()
        r1 = c.generate(sid, [_user("What is 2 + 2?")], GREEDY).consume()
        assert r1.text.strip() and "<|im_" not in r1.text  # template tokens never leak
        r2 = c.generate(sid, [_user("And 3 + 3?")], GREEDY).consume()
        assert r2.cached_tokens >= r1.prompt_tokens
        assert r2.prefill_tokens <= r2.prompt_tokens - r1.prompt_tokens


# --- faults (fake backend) -------------------------------------------------------


def test_all_slots_busy_past_the_queue_timeout_is_resource_exhausted():
    backend = FaultBackend()
    with EdgeServerThread(EdgeSettings(n_slots=1, queue_timeout_s=0.2), backend=backend) as server:
        with EdgeClient(server.target, timeout_s=30) as c:
            a, b = c.open_session(), c.open_session()
            first = c.generate(a, [_user("x")])
            chunks = iter(first)
            next(chunks)
            with pytest.raises(EdgeError) as err:
                c.generate(b, [_user("y")]).consume()
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            backend.gate.set()
            assert list(chunks) == [] and first.result.output_tokens == 1
            assert c.generate(b, [_user("y")]).consume().text == "chunk"


def test_closing_a_session_mid_stream_aborts_it():
    backend = FaultBackend()
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=backend) as server:
        with EdgeClient(server.target, timeout_s=30) as c:
            sid = c.open_session()
            stream = c.generate(sid, [_user("x")])
            chunks = iter(stream)
            next(chunks)
            c.close_session(sid)  # cancels the running generation
            with pytest.raises(EdgeError) as err:
                list(chunks)
            assert err.value.code == grpc.StatusCode.ABORTED
            # Its slot is free again for others.
            backend.gate.set()
            assert c.generate(c.open_session(), [_user("y")]).consume().text == "chunk"


def test_unexpected_errors_are_internal_without_details():
    secret = "secret-path /opt/model.bin line 42"
    backend = FaultBackend(fail=RuntimeError(secret), gate_open=True)
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=backend) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = edge_pb2_grpc.EdgeLLMStub(channel)
            sid = stub.OpenSession(edge_pb2.OpenSessionRequest(), timeout=10).session_id
            req = edge_pb2.GenerateRequest(
                session_id=sid, messages=[edge_pb2.Message(role=edge_pb2.ROLE_USER, content="x")]
            )
            for _ in range(2):  # the server keeps serving after an internal error
                code, details = _code_of(lambda: stub.Generate(req, timeout=10))
                assert code == grpc.StatusCode.INTERNAL
                assert secret not in details and "Traceback" not in details
                assert "internal server error (ref " in details
            assert stub.Echo(edge_pb2.EchoRequest(response_bytes=3), timeout=10).payload == b"\0\0\0"


# --- the CLI in a subprocess: SIGTERM ----------------------------------------------


@pytest.mark.slow
def test_serve_cli_shuts_down_gracefully_on_sigterm():
    cmd = [
        sys.executable, "-m", "device_runtime.cli.main", "serve", "--host", "127.0.0.1", "--port", "0",
        "--n-slots", "1", "--n-ctx", "256", "--threads", "1", "--grace", "30",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        port = None
        for line in proc.stderr:
            lines.append(line)
            if "edge service listening on" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port is not None, "".join(lines)
        # Drain stderr so the child never blocks on a full pipe.
        drain = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        drain.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, EdgeClient(f"127.0.0.1:{port}") as c:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            sid = c.open_session()
            stream = c.generate(sid, [_user("Count: 1, 2, 3,")], GenerationParams(max_tokens=6))
            chunks = iter(stream)
            first = next(chunks)
            proc.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING, and the running stream still completes.
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would hold the server for the whole grace period
            rest = list(chunks)
            assert stream.result.text == first + "".join(rest)
        assert proc.wait(timeout=60) == 0
        drain.join(timeout=5)
        assert "Traceback" not in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_answers_malformed_bytes_with_invalid_argument_and_keeps_serving():
    """Health is open to every caller, so its requests are as untrusted as any."""
    backend = FaultBackend(gate_open=True)
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=backend) as server, \
            grpc.insecure_channel(server.target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as err:
            check(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
