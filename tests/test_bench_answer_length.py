"""scripts/bench_answer_length.py's evaluation on hand-made lengths (no models)."""

from __future__ import annotations

import pytest

from _scripts import load_script

@pytest.fixture(scope="module")
def bench():
    return load_script("bench_answer_length")


def rows(lengths_by_dialogue: dict[int, tuple[int, int]], model: str, prompt=lambda d: 10) -> list[dict]:
    return [
        {"dialogue": d, "model": model, "turn": k + 1, "prompt_tokens": prompt(d), "context_tokens": 0 if k == 0 else 20,
         "answer_tokens": n}
        for d, pair in lengths_by_dialogue.items() for k, n in enumerate(pair)
    ]


def test_median_relative_error(bench):
    assert bench.median_rel_error([10, 10, 10], [10, 20, 5]) == pytest.approx(0.5)
    assert bench.median_rel_error([3], [0]) == 3.0  # an empty answer counts as one token


def test_a_constant_length_is_guessed_exactly_and_a_per_dialogue_one_by_the_conversation(bench):
    same = rows({d: (12, 12) for d in range(20)}, "device")
    # Edge: each dialogue keeps its own length (4, 8, ... tokens), so only the
    # conversation's earlier answer tells the second turn's.
    own = rows({d: (4 * (d % 5 + 1), 4 * (d % 5 + 1)) for d in range(20)}, "edge")
    result = bench.evaluate(same + own)
    assert result["device"]["mean"] == 0 and result["device"]["conversation, second turns"] == 0
    edge = result["edge"]
    assert edge["conversation, second turns"] < edge["mean, second turns"]
    assert edge["n"] == 40 and edge["answer_tokens_p10_p50_p90"][1] == 12


def test_a_length_that_follows_the_prompt_is_found_by_the_linear_guess(bench):
    edge = rows({d: (2 * (d % 7 + 2), 2 * (d % 7 + 2)) for d in range(30)}, "edge", prompt=lambda d: 2 * (d % 7 + 2))
    device = rows({d: (24, 24) for d in range(30)}, "device")
    result = bench.evaluate(edge + device)["edge"]
    assert result["linear(log L_p, log C)"] < result["mean"]
