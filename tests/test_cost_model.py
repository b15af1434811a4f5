"""The cost model against numbers computed by hand from Table I."""

import pytest

from device_runtime.routing import cost_model as cm


def test_single_turn_mmlu_by_hand():
    # Table I: γs=0.04, γe=0.02, B=2e7 tok/s, δ=0.02 s; Table II MMLU lengths.
    params = cm.paper_params("mmlu")
    turn = cm.TurnInputs(prompt_tokens=100)
    dev = cm.latency(params, turn, "device")
    edge = cm.latency(params, turn, "edge")
    # eq. 6: 0.04*100 + 0 + 0.04*1254.4 = 4 + 50.176
    assert dev.comp_s == pytest.approx(4.0)
    assert dev.gen_s == pytest.approx(50.176)
    assert dev.comm_s == 0.0
    assert dev.total_s == pytest.approx(54.176)
    # eq. 7: 0.02*100 + (100/2e7 + 0.02 + 4567.9/2e7) + 0.02*4567.9
    assert edge.upload_s == pytest.approx(5e-6)
    assert edge.download_s == pytest.approx(2.28395e-4)
    assert edge.comm_s == pytest.approx(0.020233395)
    assert edge.total_s == pytest.approx(2.0 + 0.020233395 + 91.358)


def test_fusion_and_decision_by_hand():
    params = cm.paper_params("mmlu")  # α = 0.03
    turn = cm.TurnInputs(prompt_tokens=100)
    d = cm.decide(params, turn, p=0.9, threshold=-0.5)
    gap = 93.378233395 - 54.176
    assert d.p_fused == pytest.approx(0.9 - 0.03 * gap)  # eq. 11, ≈ -0.2761
    assert d.target == "edge" and d.d_t == 0  # p̃ > θ
    d2 = cm.decide(params, turn, p=0.9, threshold=-0.2)
    assert d2.target == "device" and d2.d_t == 1
    # eq. 8
    assert cm.total_latency(1, 54.176, 93.378) == 54.176
    assert cm.total_latency(0, 54.176, 93.378) == 93.378


def test_router_time_eq4_counts_context():
    params = cm.paper_params("gsm8k").with_(tau_r=0.001)
    turn = cm.TurnInputs(prompt_tokens=50, context_tokens=150, delta_c_device=0, delta_c_edge=150)
    assert cm.latency(params, turn, "device").router_s == pytest.approx(0.2)
    assert cm.latency(params, turn, "edge").router_s == pytest.approx(0.2)
    # without context the router reads only the prompt
    turn_nc = cm.TurnInputs(prompt_tokens=50, context_tokens=150, delta_c_edge=150, router_tokens=50)
    assert cm.latency(params, turn_nc, "edge").router_s == pytest.approx(0.05)


def test_fig2_three_turn_dialogue_reprefills_only_missed_turns():
    # Turn 1 on the SLM, turn 2 on the LLM, turn 3 back on the SLM (Fig. 2).
    ledger = cm.ContextLedger()
    assert ledger.delta_c("device") == 0 and ledger.delta_c("edge") == 0
    ledger.commit("device", prompt_tokens=10, response_tokens=20)  # C = 30
    assert ledger.delta_c("edge") == 30 and ledger.delta_c("device") == 0
    ledger.commit("edge", prompt_tokens=5, response_tokens=40)  # C = 75
    assert ledger.delta_c("device") == 45  # only turn 2
    params = cm.paper_params("mt-bench")
    t3 = ledger.turn_inputs(prompt_tokens=8)
    dev = cm.latency(params, t3, "device")
    assert dev.comp_s == pytest.approx(0.04 * (45 + 8))  # eq. 1 with ΔC = 45
    edge = cm.latency(params, t3, "edge")
    assert edge.comp_s == pytest.approx(0.02 * 8)  # edge saw everything
    # paper upload mode sends C_t + L_p; session mode only what the edge lacks
    assert edge.upload_s == pytest.approx((75 + 8) / 2e7)
    session = cm.latency(params.with_(upload_mode="session"), t3, "edge")
    assert session.upload_s == pytest.approx(8 / 2e7)


