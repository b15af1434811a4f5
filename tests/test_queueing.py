"""Queueing in the device's cost model (issue 14, item 2): W_q, the edge's
expected wait for a KV slot, added to the edge path's predicted latency.

The estimator is pure (times are passed in); the edge client and the
orchestrator are tested against a real edge service on loopback whose only
slot a fault-injecting backend holds busy, so the waits are the server's own.
"""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.link.edge_client import reported_wait_s
from device_runtime.link.estimation import QueueWaitEstimator, QueueWaitSettings
from device_runtime.routing.routers.base import Router
from edgeroute.v1.types import ServerInfo

# --- the estimator (pure) ---------------------------------------------------------


def test_nothing_is_known_before_any_news():
    assert QueueWaitEstimator().estimate(0.0) is None


def test_waits_raise_w_q_and_turns_that_do_not_wait_bring_it_down():
    est = QueueWaitEstimator(QueueWaitSettings(weight=0.5))
    est.observe_wait(4.0, now_s=0.0)
    assert est.estimate(0.0) == pytest.approx(4.0)  # the first wait is taken as it is
    est.observe_wait(8.0, now_s=0.0)
    assert est.estimate(0.0) == pytest.approx(6.0)  # then an EWMA
    seen = []
    for _ in range(8):  # turns that found a free slot
        est.observe_wait(0.0, now_s=0.0)
        seen.append(est.estimate(0.0))
    assert seen == sorted(seen, reverse=True) and seen[-1] < 0.05
    assert est.n_waits == 10


def test_w_q_decays_while_nothing_refreshes_it():
    est = QueueWaitEstimator(QueueWaitSettings(edge_queue_half_life=30.0))
    est.observe_wait(8.0, now_s=100.0)
    assert est.estimate(100.0) == pytest.approx(8.0)
    assert est.estimate(130.0) == pytest.approx(4.0)
    assert est.estimate(160.0) == pytest.approx(2.0)
    assert est.estimate(50.0) == pytest.approx(8.0)  # a clock read before the news: no growth


def test_the_edge_s_report_sets_w_q():
    est = QueueWaitEstimator()
    est.observe_wait(1.0, now_s=0.0)
    est.observe_report(12.0, now_s=1.0)
    assert est.estimate(1.0) == pytest.approx(12.0)
    est.observe_report(0.0, now_s=2.0)  # the queue emptied
    assert est.estimate(2.0) == 0.0
    assert est.n_reports == 2


def test_a_refusal_after_waiting_is_a_floor_and_a_quick_one_changes_nothing():
    est = QueueWaitEstimator()
    est.observe_report(2.0, now_s=0.0)
    est.observe_floor(0.01, now_s=0.0)  # refused at once (a quota): no news about the queue
    assert est.estimate(0.0) == pytest.approx(2.0)
    est.observe_floor(30.0, now_s=0.0)  # the edge's queue timeout passed
    assert est.estimate(0.0) == pytest.approx(30.0)


def test_nonsense_is_ignored_and_huge_values_are_clipped():
    est = QueueWaitEstimator(QueueWaitSettings(max_wait_s=600.0))
    for bad in (math.nan, math.inf, -1.0):
        est.observe_wait(bad, now_s=0.0)
        est.observe_report(bad, now_s=0.0)
        est.observe_floor(bad, now_s=0.0)
    assert est.estimate(0.0) is None
    est.observe_report(1e12, now_s=0.0)
    assert est.estimate(0.0) == 600.0


@pytest.mark.parametrize("changes", [
    {"edge_queue_half_life": 0.0}, {"edge_queue_half_life": math.nan}, {"weight": 0.0},
    {"weight": 1.5}, {"max_wait_s": -1.0},
])
def test_settings_refuse_values_that_would_break_the_estimate(changes):
    with pytest.raises(ValueError):
        QueueWaitSettings(**changes)


_news = st.tuples(
    st.sampled_from(["wait", "report", "floor"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1e6),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_news, max_size=30), st.floats(min_value=0.0, max_value=2e6))
def test_w_q_stays_finite_and_within_its_bound_whatever_arrives(news, later):
    est = QueueWaitEstimator(QueueWaitSettings(max_wait_s=100.0))
    t = 0.0
    for kind, value, dt in news:
        t += dt
        getattr(est, {"wait": "observe_wait", "report": "observe_report", "floor": "observe_floor"}[kind])(value, t)
    w = est.estimate(t + later)
    assert w is None or (math.isfinite(w) and 0.0 <= w <= 100.0)


