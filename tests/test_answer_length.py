"""The live answer-length model (device_runtime.routing.answer_length): its
cues, the capped mean, the JSON file, the online correction, and the shipped
model's file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from device_runtime.routing.answer_length import (
    FEATURES, AnswerLengthError, AnswerLengthModel, LiveLengths, SideFit, fit, turn_features,
)

SHIPPED = Path(__file__).resolve().parents[1] / "device_runtime" / "data" / "answer_lengths.json"

LONG = ["Explain step by step how a bicycle gear works.", "Write a short story about a fox.",
        "Describe in detail how to plan a garden.", "Compare Python and Java, and explain why."]
SHORT = ["Thanks, that is all.", "Answer in one word: is the sky blue?", "Give me a one-line reminder.",
         "Ok, bye."]


def _rows(n_each: int = 6):
    rng = np.random.default_rng(0)
    prompts, follow, dev, edge = [], [], [], []
    for i in range(n_each):
        for p in LONG:
            prompts.append(p), follow.append(bool(i % 2))
            dev.append(float(rng.integers(150, 192))), edge.append(float(rng.integers(120, 192)))
        for p in SHORT:
            prompts.append(p), follow.append(bool(i % 2))
            dev.append(float(rng.integers(3, 12))), edge.append(float(rng.integers(2, 10)))
    return prompts, follow, {"device": dev, "edge": edge}


def test_cues_are_read_from_the_prompt():
    f = dict(zip(FEATURES, turn_features("Explain step by step: why is 12 * 3 = 36?", follow_up=True)))
    assert f["long_cues"] >= 2 and f["log1p_numbers"] > 0 and f["question_marks"] == 1 and f["follow_up"] == 1
    f = dict(zip(FEATURES, turn_features("Thanks! Just one word, please.", follow_up=False)))
    assert f["short_cues"] >= 1 and f["follow_up"] == 0
    assert dict(zip(FEATURES, turn_features("Reply briefly, in one sentence.", follow_up=False)))["short_cues"] >= 2
    with pytest.raises(AnswerLengthError):
        turn_features(None, follow_up=False)  # type: ignore[arg-type]
    assert np.all(np.isfinite(turn_features("9" * 100_000 + "?" * 50, follow_up=False)))  # bounded


def test_a_fitted_model_tells_long_answers_from_short_ones_and_respects_the_cap():
    prompts, follow, tokens = _rows()
    model = fit(prompts, follow, tokens, train_cap=192)
    out = model.predict_many(LONG + SHORT, [False] * 8, cap=192)
    for side in ("device", "edge"):
        assert out[side][:4].min() > 5 * out[side][4:].max()
    # The capped mean: never above the cap, and a smaller cap lowers long answers the most.
    at_48 = model.predict_many(LONG, [False] * 4, cap=48)["edge"]
    assert np.all(at_48 <= 48) and np.all(at_48 > 30)
    # A cap above the collection's is the collection's: longer answers were never seen.
    assert model.predict(LONG[0], follow_up=False, cap=4096) == model.predict(LONG[0], follow_up=False, cap=192)
    with pytest.raises(AnswerLengthError):
        model.predict(LONG[0], follow_up=False, cap=0)


def test_the_model_file_round_trips_and_bad_files_are_clear_errors(tmp_path):
    prompts, follow, tokens = _rows(2)
    model = fit(prompts, follow, tokens, train_cap=192, source="test rows")
    again = AnswerLengthModel.load(model.save(tmp_path / "m.json"))
    assert again == model
    bad = tmp_path / "bad.json"
    for content in ("not json", json.dumps({"format_version": 99}), json.dumps({**model.to_dict(), "features": ["x"]}),
                    json.dumps({**model.to_dict(), "edge": {"intercept": 1.0}}),
                    json.dumps({**model.to_dict(), "feature_scale": [0.0] * len(FEATURES)})):
        bad.write_text(content)
        with pytest.raises(AnswerLengthError):
            AnswerLengthModel.load(bad)
    with pytest.raises(AnswerLengthError, match="cannot read"):
        AnswerLengthModel.load(tmp_path / "missing.json")
    with pytest.raises(AnswerLengthError):
        SideFit(0.0, (0.0,) * len(FEATURES), (math.inf,))
    with pytest.raises(AnswerLengthError):
        fit(prompts[:3], follow[:3], {"device": [1, 2, 3], "edge": [1, 2, 3]}, train_cap=192)
    with pytest.raises(AnswerLengthError):
        fit(prompts, follow, {"device": tokens["device"], "edge": [-1.0] * len(prompts)}, train_cap=192)
    with pytest.raises(AnswerLengthError, match="l2 > 0"):  # a constant cue, no penalty
        fit(["Hi."] * 6, [False] * 6, {"device": [1, 2, 3, 4, 5, 6], "edge": [1, 2, 3, 4, 5, 6]},
            train_cap=192, l2=0.0)


def test_live_lengths_correct_a_model_pair_that_answers_longer():
    prompts, follow, tokens = _rows()
    live = LiveLengths(fit(prompts, follow, tokens, train_cap=192), prior=1.0)
    prompt = "Describe how to bake bread."
    before = live.predict(prompt, follow_up=False, cap=128)
    for p in SHORT:  # this pair answers short prompts three times as long as the fit says
        predicted = live.model.predict(p, follow_up=False, cap=128).edge
        live.observe("edge", p, follow_up=False, cap=128, answer_tokens=round(3 * (1 + predicted) - 1))
    assert live.run_correction("edge") == pytest.approx(3 ** (4 / 5), rel=0.05)  # shrunk by one prior answer
    # This conversation's own answers, shrunk towards the run's by one pseudo-answer.
    assert live.correction("edge") == pytest.approx(3 ** ((4 + 4 / 5) / 5), rel=0.05)
    assert live.correction("device") == 1.0  # the other side is untouched
    empty = LiveLengths(live.model, prior=0.0)
    empty.observe("edge", "Thanks.", follow_up=True, cap=128, answer_tokens=0)
    assert empty.run_correction("edge") == pytest.approx(1 / 3)  # one empty answer moves it at most 3x
    after = live.predict(prompt, follow_up=False, cap=128)
    assert after.edge > before.edge and after.edge <= 128 and after.device == before.device
    live.new_conversation()  # a new conversation starts from the run's factor
    assert live.correction("edge") == pytest.approx(live.run_correction("edge"))
    with pytest.raises(AnswerLengthError):
        live.observe("cloud", prompt, follow_up=False, cap=128, answer_tokens=3)
    with pytest.raises(AnswerLengthError):
        LiveLengths(live.model, window=0)


def test_the_shipped_model_loads_and_orders_long_above_short():
    model = AnswerLengthModel.load(SHIPPED)
    assert model.n_train >= 50 and model.train_cap >= 128
    long = model.predict("Explain step by step how to solve 3x + 5 = 20.", follow_up=False, cap=128)
    short = model.predict("Thanks, that is all for now.", follow_up=True, cap=128)
    assert long.edge > short.edge and long.device > short.device


def test_the_flag_picks_the_shipped_model_a_file_or_none(tmp_path):
    import argparse

    from device_runtime.cli.runner import load_answer_lengths

    assert load_answer_lengths(argparse.Namespace(answer_lengths="none")) is None
    assert load_answer_lengths(argparse.Namespace(answer_lengths="default")).model == AnswerLengthModel.load(SHIPPED)
    assert load_answer_lengths(argparse.Namespace()) is None  # a command without the flag
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="answer-length"):  # the CLI prints ValueErrors as its error
        load_answer_lengths(argparse.Namespace(answer_lengths=str(bad)))
