"""The router interface, registry, and the random and oracle routers."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.routing import cost_model as cm
from device_runtime.routing.routers import ROUTERS, Router, RouterError

ROOT = Path(__file__).resolve().parents[1]

#: What each built-in router needs to be built (the oracle exists only with labels).
BUILD_KWARGS = {"random": {"seed": 1}, "oracle": {"labels": {"q": 1.0, "r": 0.0}}, "bert": {"threads": 1}}


def test_listing_the_routers_imports_none_of_them():
    """A device without onnxruntime can list (and use) the other routers: the
    names come from the registry's lazy table, not from importing the modules."""
    code = (
        "import json, sys\n"
        "from device_runtime.routing.routers import ROUTERS\n"
        "names = ROUTERS.names()\n"
        "known = [n for n in ('bert', 'oracle', 'random') if n in ROUTERS]\n"
        "loaded = sorted(m for m in sys.modules if m == 'onnxruntime'\n"
        "                or m.startswith('device_runtime.routing.routers.'))\n"
        "print(json.dumps({'names': names, 'known': known, 'loaded': loaded}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["names"] == ["bert", "oracle", "random"]
    assert out["known"] == ["bert", "oracle", "random"]
    assert out["loaded"] == ["device_runtime.routing.routers.base"]


@pytest.mark.parametrize("name", ROUTERS.names())
def test_every_listed_name_builds_that_router(name):
    router = ROUTERS.create(name, **BUILD_KWARGS[name])
    assert isinstance(router, Router) and router.name == name
    assert 0.0 <= router.score("q") <= 1.0


def test_unknown_router_is_a_clear_error():
    with pytest.raises(RouterError, match="unknown router 'nope'; available: bert, oracle, random"):
        ROUTERS.create("nope")


def test_random_router_is_uniform_and_seeded():
    a = [ROUTERS.create("random", seed=1).score("q") for _ in range(3)]
    r1, r2 = ROUTERS.create("random", seed=7), ROUTERS.create("random", seed=7)
    s1 = [r1.score("q") for _ in range(2000)]
    s2 = [r2.score("q") for _ in range(2000)]
    assert s1 == s2
    assert all(0.0 <= p <= 1.0 for p in s1)
    assert statistics.mean(s1) == pytest.approx(0.5, abs=0.03)
    assert len(set(a)) == 1  # fresh router, same seed, same first draw


def test_random_router_costs_no_router_time():
    params = cm.paper_params("mmlu").with_(tau_r=0.01)
    router = ROUTERS.create("random")
    assert router.cost_params(params).tau_r == 0.0


def test_oracle_scales_gain_into_unit_interval():
    oracle = ROUTERS.create("oracle", labels={"easy": 0.0, "hard": 1.0, "trap": -1.0})
    assert oracle.score("hard") == 1.0
    assert oracle.score("trap") == 0.0
    assert oracle.score("easy") == 0.5
    with pytest.raises(RouterError):
        oracle.score("unseen")
    with pytest.raises(RouterError):
        ROUTERS.create("oracle")


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
