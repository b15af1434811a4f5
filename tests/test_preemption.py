"""Pre-emption (--preempt-after-s): a generation that has held its slot long
enough pauses between two tokens for a waiting call of a principal with less
slot time used, and goes on, exactly, when a slot is free again.

Ordering is read from the server's own records (which Generate finished
first), never from wall-clock time: the long answer takes many times longer
than the short one however fast the machine is.
"""

from __future__ import annotations

import threading

import grpc
import pytest

import _callers
from edge_service.errors import Aborted
from edge_service.fair_queue import FairWaitQueue
from edge_service.server import EdgeServerThread
from edge_service.sessions import SessionPool, SlotsBusy
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2
from edgeroute.v1.types import Message

LONG = "Count from 1 to 200, separated by commas: 1, 2, 3,"
LONG_TOKENS = 160
SHORT = "Say hello."


class Caller(_callers.Caller):
    def request(self, session_id: str, text: str, max_tokens: int = 8) -> edge_pb2.GenerateRequest:
        return edge_pb2.GenerateRequest(
            session_id=session_id, messages=[Message("user", text).to_pb()],
            params=edge_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0),
        )


def _server(path, preempt_after_s: float) -> EdgeServerThread:
    return EdgeServerThread(EdgeSettings(n_ctx=1024, n_slots=1, n_threads=1, auth_tokens=path,
                                         preempt_after_s=preempt_after_s))


class Reader(threading.Thread):
    """Reads a Generate stream to its end in the background; ``first`` is set at the first chunk."""

    def __init__(self, call) -> None:
        super().__init__(daemon=True)
        self.call, self.first, self.responses, self.error = call, threading.Event(), [], None

    def run(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
                self.first.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.first.set()

    @property
    def text(self) -> str:
        return "".join(r.chunk.text for r in self.responses if r.HasField("chunk"))


def _preemptions(server) -> float:
    return server.servicer.metrics.registry.get_sample_value("edgeroute_preemptions_total") or 0.0


def _order(server) -> list[str]:
    return [r.session_id for r in server.servicer.records]


@pytest.mark.slow
def test_a_long_generation_pauses_for_a_short_turn_and_goes_on_exactly(principals):
    values, path = principals
    with _server(path, 0.3) as server, Caller(server.target, values["alice"]) as alice, \
            Caller(server.target, values["bob"]) as bob:
        alone_text, alone = alice.generate(alice.open("alone"), LONG, max_tokens=LONG_TOKENS)
        long = Reader(alice.stream(alice.open("long"), LONG, max_tokens=LONG_TOKENS))
        long.start()
        assert long.first.wait(60) and long.error is None  # alice holds the only slot
        _, short = bob.generate(bob.open("short"), SHORT)
        long.join(120)
        assert long.error is None and long.responses[-1].HasField("done")
        # bob's turn finished while alice's was paused, and hers went on exactly.
        assert _order(server) == ["alone", "short", "long"]
        assert _preemptions(server) >= 1
        done = long.responses[-1].done
        assert long.text == alone_text and done.usage.output_tokens == alone.usage.output_tokens
        assert done.usage.prompt_tokens == alone.usage.prompt_tokens and done.timings.queue_s > 0
        record = [r for r in server.servicer.records if r.session_id == "long"][0]
        assert record.output_tokens == alone.usage.output_tokens and record.finish_reason == "length"
        assert [m.content for m in server.servicer.pool.transcript("long", owner="alice")] == [LONG, alone_text]


@pytest.mark.slow
def test_without_pre_emption_the_short_turn_waits_for_the_long_one(principals):
    values, path = principals
    with _server(path, 0) as server, Caller(server.target, values["alice"]) as alice, \
            Caller(server.target, values["bob"]) as bob:
        long = Reader(alice.stream(alice.open("long"), LONG, max_tokens=LONG_TOKENS))
        long.start()
        assert long.first.wait(60)
        bob.generate(bob.open("short"), SHORT)
        long.join(120)
        assert _order(server) == ["long", "short"] and _preemptions(server) == 0


@pytest.mark.slow
def test_a_paused_generation_cancelled_by_its_client_leaves_its_session_as_it_was(principals):
    values, path = principals
    with _server(path, 0.3) as server, Caller(server.target, values["alice"]) as alice, \
            Caller(server.target, values["bob"]) as bob:
        sid = alice.open("long")
        call = alice.stream(sid, LONG, max_tokens=LONG_TOKENS)
        long = Reader(call)
        long.start()
        assert long.first.wait(60)
        # bob's own long answer keeps the slot while alice's waits paused.
        other = Reader(bob.stream(bob.open("other"), LONG, max_tokens=LONG_TOKENS))
        other.start()
        _callers.until(lambda: _preemptions(server) >= 1 and other.first.is_set(), "alice's answer to pause",
                       timeout_s=60)
        call.cancel()
        long.join(60)
        assert long.error is not None and long.error.code() == grpc.StatusCode.CANCELLED
        other.join(120)
        assert other.responses[-1].HasField("done")
        assert server.servicer.pool.transcript(sid, owner="alice") == []  # nothing half recorded
        text, done = alice.generate(sid, SHORT)  # the session goes on
        assert done.usage.output_tokens >= 1 and len(server.servicer.pool.transcript(sid, owner="alice")) == 2


# --- the parts ----------------------------------------------------------------------------


def test_a_suspended_lease_lends_its_slot_and_resumes_when_one_is_free():
    pool = SessionPool(["only"], max_sessions=4)
    a, b = pool.open("a", owner="alice"), pool.open("b", owner="bob")
    lease = pool.acquire(a, owner="alice")
    pool.suspend(lease)
    assert pool.busy_slots() == 0 and pool.slots_held("alice") == 0
    with pytest.raises(Exception, match="already running"):
        pool.acquire(a, owner="alice")  # still busy: no second Generate on it
    other = pool.acquire(b, owner="bob")  # takes the slot the pause freed
    assert pool.evictions == 1
    with pytest.raises(SlotsBusy):
        pool.resume(lease)
    pool.done(other)
    pool.done(other)
    assert pool.resume(lease) is lease and lease.slot == "only" and not lease.suspended
    assert pool.busy_slots() == 1
    pool.suspend(lease)
    pool.close(a, owner="alice")
    with pytest.raises(Aborted):
        pool.resume(lease)


async def _waiting_ahead() -> None:
    import asyncio

    queue: FairWaitQueue[str] = FairWaitQueue()
    queue.charge("alice", 10.0)
    assert not queue.waiting_ahead_of("alice", 1.0)  # nobody waits
    task = asyncio.ensure_future(queue.acquire("bob", lambda: None, 5.0))
    await asyncio.sleep(0.01)
    assert queue.waiting_ahead_of("alice", 1.0)  # bob used less slot time than alice
    assert not queue.waiting_ahead_of("bob", 100.0)  # one's own calls never count
    queue.charge("bob", 50.0)
    assert not queue.waiting_ahead_of("alice", 1.0)  # bob has used more now
    assert queue.waiting_ahead_of("alice", 45.0)  # ... but not more than alice's running call adds
    task.cancel()


def test_a_running_call_yields_only_to_a_principal_with_less_slot_time():
    import asyncio

    asyncio.run(_waiting_ahead())


def test_the_setting_is_checked():
    with pytest.raises(ValueError, match="preempt_after_s"):
        EdgeSettings(preempt_after_s=-1)
    assert EdgeSettings(preempt_after_s=0).preempt_after_s == 0
