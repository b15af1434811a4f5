"""scripts/bench_quality.py's scoring and bookkeeping on hand-made answers (no models)."""

from __future__ import annotations

import json

import pytest

from _scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_quality")


def test_gold_is_the_number_after_the_four_hashes(bench):
    assert bench.gold_number("48/2 = <<48/2=24>>24 clips.\n#### 1,072") == 1072
    with pytest.raises(ValueError):
        bench.gold_number("no final answer")


@pytest.mark.parametrize("text, expected", [
    ("She earns 12 * 5 = 60 dollars. The answer is 60.", 60),
    ("The answer is $1,250.50 in total, after 3 weeks.", 1250.5),  # "answer is" wins over later numbers
    ("First 3 + 4 = 7, then 7 * 2 = 14", 14),                      # else the last number
    ("The answer is -5.", -5),
    ("I cannot tell.", None),
])
def test_the_final_number_is_extracted(bench, text, expected):
    assert bench.extract_number(text) == expected


def test_scoring_compares_numbers_not_strings(bench):
    assert bench.is_correct("so the answer is 72.0", 72.0)
    assert not bench.is_correct("so the answer is 27", 72.0)
    assert not bench.is_correct("no number", 72.0)


def test_wilson_interval(bench):
    lo, hi = bench.wilson(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17
    lo, hi = bench.wilson(3, 20)
    assert lo < 0.15 < hi and 0.04 < lo < 0.06 and 0.35 < hi < 0.37
    assert bench.wilson(0, 0) == (0.0, 1.0)


def test_sample_is_seeded_and_within_the_file(bench, tmp_path):
    data = tmp_path / "g.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"x\n#### {i}"}) + "\n" for i in range(30)))
    a = bench.load_problems(data, 5, seed=0)
    assert a == bench.load_problems(data, 5, seed=0)
    assert a != bench.load_problems(data, 5, seed=1)
    assert all(p["gold"] == p["index"] for p in a)
    with pytest.raises(SystemExit):
        bench.load_problems(data, 31, seed=0)


def test_auto_thresholds_sit_between_scores(bench):
    xs = [0.1 * i for i in range(1, 11)]
    thetas = bench.auto_thresholds(xs)
    assert thetas[0] < min(xs) and thetas[-1] > max(xs)
    for t in thetas[1:-1]:
        assert min(abs(t - x) for x in xs) > 0.04  # no score on θ


def test_a_policy_point_takes_the_chosen_sides_answers(bench):
    problems = [{"gold": 1}, {"gold": 2}]
    sides = {"device": [{"correct": False, "measured_s": 1.0}, {"correct": False, "measured_s": 1.0}],
             "edge": [{"correct": True, "measured_s": 3.0}, {"correct": True, "measured_s": 3.0}]}
    ds = [{"target": "edge", "decide_s": 0.5, "p_fused": 0.7}, {"target": "device", "decide_s": 0.5, "p_fused": 0.2}]
    pt = bench.point("auto", 0.5, ds, sides, problems)
    assert pt["correct"] == 1 and pt["edge_share"] == 0.5
    assert pt["mean_latency_s"] == pytest.approx((3.5 + 1.5) / 2)
    assert pt["margin"] == pytest.approx(0.2)
