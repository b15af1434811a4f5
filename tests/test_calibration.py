"""Eq. (9) calibration: θ for a target on traces and on telemetry, the bootstrap,
the calibration file, and ``edgeroute calibrate`` / ``chat --calibration`` end to end."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest

from device_runtime.routing import cost_model
from device_runtime.sim.calibration import (
    Calibration,
    CalibrationError,
    TelemetryTurn,
    TraceOutcomes,
    bootstrap,
    calibrate_telemetry,
    choose_threshold,
    infer_alpha,
    read_telemetry,
)
from device_runtime.sim.simulate import operating_point
from device_runtime.sim.traces import Dialogue, TraceTurn, word_count

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "routellm_tiny"


def synthetic_trace(n: int = 300, seed: int = 1) -> tuple[list[Dialogue], list[list[float]]]:
    """Single-turn dialogues of varied length whose edge gain the score partly predicts."""
    rng = random.Random(seed)
    dialogues, scores = [], []
    for i in range(n):
        hard = rng.random()
        prompt = " ".join(["w"] * rng.randint(3, 400))
        qd = 1.0 if rng.random() > hard else 0.0
        qe = 1.0 if rng.random() > hard / 3 else 0.0
        dialogues.append(Dialogue(f"s/{i}", "test", (TraceTurn(prompt, (), qd, qe),)))
        scores.append([min(1.0, max(0.0, hard + rng.gauss(0, 0.2)))])
    return dialogues, scores


def two_turn_trace(n: int = 12, seed: int = 2) -> tuple[list[Dialogue], list[list[float]]]:
    rng = random.Random(seed)
    dialogues, scores = [], []
    for i in range(n):
        t1 = TraceTurn(" ".join(["a"] * rng.randint(5, 60)), (), rng.uniform(5, 9), rng.uniform(7, 10))
        t2 = TraceTurn(" ".join(["b"] * rng.randint(5, 60)), ({"role": "user", "content": t1.prompt},),
                       rng.uniform(5, 9), rng.uniform(7, 10))
        dialogues.append(Dialogue(f"m/{i}", "test", (t1, t2)))
        scores.append([rng.random(), rng.random()])
    return dialogues, scores


PARAMS = cost_model.paper_params("gsm8k")


# --- traces -------------------------------------------------------------------------


@pytest.mark.parametrize("trace", [synthetic_trace, two_turn_trace])
def test_fast_operating_points_equal_playing_every_dialogue(trace):
    dialogues, scores = trace()
    params = cost_model.paper_params("mt-bench")
    outcomes = TraceOutcomes(params, dialogues, scores)
    thetas = outcomes.candidates()
    for theta in thetas[:: max(1, len(thetas) // 25)] + [thetas[-1]]:
        fast = outcomes.point(theta)
        slow = operating_point(params, dialogues, scores, theta, with_context=True, count=word_count)
        assert fast.quality == pytest.approx(slow.quality)
        assert fast.edge_share == pytest.approx(slow.edge_share)
        assert fast.mean_latency_s == pytest.approx(slow.mean_latency_s)
    # The candidates run from all-device to all-edge.
    assert outcomes.point(thetas[0]).edge_share == 1.0 and outcomes.point(thetas[-1]).edge_share == 0.0


@pytest.mark.parametrize("target", [0.55, 0.62, 0.7, 0.75])
def test_target_quality_is_met_at_the_least_latency(target):
    dialogues, scores = synthetic_trace()
    outcomes = TraceOutcomes(PARAMS, dialogues, scores)
    curve = outcomes.curve()
    best = choose_threshold(curve, target_quality=target)
    assert best.quality >= target
    # No θ on a fine grid (independent of the candidates) meets the target faster.
    grid = np.linspace(min(p.threshold for p in curve), max(p.threshold for p in curve), 800)
    for theta in grid:
        p = outcomes.point(float(theta))
        if p.quality >= target:
            assert p.mean_latency_s >= best.mean_latency_s - 1e-9
    # And the chosen θ really gives that point.
    assert outcomes.point(best.threshold).quality == pytest.approx(best.quality)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.333, 0.5, 1.0])
def test_target_edge_share_is_the_most_edge_within_the_budget(share):
    dialogues, scores = synthetic_trace()
    outcomes = TraceOutcomes(PARAMS, dialogues, scores)
    best = choose_threshold(outcomes.curve(), target_edge_share=share)
    assert best.edge_share <= share + 1e-12
    # One turn more would exceed the budget (single-turn: every share k/n is reachable).
    assert best.edge_share > share - 1.0 / len(dialogues) - 1e-12


def test_unreachable_and_malformed_targets_are_errors():
    dialogues, scores = synthetic_trace(60)
    curve = TraceOutcomes(PARAMS, dialogues, scores).curve()
    with pytest.raises(CalibrationError, match="unreachable.*the best is"):
        choose_threshold(curve, target_quality=1.01)
    with pytest.raises(CalibrationError, match="exactly one"):
        choose_threshold(curve, target_quality=0.5, target_edge_share=0.5)
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        choose_threshold(curve, target_edge_share=1.5)
    with pytest.raises(CalibrationError, match="finite"):
        choose_threshold(curve, target_quality=float("nan"))


def test_bootstrap_interval_contains_the_point_and_is_seeded():
    dialogues, scores = synthetic_trace()
    outcomes = TraceOutcomes(PARAMS, dialogues, scores)
    best = choose_threshold(outcomes.curve(), target_quality=0.65)
    rows = outcomes.per_dialogue(best.threshold)
    assert rows[:, 0].sum() / rows[:, 3].sum() == pytest.approx(best.quality)
    ci = bootstrap(rows, resamples=500, seed=3)
    for key in ("quality", "edge_share", "mean_latency_s"):
        assert ci[key].low <= getattr(best, key) <= ci[key].high
        assert ci[key].low < ci[key].high
    assert bootstrap(rows, resamples=500, seed=3) == ci
    # Fewer dialogues, wider interval.
    small = bootstrap(rows[:40], resamples=500, seed=3)
    assert small["quality"].high - small["quality"].low > ci["quality"].high - ci["quality"].low
    with pytest.raises(CalibrationError):
        bootstrap(rows, resamples=0)


# --- telemetry ----------------------------------------------------------------------


def telemetry_turns(alpha: float, n: int = 200, settled: int = 0, seed: int = 4) -> list[TelemetryTurn]:
    rng = random.Random(seed)
    turns = []
    for i in range(n + settled):
        dev, edge = rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)
        if i < n:
            p = rng.random()
            fused = p - alpha * (edge - dev)
            turns.append(TelemetryTurn(p, fused, dev, edge, "edge" if fused > 0.5 else "device", "auto"))
        else:
            turns.append(TelemetryTurn(None, None, dev, edge, "device", "auto"))
    return turns


def test_telemetry_alpha_is_inferred_and_the_share_is_met():
    turns = telemetry_turns(alpha=0.4)
    assert infer_alpha(turns) == pytest.approx(0.4)
    for share in (0.0, 0.1, 0.37, 0.9, 1.0):
        result = calibrate_telemetry(turns, share)
        assert result.alpha == pytest.approx(0.4)
        fused = np.asarray([t.p_fused for t in turns])
        achieved = float(np.mean(fused > result.threshold))
        assert achieved == pytest.approx(result.edge_share)
        assert share - 1 / len(turns) - 1e-12 < achieved <= share + 1e-12


def test_telemetry_recomputes_p_fused_with_a_given_alpha():
    turns = telemetry_turns(alpha=0.4)
    result = calibrate_telemetry(turns, 0.25, alpha=2.0)
    fused = np.asarray([t.p - 2.0 * t.latency_gap_s for t in turns])
    assert result.alpha == 2.0
    assert float(np.mean(fused > result.threshold)) == pytest.approx(result.edge_share)


def test_settled_turns_count_with_the_scored_p_distribution():
    turns = telemetry_turns(alpha=0.4, n=100, settled=100)
    result = calibrate_telemetry(turns, 0.3)
    assert result.n_settled == 100 and result.n_scored == 100
    assert 0.3 - 0.02 <= result.edge_share <= 0.3
    # By hand: a settled turn is on the edge with the share of scored p above θ + g.
    ps = np.asarray([t.p for t in turns if t.p is not None])
    expected = sum(float(np.mean(ps > result.threshold + 0.4 * t.latency_gap_s)) for t in turns if t.p is None)
    expected += sum(t.p_fused > result.threshold for t in turns if t.p is not None)
    assert result.edge_share == pytest.approx(expected / len(turns))


def test_bad_telemetry_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CalibrationError, match="no telemetry records"):
        read_telemetry(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turn": 0}\nnot json\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:1: predicted_s"):
        read_telemetry(bad)
    with pytest.raises(CalibrationError, match="cannot read"):
        read_telemetry(tmp_path / "missing.jsonl")
    device_only = [TelemetryTurn(None, None, 0.5, 0.6, "device", "device")] * 3
    with pytest.raises(CalibrationError, match="without a router"):
        calibrate_telemetry(device_only, 0.5)
    mixed = telemetry_turns(0.4, n=5) + [TelemetryTurn(0.5, 0.5 - 0.9 * 0.3, 0.5, 0.8, "edge", "auto")]
    with pytest.raises(CalibrationError, match="different α"):
        calibrate_telemetry(mixed, 0.5)


# --- the file ------------------------------------------------------------------------


def test_calibration_file_round_trip_and_bad_files(tmp_path):
    cal = Calibration(threshold=-0.123, alpha=0.05, router="bert",
                      calibrated_on={"source": "trace", "benchmark": "gsm8k"},
                      target={"quality": 0.8}, achieved={"quality": 0.81})
    path = cal.write(tmp_path / "cal.json")
    assert Calibration.read(path) == cal
    data = json.loads(path.read_text())
    for key, value, message in [("kind", "other", "not an edgeroute calibration"),
                                ("version", 99, "version 99"),
                                ("threshold", float("inf"), "finite"),
                                ("alpha", -1, "alpha")]:
        broken = tmp_path / f"broken_{key}.json"
        broken.write_text(json.dumps({**data, key: value}))
        with pytest.raises(CalibrationError, match=message):
            Calibration.read(broken)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(CalibrationError, match="not a JSON"):
        Calibration.read(tmp_path / "x.json")


def test_apply_calibration_sets_theta_and_alpha(tmp_path):
    from device_runtime.cli.calibrate import apply_calibration

    path = Calibration(threshold=0.42, alpha=1.5, router="bert", calibrated_on={"source": "telemetry"},
                       target={"edge_share": 0.3}, achieved={"edge_share": 0.3}).write(tmp_path / "c.json")
    args = argparse.Namespace(calibration=str(path), threshold=0.6, alpha=None)
    apply_calibration(args)
    assert (args.threshold, args.alpha) == (0.42, 1.5)
    with pytest.raises(ValueError, match="cannot read"):
        apply_calibration(argparse.Namespace(calibration=str(tmp_path / "no.json"), threshold=0.5, alpha=None))


# --- the contract, as a user runs it --------------------------------------------------


@pytest.mark.parametrize("benchmark, target", [("gsm8k", ["--target-quality", "0.5"]),
                                               ("mmlu", ["--target-edge-share", "0.4"]),
                                               ("mt-bench", ["--target-quality", "7"])])
def test_cli_trace_contract(run_cli, tmp_path, benchmark, target):
    out = tmp_path / "cal.json"
    proc = run_cli("calibrate", "--benchmark", benchmark, "--data-dir", str(FIXTURES), "--router", "random",
                   *target, "--json", "--out", str(out), "--bootstrap", "200")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    result = json.loads(proc.stdout)
    assert {"threshold", "quality", "edge_share", "mean_latency_s"} <= set(result)
    if target[0] == "--target-quality":
        assert result["quality"] >= float(target[1])
    else:
        assert result["edge_share"] <= float(target[1])
    for key in ("quality", "edge_share", "mean_latency_s"):
        ci = result["interval_95"][key]
        assert ci["low"] <= result[key] <= ci["high"]
    cal = Calibration.read(out)
    assert cal.threshold == result["threshold"] and cal.alpha == cost_model.PAPER_ALPHA[benchmark]
    assert cal.calibrated_on["benchmark"] == benchmark and cal.router == "random"
    # The same θ through `simulate --threshold` gives the same point.
    sim = run_cli("simulate", "--benchmark", benchmark, "--data-dir", str(FIXTURES), "--routers", "random",
                  f"--threshold={result['threshold']!r}", "--json", "--no-progress")
    at = json.loads(sim.stdout)["routers"]["random"]["at_threshold"]
    assert at["quality"] == pytest.approx(result["quality"])
    assert at["edge_share"] == pytest.approx(result["edge_share"])
    assert at["mean_latency_s"] == pytest.approx(result["mean_latency_s"])


def test_cli_telemetry_contract(run_cli, tmp_path):
    path = tmp_path / "telemetry.jsonl"
    lines = []
    for i, t in enumerate(telemetry_turns(alpha=0.05, n=40)):
        lines.append(json.dumps({
            "turn": i, "target": t.target, "policy": t.policy, "p": t.p, "p_fused": t.p_fused,
            "predicted_s": {"device": t.predicted_device_s, "edge": t.predicted_edge_s}, "measured_s": 0.5,
            "ttft_s": 0.1, "prompt_tokens": 5, "context_tokens": 0, "prefill_tokens": 5, "cached_tokens": 0,
            "output_tokens": 9, "fallback": False}))
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli("calibrate", "--telemetry", str(path), "--target-edge-share", "0.25", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["edge_share"] <= 0.25 and result["alpha"] == pytest.approx(0.05)
    fused = [t.p_fused for t in telemetry_turns(alpha=0.05, n=40)]
    assert sum(f > result["threshold"] for f in fused) == 10


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--router", "random", "--target-quality", "1.5"],
     "unreachable"),
    (["--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--router", "random"], "exactly one"),
    (["--telemetry", "/nonexistent.jsonl", "--target-edge-share", "0.3"], "cannot read telemetry"),
    (["--telemetry", "/dev/null", "--target-quality", "0.3"], "--target-edge-share"),
    (["--benchmark", "gsm8k", "--data-dir", "/nonexistent", "--router", "random", "--target-edge-share", "0.3"],
     "nonexistent"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message, capsys):
    from device_runtime.cli.main import main

    rc = main(["calibrate", *args, "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert message in captured.err and captured.err.startswith("edgeroute calibrate: error:")


def test_chat_refuses_a_bad_calibration_file_before_loading_models(run_cli, tmp_path):
    bad = tmp_path / "cal.json"
    bad.write_text('{"kind": "something else"}')
    proc = run_cli("chat", "--policy", "device", "--calibration", str(bad), stdin="", timeout=120)
    assert proc.returncode == 2
    assert "not an edgeroute calibration file" in proc.stderr
