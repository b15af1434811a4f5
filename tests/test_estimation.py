"""Link fitting and online estimation (pure)."""

from __future__ import annotations

import random

import pytest

from device_runtime.routing.cost_model import ContextLedger, Link, ModelTiming, decide, paper_params
from device_runtime.link.estimation import (
    EwmaSettings,
    FitError,
    LinkEstimator,
    OnlineEstimator,
    RobustEwma,
    bytes_per_token,
    fit_link,
    per_token_time,
)


def _samples(overhead=0.05, bw=1e6, sizes=(0, 10_000, 50_000, 100_000, 200_000), reps=5, noise=0.002, seed=0):
    rng = random.Random(seed)
    xs, ys = [], []
    for s in sizes:
        for _ in range(reps):
            xs.append(s)
            ys.append(overhead + s / bw + rng.uniform(0, noise))
    return xs, ys


def test_fit_link_recovers_overhead_and_bandwidth():
    xs, ys = _samples()
    fit = fit_link(xs, ys)
    assert fit.overhead_s == pytest.approx(0.051, abs=0.002)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1e6, rel=0.02)
    assert fit.r_squared > 0.999
    assert len(fit.residuals_s) == 5 and fit.n_samples == 25
    assert fit.predict_s(100_000) == pytest.approx(0.151, abs=0.003)
    assert set(fit.to_dict()) >= {"overhead_s", "bandwidth_bytes_per_s", "r_squared", "residuals_s"}


def test_fit_link_is_robust_to_a_few_slow_round_trips():
    xs, ys = _samples(reps=7)
    # Two wild round trips per size (retransmission, scheduler stall).
    for i in range(0, len(ys), 7):
        ys[i] += 1.0
        ys[i + 1] += 0.5
    fit = fit_link(xs, ys)
    assert fit.overhead_s == pytest.approx(0.051, abs=0.003)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1e6, rel=0.05)
    assert fit.r_squared_all < fit.r_squared


def test_fit_link_drops_one_size_that_was_slow_every_time():
    xs, ys = _samples(sizes=(0, 4096, 16384, 65536, 262144, 1048576))
    ys = [y + (0.5 if x == 65536 else 0.0) for x, y in zip(xs, ys)]  # an RTO at every 64 KiB echo
    fit = fit_link(xs, ys)
    assert fit.dropped_sizes == (65536,)
    assert fit.overhead_s == pytest.approx(0.051, abs=0.003)
    assert fit.bandwidth_bytes_per_s == pytest.approx(1e6, rel=0.02)
    assert fit_link(*_samples()).dropped_sizes == ()


@pytest.mark.parametrize(
    "sizes, rtts",
    [([100, 100], [0.1, 0.1]), ([], []), ([1, 2], [0.1]), ([1, 2], [0.2, 0.1]), ([1, 2], [0.1, float("nan")])],
)
def test_fit_link_rejects_undetermined_input(sizes, rtts):
    with pytest.raises(FitError):
        fit_link(sizes, rtts)


def test_bytes_per_token_and_per_token_time():
    assert bytes_per_token(["abcd", "", "efgh ij"], lambda t: len(t.split())) == pytest.approx(11 / 3)
    with pytest.raises(ValueError):
        bytes_per_token(["", ""], len)
    # 10 ms fixed + 2 ms/token: the slope ignores the fixed part.
    tokens = [16, 64, 256]
    assert per_token_time([0.01 + 0.002 * t for t in tokens], tokens) == pytest.approx(0.002)
    assert per_token_time([0.2, 0.2], [100, 100]) == pytest.approx(0.002)


def test_robust_ewma_rejects_isolated_outlier_and_follows_a_regime_change():
    e = RobustEwma(EwmaSettings(weight=0.3, regime_after=2), value=0.05)
    for x in [0.05, 0.052, 0.049, 0.051, 0.05, 0.05]:
        assert e.update(x)
    assert not e.update(2.0)  # one spike: rejected
    assert e.value == pytest.approx(0.05, abs=0.002)
    assert e.update(0.05)
    # The link degrades: two consecutive outliers adopt the new level at once.
    assert not e.update(0.40)
    assert e.update(0.42)
    assert e.value == pytest.approx(0.41)
    assert e.n_regime_changes == 1
    # Recovery is the same rule the other way.
    for x in [0.40, 0.41, 0.42, 0.40]:
        e.update(x)
    e.update(0.05)
    e.update(0.05)
    assert e.value == pytest.approx(0.05)
    with pytest.raises(ValueError):
        e.update(float("inf"))


def test_ewma_settings_validate():
    with pytest.raises(ValueError):
        EwmaSettings(weight=0)
    with pytest.raises(ValueError):
        EwmaSettings(window=1)


