"""Stateless gateways (issue 15, item 4): the device's ``--edge A,B`` list, its
circuit breaker, and a conversation that goes on through the other gateway
when the one holding it dies, between two turns or in the middle of an answer.

The gateways are real ``edgeroute serve`` processes (or the same server with a
backend that stalls after one real chunk, tests/_gateway_proc.py, so that the
kill lands mid-answer) and the session-scoped in-process edge; the device is
the real SLM and orchestrator.  A dead gateway is SIGKILLed, as a crash is.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env
from device_runtime.link.breaker import MAX_EDGE_ADDRESSES, CircuitBreaker, parse_edge_targets
from device_runtime.link.edge_client import EdgeClient, EdgeUnavailable


class Clock:
    """The breaker's clock, stepped by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the address list -----------------------------------------------------------


def test_edge_list_is_parsed_in_order():
    assert parse_edge_targets("127.0.0.1:50051") == ("127.0.0.1:50051",)
    assert parse_edge_targets(" a.example:1 , [::1]:2,b:65535") == ("a.example:1", "[::1]:2", "b:65535")
    assert parse_edge_targets(["h:7", "g:8"]) == ("h:7", "g:8")


@pytest.mark.parametrize("text, why", [
    ("", "no edge address"),
    ("a:1,,b:2", "empty address"),
    ("a:1,", "empty address"),
    ("a:0", "1 to 65535"),
    ("a:65536", "1 to 65535"),
    ("a:http", "1 to 65535"),
    ("a", "not HOST:PORT"),
    (":5", "not HOST:PORT"),
    ("::1:5", "brackets"),
    ("a:1,a:1", "listed twice"),
    ("a:1,a:01", "listed twice"),
    (",".join(f"h:{i}" for i in range(1, MAX_EDGE_ADDRESSES + 2)), "at most"),
])
def test_bad_edge_lists_are_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_edge_targets(text)


def test_chat_refuses_a_bad_edge_list_before_loading_anything(run_cli):
    for edge, why in [("127.0.0.1:1,,127.0.0.1:2", "empty address"), ("127.0.0.1:70000", "65535"),
                      ("127.0.0.1:5,127.0.0.1:5", "listed twice")]:
        r = run_cli("chat", "--edge", edge, "--policy", "edge", stdin="", timeout=120)
        assert r.returncode == 2, r.stderr
        assert why in r.stderr and "--edge" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("demo", "--edge", "127.0.0.1:1,127.0.0.1:2", "--edge-cool-down", "0", timeout=120)
    assert r.returncode == 2 and "--edge-cool-down" in r.stderr


# --- the circuit breaker --------------------------------------------------------


def test_breaker_skips_a_failed_address_for_its_cool_down_then_tries_it_again():
    clock = Clock()
    b = CircuitBreaker(["a:1", "b:2", "c:3"], cool_down_s=10, clock=clock)
    assert b.candidates() == ["a:1", "b:2", "c:3"]
    b.failed("a:1")
    assert b.candidates() == ["b:2", "c:3"] and b.cooling("a:1")
    clock.now += 9.9
    assert b.candidates() == ["b:2", "c:3"]
    clock.now += 0.2
    assert b.candidates() == ["a:1", "b:2", "c:3"]  # back first, in the listed order
    b.failed("a:1")
    b.succeeded("a:1")
    assert b.candidates()[0] == "a:1"
    assert b.failures == {"a:1": 2, "b:2": 0, "c:3": 0}


def test_breaker_with_every_address_cooling_tries_the_one_that_recovers_first():
    clock = Clock()
    b = CircuitBreaker(["a:1", "b:2"], cool_down_s=10, clock=clock)
    b.failed("b:2")
    clock.now += 1
    b.failed("a:1")
    assert b.candidates() == ["b:2"]  # one attempt, not one per address
    single = CircuitBreaker(["a:1"], cool_down_s=10, clock=clock)
    single.failed("a:1")
    assert single.candidates() == ["a:1"]  # one address: the breaker changes nothing


@pytest.mark.parametrize("cool_down", [0, -1, float("nan"), float("inf"), 3601])
def test_breaker_cool_down_is_bounded(cool_down):
    with pytest.raises(ValueError, match="cool_down_s"):
        CircuitBreaker(["a:1"], cool_down_s=cool_down)


def test_client_moves_past_a_dead_address_and_retries_it_after_the_cool_down(free_port):
    """No model: the live address is a server with the fault backend (only
    Echo is called); the dead one is a port nobody listens on."""
    from _edge_fakes import FaultBackend
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    dead = f"127.0.0.1:{free_port()}"
    clock = Clock()
    with EdgeServerThread(EdgeSettings(n_slots=1), backend=FaultBackend()) as live, EdgeClient(
        [dead, live.target], connect_timeout_s=0.3, cool_down_s=5, clock=clock,
    ) as client:
        assert client.target == dead  # the first is preferred
        assert client.ping(0) > 0
        assert client.target == live.target and client.breaker.failures[dead] == 1
        t0 = time.monotonic()
        client.ping(0)
        assert client.breaker.failures[dead] == 1  # skipped: not tried again yet
        clock.now += 5.1
        client.ping(0)
        assert client.breaker.failures[dead] == 2  # tried again after the cool-down
        assert time.monotonic() - t0 >= 0.3  # (that retry waited for its connect timeout)
    with EdgeClient([dead], connect_timeout_s=0.3) as alone:
        with pytest.raises(EdgeUnavailable, match=dead):
            alone.ping(0)


# --- two real gateways, one killed -------------------------------------------------


