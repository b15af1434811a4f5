"""The simulator: multi-turn charging by hand, and ``edgeroute simulate`` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.routing import cost_model
from device_runtime.cli.main import main
from device_runtime.sim.simulate import play_dialogue, sweep_thresholds
from device_runtime.sim.traces import Dialogue, TraceTurn, load_trace, word_count

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "routellm_tiny"
SHARED = ROOT.parent / "shared" / "data" / "routellm"
CURVE_KEYS = {"threshold", "quality", "edge_share", "mean_latency_s"}


# --- multi-turn charging, by hand ------------------------------------------------------


def two_turn_dialogue() -> Dialogue:
    t1 = TraceTurn("a b c d e f g h i j", (), quality_device=5.0, quality_edge=9.0)
    t2 = TraceTurn(
        "k l m n o",
        ({"role": "user", "content": t1.prompt}, {"role": "assistant", "content": "x"}),
        quality_device=4.0,
        quality_edge=8.0,
    )
    return Dialogue("hand/1", "test", (t1, t2))


# Table I with MT-Bench lengths (L̄s 226.37, L̄e 879.16), α 0.05.
# Turn 1 (L_p 10, empty context):
#   Tˢ = 0.04*10 + 0.04*226.37                                  = 9.4548
#   Tᵉ = 0.02*10 + (10/2e7 + 0.02 + 879.16/2e7) + 0.02*879.16   = 17.803244458
T1_DEV, T1_EDGE = 9.4548, 17.803244458
# Turn 2 (L_p 5) after turn 1 on the device: C_t = 10 + 226 = 236, ΔCˢ = 0, ΔCᵉ = 236.
#   Tˢ = 0.04*5 + 0.04*226.37                                   = 9.2548
#   Tᵉ = 0.02*(236+5) + (241/2e7 + 0.02 + 879.16/2e7) + 17.5832 = 22.423256008
T2_DEV, T2_EDGE = 9.2548, 22.423256008
# The "w/o context" policy predicts turn 2 as if fresh (ΔC = C_t = 0):
#   Tᵉ = 0.02*5 + (5/2e7 + 0.02 + 879.16/2e7) + 17.5832         = 17.703244208
T2_EDGE_NO_CONTEXT = 17.703244208


def test_turn_fused_scores_by_hand():
    params = cost_model.paper_params("mt-bench")
    d = two_turn_dialogue()
    _, _, _, fused = play_dialogue(params, d, [0.0, 1.0], True, word_count, threshold=0.0)
    assert fused[0] == pytest.approx(0.0 - 0.05 * (T1_EDGE - T1_DEV))
    assert fused[1] == pytest.approx(1.0 - 0.05 * (T2_EDGE - T2_DEV))
    _, _, _, fused = play_dialogue(params, d, [0.0, 1.0], False, word_count, threshold=0.0)
    assert fused[1] == pytest.approx(1.0 - 0.05 * (T2_EDGE_NO_CONTEXT - T2_DEV))


def test_both_policies_pay_the_true_delta_c():
    params = cost_model.paper_params("mt-bench")
    d = two_turn_dialogue()
    # θ = 0: device, then edge, under both policies; the edge re-prefills turn 1 and its answer.
    for with_context in (True, False):
        q, edge_calls, lat, _ = play_dialogue(params, d, [0.0, 1.0], with_context, word_count, threshold=0.0)
        assert (q, edge_calls) == (5.0 + 8.0, 1)
        assert lat == pytest.approx(T1_DEV + T2_EDGE)
    # θ = 0.45 sits between turn 2's p̃ with context (0.342) and without (0.578):
    # "w/ context" sees the re-prefill and stays on the device ...
    q, edge_calls, lat, _ = play_dialogue(params, d, [0.0, 1.0], True, word_count, threshold=0.45)
    assert (q, edge_calls) == (5.0 + 4.0, 0)
    assert lat == pytest.approx(T1_DEV + T2_DEV)
    # ... "w/o context" goes to the edge, predicting 17.70 s, and is charged the true 22.42 s.
    q, edge_calls, lat, _ = play_dialogue(params, d, [0.0, 1.0], False, word_count, threshold=0.45)
    assert (q, edge_calls) == (5.0 + 8.0, 1)
    assert lat == pytest.approx(T1_DEV + T2_EDGE)


def test_router_time_follows_what_the_router_read():
    params = cost_model.paper_params("mt-bench").with_(tau_r=0.001)
    d = two_turn_dialogue()
    _, _, with_ctx, _ = play_dialogue(params, d, [0.0, 1.0], True, word_count, threshold=0.0)
    _, _, without, _ = play_dialogue(params, d, [0.0, 1.0], False, word_count, threshold=0.0)
    # eq. (4): τ_r (C_t + L_p) with history, τ_r L_p without; turn 1 reads 10 words either way.
    assert with_ctx == pytest.approx(T1_DEV + T2_EDGE + 0.001 * 10 + 0.001 * (236 + 5))
    assert without == pytest.approx(T1_DEV + T2_EDGE + 0.001 * 10 + 0.001 * 5)


def test_thresholds_cover_all_edge_to_all_device():
    thetas = sweep_thresholds([-2.0, -1.0, 0.5], points=5)
    assert thetas == sorted(thetas)
    assert thetas[0] < -2.0 and thetas[-1] > 0.5
    assert len(sweep_thresholds([0.3] * 10, points=41)) == 3


# --- the CLI end to end ------------------------------------------------------------------


def check_summary(summary: dict, benchmark: str, routers: list[str]) -> None:
    """The contract's JSON schema."""
    assert summary["benchmark"] == benchmark
    assert isinstance(summary["n"], int) and summary["n"] > 0
    for key in ("all_device", "all_edge"):
        assert set(summary[key]) >= {"quality", "mean_latency_s"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in summary[key].values())
    expected = set(routers)
    if benchmark == "mt-bench":
        expected |= {f"{r}/no-context" for r in routers}
    assert set(summary["routers"]) == expected
    for r in summary["routers"].values():
        for key in ("apgr", "cpt50", "cpt80"):
            assert isinstance(r[key], float) and math.isfinite(r[key])
        assert 0.0 <= r["cpt50"] <= r["cpt80"] <= 1.0
        assert len(r["curve"]) >= 2
        for point in r["curve"]:
            assert set(point) == CURVE_KEYS
            assert all(isinstance(v, float) for v in point.values())
            assert 0.0 <= point["edge_share"] <= 1.0
        shares = [p["edge_share"] for p in r["curve"]]
        assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == 1.0
        # The ends of the sweep are the all-device and all-edge policies.
        assert r["curve"][0]["quality"] == pytest.approx(summary["all_device"]["quality"])
        assert r["curve"][-1]["quality"] == pytest.approx(summary["all_edge"]["quality"])


