"""The self-profile of ``chat`` and ``demo`` (device_runtime/runtime/self_profile.py).

- the prediction-error figures of the summary (pure);
- the profile it builds from real answers of the real SLM and the real edge
  over loopback, and what it does when the edge is not there;
- ``demo``: a saved ``--profile`` wins over it, and the ``--json`` telemetry
  keeps the keys it had before self-profiling and online estimation became
  the default (recorded from the code before the change, below).
"""

from __future__ import annotations

import json

import pytest

from device_runtime.link.profile import PARAM_KEYS, Profile
from device_runtime.routing.cost_model import paper_params
from device_runtime.runtime.self_profile import (
    CALIBRATION_PROMPTS, SelfProfileSettings, format_errors, measure, prediction_errors, self_profiled_params,
)
from device_runtime.runtime.telemetry import FIELDS, TurnTelemetry, validate_record

FAST = ["--max-tokens", "6", "--threads", "1", "--n-ctx", "1024"]
#: `edgeroute demo --json` keys of the code before self-profiling (commit 6d6f806):
#: the contract's, and the optional post-hoc prediction; `estimates` only with --online.
KEYS_BEFORE = set(FIELDS) | {"predicted_posthoc_s"}
KEYS_BEFORE_ONLINE = KEYS_BEFORE | {"estimates"}


def _rec(target: str, predicted: dict, measured: float, *, posthoc: float | None = None,
         fallback: bool = False) -> TurnTelemetry:
    return TurnTelemetry(
        turn=1, target=target, policy="auto", p=0.5, p_fused=0.5, predicted_s=predicted, measured_s=measured,
        ttft_s=0.1, prompt_tokens=5, context_tokens=0, prefill_tokens=5, cached_tokens=0, output_tokens=3,
        fallback=fallback, predicted_posthoc_s=posthoc,
    )


# --- the summary's figures (pure) ------------------------------------------------------------


def test_prediction_errors_are_per_side_medians_of_the_chosen_prediction():
    recs = [
        _rec("device", {"device": 1.1, "edge": 9.0}, 1.0, posthoc=1.0),   # 10%, post hoc 0%
        _rec("device", {"device": 1.5, "edge": 0.1}, 1.0, posthoc=1.2),   # 50%, post hoc 20%
        _rec("device", {"device": 0.8, "edge": 0.1}, 1.0, posthoc=0.9),   # 20%, post hoc 10%
        _rec("edge", {"device": 0.1, "edge": 0.6}, 0.5),                  # 20%, no post hoc
        _rec("edge", {"device": 0.1, "edge": 0.25}, 0.5, posthoc=0.5),    # 50%, post hoc 0%
        # A fallback: its time includes the failed edge attempt; left out.
        _rec("device", {"device": 0.1, "edge": 0.1}, 5.0, fallback=True),
    ]
    errors = prediction_errors(recs)
    assert errors["device"].n == 3 and errors["device"].median == pytest.approx(0.2)
    assert errors["device"].median_posthoc == pytest.approx(0.1)
    assert errors["edge"].n == 2 and errors["edge"].median == pytest.approx(0.35)
    assert errors["edge"].median_posthoc == pytest.approx(0.0)
    line = format_errors(errors)
    assert "device 20% (n=3; 10% with the answer's actual length)" in line
    assert "edge 35% (n=2; 0% with the answer's actual length)" in line


def test_prediction_errors_without_turns_on_a_side():
    errors = prediction_errors([_rec("edge", {"device": 1.0, "edge": 1.0}, 2.0)])
    assert errors["device"].n == 0 and errors["device"].median is None
    assert errors["edge"].median == pytest.approx(0.5) and errors["edge"].median_posthoc is None
    assert "device - (n=0)" in format_errors(errors)