def test_link_estimator_refits_bandwidth_when_sizes_vary():
    # The profiled B is 4x off (the link changed); transfers are large enough to show it.
    est = LinkEstimator(Link(bandwidth_tokens_per_s=1000.0, overhead_s=0.05))
    rng = random.Random(1)
    for _ in range(20):
        tokens = rng.choice([10, 100, 400, 800])
        est.update(tokens, 0.05 + tokens / 250.0)  # the true B is 250 tokens/s
    assert est.link.bandwidth_tokens_per_s == pytest.approx(250.0, rel=0.15)
    assert est.link.overhead_s == pytest.approx(0.05, abs=0.03)


def test_link_estimator_does_not_read_bandwidth_from_probes_next_to_turns():
    # A poor link's δ (0.24 s).  Probes (0 tokens) see δ; a streamed turn on a
    # jittery link waits for the latest of its chunks, ~30 ms more whatever its
    # size.  Its transfers (<= 200 tokens at 58k tokens/s: <= 3.4 ms) are
    # invisible, so B must keep its profiled value; counting the probes as
    # 0-token turns would fit B ≈ 5k tokens/s.
    est = LinkEstimator(Link(bandwidth_tokens_per_s=58_000.0, overhead_s=0.24))
    rng = random.Random(3)
    for _ in range(12):
        est.update(0, 0.24 + rng.uniform(-0.002, 0.002), probe=True)
        tokens = rng.choice([60, 120, 200])
        est.update(tokens, 0.24 + 0.03 + tokens / 58_000.0 + rng.uniform(-0.002, 0.002))
    assert est.link.bandwidth_tokens_per_s == 58_000.0
    assert est.link.overhead_s == pytest.approx(0.255, abs=0.025)


def test_link_estimator_keeps_bandwidth_under_jitter_that_hides_any_slope():
    # Turns alone, sizes 20-300 tokens, ±20 ms of jitter a way: a slope of a
    # few ms under 40 ms of noise is not evidence about B.
    est = LinkEstimator(Link(bandwidth_tokens_per_s=58_000.0, overhead_s=0.24))
    rng = random.Random(4)
    for _ in range(16):
        tokens = rng.choice([20, 300])
        est.update(tokens, 0.24 + tokens / 58_000.0 + rng.uniform(-0.02, 0.02) + rng.uniform(-0.02, 0.02))
    assert est.link.bandwidth_tokens_per_s == 58_000.0


def test_link_estimator_keeps_bandwidth_when_transfers_are_negligible():
    est = LinkEstimator(Link(bandwidth_tokens_per_s=1e6, overhead_s=0.02))
    rng = random.Random(2)
    for _ in range(30):
        est.update(rng.choice([0, 20, 300]), 0.02 + rng.uniform(0, 0.003))
    assert est.link.bandwidth_tokens_per_s == 1e6
    assert est.link.overhead_s == pytest.approx(0.0215, abs=0.002)


def test_link_estimator_reports_an_outlier_waiting_for_confirmation():
    est = LinkEstimator(Link(bandwidth_tokens_per_s=1e5, overhead_s=0.02))
    assert est.pending_outliers == 0
    assert not est.update(10, 0.25)  # one slow turn: held back
    assert est.pending_outliers == 1 and est.link.overhead_s == pytest.approx(0.02)
    est.update(0, 0.24, probe=True)  # the confirming probe: a new regime
    assert est.pending_outliers == 0 and est.link.overhead_s == pytest.approx(0.245, abs=0.002)
    assert not est.update(10, 0.02)  # one fast sample after it: held back again
    assert est.pending_outliers == 1
    est.update(10, 0.25)  # ... and dropped by an ordinary one
    assert est.pending_outliers == 0 and est.link.overhead_s > 0.2


def test_online_estimator_moves_turns_to_device_when_link_degrades_and_back():
    """Eqs. (6)-(12) with live estimates: a hard turn goes to the edge on a good
    link, to the device within a few turns of degradation, back after recovery."""
    base = paper_params("mt-bench").with_(link=Link(bandwidth_tokens_per_s=1e5, overhead_s=0.04))
    est = OnlineEstimator(base)
    ledger = ContextLedger()
    turn = ledger.turn_inputs(prompt_tokens=50)

    def target() -> str:
        return decide(est.params(), turn, p=0.9, threshold=0.5).target

    def edge_turn(rtt_s: float) -> None:
        server_s = 0.02 * 879
        est.observe_edge_turn(measured_s=server_s + rtt_s, server_s=server_s, router_s=0.0,
                              upload_tokens=50, output_tokens=879, first_token_s=1.0,
                              decode_s=server_s - 1.0)

    for _ in range(5):
        edge_turn(0.04)
    assert target() == "edge"
    decisions = []
    for _ in range(4):  # the link degrades: 60 s of comm per turn (an outage-like link)
        edge_turn(60.0)
        decisions.append(target())
    assert "device" in decisions[:2]
    assert est.snapshot()["overhead_s"] > 10
    back = []
    for _ in range(3):  # pings while on the device see the recovery
        est.observe_ping(0.04)
        back.append(target())
    assert back[-1] == "edge" and "edge" in back[:3]
    assert set(est.snapshot()) == {
        "gamma_s_prefill", "gamma_s_decode", "gamma_e_prefill", "gamma_e_decode",
        "bandwidth_tokens_per_s", "overhead_s", "call_s_edge",
    }


