"""A raw-stub client of the edge for the tests that send what EdgeClient never
would (forged metadata, oversized fields, bare requests), and ``status_of``.

Each test file subclasses :class:`Caller` with the ``request`` it needs.
"""

from __future__ import annotations

import time

import grpc
import pytest

from edgeroute.v1 import edge_pb2, edge_pb2_grpc

T = 30  # per-call deadline, generous: these tests assert codes and states, never times


class Caller:
    """One client: a channel (TLS with ``credentials``), and the token and
    extra metadata it sends."""

    def __init__(self, target: str, token: str | None = None, *, credentials=None, metadata=None,
                 options=()) -> None:
        self.channel = (
            grpc.secure_channel(target, credentials, options=list(options)) if credentials
            else grpc.insecure_channel(target, options=list(options))
        )
        self.stub = edge_pb2_grpc.EdgeLLMStub(self.channel)
        self.metadata = tuple(metadata or ()) + ((("authorization", f"Bearer {token}"),) if token else ())

    def open(self, session_id: str = "") -> str:
        request = edge_pb2.OpenSessionRequest(session_id=session_id)
        return self.stub.OpenSession(request, timeout=T, metadata=self.metadata).session_id

    def close(self, session_id: str) -> None:
        request = edge_pb2.CloseSessionRequest(session_id=session_id)
        self.stub.CloseSession(request, timeout=T, metadata=self.metadata)

    def info(self) -> edge_pb2.ServerInfo:
        return self.stub.GetServerInfo(edge_pb2.GetServerInfoRequest(), timeout=T, metadata=self.metadata)

    def echo(self, response_bytes: int = 0, payload: bytes = b"") -> bytes:
        request = edge_pb2.EchoRequest(payload=payload, response_bytes=response_bytes)
        return self.stub.Echo(request, timeout=T, metadata=self.metadata).payload

    def request(self, session_id: str, *args, **kw) -> edge_pb2.GenerateRequest:
        raise NotImplementedError

    def stream(self, session_id: str, *args, timeout: float = T, **kw):
        return self.stub.Generate(self.request(session_id, *args, **kw), timeout=timeout, metadata=self.metadata)

    def generate(self, session_id: str, *args, **kw) -> tuple[str, edge_pb2.GenerateDone]:
        """The answer's text and its final message."""
        responses = list(self.stream(session_id, *args, **kw))
        assert responses and responses[-1].HasField("done")
        return "".join(r.chunk.text for r in responses[:-1]), responses[-1].done

    def __enter__(self) -> "Caller":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """The status code and detail of a call that must fail (streams are drained)."""
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return err.value.code(), err.value.details()


def until(predicate, what: str, timeout_s: float = T) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
