"""Per-query response-length prediction and the simulator's ``--response-lengths`` option."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from device_runtime.routing import cost_model
from device_runtime.cli.main import main
from device_runtime.sim.response_length import (
    FEATURES,
    FitSettings,
    LengthModel,
    LengthModelError,
    evaluate,
    fit,
    fit_trace,
    prompt_features,
)
from device_runtime.sim.length_plan import length_plan
from device_runtime.sim.simulate import LengthPlan, SimulationError, play_dialogue, recorded_lengths
from device_runtime.sim.traces import Dialogue, TraceTurn, load_trace, split_of, word_count

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "routellm_tiny"

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def synthetic_prompt(rng: np.random.Generator, words: int) -> str:
    return " ".join(f"w{rng.integers(0, 50)}" for _ in range(words - 1)) + " total?"


def true_device(words: int) -> float:
    # A known relation: log1p(L_r) = 1 + 0.8 log1p(L_p), no noise.
    return math.expm1(1.0 + 0.8 * math.log1p(words))


def true_edge(words: int) -> float:
    return math.expm1(2.0 + 0.5 * math.log1p(words))


def synthetic_rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(3, 200, size=n)
    prompts = [synthetic_prompt(rng, int(k)) for k in sizes]
    return prompts, [true_device(int(k)) for k in sizes], [true_edge(int(k)) for k in sizes]


# --- the predictor ---------------------------------------------------------------------


def test_fit_recovers_a_known_relation():
    prompts, dev, edge = synthetic_rows(200)
    model = fit(prompts, dev, edge, settings=FitSettings(l2=1e-6))
    test_prompts, test_dev, test_edge = synthetic_rows(50, seed=1)
    p_dev, p_edge = model.predict_many(test_prompts)
    np.testing.assert_allclose(p_dev, test_dev, rtol=0.03)
    np.testing.assert_allclose(p_edge, test_edge, rtol=0.03)
    # No residuals, so the smearing factor is 1.
    assert model.device.smearing == pytest.approx(1.0, abs=1e-3)
    single = model.predict(test_prompts[0])
    assert isinstance(single, cost_model.ResponseLengths)
    assert single.device == pytest.approx(p_dev[0]) and single.edge == pytest.approx(p_edge[0])


def test_smearing_makes_the_prediction_a_mean_not_a_median():
    # Same prompt, lengths 10 and 1000: exp(mean log) is ~100, the mean is 505.
    prompts = ["same prompt"] * 4
    model = fit(prompts, [10, 1000, 10, 1000], [10, 1000, 10, 1000])
    assert model.predict("same prompt").device == pytest.approx(505.0, rel=0.01)


def test_save_load_round_trip(tmp_path):
    prompts, dev, edge = synthetic_rows(60)
    model = fit(prompts, dev, edge, benchmark="gsm8k")
    path = model.save(tmp_path / "lengths.json")
    loaded = LengthModel.load(path)
    assert loaded == model
    assert json.loads(path.read_text())["features"] == list(FEATURES)
    np.testing.assert_array_equal(loaded.predict_many(prompts)[0], model.predict_many(prompts)[0])


@pytest.mark.parametrize(
    "prompts, dev, edge, match",
    [
        (["a", "b"], [1, 2], [1, 2], "at least 3 rows"),
        (["a", "b", "c"], [1, 2], [1, 2, 3], "expected 3 lengths"),
        (["a", "b", "c"], [1, -2, 3], [1, 2, 3], "non-negative"),
        (["a", "b", "c"], [1, 2, 3], [1, float("nan"), 3], "finite"),
        (["a", 5, "c"], [1, 2, 3], [1, 2, 3], "must be a string"),
    ],
)
def test_bad_training_input(prompts, dev, edge, match):
    with pytest.raises(LengthModelError, match=match):
        fit(prompts, dev, edge)


def test_bad_settings_and_files(tmp_path):
    with pytest.raises(ValueError, match="l2"):
        FitSettings(l2=-1.0)
    with pytest.raises(LengthModelError, match="not found"):
        LengthModel.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LengthModelError, match="not valid JSON"):
        LengthModel.load(bad)
    prompts, dev, edge = synthetic_rows(20)
    data = fit(prompts, dev, edge).to_dict()
    bad.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(LengthModelError, match="format_version"):
        LengthModel.load(bad)
    bad.write_text(json.dumps({**data, "features": ["x"]}))
    with pytest.raises(LengthModelError, match="features"):
        LengthModel.load(bad)
    broken = dict(data, device={"intercept": 1.0, "coef": [1.0], "smearing": 1.0})
    bad.write_text(json.dumps(broken))
    with pytest.raises(LengthModelError, match="coefficients"):
        LengthModel.load(bad)
    del data["edge"]
    bad.write_text(json.dumps(data))
    with pytest.raises(LengthModelError, match="malformed"):
        LengthModel.load(bad)


def test_extreme_prompts_stay_finite():
    prompts, dev, edge = synthetic_rows(30)
    model = fit(prompts, dev, edge)
    for prompt in ("", "9" * 5000, "word " * 200_000, "1.2.3.4 ? ? ?"):
        lengths = model.predict(prompt)
        assert math.isfinite(lengths.device) and lengths.device >= 0
        assert math.isfinite(lengths.edge) and lengths.edge >= 0
    assert prompt_features("Tom has 3 apples and 12 pears. How many?")[FEATURES.index("question_marks")] == 1


# --- the trace and the simulator -----------------------------------------------------------


def write_gsm8k(root, n: int = 60, seed: int = 0):
    """A synthetic GSM8K responses file: longer prompts get longer answers."""
    rng = np.random.default_rng(seed)
    sub = root / "gsm8k"
    sub.mkdir(parents=True)
    with (sub / "gsm8k_responses.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", WEAK, STRONG, WEAK + "_response", STRONG + "_response"])
        for i in range(n):
            k = int(rng.integers(5, 80))
            prompt = f"q{i} " + synthetic_prompt(rng, k)
            w.writerow(
                [prompt, i % 4 == 0, True,
                 " ".join(["x"] * int(true_device(k))), " ".join(["y"] * int(true_edge(k)))]
            )
    (sub / "contaminated_prompts.jsonl").write_text("")
    return root


def test_fit_trace_uses_only_the_train_split(tmp_path):
    trace = load_trace("gsm8k", write_gsm8k(tmp_path))
    model = fit_trace(trace, benchmark="gsm8k")
    assert model.n_train == sum(split_of(d.turns[0].prompt) == "train" for d in trace)
    report = evaluate(model, trace)
    assert report["n_train"] + report["n_val"] == len(trace)
    for target in ("device", "edge"):
        # A noiseless relation: the model beats the per-benchmark averages on val.
        assert report[target]["predicted"]["r2"] > 0.9
        assert report[target]["predicted"]["mae"] < report[target]["train_mean"]["mae"]
        assert report[target]["predicted"]["mae"] < report[target]["paper_average"]["mae"]


def test_decision_and_charge_lengths_by_hand():
    turn = TraceTurn("a b c d e f g h i j", (), 0.0, 1.0, response_words_device=50, response_words_edge=80)
    d = Dialogue("hand/1", "gsm8k", (turn,))
    params = cost_model.paper_params("gsm8k")  # γs 0.04, γe 0.02, α 0.05, B 2e7, δ 0.02
    guess = cost_model.ResponseLengths(20.0, 300.0)
    plan = LengthPlan(decide=lambda t: guess, charge=recorded_lengths)
    q, edge_calls, lat, fused = play_dialogue(params, d, [0.6], True, word_count, threshold=-100.0, lengths=plan)
    # Decision: Tˢ = 0.04*(10+20) = 1.2; Tᵉ = 0.02*(10+300) + (10+300)/2e7 + 0.02.
    t_edge_seen = 0.02 * 310 + 310 / 2e7 + 0.02
    assert fused[0] == pytest.approx(0.6 - 0.05 * (t_edge_seen - 1.2))
    # Charge (the edge was picked): the recorded 80 words.
    assert (q, edge_calls) == (1.0, 1)
    assert lat == pytest.approx(0.02 * 90 + 90 / 2e7 + 0.02)
    with pytest.raises(SimulationError, match="no per-query response lengths"):
        recorded_lengths(TraceTurn("a", (), 0.0, 1.0))


def run_json(argv, capsys):
    rc = main(["simulate", "--json", "--no-progress", *argv])
    captured = capsys.readouterr()
    return rc, captured


@pytest.mark.parametrize("mode", ["train-mean", "predicted", "true"])
def test_cli_response_lengths_on_the_fixture(mode, capsys):
    base = ["--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--routers", "random,oracle"]
    rc, captured = run_json([*base, "--response-lengths", mode], capsys)
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["response_lengths"] == {"decision": mode, "charge": "true"}
    # The charge is the recorded lengths: all-device = mean of 0.04 (L_p + L_r^s).
    trace = load_trace("gsm8k", FIXTURES)
    want = np.mean([0.04 * (word_count(d.turns[0].prompt) + d.turns[0].response_words_device) for d in trace])
    assert summary["all_device"]["mean_latency_s"] == pytest.approx(want)
    assert set(summary["routers"]) == {"random", "oracle"}


def test_cli_default_is_the_paper_and_unchanged(capsys):
    base = ["--benchmark", "gsm8k", "--data-dir", str(FIXTURES)]
    rc, default = run_json(base, capsys)
    assert rc == 0
    assert "response_lengths" not in json.loads(default.out)
    rc, explicit = run_json([*base, "--response-lengths", "average", "--charge-lengths", "average"], capsys)
    assert rc == 0 and explicit.out == default.out


def test_cli_scaled_charge_keeps_the_preset_mean(tmp_path, capsys):
    root = write_gsm8k(tmp_path)
    rc, captured = run_json(
        ["--benchmark", "gsm8k", "--data-dir", str(root), "--routers", "random",
         "--response-lengths", "predicted", "--charge-lengths", "scaled", "--split", "val"],
        capsys,
    )
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["response_lengths"] == {"decision": "predicted", "charge": "scaled"}
    trace = load_trace("gsm8k", root)
    scale = 136.3 / np.mean([d.turns[0].response_words_device for d in trace])
    val = [d.turns[0] for d in trace if split_of(d.turns[0].prompt) == "val"]
    want = np.mean([0.04 * (word_count(t.prompt) + t.response_words_device * scale) for t in val])
    assert summary["all_device"]["mean_latency_s"] == pytest.approx(want)


def test_cli_length_model_file(tmp_path, capsys):
    trace = load_trace("gsm8k", FIXTURES)
    path = fit_trace(trace, benchmark="gsm8k").save(tmp_path / "m.json")
    base = ["--benchmark", "gsm8k", "--data-dir", str(FIXTURES), "--response-lengths", "predicted"]
    rc, captured = run_json([*base, "--length-model", str(path)], capsys)
    assert rc == 0, captured.err
    rc, refit = run_json(base, capsys)
    assert refit.out == captured.out
    rc, captured = run_json([*base, "--length-model", str(tmp_path / "nope.json")], capsys)
    assert rc == 2 and "not found" in captured.err and captured.out == ""


def test_cli_needs_recorded_lengths(capsys):
    for mode in ("predicted", "true"):
        rc, captured = run_json(
            ["--benchmark", "mt-bench", "--data-dir", str(FIXTURES), "--response-lengths", mode], capsys
        )
        assert rc == 2
        assert "no recorded response lengths" in captured.err and captured.out == ""


def test_length_model_does_not_cross_benchmarks():
    trace = load_trace("gsm8k", FIXTURES)
    model = fit_trace(trace, benchmark="gsm8k")
    other = LengthModel.from_dict({**model.to_dict(), "benchmark": "mmlu"})
    with pytest.raises(LengthModelError, match="do not transfer"):
        length_plan("predicted", "true", trace, benchmark="gsm8k", model=other)
    with pytest.raises(LengthModelError, match="needs the preset"):
        length_plan("average", "scaled", trace, benchmark="gsm8k")