def _wait_ready(proc: subprocess.Popen, target: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    with EdgeClient(target, connect_timeout_s=1.0) as probe:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {proc.stderr.read() if proc.stderr else ''}")
            if probe.warm_up(timeout_s=1.0) is not None:
                return
            time.sleep(0.2)
    raise TimeoutError(f"gateway at {target} not ready in {timeout_s} s")


def _tear_down(proc: subprocess.Popen, orch: Orchestrator, client: EdgeClient) -> None:
    """Kill the gateway if the test left it running, then close the runtime."""
    if proc.poll() is None:
        _kill(proc)
    orch.close()
    client.close()


def _start(argv: list[str], target: str) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(proc, target)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL: a crash, no graceful shutdown
    proc.wait(30)


def _runtime(slm, addresses, clock):
    from device_runtime.link.profile import live_cost_params
    from device_runtime.routing.policies import FixedPolicy
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    client = EdgeClient(addresses, timeout_s=120, connect_timeout_s=1.0, cool_down_s=30, clock=clock)
    orch = Orchestrator(slm, FixedPolicy("edge"), live_cost_params(), edge=client,
                        settings=OrchestratorSettings(max_tokens=16))
    return orch, client


def _gateway_transcript(server, session_id: str) -> list[dict]:
    return [m.to_dict() for m in server.servicer.pool.transcript(session_id)]


def _assert_each_turn_once(orch, prompts: list[str]) -> None:
    users = [m["content"] for m in orch.transcript if m["role"] == "user"]
    assert users == prompts
    roles = [m["role"] for m in orch.transcript]
    assert roles == ["user", "assistant"] * len(prompts)


@pytest.mark.slow
def test_conversation_survives_the_gateway_dying_between_turns(slm, edge_server, free_port):
    """A real ``edgeroute serve`` holds the conversation and is killed; the
    next turns go to the other gateway, which is sent the whole transcript on
    the same session id; the dead one is skipped while it cools down and
    tried again after."""
    port = free_port()
    a, b = f"127.0.0.1:{port}", edge_server.target
    proc = _start([sys.executable, "-m", "device_runtime.cli", "serve", "--port", str(port),
                   "--n-slots", "1", "--n-ctx", "2048", "--threads", "1"], a)
    clock = Clock()
    orch, client = _runtime(slm, [a, b], clock)
    events: list[tuple[str, str]] = []
    prompts = ["Hello.", "Name a colour.", "Name an animal.", "Thanks.", "Bye."]
    try:
        for prompt in prompts[:2]:
            r = orch.turn(prompt)
            assert r.telemetry.target == "edge" and not r.telemetry.fallback
        assert client.target == a
        sid = orch.edge_session.id
        _kill(proc)
        r = orch.turn(prompts[2], on_event=lambda k, d: events.append((k, d)))
        assert r.telemetry.target == "edge" and not r.telemetry.fallback
        assert client.target == b and orch.edge_session.id == sid
        assert ("edge_moved", f"{a} -> {b}") in events
        # The other gateway holds exactly the device's conversation: the two
        # turns answered by the dead one (sent whole), then its own.
        assert _gateway_transcript(edge_server, sid) == orch.transcript
        assert client.breaker.failures[a] == 1
        r = orch.turn(prompts[3])
        assert r.telemetry.target == "edge" and client.breaker.failures[a] == 1  # skipped
        assert r.telemetry.cached_tokens > 0  # the other gateway's KV holds the conversation now
        clock.now += 31
        r = orch.turn(prompts[4])  # the cool-down is over: the dead one is tried, then the other
        assert r.telemetry.target == "edge" and not r.telemetry.fallback
        assert client.breaker.failures[a] == 2
        _assert_each_turn_once(orch, prompts)
        assert _gateway_transcript(edge_server, sid) == orch.transcript
    finally:
        _tear_down(proc, orch, client)


@pytest.mark.slow
def test_conversation_survives_the_gateway_dying_mid_answer(slm, edge_server, free_port):
    """The gateway holding the conversation is killed after the first chunk of
    an answer: the turn is asked again on the other gateway, the transcript
    takes that answer once, and the next turn goes there too."""
    port = free_port()
    a, b = f"127.0.0.1:{port}", edge_server.target
    proc = _start([sys.executable, str(Path(__file__).with_name("_gateway_proc.py")), str(port), "2"], a)
    orch, client = _runtime(slm, [a, b], Clock())
    events: list[str] = []
    shown: list[str] = []
    prompts = ["Hello.", "Tell me about rivers.", "Thanks."]

    def on_text(chunk: str) -> None:
        shown.append(chunk)
        if proc.poll() is None:
            _kill(proc)  # the first chunk of the stalled answer has arrived

    try:
        first = orch.turn(prompts[0])
        assert first.telemetry.target == "edge" and client.target == a
        sid = orch.edge_session.id
        r = orch.turn(prompts[1], on_text=on_text, on_event=lambda k, d: events.append(k))
        assert proc.poll() is not None
        assert r.telemetry.target == "edge" and not r.telemetry.fallback
        assert events[:2] == ["edge_lost", "edge_moved"] and "fallback" not in events
        assert client.target == b and orch.edge_session.id == sid
        # What was shown: the dead gateway's first chunk, then the whole new answer.
        assert len(shown) >= 2 and "".join(shown[1:]) == r.text
        _assert_each_turn_once(orch, prompts[:2])
        assert orch.transcript[-1] == {"role": "assistant", "content": r.text}
        assert _gateway_transcript(edge_server, sid) == orch.transcript
        last = orch.turn(prompts[2])
        assert last.telemetry.target == "edge" and client.target == b
        assert client.breaker.failures[a] == 1
        _assert_each_turn_once(orch, prompts)
        assert _gateway_transcript(edge_server, sid) == orch.transcript
    finally:
        _tear_down(proc, orch, client)
