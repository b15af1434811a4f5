"""The edge under load and abuse (issue 14), server side, over real gRPC.

One test per limit and per quota, at the limit and one past it; the wait
queue (fair between principals, bounded in time and length); a client that
stops reading, one that stops answering pings (a frozen process), one that
pings too often; connection idle and age limits; the metrics endpoint,
scraped over HTTP.  The scripted fake backend (``_edge_fakes.ScriptedBackend``:
``hold``, ``flood``, ``tokens N``) stands in for the model wherever the
answer's content does not matter; the output-token clip and the contract's
command line run the real Gemma 3 270M GGUF (``slow``).

No assertion is about wall-clock time: limits are set small and the tests
wait for states (a record, a status, a queue depth) with generous deadlines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from contextlib import contextmanager

import grpc
import pytest

import _callers
from _callers import T, status_of, until
from _edge_fakes import ScriptedBackend
from conftest import ROOT, cli_env
from edge_service.errors import RETRY_AFTER_KEY
from edge_service.limits import RateLimiter
from edge_service.errors import NotFound, ResourceExhausted
from edge_service.server import EdgeServerThread
from edge_service.sessions import SessionPool
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2
from edgeroute.v1.types import Message


# --- helpers -----------------------------------------------------------------------


class Caller(_callers.Caller):
    """A client whose turns are one user message, repeated ``messages`` times."""

    def request(self, session_id: str, text: str = "ok", *, max_tokens: int = 8, messages: int = 1,
                stop=(), **fields) -> edge_pb2.GenerateRequest:
        return edge_pb2.GenerateRequest(
            session_id=session_id,
            messages=[Message("user", text).to_pb()] * messages,
            params=edge_pb2.GenerationParams(max_tokens=max_tokens, stop=list(stop)),
            **fields,
        )


@contextmanager
def edge(backend=None, **settings):
    """A server on loopback with the scripted backend and one slot, unless told otherwise."""
    backend = backend if backend is not None else ScriptedBackend()
    with EdgeServerThread(EdgeSettings(**{"n_slots": 1, **settings}), backend=backend) as server:
        server.backend = backend
        yield server


def holding(caller: Caller, server, session_id: str):
    """Start a ``hold`` stream and wait until it has its slot; returns the call."""
    call = caller.stream(session_id, "hold")
    next(iter(call))
    return call


# --- session quotas and retention (the pool alone, then over gRPC) -------------------------


def _done(pool, lease) -> None:
    pool.done(lease)
    pool.done(lease)


def test_sessions_per_principal_at_the_quota_and_one_past_it():
    pool = SessionPool(["s0", "s1"], max_sessions=10, max_sessions_per_principal=2)
    a1, a2 = pool.open("a1", owner="alice"), pool.open("a2", owner="alice")
    b1 = pool.open("b1", owner="bob")
    assert pool.count("alice") == 2 and pool.session_evictions == 0  # at the quota: both kept
    pool.open("a3", owner="alice")  # one past it: alice's least recently used goes, nobody else's
    assert pool.count("alice") == 2 and pool.session_evictions == 1
    with pytest.raises(NotFound):
        pool.transcript(a1, owner="alice")
    assert pool.transcript(a2, owner="alice") == [] and pool.transcript(b1, owner="bob") == []
    leases = [pool.acquire(sid, owner="alice") for sid in ("a2", "a3")]  # both generating
    with pytest.raises(ResourceExhausted, match="none of yours is idle"):
        pool.open("a4", owner="alice")
    assert pool.count("alice") == 2 and pool.count("bob") == 1
    for lease in leases:
        _done(pool, lease)


def test_a_full_server_closes_only_the_openers_own_sessions():
    pool = SessionPool(["s0"], max_sessions=4, max_sessions_per_principal=3)
    bob = [pool.open(f"b{i}", owner="bob") for i in range(2)]
    pool.open("a0", owner="alice")
    pool.open("a1", owner="alice")  # the server is full (4): within everyone's quota
    for i in range(2, 20):  # alice churns: each open closes her own oldest
        pool.open(f"a{i}", owner="alice")
    assert all(pool.transcript(sid, owner="bob") == [] for sid in bob)  # bob lost nothing
    assert pool.count("alice") == 2 and pool.session_evictions == 18
    with pytest.raises(ResourceExhausted, match="maximum of 4 sessions"):
        pool.open("c0", owner="carol")  # carol has nothing to give up: refused, nobody evicted
    assert len(pool) == 4 and pool.count("bob") == 2


def test_idle_sessions_expire_after_the_ttl_and_busy_ones_do_not():
    now = [0.0]
    kinds: list[str] = []
    pool = SessionPool(["s0", "s1"], max_sessions=10, ttl_s=60, clock=lambda: now[0], on_evict=kinds.append)
    idle, busy = pool.open("idle"), pool.open("busy")
    lease = pool.acquire(busy)
    now[0] = 59.9
    assert pool.transcript(idle) == []  # just within the TTL
    now[0] = 60.0
    with pytest.raises(NotFound):
        pool.transcript(idle)  # at the TTL: gone, as if it never existed
    now[0] = 500.0
    assert pool.expire_idle() == 0  # generating: never expires
    _done(pool, lease)  # idle from now on
    now[0] = 559.0
    assert pool.expire_idle() == 0
    now[0] = 560.0
    assert pool.expire_idle() == 1 and len(pool) == 0 and pool.expirations == 2
    assert kinds == ["ttl", "ttl"]


def test_one_principal_past_its_quota_never_makes_another_principals_session_not_found(principals):
    """The contract, over gRPC: alice opens sessions far past her quota (and
    the server's maximum); bob's sessions answer every time."""
    tokens, path = principals
    with edge(auth_tokens=path, max_sessions=6, max_sessions_per_principal=3) as server, \
            Caller(server.target, tokens["alice"]) as alice, Caller(server.target, tokens["bob"]) as bob:
        bob_sids = [bob.open() for _ in range(3)]
        for sid in bob_sids:
            bob.generate(sid)
        for i in range(40):
            sid = alice.open()
            if i % 5 == 0:
                alice.generate(sid)
            for bsid in bob_sids[i % 3:i % 3 + 1]:
                bob.generate(bsid)  # never NOT_FOUND
        assert server.servicer.pool.count("alice") == 3 and server.servicer.pool.count("bob") == 3
        code, detail = status_of(lambda: Caller(server.target, tokens["carol"]).open())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "maximum of 6 sessions" in detail
        assert [bob.generate(sid)[0] for sid in bob_sids] == ["ok"] * 3


def test_an_idle_session_past_the_ttl_is_not_found_and_open_session_reopens_it():
    with edge(session_ttl_s=0.2) as server, Caller(server.target) as c:
        sid = "kept-for-a-while"
        assert c.generate(sid, open_session=True)[0] == "ok"  # opened and used in one call
        until(lambda: len(server.servicer.pool) == 0, "the sweep to delete the idle session")
        code, _ = status_of(lambda: c.stream(sid, "ok"))
        assert code == grpc.StatusCode.NOT_FOUND and server.servicer.pool.expirations == 1
        # The device sends the whole conversation with open_session, as after a restart.
        assert c.generate(sid, open_session=True)[0] == "ok"
        assert 'edgeroute_evictions_total{kind="ttl"}' in server.servicer.metrics.render()


# --- the wait queue --------------------------------------------------------------------


def test_a_call_waits_for_a_slot_and_done_reports_the_wait():
    with edge() as server, Caller(server.target) as a, Caller(server.target) as b:
        assert a.info().expected_queue_wait_s == 0  # a slot is free
        first = holding(a, server, a.open())
        waiting = b.stream(b.open(), "ok")  # no slot: it waits
        until(lambda: server.servicer.queue.depth == 1, "the call to queue")
        info = a.info()
        assert info.queue_depth == 1 and info.busy_slots == 1 and info.n_slots == 1
        server.backend.gate.set()
        assert list(first)[-1].HasField("done")
        responses = list(waiting)
        assert responses[-1].done.timings.queue_s > 0  # the real wait, measured on the server
        info = a.info()
        assert info.queue_depth == 0 and info.queue_wait_s > 0 and info.HasField("expected_queue_wait_s")


def test_queue_timeout_is_resource_exhausted_with_the_expected_wait():
    with edge(queue_timeout_s=0.2) as server, Caller(server.target) as c:
        c.generate(c.open())  # one finished turn: the queue knows how long a slot is held
        held = holding(c, server, c.open())
        call = c.stream(c.open(), "ok")
        code, detail = status_of(lambda: call)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no KV slot was free within" in detail and "expected wait about" in detail
        retry = dict(call.trailing_metadata() or ())
        assert float(retry[RETRY_AFTER_KEY]) >= 0
        assert server.servicer.queue.depth == 0  # the timed-out call left the queue
        server.backend.gate.set()
        assert list(held)[-1].HasField("done")


def test_the_wait_queue_is_bounded():
    with edge(max_queue=1) as server, Caller(server.target) as c:
        held = holding(c, server, c.open())
        waiting = c.stream(c.open(), "ok")  # the one place in the queue
        until(lambda: server.servicer.queue.depth == 1, "the call to queue")
        code, detail = status_of(lambda: c.stream(c.open(), "ok"))  # one past it
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queue" in detail
        server.backend.gate.set()
        assert list(held)[-1].HasField("done") and list(waiting)[-1].HasField("done")


def test_principals_with_unequal_demand_take_turns(principals):
    """alice queues four calls before bob queues two: bob's are not served
    after all of hers.  alice's first call held a slot all along, so she has
    used more slot time than bob, whose call goes first."""
    tokens, path = principals
    with edge(auth_tokens=path) as server, Caller(server.target, tokens["alice"]) as alice, \
            Caller(server.target, tokens["bob"]) as bob:
        held = holding(alice, server, alice.open("hold"))
        calls = []
        for i in range(4):
            calls.append(alice.stream(alice.open(f"a{i}"), "ok"))
            until(lambda: server.servicer.queue.depth == i + 1, "alice's call to queue")
        for i in range(2):
            calls.append(bob.stream(bob.open(f"b{i}"), "ok"))
            until(lambda: server.servicer.queue.depth == 5 + i, "bob's call to queue")
        server.backend.gate.set()
        for call in [held, *calls]:
            assert list(call)[-1].HasField("done")
        served = [r.session_id for r in server.servicer.records if r.session_id != "hold"]
        assert served[0] == "b0" and served.index("b1") < served.index("a2"), served
        assert [s for s in served if s[0] == "a"] == ["a0", "a1", "a2", "a3"]  # FIFO within one


def test_one_principal_cannot_hold_every_slot_while_another_uses_the_edge(principals):
    """With two slots and bob active, alice's long generations take at most
    one slot: her second waits although a slot is free, and bob's turn gets it."""
    tokens, path = principals
    with edge(auth_tokens=path, n_slots=2) as server, Caller(server.target, tokens["alice"]) as alice, \
            Caller(server.target, tokens["bob"]) as bob:
        bob.generate(bob.open())  # bob has used the edge within the minute
        first = holding(alice, server, alice.open())
        second = alice.stream(alice.open(), "hold")
        until(lambda: server.servicer.queue.depth == 1, "alice's second call to queue")
        assert server.servicer.pool.busy_slots() == 1  # a slot is free, but not for alice
        _, done = bob.generate(bob.open())  # bob's turn goes at once
        assert done.timings.queue_s < T and server.servicer.queue.depth == 1
        server.backend.gate.set()
        assert list(first)[-1].HasField("done") and list(second)[-1].HasField("done")


def test_a_principal_alone_on_the_edge_may_use_every_slot():
    with edge(n_slots=2) as server, Caller(server.target) as c:
        calls = [holding(c, server, c.open()), holding(c, server, c.open())]
        assert server.servicer.pool.busy_slots() == 2 and server.servicer.queue.depth == 0
        server.backend.gate.set()
        assert all(list(call)[-1].HasField("done") for call in calls)


def test_the_slot_share_can_be_set_and_is_checked(principals):
    tokens, path = principals
    with edge(auth_tokens=path, n_slots=2, max_slots_per_principal=2) as server, \
            Caller(server.target, tokens["alice"]) as alice, Caller(server.target, tokens["bob"]) as bob:
        bob.generate(bob.open())
        calls = [holding(alice, server, alice.open()), holding(alice, server, alice.open())]
        assert server.servicer.pool.busy_slots() == 2  # a share of every slot: no limit
        server.backend.gate.set()
        assert all(list(call)[-1].HasField("done") for call in calls)
    with pytest.raises(ValueError):
        EdgeSettings(max_slots_per_principal=0)


def test_concurrent_calls_per_principal_at_the_limit_and_one_past_it(principals):
    tokens, path = principals
    with edge(auth_tokens=path, max_concurrent_per_principal=2) as server, \
            Caller(server.target, tokens["alice"]) as alice, Caller(server.target, tokens["bob"]) as bob:
        held = holding(alice, server, alice.open())  # alice: one running
        waiting = alice.stream(alice.open(), "ok")  # and one waiting: at her limit
        until(lambda: server.servicer.queue.depth == 1, "alice's second call to queue")
        code, detail = status_of(lambda: alice.stream(alice.open(), "ok"))  # one past it
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-per-principal" in detail
        bobs = bob.stream(bob.open(), "ok")  # bob is not touched: he queues as usual
        until(lambda: server.servicer.queue.depth == 2, "bob's call to queue")
        server.backend.gate.set()
        for call in (held, waiting, bobs):
            assert list(call)[-1].HasField("done")
        assert alice.generate(alice.open())[0] == "ok"  # her places are back


# --- sizes and counts ----------------------------------------------------------------------


def test_max_input_tokens_at_the_limit_and_one_past_it():
    words = lambda n: " ".join(["w"] * n)  # noqa: E731 - the scripted slot counts words as tokens
    with edge(max_input_tokens=10) as server, Caller(server.target) as c:
        assert c.info().max_input_tokens == 10
        sid = c.open()
        assert c.generate(sid, words(10))[0] == "ok"  # at the limit
        code, detail = status_of(lambda: c.stream(c.open(), words(11)))  # one past it
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-input-tokens" in detail
        held = server.servicer.pool.transcript(sid)  # 11 words: the prompt and the answer
        code, _ = status_of(lambda: c.stream(sid, "w"))  # the transcript counts too
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert server.servicer.pool.transcript(sid) == held  # nothing recorded


def test_messages_and_stop_strings_at_their_limits_and_one_past():
    with edge(max_messages=3, max_stop_strings=2, max_stop_chars=10) as server, Caller(server.target) as c:
        sid = c.open()
        assert c.generate(sid, messages=3)[0] == "ok"
        assert c.generate(sid, stop=("12345", "67890"))[0] == "ok"  # 2 strings, 10 characters
        for kw, needle in (({"messages": 4}, "at most 3 messages"),
                           ({"stop": ("a", "b", "c")}, "at most 2 stop strings"),
                           ({"stop": ("12345", "678901")}, "at most 10 characters")):
            code, detail = status_of(lambda: c.stream(sid, "ok", **kw))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in detail, detail


def test_max_message_bytes_each_way():
    assert EdgeSettings().max_message_bytes == 1 << 20  # the default: 1 MiB
    limit = 64 * 1024
    with edge(max_message_bytes=limit) as server, Caller(server.target) as c:
        assert c.info().max_message_bytes == limit
        assert len(c.echo(payload=bytes(limit - 64))) == 0  # just under, uplink
        code, _ = status_of(lambda: c.echo(payload=bytes(limit + 1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # one past: refused by gRPC itself
        cap = c.info().max_echo_bytes
        assert cap == limit - 1024 and len(c.echo(cap)) == cap  # downlink: the Echo cap fits a message


def test_echo_above_its_cap_is_invalid_argument():
    assert EdgeSettings().echo_cap_bytes == (1 << 20) - 1024  # 1 MiB, less the framing of a 1 MiB message
    with edge(max_echo_bytes=1000) as server, Caller(server.target) as c:
        assert c.info().max_echo_bytes == 1000
        assert len(c.echo(1000)) == 1000
        code, detail = status_of(lambda: c.echo(1001))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "<= 1000" in detail
    with edge() as server, Caller(server.target) as c:
        code, _ = status_of(lambda: c.echo(1 << 20))  # the default cap
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_echo_rate_per_principal_at_the_burst_and_one_past_it(principals):
    tokens, path = principals
    # A rate so low that no token comes back during the test: only the burst counts.
    with edge(auth_tokens=path, echo_rate=0.001, echo_burst=3) as server, \
            Caller(server.target, tokens["alice"]) as alice, Caller(server.target, tokens["bob"]) as bob:
        for _ in range(3):
            alice.echo(1)
        code, detail = status_of(lambda: alice.echo(1))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "per principal" in detail
        assert bob.echo(2) == b"\0\0"  # bob's bucket is his own


def test_rate_limiter_refills_and_stays_bounded():
    now = [0.0]
    limiter = RateLimiter(2.0, 2, max_principals=3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 0.5  # one token back at 2 per second
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    for name in "bcdef":
        limiter.allow(name)
    assert len(limiter) == 3  # many principals do not grow the table


def test_session_ids_are_checked_on_every_call():
    with edge() as server, Caller(server.target) as c:
        assert c.open("x" * 128) == "x" * 128  # the longest id
        for bad in ("x" * 129, "bad id!", "line\n", "é"):
            for call in (lambda: c.open(bad),
                         lambda: c.stub.CloseSession(edge_pb2.CloseSessionRequest(session_id=bad), timeout=T),
                         lambda: c.stream(bad, "ok"),
                         lambda: c.stream(bad, "ok", open_session=True)):
                code, detail = status_of(call)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and bad not in detail, (bad, detail)


@pytest.mark.slow
def test_max_tokens_above_max_output_tokens_is_clipped_and_done_says_so():
    """The contract, with the real model: at most --max-output-tokens tokens."""
    settings = EdgeSettings(n_ctx=256, n_slots=1, n_threads=1, max_output_tokens=4)
    with EdgeServerThread(settings) as server, Caller(server.target) as c:
        assert c.info().max_output_tokens == 4
        prompt = "Count from 1 to 100, separated by commas: 1, 2, 3,"
        text, done = c.generate(c.open(), prompt, max_tokens=2**31 - 1)
        assert done.usage.output_tokens <= 4 and done.max_tokens_clipped_to == 4
        assert server.servicer.records[-1].max_tokens == 4
        _, at_limit = c.generate(c.open(), prompt, max_tokens=4)
        assert at_limit.usage.output_tokens <= 4 and not at_limit.HasField("max_tokens_clipped_to")
        _, past = c.generate(c.open(), prompt, max_tokens=5)
        assert past.usage.output_tokens <= 4 and past.max_tokens_clipped_to == 4


# --- time limits on a stream ----------------------------------------------------------------


def test_a_generation_past_max_generation_s_is_deadline_exceeded_and_frees_its_slot():
    with edge(max_generation_s=0.3) as server, Caller(server.target) as c:
        sid = c.open()
        code, detail = status_of(lambda: c.stream(sid, "hold"))  # never finishes by itself
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "--max-generation-s" in detail
        record = server.servicer.wait_for_record(lambda r: r.session_id == sid, T)
        assert record is not None and record.finish_reason == "cancelled"
        assert server.servicer.pool.transcript(sid) == []  # an unfinished turn is not recorded
        assert c.generate(sid)[0] == "ok"  # the session and the slot are free


def test_a_stalled_reader_is_cancelled_and_its_slot_goes_to_the_next_call():
    """A flood the client does not read fills the transport's buffers; the
    write then waits, and after --stream-stall-timeout the call is cancelled,
    its model stopped and its slot given to the call waiting for it."""
    with edge(stream_stall_timeout_s=0.5) as server, Caller(server.target) as reader, \
            Caller(server.target) as other:
        flood = reader.stream(reader.open(), "flood")
        chunks = iter(flood)
        next(chunks)  # then stop reading
        waiting = other.stream(other.open(), "ok")
        assert list(waiting)[-1].HasField("done")  # served once the stalled stream let go
        record = server.servicer.wait_for_record(lambda r: r.finish_reason == "cancelled", T)
        assert record is not None and record.output_tokens > 1
        with pytest.raises(grpc.RpcError) as err:
            for _ in chunks:  # what the transport had buffered, then the status
                pass
        assert err.value.code() == grpc.StatusCode.CANCELLED and "--stream-stall-timeout" in err.value.details()
        assert "edgeroute_limit_hits_total{limit=\"stream_stall\"} 1.0" in server.servicer.metrics.render()


# --- transport ------------------------------------------------------------------------------

_FROZEN_CLIENT = textwrap.dedent("""
    import sys, time, grpc
    from edgeroute.v1 import edge_pb2, edge_pb2_grpc
    stub = edge_pb2_grpc.EdgeLLMStub(grpc.insecure_channel(sys.argv[1]))
    sid = stub.OpenSession(edge_pb2.OpenSessionRequest(session_id="frozen"), timeout=30).session_id
    message = edge_pb2.Message(role=edge_pb2.ROLE_USER, content="hold")
    call = stub.Generate(edge_pb2.GenerateRequest(session_id=sid, messages=[message]), timeout=600)
    next(call)
    print("streaming", flush=True)
    time.sleep(600)
""")


def test_keepalive_closes_a_peer_that_stops_answering_pings():
    """A client process frozen mid-stream (SIGSTOP: its TCP stack still acks,
    but nothing answers HTTP/2 pings) loses its connection after the
    keepalive timeout; its call is cancelled and its slot freed."""
    with edge(keepalive_time_s=0.3, keepalive_timeout_s=0.5) as server, Caller(server.target) as other:
        proc = subprocess.Popen([sys.executable, "-c", _FROZEN_CLIENT, server.target], stdout=subprocess.PIPE,
                                text=True, cwd=ROOT, env=cli_env())
        try:
            assert proc.stdout.readline().strip() == "streaming"
            proc.send_signal(signal.SIGSTOP)
            record = server.servicer.wait_for_record(lambda r: r.session_id == "frozen", T)
            assert record is not None and record.finish_reason == "cancelled"
            assert other.generate(other.open())[0] == "ok"  # the slot is free again
            assert other.info().busy_slots == 0
        finally:
            proc.kill()
            proc.wait()


def test_a_client_that_pings_too_often_is_disconnected():
    options = [("grpc.keepalive_time_ms", 50), ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with edge(min_ping_interval_s=5) as server, Caller(server.target, options=options) as pinger:
        code, _ = status_of(lambda: pinger.stream(pinger.open(), "hold"))
        assert code == grpc.StatusCode.UNAVAILABLE  # GOAWAY (too many pings) ended the call
        record = server.servicer.wait_for_record(lambda r: r.finish_reason == "cancelled", T)
        assert record is not None


def test_idle_connections_are_closed_and_clients_reconnect():
    with edge(max_connection_idle_s=0.2) as server, Caller(server.target) as c:
        states: list[grpc.ChannelConnectivity] = []
        c.channel.subscribe(states.append, try_to_connect=False)
        c.info()
        until(lambda: grpc.ChannelConnectivity.READY in states, "the channel to connect")
        until(lambda: states[-1] == grpc.ChannelConnectivity.IDLE, "the server to close the idle connection")
        assert c.info().n_slots == 1  # the next call reconnects


def test_old_connections_are_closed_after_the_grace_period():
    with edge(max_connection_age_s=0.3, max_connection_age_grace_s=0.3) as server, Caller(server.target) as c:
        code, _ = status_of(lambda: c.stream(c.open(), "hold"))  # outlives age + grace
        assert code == grpc.StatusCode.UNAVAILABLE
        record = server.servicer.wait_for_record(lambda r: r.finish_reason == "cancelled", T)
        assert record is not None
        assert c.generate(c.open())[0] == "ok"  # a new connection serves


def test_streams_per_connection_and_rpcs_per_server_are_bounded():
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own (channels share them otherwise)
    with edge(n_slots=2, max_concurrent_streams=1) as server, Caller(server.target, options=own) as c, \
            Caller(server.target, options=own) as d:
        held = holding(c, server, c.open())
        code, _ = status_of(lambda: c.stream("never-reaches-the-server", "ok", timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # waited for a stream on this connection
        assert d.generate(d.open())[0] == "ok"  # another connection is served
        server.backend.gate.set()
        assert list(held)[-1].HasField("done")
    with edge(n_slots=2, max_concurrent_rpcs=2) as server, Caller(server.target) as c:
        calls = [holding(c, server, c.open()) for _ in range(2)]  # at the limit
        code, _ = status_of(c.info)  # one past it
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        server.backend.gate.set()
        for call in calls:
            assert list(call)[-1].HasField("done")
        assert c.info().n_slots == 2


# --- metrics ------------------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=T) as response:
        return response.read().decode()


def test_metrics_endpoint_serves_the_counters(principals, free_port):
    tokens, path = principals
    port = free_port()
    with edge(auth_tokens=path, metrics_port=port, max_sessions_per_principal=1) as server, \
            Caller(server.target, tokens["alice"]) as alice, Caller(server.target, "wrong") as intruder:
        alice.generate(alice.open())
        alice.generate(alice.open())  # her first session is closed to make room
        status_of(intruder.info)
        held = holding(alice, server, alice.open())
        text = _scrape(port)
        server.backend.gate.set()
        list(held)
    for line in ('edgeroute_calls_total{code="OK",method="Generate"} 2.0',
                 'edgeroute_calls_total{code="UNAUTHENTICATED",method="GetServerInfo"} 1.0',
                 "edgeroute_auth_failures_total 1.0",
                 'edgeroute_evictions_total{kind="session"} 2.0',
                 "edgeroute_sessions 1.0", "edgeroute_busy_slots 1.0", "edgeroute_queue_depth 0.0",
                 "edgeroute_ttft_seconds_count 2.0", "edgeroute_queue_wait_seconds_count 2.0",
                 "edgeroute_output_tokens_total 2.0", "edgeroute_prefill_tokens_total 2.0",
                 "edgeroute_cached_tokens_total 0.0"):
        assert line in text, line
    with pytest.raises(OSError):
        _scrape(port)  # stopped with the server


# --- the command line -----------------------------------------------------------------------


CONTRACT_FLAGS = ("--max-output-tokens", "--max-sessions-per-principal", "--max-concurrent-per-principal",
                  "--session-ttl", "--queue-timeout", "--max-message-bytes", "--stream-stall-timeout",
                  "--metrics-port")


def test_settings_refuse_bad_limits():
    for bad in (dict(max_output_tokens=0), dict(queue_timeout_s=0), dict(session_ttl_s=-1),
                dict(max_stop_strings=17), dict(echo_rate=float("nan")), dict(max_input_tokens=0),
                dict(keepalive_time_s=1e9), dict(metrics_port=70000), dict(max_message_bytes=1000)):
        with pytest.raises(ValueError):
            EdgeSettings(**bad)


def test_serve_help_lists_every_limit(run_cli):
    proc = run_cli("serve", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in (*CONTRACT_FLAGS, "--max-input-tokens", "--max-echo-bytes", "--echo-rate", "--max-generation-s",
                 "--keepalive-time", "--max-connection-age", "--max-concurrent-rpcs", "--metrics-host"):
        assert name in proc.stdout, name


@pytest.mark.slow
def test_serve_runs_the_contract_command_line(free_port):
    """``edgeroute serve`` with every flag of the issue's contract, the real model."""
    metrics = free_port()
    cmd = [sys.executable, "-m", "device_runtime.cli.main", "serve", "--port", "0", "--n-slots", "1",
           "--n-ctx", "256", "--threads", "1", "--max-output-tokens", "3", "--max-sessions-per-principal", "4",
           "--max-concurrent-per-principal", "2", "--session-ttl", "600", "--queue-timeout", "5",
           "--max-message-bytes", str(256 * 1024), "--stream-stall-timeout", "10", "--metrics-port", str(metrics)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env=cli_env())
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "edge service listening on" in line:
                break
        port = int(lines[-1].rsplit(":", 1)[1])
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        with Caller(f"127.0.0.1:{port}") as c:
            info = c.info()
            assert (info.max_output_tokens, info.max_sessions_per_principal, info.max_concurrent_per_principal,
                    info.max_message_bytes, info.queue_timeout_s) == (3, 4, 2, 256 * 1024, 5.0)
            _, done = c.generate(c.open(), "Count: 1, 2, 3,", max_tokens=1000)
            assert done.usage.output_tokens <= 3 and done.max_tokens_clipped_to == 3
        assert 'edgeroute_calls_total{code="OK",method="Generate"} 1.0' in _scrape(metrics)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