def test_settings_are_bounded():
    for bad in ({"prompts": 1}, {"prompts": len(CALIBRATION_PROMPTS) + 1}, {"max_tokens": 1},
                {"link_reps": 0}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            SelfProfileSettings(**bad)


# --- real models -------------------------------------------------------------------------------


@pytest.mark.slow
def test_self_profile_measures_both_models_and_the_link(slm, edge_server):
    from device_runtime.link.edge_client import EdgeClient

    settings = SelfProfileSettings(prompts=2, max_tokens=8)
    with EdgeClient(edge_server.target) as edge:
        params, result = self_profiled_params(paper_params("mt-bench", "session"), slm, edge, max_tokens=6,
                                              settings=settings)
    prof = result.profile
    Profile.read(prof)  # a valid PROFILE.json object, as `edgeroute profile` writes
    assert set(PARAM_KEYS) <= set(prof)
    for key in ("gamma_s_prefill", "gamma_s_decode", "gamma_e_prefill", "gamma_e_decode",
                "overhead_s", "bandwidth_tokens_per_s", "response_tokens_device", "response_tokens_edge",
                "call_s_device", "call_s_edge"):
        assert "measured" in prof["sources"][key] or "estimated" in prof["sources"][key], key
    # Real answers, capped at the run's --max-tokens (6), not the settings' 8.
    assert len(prof["fit"]["slm_runs"]) == 2 and len(prof["fit"]["edge_runs"]) == 2
    assert all(1 <= r["output_tokens"] <= 8 for r in prof["fit"]["slm_runs"])
    assert all(r["edge_output_tokens"] <= 6 for r in prof["fit"]["edge_runs"])
    assert 0 < prof["response_tokens_device"] <= 8
    # The cost model now has this machine's values, not Table I's.
    assert params.gamma_s.decode_s_per_token == pytest.approx(prof["gamma_s_decode"])
    assert params.gamma_e.decode_s_per_token == pytest.approx(prof["gamma_e_decode"])
    assert params.gamma_s.call_s == pytest.approx(prof["call_s_device"])
    assert params.link.overhead_s == pytest.approx(prof["overhead_s"])
    assert params.response.device == pytest.approx(prof["response_tokens_device"])
    assert params.alpha == paper_params("mt-bench").alpha  # what was not measured stays
    assert set(result.seconds) == {"device", "edge", "link"} and not result.skipped
    assert "self-profile in" in result.describe()


@pytest.mark.slow
def test_self_profile_without_a_reachable_edge_keeps_the_edge_preset(slm, free_port):
    from device_runtime.link.edge_client import EdgeClient

    with EdgeClient(f"127.0.0.1:{free_port()}", connect_timeout_s=0.5) as edge:
        result = measure(slm, edge, max_tokens=4, settings=SelfProfileSettings(prompts=2, timeout_s=2))
    prof = result.profile
    assert "edge" in result.skipped and "edge" not in result.seconds
    assert prof["sources"]["gamma_e_decode"] == "paper Table I"
    assert prof["gamma_e_decode"] == paper_params("mt-bench").gamma_e.decode_s_per_token
    assert prof["sources"]["gamma_s_decode"] == "measured"
    assert "not measured: edge" in result.describe()


# --- the command line ----------------------------------------------------------------------------


def _json_lines(stdout: str) -> list[dict]:
    recs = [json.loads(line) for line in stdout.splitlines()]
    for r in recs:
        validate_record(r)
    return recs


@pytest.mark.slow
def test_demo_self_profiles_by_default_and_keeps_its_telemetry_keys(run_cli, edge_server):
    proc = run_cli("demo", "--edge", edge_server.target, "--policy", "random", "--limit", "2",
                   "--max-turns", "2", "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = _json_lines(proc.stdout)
    assert len(recs) == 4
    assert all(set(r) == KEYS_BEFORE for r in recs)
    assert "self-profile in" in proc.stderr
    assert "prediction error, median |predicted - measured| / measured: device" in proc.stderr
    # predicted_s is what the decision used: eq. (11) with the preset's α = 0.05.
    for r in recs:
        gap = r["predicted_s"]["edge"] - r["predicted_s"]["device"]
        assert r["p_fused"] == pytest.approx(r["p"] - 0.05 * gap, abs=1e-9)
    # Not Table I's γ_s = 0.04 s/token (prefill and decode, no per-call time),
    # which would predict the first turn at 0.04 · (L_p + 6 answer tokens).
    first = recs[0]
    assert first["predicted_s"]["device"] != pytest.approx(0.04 * (first["prompt_tokens"] + 6), rel=1e-6)


@pytest.mark.slow
def test_a_saved_profile_wins_over_the_self_profile(run_cli, edge_server, tmp_path):
    slow = {"gamma_s_prefill": 0.001, "gamma_s_decode": 1.0, "gamma_e_prefill": 0.001, "gamma_e_decode": 2.0,
            "tau_r": 0.0, "bandwidth_tokens_per_s": 1e6, "overhead_s": 0.01, "bytes_per_token": 4.0}
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(slow))
    proc = run_cli("demo", "--edge", edge_server.target, "--policy", "device", "--limit", "1",
                   "--max-turns", "2", "--json", "--online", "--profile", str(profile), *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "self-profile" not in proc.stderr
    recs = _json_lines(proc.stdout)
    assert all(set(r) == KEYS_BEFORE_ONLINE for r in recs)
    # The first turn is decided on the saved profile: 6 answer tokens at 1 s each.
    assert recs[0]["predicted_s"]["device"] >= 6.0


def test_contradicting_online_flags_are_refused(run_cli):
    # Refused before any model loads.
    proc = run_cli("demo", "--online", "--no-online", "--policy", "device", *FAST, timeout=120)
    assert proc.returncode == 1 and "--online and --no-online" in proc.stderr
    assert "edge service on" not in proc.stderr
