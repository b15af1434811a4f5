"""``edgeroute profile`` and PROFILE.json: on loopback, and over the emulated link."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from device_runtime.routing.cost_model import paper_params
from device_runtime.link.profile import (
    PARAM_KEYS,
    Profile,
    ProfileError,
    live_cost_params,
    write_profile,
)
from netlab.namespaces import REPO_ROOT, LinkSettings, NetLab, unavailable_reason

GOOD = {
    "gamma_s_prefill": 0.002, "gamma_s_decode": 0.03, "gamma_e_prefill": 0.001,
    "gamma_e_decode": 0.02, "tau_r": 1e-4, "bandwidth_tokens_per_s": 5e5,
    "overhead_s": 0.05, "bytes_per_token": 4.2, "fit": {"link": {}}, "sources": {},
}


def test_a_profile_replaces_measured_values(tmp_path):
    path = write_profile(tmp_path / "p.json", GOOD)
    base = paper_params("mt-bench", upload_mode="session")
    params = Profile.read(path).cost_params(base)
    assert params.gamma_s.prefill_s_per_token == 0.002 and params.gamma_s.decode_s_per_token == 0.03
    assert params.gamma_e.prefill_s_per_token == 0.001 and params.gamma_e.decode_s_per_token == 0.02
    assert params.tau_r == 1e-4
    assert params.link.bandwidth_tokens_per_s == 5e5 and params.link.overhead_s == 0.05
    # What the profile does not measure stays the base's.
    assert params.alpha == base.alpha and params.response == base.response
    assert params.upload_mode == "session"
    # A partial profile replaces only what it has.
    partial = Profile.read({"overhead_s": 0.3}).cost_params(base)
    assert partial.link.overhead_s == 0.3 and partial.gamma_s == base.gamma_s
    # No per-call time in the profile: the paper's model (0).
    assert params.gamma_e.call_s == 0.0 and params.gamma_s.call_s == 0.0
    timed = Profile.read({**GOOD, "call_s_edge": 0.07}).cost_params(base)
    assert timed.gamma_e.call_s == 0.07 and timed.gamma_s.call_s == 0.0
    # Measured answer lengths: for live routing only (simulate keeps its benchmark's).
    measured = {**GOOD, "response_tokens_device": 21.0, "response_tokens_edge": 12.5}
    assert Profile.read(measured).cost_params(base).response == base.response
    live = Profile.read(measured).cost_params(base, response_lengths=True)
    assert (live.response.device, live.response.edge) == (21.0, 12.5)
    assert live_cost_params(measured).response.edge == 12.5
    assert live_cost_params(GOOD).response == live_cost_params().response


def test_sample_prompts_spread_over_the_data_and_fall_back_to_the_demo(tmp_path):
    from device_runtime.runtime.dialogues import sample_prompts

    (tmp_path / "mtbench101").mkdir()
    rows = [{"id": i, "history": [{"user": f"question {i}", "bot": "answer"}]} for i in range(1, 41)]
    (tmp_path / "mtbench101" / "mtbench101.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = sample_prompts(tmp_path, 4)
    assert got == ["question 3", "question 13", "question 23", "question 33"]
    assert sample_prompts(tmp_path, 0) == []
    demo = sample_prompts(tmp_path / "missing", 3)
    assert len(demo) == 3 and all(isinstance(p, str) and p for p in demo)


def test_call_time_is_what_gamma_leaves_of_the_server_time():
    from device_runtime.link.profiler import EdgeRun, call_time

    runs = [EdgeRun(edge_prefill_tokens=p, prefill_s=0.002 * p, decode_s=0.02 * (r - 1),
                    server_ttft_s=0.05 + 0.002 * p, edge_output_tokens=r, prompt_tokens=p, output_tokens=r)
            for p, r in ((16, 8), (64, 12), (128, 24))]
    # γ_d · L_r charges one decode step more than decode_s holds: 0.05 - 0.02.
    assert call_time(runs, 0.002, 0.02) == pytest.approx(0.03)
    assert call_time(runs, 0.01, 0.05) == 0.0  # never negative
    with pytest.raises(ValueError):
        call_time([], 0.002, 0.02)


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in GOOD.items() if k != "tau_r"},
        {**GOOD, "overhead_s": -1},
        {**GOOD, "bandwidth_tokens_per_s": 0},
        {**GOOD, "gamma_s_decode": "fast"},
        {**GOOD, "gamma_e_decode": float("nan")},
        {**GOOD, "call_s_edge": -0.01},
        {**GOOD, "call_s_device": "slow"},
        {**GOOD, "response_tokens_edge": -3},
    ],
)
def test_bad_profiles_are_rejected(tmp_path, bad):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    if all(k in bad for k in PARAM_KEYS):
        with pytest.raises(ProfileError):
            Profile.read(path)
    else:  # a partial profile is fine for --profile (the preset fills in) ...
        Profile.read(path)
    with pytest.raises(ProfileError):  # ... but `edgeroute profile` writes them all
        write_profile(tmp_path / "out.json", bad)


def test_unreadable_profiles_are_rejected(tmp_path):
    with pytest.raises(ProfileError, match="cannot read"):
        Profile.read(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.read(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(ProfileError, match="object"):
        Profile.read(tmp_path / "y.json")


def test_the_word_factor_needs_bytes_per_token():
    """simulate restates a profile per word of its traces: tokens per word is
    the traces' bytes per word over the profile's bytes per token."""
    assert Profile.read(GOOD).tokens_per_word(6.3) == pytest.approx(6.3 / 4.2)
    no_bytes = {k: v for k, v in GOOD.items() if k != "bytes_per_token"}
    with pytest.raises(ProfileError, match="p.json: no bytes_per_token"):
        Profile(Profile.read(no_bytes).values, "p.json").tokens_per_word(6.3)


def test_live_parameters_start_from_the_session_preset(tmp_path):
    from device_runtime.link.profile import LiveCostSettings

    assert live_cost_params() == paper_params("mt-bench", upload_mode="session")
    assert live_cost_params(benchmark="gsm8k").alpha == paper_params("gsm8k").alpha
    path = write_profile(tmp_path / "p.json", GOOD)
    settings = LiveCostSettings(alpha=0.2, profile=str(path), benchmark="mmlu")
    assert settings.cost_params() == live_cost_params(path, benchmark="mmlu").with_(alpha=0.2)
    assert LiveCostSettings().cost_params() == live_cost_params()


def _profile_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "device_runtime.cli.main", "profile", *args]


def test_profile_cli_rejects_bad_arguments():
    for args in (["--json", "--parts", "link"], ["--out", "x.json", "--parts", "nope"], ["--parts", "slm"],
                 ["--json", "--parts", "slm", "--answer-prompts", "-1"]):
        proc = subprocess.run(_profile_cmd(*args), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        assert "edgeroute profile:" in proc.stderr


def test_profile_cli_unreachable_edge_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        _profile_cmd("--edge", "127.0.0.1:9", "--parts", "link", "--json", "--timeout", "2"),
        capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "unreachable" in proc.stderr


@pytest.mark.slow
def test_profile_cli_on_loopback_writes_the_contract(tmp_path):
    """Real edge (Gemma 3 270M) on loopback, real SLM; stdout is only the JSON."""
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    out = tmp_path / "PROFILE.json"
    with EdgeServerThread(EdgeSettings(n_slots=1, n_ctx=1024)) as edge:
        proc = subprocess.run(
            _profile_cmd(
                "--edge", edge.target, "--out", str(out), "--json", "--parts", "link,edge,slm",
                "--sizes", "0,65536,786432", "--link-reps", "3", "--prompt-tokens", "16,96",
                "--max-tokens", "8", "--reps", "1", "--answer-prompts", "2",
            ),
            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert printed == json.loads(out.read_text())
    for key in PARAM_KEYS:
        assert isinstance(printed[key], float) and printed[key] >= 0, key
    for key in ("gamma_s_prefill", "gamma_s_decode", "gamma_e_prefill", "gamma_e_decode"):
        assert printed["sources"][key].startswith("measured") and printed[key] > 0
    assert 2.0 < printed["bytes_per_token"] < 8.0  # English text, a BPE tokenizer
    assert {"up", "down"} <= set(printed["fit"]["link"])
    assert printed["call_s_edge"] >= 0 and printed["sources"]["call_s_edge"].startswith("measured")
    for side in ("device", "edge"):  # two answers each, of at most 8 tokens
        assert 0 < printed[f"response_tokens_{side}"] <= 16
        assert len(printed["fit"][f"{'slm' if side == 'device' else 'edge'}_answer_tokens"]) == 2
    live_cost_params(out)  # usable as --profile


_REASON = unavailable_reason()


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(_REASON is not None, reason=f"netlab: {_REASON}")
def test_profiler_recovers_configured_rtt_and_rate_over_emulated_link():
    """Issue 5 target: δ within 10% of 2 × the relay's one-way delay, B within
    15% of the tbf rate (payload bytes/s against the configured bit rate)."""
    settings = LinkSettings(rate_mbit=20.0, delay_ms=25.0, name="test")
    with NetLab(settings=settings) as lab:
        edge_port = 50051
        server = lab.popen(
            lab.edge_ns,
            [sys.executable, "-m", "device_runtime.cli.main", "serve", "--host", lab.edge_addr,
             "--port", str(edge_port), "--n-slots", "1", "--n-ctx", "512",
             "--insecure"],  # a private namespace pair made by this test
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        lab.wait_port(lab.edge_ns, lab.edge_addr, edge_port, timeout_s=300, proc=server)
        relay_port = lab.start_relay(edge_port)
        proc = subprocess.run(
            lab.exec_prefix(lab.dev_ns) + _profile_cmd(
                "--edge", f"127.0.0.1:{relay_port}", "--parts", "link", "--json", "--link-reps", "5",
            ),
            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = json.loads(proc.stdout)
    rtt = settings.rtt_added_s
    assert abs(profile["overhead_s"] - rtt) <= 0.10 * rtt, profile["fit"]["link"]
    rate = settings.rate_bytes_per_s
    for direction in ("up", "down"):
        fit = profile["fit"]["link"][direction]
        assert fit["ok"] and fit["r_squared"] > 0.95
        assert abs(fit["bandwidth_bytes_per_s"] - rate) <= 0.15 * rate, fit
    assert abs(profile["bandwidth_bytes_per_s"] - rate) <= 0.15 * rate
    assert profile["bandwidth_tokens_per_s"] == pytest.approx(
        profile["bandwidth_bytes_per_s"] / profile["bytes_per_token"]
    )


def test_in_words_restates_per_token_parameters_per_word():
    from device_runtime.link.profile import ProfileError, in_words

    base = paper_params().with_(tau_r=0.001)
    words = in_words(base, 1.5)
    assert words.gamma_s.prefill_s_per_token == pytest.approx(1.5 * base.gamma_s.prefill_s_per_token)
    assert words.gamma_e.decode_s_per_token == pytest.approx(1.5 * base.gamma_e.decode_s_per_token)
    assert words.gamma_e.call_s == base.gamma_e.call_s and words.link.overhead_s == base.link.overhead_s
    assert words.link.bandwidth_tokens_per_s == pytest.approx(base.link.bandwidth_tokens_per_s / 1.5)
    assert words.tau_r == pytest.approx(0.0015)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ProfileError):
            in_words(base, bad)