def test_what_the_edge_reports_becomes_a_wait():
    def info(**load):
        return ServerInfo("fault", "m", "plain", 64, 1, 8, 1 << 20, **load)

    assert reported_wait_s(info()) == 0.0  # an older edge, or an idle one: no wait
    assert reported_wait_s(info(expected_queue_wait_s=3.5, queue_depth=2, busy_slots=1)) == 3.5
    assert reported_wait_s(info(expected_queue_wait_s=0.0, busy_slots=0)) == 0.0
    assert reported_wait_s(info(queue_depth=3, busy_slots=1, queue_wait_s=9.0)) == 9.0
    assert reported_wait_s(info(queue_depth=0, busy_slots=1)) is None  # busy, nothing measured
    assert reported_wait_s(info(expected_queue_wait_s=math.nan, busy_slots=0)) == 0.0


# --- the edge client against a real edge whose only slot is held -----------------

#: No decay within a test: the estimates read back are the ones fed in.
NO_DECAY = QueueWaitSettings(edge_queue_half_life=1e9)
HI = [{"role": "user", "content": "Hello there."}]


@pytest.fixture
def gated_edge():
    """A real edge service with one slot, on a backend whose turns finish
    only when ``backend.gate`` opens (so a held slot makes real waits)."""
    from _edge_fakes import FaultBackend
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    backend = FaultBackend()
    with EdgeServerThread(EdgeSettings(n_slots=1, queue_timeout_s=60.0), backend=backend) as server:
        yield server, backend


def _hold_the_slot(target: str, backend) -> threading.Thread:
    """Another device's turn that takes the only slot and keeps it until the gate opens."""
    from device_runtime.link.edge_client import EdgeClient, new_session_id

    backend.gate.clear()
    backend.started.clear()
    client = EdgeClient(target, timeout_s=60)

    def run():
        try:
            client.generate(new_session_id(), HI, open_session=True).consume()
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert backend.started.wait(30), "the other device's turn never reached the slot"
    return thread


def _wait_until_queued(target: str, depth: int) -> None:
    """Poll the edge's own report until ``depth`` calls wait for a slot."""
    from device_runtime.link.edge_client import EdgeClient

    with EdgeClient(target, timeout_s=30) as observer:
        for _ in range(3000):
            if observer.server_info().queue_depth >= depth:
                return
            threading.Event().wait(0.01)
    raise AssertionError(f"never {depth} call(s) in the edge's queue")


def test_a_turn_that_waited_for_its_slot_raises_w_q_and_the_edge_s_report_sets_it(gated_edge):
    from device_runtime.link.edge_client import EdgeClient, new_session_id

    server, backend = gated_edge
    with EdgeClient(server.target, timeout_s=60, queue=NO_DECAY) as edge:
        assert edge.expected_queue_s() is None  # nothing known yet: the parameters' own W_q
        assert edge.server_info().expected_queue_wait_s == 0.0  # a free slot
        assert edge.expected_queue_s() == 0.0
        other = _hold_the_slot(server.target, backend)
        results = []
        mine = threading.Thread(target=lambda: results.append(
            edge.generate(new_session_id(), HI, open_session=True).consume()))
        mine.start()
        _wait_until_queued(server.target, 1)  # this device's turn waits behind the other's
        backend.gate.set()
        other.join(30)
        mine.join(30)
        (result,) = results
        assert result.queue_s > 0  # the edge's own account of the wait
        # Folded into W_q (EWMA weight 0.5 from the idle report's 0).
        assert edge.expected_queue_s() == pytest.approx(0.5 * result.queue_s)
        assert edge.queue.counts == (1, 1)

        # Busy again: the edge's report now expects a wait, and sets W_q.
        other = _hold_the_slot(server.target, backend)
        info = edge.server_info()
        assert info.busy_slots == 1 and info.expected_queue_wait_s > 0
        assert edge.expected_queue_s() == pytest.approx(info.expected_queue_wait_s)
        backend.gate.set()
        other.join(30)
        edge.server_info()  # free again
        assert edge.expected_queue_s() == 0.0

    with EdgeClient(server.target, queue=QueueWaitSettings(edge_queue=False)) as paper:
        paper.server_info()
        assert paper.expected_queue_s() is None  # --no-edge-queue: the idle edge of the paper


def test_a_call_refused_after_the_queue_timeout_leaves_w_q_at_least_that_long():
    from _edge_fakes import FaultBackend
    from device_runtime.link.edge_client import EdgeClient, EdgeError, new_session_id
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    backend = FaultBackend()
    timeout_s = 0.3
    with EdgeServerThread(EdgeSettings(n_slots=1, queue_timeout_s=timeout_s), backend=backend) as server:
        other = _hold_the_slot(server.target, backend)
        with EdgeClient(server.target, timeout_s=60, queue=NO_DECAY) as edge:
            with pytest.raises(EdgeError) as refused:
                edge.generate(new_session_id(), HI, open_session=True).consume()
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The edge waited its whole queue timeout before refusing.
            assert edge.expected_queue_s() >= timeout_s
        backend.gate.set()
        other.join(30)