def test_cli_subprocess_prints_only_json_and_writes_plots(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "device_runtime.cli.main", "simulate", "--benchmark", "mt-bench",
         "--data-dir", str(FIXTURES), "--routers", "random,oracle", "--preset", "paper",
         "--out", str(out), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert proc.stdout.count("\n") == 1
    check_summary(summary, "mt-bench", ["random", "oracle"])
    assert summary["n"] == 7  # 2 + 2 + 1 + 2 turns
    assert summary["all_device"]["quality"] == pytest.approx((7 + 6 + 3 + 2 + 8 + 10 + 9) / 7)
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in ("mt-bench_quality_vs_latency.png", "mt-bench_quality_vs_edge_share.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("benchmark, n", [("mmlu", 8), ("gsm8k", 4)])
def test_cli_single_turn_fixtures(benchmark, n, capsys):
    rc = main(["simulate", "--benchmark", benchmark, "--data-dir", str(FIXTURES),
               "--routers", "random,oracle", "--json", "--no-progress", "--alpha", "0.01"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    check_summary(summary, benchmark, ["random", "oracle"])
    assert summary["n"] == n
    assert summary["params"]["alpha"] == 0.01
    assert summary["routers"]["oracle"]["apgr"] >= summary["routers"]["random"]["apgr"]


def test_cli_table_without_json(capsys):
    rc = main(["simulate", "--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "APGR" in out and "all-device" in out and "oracle" in out and "random" in out


def test_cli_split_and_upload_mode(capsys):
    rc = main(["simulate", "--benchmark", "mmlu", "--data-dir", str(FIXTURES), "--json",
               "--no-progress", "--split", "train", "--upload-mode", "session", "--points", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["split"] == "train" and summary["params"]["upload_mode"] == "session"
    assert 0 < summary["n"] <= 8


def test_cli_profile_replaces_the_measured_parameters(tmp_path, capsys):
    profile = tmp_path / "PROFILE.json"
    profile.write_text(json.dumps({
        "gamma_s_prefill": 0.001, "gamma_s_decode": 0.03, "gamma_e_prefill": 0.0005,
        "gamma_e_decode": 0.01, "tau_r": 0.0001, "bandwidth_tokens_per_s": 5000.0,
        "overhead_s": 0.08, "bytes_per_token": 4.2,
    }))
    rc = main(["simulate", "--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--json",
               "--no-progress", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    # all-device: eq. (6) with the profile's γ_s, the preset's L̄_r^s = 136.3 words;
    # γ is per device-SLM token and the traces count words: k tokens per word,
    # from the traces' bytes per word and the profile's bytes per token.
    turns = load_trace("gsm8k", FIXTURES)
    prompts = [t.prompt for d in turns for t in d.turns]
    k = sum(len(p.encode()) for p in prompts) / sum(len(p.split()) for p in prompts) / 4.2
    assert summary["profile"]["tokens_per_word"] == pytest.approx(k) and 1.0 < k < 2.0
    expected = sum(k * (0.001 * word_count(d.turns[0].prompt) + 0.03 * 136.3) for d in turns) / len(turns)
    assert summary["all_device"]["mean_latency_s"] == pytest.approx(expected)
    del_bpt = {"gamma_s_prefill": 0.001, "gamma_s_decode": 0.03}
    profile.write_text(json.dumps(del_bpt))
    rc = main(["simulate", "--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--json",
               "--no-progress", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert rc == 2 and "bytes_per_token" in captured.err
    profile.write_text('{"gamma_s_prefill": -1}')
    rc = main(["simulate", "--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--json",
               "--no-progress", "--profile", str(profile)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "gamma_s_prefill" in captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--benchmark", "mmlu", "--data-dir", "/nonexistent/routellm"], "does not exist"),
        (["--benchmark", "mmlu", "--data-dir", str(FIXTURES), "--routers", "nope"], "unknown router"),
        (["--benchmark", "mmlu", "--data-dir", str(FIXTURES), "--routers", "bert",
          "--bundle", "/nonexistent/bundle"], "bert"),
        # One row where both models agree: no quality gap, so no APGR.
        (["--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--limit", "1"], "no gap"),
        (["--benchmark", "mmlu", "--data-dir", str(FIXTURES), "--points", "2"], "--points"),
    ],
)
def test_cli_errors_are_clear_and_keep_stdout_empty(args, message, capsys):
    rc = main(["simulate", *args, "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared RouteLLM data not found at {SHARED}")
@pytest.mark.parametrize("benchmark", ["mmlu", "gsm8k", "mt-bench"])
def test_cli_on_a_slice_of_the_shared_data(benchmark, tmp_path, capsys):
    rc = main(["simulate", "--benchmark", benchmark, "--data-dir", str(SHARED), "--routers",
               "random,oracle", "--preset", "paper", "--limit", "60", "--json", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    check_summary(summary, benchmark, ["random", "oracle"])
    assert summary["routers"]["oracle"]["apgr"] > summary["routers"]["random"]["apgr"]
    assert len(list(tmp_path.glob("*.png"))) == 2


def _default_bundle_exists() -> bool:
    try:
        from device_runtime.routing.bundle import default_bundle_dir
    except ImportError:
        return False
    return default_bundle_dir().is_dir()


@pytest.mark.slow
@pytest.mark.skipif(not _default_bundle_exists(), reason="no shipped BERT router bundle yet")
def test_cli_with_the_bert_router_on_fixtures(capsys):
    rc = main(["simulate", "--benchmark", "mt-bench", "--data-dir", str(FIXTURES), "--routers",
               "random,bert", "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    check_summary(json.loads(captured.out), "mt-bench", ["random", "bert"])


def test_cli_threshold_adds_the_operating_point_of_every_router(capsys):
    base = ["simulate", "--benchmark", "mt-bench", "--data-dir", str(FIXTURES), "--routers", "random,oracle",
            "--json", "--no-progress"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert all("at_threshold" not in r for r in plain["routers"].values())
    # A θ from the middle of oracle's sweep: its at_threshold is that curve point.
    point = plain["routers"]["oracle"]["curve"][len(plain["routers"]["oracle"]["curve"]) // 2]
    assert main([*base, "--threshold", repr(point["threshold"])]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["routers"]) == {"random", "random/no-context", "oracle", "oracle/no-context"}
    for name, r in summary["routers"].items():
        assert set(r["at_threshold"]) == CURVE_KEYS and r["at_threshold"]["threshold"] == point["threshold"]
        assert r["curve"] == plain["routers"][name]["curve"]  # the sweep is unchanged
    assert summary["routers"]["oracle"]["at_threshold"] == pytest.approx(point)
    # Far below every p̃: all-edge; far above: all-device.
    for theta, side in (("-1e6", "all_edge"), ("1e6", "all_device")):
        assert main([*base, f"--threshold={theta}"]) == 0  # "=": argparse reads "-1e6" as an option
        at = json.loads(capsys.readouterr().out)["routers"]["random"]["at_threshold"]
        assert at["quality"] == pytest.approx(summary[side]["quality"])
        assert at["edge_share"] == (1.0 if side == "all_edge" else 0.0)
    with pytest.raises(SystemExit):
        main([*base, "--threshold", "nan"])
    assert "finite" in capsys.readouterr().err