def test_online_estimator_learns_the_edge_per_call_time():
    """First token = 50 ms + γ_p·P, decode = 10 ms + γ_d·D: the lines' intercepts
    take up the fixed 60 ms per call that γ·tokens leaves, γ_e stays the
    profile's, and the predicted server time matches."""
    base = paper_params("mt-bench").with_(gamma_e=ModelTiming(0.002, 0.02))
    est = OnlineEstimator(base)
    assert est.params().gamma_e.call_s == 0.0
    rng = random.Random(3)
    for _ in range(12):
        p_tok, r_tok = rng.randint(5, 40), rng.randint(6, 24)
        first = 0.05 + 0.002 * p_tok + rng.uniform(-0.002, 0.002)
        decode = 0.01 + 0.02 * r_tok + rng.uniform(-0.002, 0.002)
        est.observe_edge_turn(measured_s=first + decode + 0.03, server_s=first + decode, router_s=0.0,
                              upload_tokens=p_tok, output_tokens=r_tok, first_token_s=first, decode_s=decode)
    edge = est.params().gamma_e
    assert edge.call_s == pytest.approx(0.06, abs=0.006)
    assert edge.prefill_s_per_token == pytest.approx(0.002, rel=0.1)
    assert edge.decode_s_per_token == pytest.approx(0.02, rel=0.05)
    assert est.snapshot()["call_s_edge"] == edge.call_s
    assert est.params().link.overhead_s == pytest.approx(0.03, abs=0.002)
    # A ratio would have read γ_d 10-25% high on these short answers.
    assert edge.decode_s_per_token < 0.02 * 1.05
    # Without the server's split (link-only tracking) the profiled timing stays.
    fixed = OnlineEstimator(base.with_(gamma_e=ModelTiming(0.002, 0.02, call_s=0.01)))
    fixed.observe_edge_turn(measured_s=1.0, server_s=0.9, router_s=0.0, upload_tokens=10, output_tokens=10)
    assert fixed.params().gamma_e == ModelTiming(0.002, 0.02, call_s=0.01)


def test_line_fit_follows_a_shift_and_rejects_a_lone_outlier():
    from device_runtime.link.estimation import LineFit

    fit = LineFit(0.05, 0.002)
    for x in (10, 30, 20, 40, 15, 25):
        fit.update(x, 0.05 + 0.002 * x)
    assert fit.predict(20) == pytest.approx(0.09, abs=0.002)
    assert not fit.update(20, 0.6)  # one slow turn (a GC pause): held back
    assert fit.predict(20) == pytest.approx(0.09, abs=0.002)
    fit.update(10, 0.07)
    fit.update(30, 0.59)  # the edge got 0.5 s slower per call, twice in a row
    fit.update(20, 0.58)
    assert fit.n_regime_changes == 1
    assert fit.predict(20) == pytest.approx(0.59, abs=0.02)
    assert fit.slope == pytest.approx(0.002, rel=0.2)
    with pytest.raises(ValueError):
        fit.update(float("nan"), 1.0)
    with pytest.raises(ValueError):
        LineFit(0.0, 0.002, noise_sd_s=0)


def test_online_estimator_updates_gamma_and_skips_tiny_samples():
    est = OnlineEstimator(paper_params("gsm8k"), min_prefill_tokens=16)
    for _ in range(10):
        est.observe_device_turn(prefill_tokens=100, prefill_s=0.5, output_tokens=50, decode_s=1.0)
    p = est.params()
    assert p.gamma_s.prefill_s_per_token == pytest.approx(0.005, rel=0.05)
    assert p.gamma_s.decode_s_per_token == pytest.approx(0.02, rel=0.05)
    est.observe_device_turn(prefill_tokens=4, prefill_s=5.0, output_tokens=0, decode_s=0.0)
    assert est.params().gamma_s.prefill_s_per_token == pytest.approx(0.005, rel=0.05)


def test_online_device_gamma_leaves_out_the_profiled_call_time():
    # A self-profiled per-call time (call_s_device) is charged apart by eq. (1):
    # the prefill samples must not charge it to γ_s again.
    base = paper_params("gsm8k")
    base = base.with_(gamma_s=ModelTiming(0.005, 0.02, call_s=0.1))
    est = OnlineEstimator(base, min_prefill_tokens=16)
    for _ in range(5):
        est.observe_device_turn(prefill_tokens=100, prefill_s=0.6, output_tokens=50, decode_s=1.0)
    p = est.params()
    assert p.gamma_s.prefill_s_per_token == pytest.approx(0.005, rel=1e-6)
    assert p.gamma_s.call_s == 0.1