# --- the orchestrator: a borderline turn and a busy edge --------------------------


class FixedScoreRouter(Router):
    """A router whose p is fixed: the decision turns on the latency term alone."""

    name = "fixed"
    tau_r = 0.0

    def __init__(self, p: float) -> None:
        self.p = p

    def score(self, prompt, context=()):
        return self.p


def _connect(slm, target: str, policy, edge=None):
    """The runtime as ``edgeroute chat --edge`` assembles it (no --online): the
    edge's window and, on connect, its queue report."""
    import argparse

    from device_runtime.cli.runner import DeviceSide, assemble
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profile import live_cost_params
    from device_runtime.runtime.orchestrator import OrchestratorSettings

    edge = edge or EdgeClient(target, timeout_s=60, queue=NO_DECAY)
    device = DeviceSide(slm, policy, live_cost_params(), OrchestratorSettings(max_tokens=10))
    return assemble(device, edge, argparse.Namespace(online=False, no_online=True))


@pytest.mark.slow
def test_a_borderline_turn_stays_on_the_device_while_the_edge_reports_a_wait(slm, gated_edge):
    """θ sits between the turn's fused score on an idle edge and its score with
    the wait the loaded edge reports: whatever that wait's size, the turn goes
    to the edge when the edge is idle and stays on the device while it is busy."""
    from device_runtime.routing.policies import AutoPolicy

    server, backend = gated_edge
    prompt = "Name a colour."
    backend.gate.set()
    idle = _connect(slm, server.target, AutoPolicy(FixedScoreRouter(0.5), -10.0, skip_settled=False))
    rec_idle = idle.turn(prompt).telemetry  # also leaves a slot hold for the edge to expect from
    assert rec_idle.target == "edge" and not rec_idle.fallback
    idle.close()
    idle.edge.close()

    other = _hold_the_slot(server.target, backend)
    policy = AutoPolicy(FixedScoreRouter(0.5), 0.0, skip_settled=False)
    busy = _connect(slm, server.target, policy)  # the report on connect: a wait
    wait_s = busy.edge.expected_queue_s()
    assert wait_s > 0
    policy.threshold = rec_idle.p_fused - busy.params.alpha * wait_s / 2
    n_generates = len(server.servicer.records)
    r = busy.turn(prompt)
    rec = r.telemetry
    assert rec.target == "device" and not rec.fallback and r.fallback_status is None
    # The prediction the decision used: the idle edge's, plus W_q; the device's unchanged.
    assert rec.predicted_s["edge"] == pytest.approx(rec_idle.predicted_s["edge"] + wait_s)
    assert rec.predicted_s["device"] == pytest.approx(rec_idle.predicted_s["device"])
    assert rec.p_fused < policy.threshold < rec_idle.p_fused
    assert busy.edge_session.id is None and len(server.servicer.records) == n_generates  # never queued

    backend.gate.set()
    other.join(30)
    busy.edge.server_info()  # the queue emptied (as --online asks after a device turn)
    busy.new_conversation()
    again = busy.turn(prompt).telemetry  # the same turn, the same θ: the edge again
    assert again.target == "edge" and again.p_fused == pytest.approx(rec_idle.p_fused)
    busy.close()
    busy.edge.close()


@pytest.mark.slow
def test_no_slot_in_time_is_a_busy_edge_not_a_bad_link(slm):
    """A turn refused after the edge's queue timeout falls back to the device;
    with --online, the Echo after it runs as after any device turn, and the
    edge is asked for its queue, rather than the link being taken as down."""
    from _edge_fakes import FaultBackend
    from device_runtime.routing.policies import FixedPolicy
    from device_runtime.runtime.online import OnlineRouting, OnlineSettings
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    backend = FaultBackend(gate_open=True)
    with EdgeServerThread(EdgeSettings(n_slots=1, queue_timeout_s=0.3), backend=backend) as server:
        orch = _connect(slm, server.target, FixedPolicy("edge"))
        online = OnlineRouting(orch.params, OnlineSettings(idle_probe_s=None))
        orch.add_hook(online)
        assert orch.turn("Hello there.").telemetry.target == "edge"  # a hold the edge can expect from
        other = _hold_the_slot(server.target, backend)
        reports = orch.edge.queue.counts[1]
        r = orch.turn("Name a colour.")
        assert r.telemetry.fallback and r.fallback_status == "RESOURCE_EXHAUSTED"
        assert orch.edge.queue.counts[1] == reports + 1  # the Echo went through, then the report
        assert orch.edge.expected_queue_s() > 0
        backend.gate.set()
        other.join(30)
        orch.close()
        orch.edge.close()
