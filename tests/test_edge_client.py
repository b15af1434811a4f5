"""The device's edge client against real loopback servers: streaming, deadlines, failures."""

from __future__ import annotations

import socket
import time

import grpc
import pytest

from _edge_fakes import FaultBackend
from device_runtime.link.edge_client import (
    EdgeClient,
    EdgeError,
    EdgeUnavailable,
    GenerationParams,
    new_session_id,
)
from edge_service.server import EdgeServerThread
from edge_service.settings import EdgeSettings

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def fault_edge():
    backend = FaultBackend()
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=backend) as server:
        yield server, backend


def test_unreachable_edge_raises_edge_unavailable(free_port):
    with EdgeClient(f"127.0.0.1:{free_port()}", connect_timeout_s=0.5) as c:
        with pytest.raises(EdgeUnavailable):
            c.open_session()
        with pytest.raises(EdgeUnavailable):
            c.generate("s", HI, GenerationParams(max_tokens=4))
        with pytest.raises(EdgeUnavailable):
            c.ping(10)


def test_client_connects_in_the_background_and_warms_up(free_port, fault_edge):
    server, _ = fault_edge
    with EdgeClient(server.target) as c:
        # No call made: the channel connects on its own (connect_now).
        deadline = time.monotonic() + 10
        while c.state != grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.state == grpc.ChannelConnectivity.READY
        assert c.warm_up() > 0
    with EdgeClient(server.target, connect_now=False) as lazy:
        time.sleep(0.2)
        assert lazy.state == grpc.ChannelConnectivity.IDLE
    with EdgeClient(f"127.0.0.1:{free_port()}", connect_timeout_s=0.3) as dead:
        assert dead.warm_up() is None  # logged, not raised


def test_deadline_exceeded_is_edge_unavailable(fault_edge):
    server, backend = fault_edge  # the fake slot blocks until its gate opens
    with EdgeClient(server.target) as c:
        sid = c.open_session()
        stream = c.generate(sid, HI, timeout_s=0.5)
        with pytest.raises(EdgeUnavailable) as err:
            stream.consume()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        backend.gate.set()
        # The deadline cancelled the turn on the server; the session is usable.
        assert c.generate(sid, HI).consume().text == "chunk"


def test_server_errors_carry_the_status_code(fault_edge):
    server, _ = fault_edge
    with EdgeClient(server.target) as c:
        with pytest.raises(EdgeError) as err:
            c.generate("no-such-session", HI).consume()
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "no-such-session" in err.value.details
        with pytest.raises(EdgeError) as err:
            c.close_session("no-such-session")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        sid = new_session_id()
        assert c.open_session(sid) == sid
        with pytest.raises(EdgeError) as err:
            c.open_session(sid)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(EdgeError) as err:
            c.ping(0, response_bytes=c.server_info().max_message_bytes)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_generate_with_open_session_opens_the_session_in_the_same_call():
    from edgeroute.v1 import edge_pb2, edge_pb2_grpc

    settings = EdgeSettings(n_slots=1, max_sessions=2)
    with EdgeServerThread(settings, backend=FaultBackend(gate_open=True)) as server, EdgeClient(server.target) as c:
        sid = new_session_id()
        assert c.generate(sid, HI, open_session=True).consume().text == "chunk"
        assert len(server.servicer.pool.transcript(sid)) == 2
        # A session the edge holds is used as it is: the transcript grows.
        assert c.generate(sid, HI, open_session=True).consume().text == "chunk"
        assert len(server.servicer.pool.transcript(sid)) == 4
        # Without the flag an unknown id is still NOT_FOUND.
        with pytest.raises(EdgeError) as err:
            c.generate(new_session_id(), HI).consume()
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="session_id"):
            c.generate("", HI, open_session=True)
        # Bad ids and a full server are refused by the server, not crashed on.
        with grpc.insecure_channel(server.target) as channel:
            stub = edge_pb2_grpc.EdgeLLMStub(channel)
            for bad in ("", "no spaces allowed"):
                request = edge_pb2.GenerateRequest(
                    session_id=bad, messages=[edge_pb2.Message(role=edge_pb2.ROLE_USER, content="Hi")],
                    open_session=True,
                )
                with pytest.raises(grpc.RpcError) as rpc_err:
                    list(stub.Generate(request, timeout=10))
                assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        other = c.open_session()  # the second of max_sessions = 2
        # A full server closes its least recently used idle session (sid) ...
        assert c.generate(new_session_id(), HI, open_session=True).consume().text == "chunk"
        assert server.servicer.pool.session_evictions == 1
        with pytest.raises(EdgeError) as err:
            c.generate(sid, HI).consume()
        assert err.value.code == grpc.StatusCode.NOT_FOUND  # ... whose client opens a new one
        assert c.generate(other, HI).consume().text == "chunk"  # the server is fine


