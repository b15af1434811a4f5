"""APGR and CPT: hand-computed cases and synthetic traces with known answers."""

from __future__ import annotations

import random
import statistics
from typing import Mapping, Sequence

import numpy as np
import pytest

from device_runtime.routing import cost_model
from device_runtime.sim.metrics import CurvePoint, MetricError, apgr, cpt, pgr, router_metrics
from device_runtime.routing.routers import ROUTERS
from device_runtime.routing.routers.base import Message, Router
from device_runtime.sim.simulate import SimConfig, oracle_labels, simulate
from device_runtime.sim.traces import Dialogue, TraceTurn


# --- by hand -----------------------------------------------------------------------


def test_pgr():
    assert pgr(0.75, 0.5, 1.0) == pytest.approx(0.5)
    assert pgr(0.5, 0.5, 1.0) == 0.0
    assert pgr(1.0, 0.5, 1.0) == 1.0


def test_apgr_and_cpt_by_hand():
    # q_device 0.5, q_edge 1.0; one point at share 0.5 with quality 0.875 (PGR 0.75).
    # Closed curve (0, 0), (0.5, 0.75), (1, 1):
    #   APGR = 0.5 * (0 + 0.75) / 2 + 0.5 * (0.75 + 1) / 2 = 0.1875 + 0.4375
    pts = [(0.5, 0.875)]
    assert apgr(pts, 0.5, 1.0) == pytest.approx(0.625)
    # CPT(50%) on the first segment: 0.5 * 0.5 / 0.75 = 1/3.
    assert cpt(pts, 0.5, 1.0, 0.5) == pytest.approx(1 / 3)
    # CPT(80%) on the second: 0.5 + 0.5 * (0.8 - 0.75) / 0.25 = 0.6.
    assert cpt(pts, 0.5, 1.0, 0.8) == pytest.approx(0.6)
    assert cpt(pts, 0.5, 1.0, 0.75) == pytest.approx(0.5)
    assert cpt(pts, 0.5, 1.0, 0.0) == 0.0
    assert cpt(pts, 0.5, 1.0, 1.0) == pytest.approx(1.0)


def test_chance_line_has_apgr_one_half():
    pts = [(s / 10, 0.6 + 0.2 * s / 10) for s in range(11)]
    assert apgr(pts, 0.6, 0.8) == pytest.approx(0.5)
    assert cpt(pts, 0.6, 0.8, 0.5) == pytest.approx(0.5)
    assert cpt(pts, 0.6, 0.8, 0.8) == pytest.approx(0.8)


def test_cpt_takes_the_first_crossing_of_a_non_monotone_curve():
    # PGR rises to 1.0 at share 0.2, dips, and rises again.
    pts = [(0.2, 1.0), (0.5, 0.4), (0.8, 0.9)]
    assert cpt(pts, 0.0, 1.0, 0.8) == pytest.approx(0.16)


def test_oracle_above_one():
    # A router can beat the all-edge quality (the weak model is right where the strong one is not).
    pts = [(0.1, 1.1)]
    assert apgr(pts, 0.5, 1.0) > 1.0


def test_router_metrics_on_curve_points():
    curve = [CurvePoint(0.1, 0.875, 0.5, 12.0)]
    m = router_metrics(curve, 0.5, 1.0)
    assert (m.apgr, m.cpt50, m.cpt80) == pytest.approx((0.625, 1 / 3, 0.6))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: apgr([(0.5, 0.7)], 0.7, 0.7), "no gap"),
        (lambda: apgr([(1.5, 0.7)], 0.5, 1.0), r"\[0, 1\]"),
        (lambda: apgr([(float("nan"), 0.7)], 0.5, 1.0), "finite"),
        (lambda: apgr([(0.5, 0.7)], float("inf"), 1.0), "finite"),
        (lambda: cpt([(0.5, 0.7)], 0.5, 1.0, 50), "target_pgr"),
        (lambda: router_metrics([], 0.5, 1.0), "empty"),
    ],
)
def test_degenerate_input_is_a_clear_error(call, match):
    with pytest.raises(MetricError, match=match):
        call()


# --- synthetic traces ------------------------------------------------------------------


class FixedRouter(Router):
    """Scores from a table (a test router, not a fake of the thing under test)."""

    name = "fixed"
    tau_r = 0.0

    def __init__(self, table: Mapping[str, float]) -> None:
        self._table = dict(table)

    def score(self, prompt: str, context: Sequence[Message] = ()) -> float:
        return self._table[prompt]