def test_split_prefill_and_decode_times():
    params = cm.paper_params("gsm8k").with_(
        gamma_s=cm.ModelTiming(prefill_s_per_token=0.001, decode_s_per_token=0.05)
    )
    dev = cm.latency(params, cm.TurnInputs(prompt_tokens=200), "device")
    assert dev.comp_s == pytest.approx(0.2)
    assert dev.gen_s == pytest.approx(0.05 * 136.3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(prompt_tokens=-1),
        dict(prompt_tokens=1, context_tokens=5, delta_c_edge=6),
    ],
)
def test_bad_turn_inputs(kwargs):
    with pytest.raises(ValueError):
        cm.TurnInputs(**kwargs)


def test_bad_params_and_scores():
    with pytest.raises(ValueError):
        cm.Link(bandwidth_tokens_per_s=0, overhead_s=0.02)
    with pytest.raises(ValueError):
        cm.ModelTiming.uniform(float("nan"))
    with pytest.raises(ValueError):
        cm.paper_params("nope")
    with pytest.raises(ValueError):
        cm.decide(cm.paper_params("mmlu"), cm.TurnInputs(prompt_tokens=1), p=1.5, threshold=0)
    with pytest.raises(ValueError):
        cm.total_latency(2, 1.0, 2.0)


def test_per_call_time_is_charged_once_per_call_and_zero_is_the_paper():
    base = cm.paper_params("mmlu")
    turn = cm.ContextLedger().turn_inputs(prompt_tokens=100)
    paper = cm.latency(base, turn, "edge")
    with_call = cm.latency(base.with_(gamma_e=cm.ModelTiming(
        base.gamma_e.prefill_s_per_token, base.gamma_e.decode_s_per_token, call_s=0.07)), turn, "edge")
    assert with_call.comp_s == pytest.approx(paper.comp_s + 0.07)
    assert with_call.total_s == pytest.approx(paper.total_s + 0.07)
    assert cm.latency(base, turn, "device") == cm.latency(base.with_(gamma_e=cm.ModelTiming(0.1, 0.1, 1.0)), turn, "device")
    assert cm.ModelTiming(0.1, 0.2) == cm.ModelTiming(0.1, 0.2, 0.0)
    with pytest.raises(ValueError, match="call_s"):
        cm.ModelTiming(0.1, 0.2, call_s=-0.01)


@pytest.mark.parametrize("case, expect", [("slow link", "device"), ("table I", None), ("slow device", "edge")])
def test_settled_target_is_the_decision_for_every_router_score(case, expect):
    params = cm.paper_params("gsm8k")  # α = 0.05: α(T^e − T^s) ≈ 0.19 s⁻¹ · s
    if case == "slow link":  # δ = 20 s
        params = params.with_(link=cm.Link(params.link.bandwidth_tokens_per_s, 20.0))
    elif case == "slow device":  # 1 s per device token
        params = params.with_(gamma_s=cm.ModelTiming(1.0, 1.0))
    turn = cm.ContextLedger().turn_inputs(prompt_tokens=50)
    settled = cm.settled_target(params, turn, 0.5)
    assert settled == expect
    targets = {cm.decide(params, turn, p, 0.5).target for p in (0.0, 0.25, 0.5, 0.75, 1.0)}
    if expect is None:
        assert targets == {"device", "edge"}  # the router's score matters
    else:
        assert targets == {expect}


def test_the_edge_queue_wait_adds_to_the_edge_path_only():
    params = cm.paper_params("mmlu")
    turn = cm.TurnInputs(prompt_tokens=50, context_tokens=100, delta_c_edge=100)
    idle_e = cm.latency(params, turn, "edge").total_s
    idle_s = cm.latency(params, turn, "device").total_s
    loaded = params.with_(edge_queue_s=2.5)
    assert cm.latency(loaded, turn, "edge").total_s == pytest.approx(idle_e + 2.5)
    assert cm.latency(loaded, turn, "device").total_s == pytest.approx(idle_s)
    # A long enough wait moves a borderline edge turn to the device (eq. 11-12).
    p = 0.9
    theta = cm.decide(params, turn, p, threshold=0.5).p_fused - 0.01
    assert cm.decide(params, turn, p, threshold=theta).target == "edge"
    assert cm.decide(params.with_(edge_queue_s=60.0), turn, p, threshold=theta).target == "device"
    with pytest.raises(ValueError):
        params.with_(edge_queue_s=-1.0)
