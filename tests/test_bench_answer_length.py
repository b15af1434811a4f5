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
    assert result["device"]["best constant, first turns"] == 0
    # First turns of 4, 8, 12, 16, 20 tokens: the best single guess, in hindsight, is off by
    # 1/3 on the median turn (8 for 12, or 16 for 12 ...), never 0, and a CV mean is no better.
    assert 0 < edge["best constant, first turns"] <= edge["mean"]


def test_rows_from_an_earlier_run_are_re_evaluated(bench, tmp_path, capsys):
    import json

    saved = tmp_path / "lengths.json"
    saved.write_text(json.dumps({"rows": rows({d: (12, 12) for d in range(10)}, "device")
                                 + rows({d: (8, 10) for d in range(10)}, "edge"), "max_tokens": 24}))
    assert bench.main(["--rows", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 MT-Bench-101 dialogues") and "| edge | 20 |" in out
    saved.write_text("{}")
    with pytest.raises(SystemExit):
        bench.main(["--rows", str(saved)])


def test_a_length_that_follows_the_prompt_is_found_by_the_linear_guess(bench):
    edge = rows({d: (2 * (d % 7 + 2), 2 * (d % 7 + 2)) for d in range(30)}, "edge", prompt=lambda d: 2 * (d % 7 + 2))
    device = rows({d: (24, 24) for d in range(30)}, "device")
    result = bench.evaluate(edge + device)["edge"]
    assert result["linear(log L_p, log C)"] < result["mean"]