def synthetic_trace(n: int = 400, seed: int = 7) -> list[Dialogue]:
    """Single-turn queries with equal prompt lengths, so latency does not reorder p̃."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        qd = float(rng.random() < 0.6)
        qe = float(rng.random() < 0.85)
        turn = TraceTurn(prompt=f"query {i:05d} text", context=(), quality_device=qd, quality_edge=qe)
        out.append(Dialogue(f"syn/{i}", "synthetic", (turn,)))
    return out


def _run(dialogues, routers, benchmark="mmlu"):
    config = SimConfig(benchmark=benchmark, params=cost_model.paper_params(benchmark), points=41)
    return simulate(config, dialogues, routers)


def test_oracle_is_at_least_as_good_as_any_router():
    dialogues = synthetic_trace()
    labels = oracle_labels(dialogues)
    prompts = list(labels)
    rng = random.Random(3)
    noisy = {p: min(1.0, max(0.0, (labels[p] + 1) / 2 + rng.gauss(0, 0.3))) for p in prompts}
    routers = {
        "oracle": lambda: ROUTERS.create("oracle", labels=labels),
        "noisy-oracle": lambda: FixedRouter(noisy),
        "anti-oracle": lambda: FixedRouter({p: (1 - labels[p]) / 2 for p in prompts}),
        "constant": lambda: FixedRouter({p: 0.5 for p in prompts}),
        **{f"random{s}": (lambda s=s: ROUTERS.create("random", seed=s)) for s in range(5)},
    }
    result = _run(dialogues, routers)
    best = result.routers["oracle"].metrics
    for name, r in result.routers.items():
        assert best.apgr >= r.metrics.apgr - 1e-12, name
        assert best.cpt50 <= r.metrics.cpt50 + 1e-12, name
        assert best.cpt80 <= r.metrics.cpt80 + 1e-12, name
    # Only the two endpoints: the straight line.
    assert result.routers["constant"].metrics.apgr == pytest.approx(0.5)
    assert result.routers["anti-oracle"].metrics.apgr < 0.5 < result.routers["noisy-oracle"].metrics.apgr
    # The oracle's curve, interpolated between its points (ties in p̃ fall
    # between them), is at least every other curve at every edge share.
    oracle_curve = result.routers["oracle"].curve
    xs = [c.edge_share for c in oracle_curve]
    ys = [c.quality for c in oracle_curve]
    for name, r in result.routers.items():
        for point in r.curve:
            assert np.interp(point.edge_share, xs, ys) >= point.quality - 1e-12, name


def test_random_apgr_is_about_one_half_over_seeds():
    dialogues = synthetic_trace(n=300)
    routers = {f"random{s}": (lambda s=s: ROUTERS.create("random", seed=s)) for s in range(24)}
    result = _run(dialogues, routers)
    values = [r.metrics.apgr for r in result.routers.values()]
    mean = statistics.fmean(values)
    # Each seed's APGR is noisy (std about 0.05 at n=300); the mean over 24 seeds is not.
    assert mean == pytest.approx(0.5, abs=0.04)
    assert statistics.pstdev(values) < 0.15
    for r in result.routers.values():
        shares = [c.edge_share for c in r.curve]
        assert shares[0] == 0.0 and shares[-1] == 1.0


def test_routellm_binned_curve_by_hand():
    """RouteLLM's protocol: thresholds at the quantile edges of 10 bins of the
    scores, p >= edge to the strong model, nothing at the top edge."""
    from export.evaluate import binned_routing_curve, routing_metrics

    scores = [i / 19 for i in range(20)]  # 20 distinct scores: 2 per bin
    qd = [0.0] * 20
    qe = [1.0 if i >= 10 else 0.0 for i in range(20)]  # only the top half gains
    pts = binned_routing_curve(scores, qd, qe, bins=10)
    assert len(pts) == 11 and pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 0.5)
    assert (0.5, 0.5) in [(round(a, 6), round(b, 6)) for a, b in pts]  # the top half on the edge
    m = routing_metrics(scores, qd, qe, bins=10)
    # PGR rises linearly to 1 at share 0.5 (the top-ranked turns are the gainers), then stays at 1.
    assert m["apgr"] == pytest.approx(0.75)
    assert m["cpt50"] == pytest.approx(0.25)
    dense = routing_metrics(scores, qd, qe)
    assert dense["apgr"] == pytest.approx(0.75)  # a perfect ranking: both protocols agree
    with pytest.raises(ValueError, match="bins"):
        binned_routing_curve(scores, qd, qe, bins=0)
