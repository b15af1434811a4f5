"""The router interface, registry, and the random and oracle routers."""

import statistics

import pytest

from device_runtime import cost_model as cm
from device_runtime.routers import Router, RouterError, available_routers, create_router


def test_registry_lists_builtin_routers():
    assert {"random", "oracle", "bert"} <= set(available_routers())


def test_unknown_router_is_a_clear_error():
    with pytest.raises(RouterError, match="unknown router 'nope'"):
        create_router("nope")


def test_random_router_is_uniform_and_seeded():
    a = [create_router("random", seed=1).score("q") for _ in range(3)]
    r1, r2 = create_router("random", seed=7), create_router("random", seed=7)
    s1 = [r1.score("q") for _ in range(2000)]
    s2 = [r2.score("q") for _ in range(2000)]
    assert s1 == s2
    assert all(0.0 <= p <= 1.0 for p in s1)
    assert statistics.mean(s1) == pytest.approx(0.5, abs=0.03)
    assert len(set(a)) == 1  # fresh router, same seed, same first draw


def test_random_router_costs_no_router_time():
    params = cm.paper_params("mmlu").with_(tau_r=0.01)
    router = create_router("random")
    assert router.cost_params(params).tau_r == 0.0


def test_oracle_scales_gain_into_unit_interval():
    oracle = create_router("oracle", labels={"easy": 0.0, "hard": 1.0, "trap": -1.0})
    assert oracle.score("hard") == 1.0
    assert oracle.score("trap") == 0.0
    assert oracle.score("easy") == 0.5
    with pytest.raises(RouterError):
        oracle.score("unseen")
    with pytest.raises(RouterError):
        create_router("oracle")


def test_decide_shares_the_fusion_rule():
    class Fixed(Router):
        name = "fixed"

        def score(self, prompt, context=()):
            return 0.8

    params = cm.paper_params("gsm8k")
    turn = cm.TurnInputs(prompt_tokens=40)
    d = Fixed().decide(params, turn, threshold=0.0, prompt="x")
    expected = cm.decide(params, turn, 0.8, 0.0)
    assert d == expected
    assert d.p_fused < d.p  # the edge is slower here, so the score is penalized
