"""Pre-emption under a seeded storm: three principals, two slots, a quantum of
20 ms, long and short answers, cancels, closed sessions and deadlines at
random.  The slot here is a fault injector that can pause (it counts, so that
an answer split into parts shows any token lost or repeated at a pause); the
real model's pause is checked in tests/test_preemption.py and tests/test_llm.py.

Afterwards: every answer that finished is exact, every session whose calls
all finished holds exactly those turns, no slot, lease or queue entry is
left over, and the server still answers.
"""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

import _callers
from _edge_fakes import FaultBackend
from test_preemption import Reader, _order, _preemptions
from device_runtime.llm.conversation import GenerationStats
from edge_service.backends.base import Slot
from edge_service.server import EdgeServerThread
from edge_service.settings import EdgeSettings
from edgeroute.v1 import edge_pb2
from edgeroute.v1.types import Message

TOKEN_S = 0.002  # per counted token: long answers span many 20 ms quanta


class CountingSlot(Slot):
    """``count N``: the tokens ``0 1 ... N-1``, one chunk each; pauses when
    asked, and goes on from its continuation (which names the owner whose
    count it is, so that a part resumed for another owner fails loudly)."""

    supports_pause = True
    token_s = TOKEN_S

    def __init__(self, backend: "CountingBackend") -> None:
        self.backend = backend
        self.last_stats = None
        self.last_continuation = None

    def stream(self, messages, params, cancel, kv_owner=None, pause=None, continuation=None):
        self.last_stats = self.last_continuation = None
        start = 0
        if continuation is not None:
            owner, start = continuation
            if owner != kv_owner:
                raise AssertionError(f"resumed {owner!r}'s answer for {kv_owner!r}")
        total = min(int(messages[-1]["content"].split()[1]), params.max_tokens)
        n, reason = start, "length" if total >= params.max_tokens else "stop"
        while n < total:
            if cancel.is_set():
                reason = "cancelled"
                break
            if pause is not None and pause.is_set() and n > start:
                reason = "paused"
                self.last_continuation = (kv_owner, n)
                break
            time.sleep(self.token_s)
            yield f"{n} "
            n += 1
        self.last_stats = GenerationStats(
            prompt_tokens=1, prefill_tokens=1, cached_tokens=0, output_tokens=n - start,
            prefill_s=0.0, decode_s=0.0, ttft_s=0.0, finish_reason=reason,
        )


class CountingBackend(FaultBackend):
    name = "counting"

    def new_slot(self):
        return CountingSlot(self)


class Caller(_callers.Caller):
    def request(self, session_id: str, count: int) -> edge_pb2.GenerateRequest:
        return edge_pb2.GenerateRequest(
            session_id=session_id, messages=[Message("user", f"count {count}").to_pb()],
            params=edge_pb2.GenerationParams(max_tokens=200),
        )


def _expected(count: int) -> str:
    return "".join(f"{i} " for i in range(count))