def test_bad_input_is_rejected_before_sending(fault_edge):
    server, _ = fault_edge
    with EdgeClient(server.target) as c:
        with pytest.raises(ValueError, match="role"):
            c.generate("s", [{"role": "robot", "content": "x"}])
        with pytest.raises(ValueError, match="max_tokens"):
            GenerationParams(max_tokens=-1)
        with pytest.raises(ValueError):
            c.ping(-1)
    with pytest.raises(ValueError):
        EdgeClient("")
    c.close()
    c.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        c.open_session()


def test_client_recovers_when_the_edge_comes_back(free_port):
    port = free_port()
    settings = EdgeSettings(n_slots=1)
    with EdgeClient(f"127.0.0.1:{port}", connect_timeout_s=1.0) as c:
        with pytest.raises(EdgeUnavailable):
            c.ping(10)
        with EdgeServerThread(settings, port=port, backend=FaultBackend(gate_open=True)):
            assert c.ping(10) > 0
            sid = c.open_session()
        with pytest.raises(EdgeUnavailable):
            c.generate(sid, HI).consume()
        with EdgeServerThread(settings, port=port, backend=FaultBackend(gate_open=True)):
            # A new server knows nothing of the old session.
            with pytest.raises(EdgeError) as err:
                c.generate(sid, HI).consume()
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert c.generate(c.open_session(), HI).consume().text == "chunk"


@pytest.mark.slow
def test_stream_result_from_the_real_model():
    settings = EdgeSettings(n_ctx=512, n_slots=1, n_threads=1)
    with EdgeServerThread(settings) as server, EdgeClient(server.target) as c:
        sid = c.open_session()
        stream = c.generate(sid, [{"role": "user", "content": "Count: 1, 2, 3,"}], GenerationParams(max_tokens=8))
        with pytest.raises(RuntimeError):
            stream.result  # not finished yet
        chunks = list(stream)
        r = stream.result
        assert len(chunks) >= 2 and r.text == "".join(chunks) == stream.text
        assert 1 <= r.output_tokens <= 8
        assert r.prefill_tokens + r.cached_tokens == r.prompt_tokens and r.prefill_tokens > 0
        assert 0 < r.ttft_s <= r.total_s
        assert r.prefill_s > 0 and r.decode_s >= 0
        with pytest.raises(RuntimeError, match="once"):
            list(stream)
        c.close_session(sid)
        with pytest.raises(EdgeError):
            c.generate(sid, HI).consume()


def test_a_status_that_fails_after_the_final_message_keeps_the_result():
    """The edge recorded the turn once it sent `done`; a failure after it (the
    link dropping as the stream closes) must not make the device redo it."""
    from device_runtime.link.edge_client import EdgeStream
    from edgeroute.v1 import edge_pb2

    class LinkDropped(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection reset (injected)"

    def call(done: bool):
        yield edge_pb2.GenerateResponse(chunk=edge_pb2.TokenChunk(text="Hi"))
        if done:
            yield edge_pb2.GenerateResponse(done=edge_pb2.GenerateDone(
                usage=edge_pb2.Usage(prompt_tokens=3, prefill_tokens=3, output_tokens=1),
                finish_reason=edge_pb2.FINISH_REASON_STOP))
        raise LinkDropped()

    stream = EdgeStream(call(done=True), time.perf_counter())
    assert list(stream) == ["Hi"] and stream.result.output_tokens == 1
    stream = EdgeStream(call(done=False), time.perf_counter())
    with pytest.raises(EdgeUnavailable):
        list(stream)


def test_generate_refuses_a_bad_transcript_length(fault_edge):
    server, _ = fault_edge
    with EdgeClient(server.target) as c:
        for bad in (-1, 2**32):
            with pytest.raises(ValueError, match="transcript_length"):
                c.generate("s", HI, transcript_length=bad)
        # A digest is a SHA-256 of the messages counted by transcript_length.
        for length, digest in ((None, bytes(32)), (2, bytes(31)), (2, "0" * 32)):
            with pytest.raises(ValueError, match="transcript_digest"):
                c.generate("s", HI, transcript_length=length, transcript_digest=digest)