def _client(caller: Caller, name: str, seed: int, log: dict, errors: list) -> None:
    """Four sessions, six turns each, with cancels, closes and short deadlines at random."""
    rng = random.Random(seed)
    sessions = {caller.open(f"{name}-{i}"): {"done": [], "clean": True} for i in range(4)}
    log.update(sessions)
    for _ in range(6):
        sid = rng.choice(list(sessions))
        state = sessions[sid]
        count = rng.choice([3, 8, 40, 90])
        fault = rng.random()
        try:
            call = caller.stream(sid, count, timeout=0.15 if fault < 0.1 else 60)
            text, done = "", None
            for i, response in enumerate(call):
                if response.HasField("done"):
                    done = response.done
                    break
                text += response.chunk.text
                if fault > 0.9 and i == 5:
                    call.cancel()
                elif 0.8 < fault <= 0.9 and i == 5:
                    caller.close(sid)  # the running (maybe paused) call is cancelled
                    sessions.pop(sid)
                    caller_sid = caller.open(sid)
                    sessions[caller_sid] = state = {"done": [], "clean": False}
            if done is not None:
                if text != _expected(count) or done.usage.output_tokens != count:
                    errors.append(f"{sid}: count {count} answered {text!r} ({done.usage.output_tokens} tokens)")
                state["done"].append(text)
            else:
                state["clean"] = False
        except grpc.RpcError as exc:
            state["clean"] = False
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION):
                errors.append(f"{sid}: {exc.code().name}: {exc.details()}")
    log.update(sessions)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_storm_of_pauses_loses_and_repeats_nothing(principals, seed):
    values, path = principals
    settings = EdgeSettings(n_slots=2, auth_tokens=path, preempt_after_s=0.02, max_concurrent_per_principal=8)
    with EdgeServerThread(settings, backend=CountingBackend()) as server:
        callers = {name: Caller(server.target, tok) for name, tok in values.items()}
        logs: dict[str, dict] = {name: {} for name in values}
        errors: list[str] = []
        threads = [
            threading.Thread(target=_client, args=(callers[name], f"{name}{k}", seed * 100 + 10 * k + i,
                                                   logs[name], errors))
            for i, name in enumerate(values) for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        servicer = server.servicer
        assert servicer.metrics.registry.get_sample_value("edgeroute_preemptions_total") > 0
        deadline = time.monotonic() + 10
        while servicer.pool.busy_slots() or servicer.queue.depth:  # cancelled parts winding down
            assert time.monotonic() < deadline, "a slot or a queue entry was left over"
            time.sleep(0.01)
        for name, sessions in logs.items():
            for sid, state in sessions.items():
                held = [m.content for m in servicer.pool.transcript(sid, owner=name) if m.role == "assistant"]
                if state["clean"]:
                    assert held == state["done"], sid
                # Each session still answers, at once (nothing left busy).
                text, done = callers[name].generate(sid, 3)
                assert text == _expected(3)
        for caller in callers.values():
            caller.__exit__(None, None, None)


# --- the edges of a pause (the counting slot; orders from the server's records) ---------


class SlowCountingBackend(CountingBackend):
    """Counts at 10 ms per token."""

    def new_slot(self):
        slot = CountingSlot(self)
        slot.token_s = 0.01
        return slot


def _reader(call):
    reader = Reader(call)
    reader.start()
    assert reader.first.wait(30)
    return reader


def _suspended(server, sid: str, owner: str) -> bool:
    session = server.servicer.pool._sessions.get((owner, sid))
    return session is not None and session.lease is not None and session.lease.suspended


def test_a_full_queue_does_not_end_a_paused_answer(principals):
    """With --max-queue 1 and bob's call waiting, alice's answer pauses and
    goes on: its place in the queue is not a new call's."""
    values, path = principals
    settings = EdgeSettings(n_slots=1, auth_tokens=path, preempt_after_s=0.02, max_queue=1)
    with EdgeServerThread(settings, backend=CountingBackend()) as server, \
            Caller(server.target, values["alice"]) as alice, Caller(server.target, values["bob"]) as bob:
        long = _reader(alice.stream(alice.open("long"), 150))
        text, _ = bob.generate(bob.open("short"), 3)
        long.join(60)
        assert long.error is None and long.text == _expected(150) and text == _expected(3)
        assert _preemptions(server) >= 1


def test_a_paused_answer_ends_at_once_when_its_session_closes(principals):
    """alice's answer, paused for bob's (shorter than a quantum, so it never
    pauses itself), ends ABORTED as soon as her session is closed, not when
    bob's ends; it is recorded as cancelled, and her counter is not charged
    for the pause."""
    values, path = principals
    settings = EdgeSettings(n_slots=1, auth_tokens=path, preempt_after_s=1.0)
    with EdgeServerThread(settings, backend=SlowCountingBackend()) as server, \
            Caller(server.target, values["alice"]) as alice, Caller(server.target, values["bob"]) as bob:
        sid = alice.open("long")
        long = _reader(alice.stream(sid, 190))
        other = _reader(bob.stream(bob.open("other"), 80))
        _callers.until(lambda: _suspended(server, sid, "alice"), "alice's answer to pause")
        charged = server.servicer.queue._service["alice"]
        alice.close(sid)
        long.join(30)
        assert long.error is not None and long.error.code() == grpc.StatusCode.ABORTED
        assert "other" not in _order(server)  # bob's answer is still running
        record = [r for r in server.servicer.records if r.session_id == "long"]
        assert len(record) == 1 and record[0].finish_reason == "cancelled" and record[0].output_tokens >= 1
        assert server.servicer.queue._service["alice"] == charged  # the pause was not slot time
        other.join(60)
        assert other.responses[-1].HasField("done") and other.text == _expected(80)


async def _one_waiter_one_pause(server) -> None:
    import asyncio

    servicer, pool = server.servicer, server.servicer.pool
    leases = []
    for owner in ("alice", "carol"):
        pool.open(owner, owner=owner)
        lease = pool.acquire(owner, owner=owner)
        lease.acquired_at -= 10  # both have run past the quantum
        leases.append(lease)
    waiter = asyncio.ensure_future(servicer.queue.acquire("bob", lambda: None, 5.0))
    await asyncio.sleep(0.01)
    for lease in leases:
        servicer._maybe_preempt(lease)
    assert [lease.pause.is_set() for lease in leases].count(True) == 1  # one call waits: one pause
    waiter.cancel()


def test_one_waiting_call_pauses_one_generation_not_all():
    import asyncio

    settings = EdgeSettings(n_slots=2, preempt_after_s=1.0, max_slots_per_principal=2)
    with EdgeServerThread(settings, backend=CountingBackend()) as server:
        asyncio.run(_one_waiter_one_pause(server))
