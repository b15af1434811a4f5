"""Trace loaders on small invented fixture files (and, when present, the shared data)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from device_runtime.sim.traces import TraceError, load_trace, split_of, word_count

FIXTURES = Path(__file__).parent / "fixtures" / "routellm_tiny"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routellm"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture tree, for breaking it."""
    dst = tmp_path / "routellm"
    shutil.copytree(FIXTURES, dst)
    return dst


# --- MMLU ---------------------------------------------------------------------


def test_mmlu_loads_every_domain_and_decontaminates():
    dialogues = load_trace("mmlu", FIXTURES)
    assert len(dialogues) == 8  # 6 + 3 rows, one contaminated
    assert {d.domain for d in dialogues} == {"toy_arithmetic", "toy_geography"}
    assert all(len(d.turns) == 1 and d.turns[0].context == () for d in dialogues)
    assert not any("contaminated" in d.turns[0].prompt for d in dialogues)
    first = dialogues[0].turns[0]
    assert first.prompt.startswith("What is 2 + 3?\nA. 4") and first.prompt.endswith("Answer:")
    by_prompt = {d.turns[0].prompt.split("\n")[0]: d.turns[0] for d in dialogues}
    assert (by_prompt["What is 7 * 8?"].quality_device, by_prompt["What is 7 * 8?"].quality_edge) == (0.0, 1.0)
    assert (by_prompt["What is 100 / 4?"].quality_device, by_prompt["What is 100 / 4?"].quality_edge) == (1.0, 0.0)
    assert first.response_words_device is None and first.response_words_edge is None
    assert len({d.id for d in dialogues}) == len(dialogues)


def test_mmlu_without_decontamination_keeps_the_row():
    assert len(load_trace("mmlu", FIXTURES, decontaminate=False)) == 9


def test_missing_contaminated_file_keeps_all_rows_with_a_warning(data_copy, caplog):
    (data_copy / "mmlu" / "contaminated_prompts.jsonl").unlink()
    with caplog.at_level("WARNING"):
        assert len(load_trace("mmlu", data_copy)) == 9
    assert "no decontamination" in caplog.text


# --- GSM8K --------------------------------------------------------------------


def test_gsm8k_response_lengths_are_word_counts():
    dialogues = load_trace("gsm8k", FIXTURES)
    assert len(dialogues) == 4  # one of five contaminated
    t = dialogues[0].turns[0]
    assert (t.quality_device, t.quality_edge) == (1.0, 1.0)
    assert t.response_words_device == word_count("He has 3 + 4 = 7 boats.") == 8
    # The strong answer spans three lines; words are counted across them.
    assert t.response_words_edge == 5 + 10 + 4
    assert [d.domain for d in dialogues] == ["gsm8k"] * 4


# --- MT-Bench -------------------------------------------------------------------


def test_mt_bench_turns_scores_and_context():
    dialogues = {d.id: d for d in load_trace("mt-bench", FIXTURES)}
    # 903 is contaminated (turn 2); 904's weak turn-2 score is -1, so only turn 1 stays.
    assert set(dialogues) == {"mt-bench/901", "mt-bench/902", "mt-bench/904", "mt-bench/905"}
    d = dialogues["mt-bench/901"]
    assert d.domain == "writing"
    t1, t2 = d.turns
    assert (t1.quality_device, t1.quality_edge, t2.quality_device, t2.quality_edge) == (7, 9, 6, 9)
    assert t1.context == ()
    # Turn 2 sees turn 1 and the weak (device) model's answer, from the judge prompt.
    assert t2.context == (
        {"role": "user", "content": "Write a two-line poem about the fixture sea."},
        {"role": "assistant", "content": "The sea is grey,\nit moves all day."},
    )
    # Math judgements carry a reference answer first; the model's answer is still found.
    assert dialogues["mt-bench/902"].turns[1].context[1]["content"] == "12 squared is 124."
    assert len(dialogues["mt-bench/904"].turns) == 1
    # No recoverable answer: the context is the user turn alone.
    assert dialogues["mt-bench/905"].turns[1].context == (
        {"role": "user", "content": "Write a Python function that returns 42."},
    )


def test_mt_bench_without_decontamination_keeps_question_903():
    ids = {d.id for d in load_trace("mt-bench", FIXTURES, decontaminate=False)}
    assert "mt-bench/903" in ids


def test_mt_bench_explicit_models(data_copy):
    with pytest.raises(TraceError, match="not present"):
        load_trace("mt-bench", data_copy, weak="no-such-model")
    dialogues = load_trace("mt-bench", data_copy, weak=WEAK, strong=STRONG)
    assert len(dialogues) == 4


# --- errors -----------------------------------------------------------------------


def test_unknown_benchmark():
    with pytest.raises(TraceError, match="unknown benchmark"):
        load_trace("hellaswag", FIXTURES)


def test_missing_data_dir(tmp_path):
    with pytest.raises(TraceError, match="does not exist"):
        load_trace("mmlu", tmp_path / "nope")


def test_missing_subdir(tmp_path):
    with pytest.raises(TraceError, match="mt_bench"):
        load_trace("mt-bench", tmp_path)


def test_missing_files(data_copy):
    (data_copy / "gsm8k" / "gsm8k_responses.csv").unlink()
    with pytest.raises(TraceError, match="gsm8k_responses.csv"):
        load_trace("gsm8k", data_copy)
    (data_copy / "mt_bench" / "judgements.jsonl").unlink()
    with pytest.raises(TraceError, match="judgements.jsonl"):
        load_trace("mt-bench", data_copy)
    for f in (data_copy / "mmlu").glob("mmlu_*.csv"):
        f.unlink()
    with pytest.raises(TraceError, match="no mmlu_"):
        load_trace("mmlu", data_copy)


def test_missing_strong_column(data_copy):
    (data_copy / "mmlu" / "mmlu_toy_geography.csv").write_text(f"prompt,{WEAK}\nq,True\n")
    with pytest.raises(TraceError, match="weak and a strong"):
        load_trace("mmlu", data_copy)


def test_missing_prompt_column(data_copy):
    (data_copy / "mmlu" / "mmlu_toy_geography.csv").write_text(f"question,{WEAK},{STRONG}\nq,True,False\n")
    with pytest.raises(TraceError, match="'prompt'"):
        load_trace("mmlu", data_copy)


def test_ambiguous_model_columns(data_copy):
    (data_copy / "mmlu" / "mmlu_toy_geography.csv").write_text("prompt,model-a,model-b\nq,True,False\n")
    with pytest.raises(TraceError, match="strong"):
        load_trace("mmlu", data_copy)


def test_bad_correctness_value(data_copy):
    (data_copy / "mmlu" / "mmlu_toy_geography.csv").write_text(f"prompt,{WEAK},{STRONG}\nq,True,maybe\n")
    with pytest.raises(TraceError, match="True/False"):
        load_trace("mmlu", data_copy)


def test_malformed_jsonl(data_copy):
    (data_copy / "mt_bench" / "question.jsonl").write_text('{"question_id": 1, "turns": [\n')
    with pytest.raises(TraceError, match="invalid JSON"):
        load_trace("mt-bench", data_copy)


def test_judgement_missing_fields(data_copy):
    (data_copy / "mt_bench" / "judgements.jsonl").write_text('{"question_id": 901, "model": "x"}\n')
    with pytest.raises(TraceError, match="lacks"):
        load_trace("mt-bench", data_copy)


# --- splits and counts --------------------------------------------------------------


def test_split_is_the_documented_hash():
    prompts = [f"prompt number {i}" for i in range(2000)]
    for p in prompts[:50]:
        bucket = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 10_000
        assert split_of(p) == ("val" if bucket < 2000 else "train")
        assert split_of(p) == split_of(p)
    share = sum(split_of(p) == "val" for p in prompts) / len(prompts)
    assert 0.15 < share < 0.25
    assert all(split_of(p, 0.0) == "train" for p in prompts[:20])
    assert all(split_of(p, 1.0) == "val" for p in prompts[:20])
    with pytest.raises(ValueError):
        split_of("x", 1.5)


def test_word_count():
    assert word_count("") == 0
    assert word_count("one two  three\nfour") == 4


# --- the shared data, when this checkout has it ------------------------------------


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared RouteLLM data not found at {SHARED}")
@pytest.mark.parametrize("benchmark", ["mmlu", "gsm8k", "mt-bench"])
def test_shared_data_loads(benchmark):
    dialogues = load_trace(benchmark, SHARED)
    turns = [t for d in dialogues for t in d.turns]
    assert turns
    hi = 10.0 if benchmark == "mt-bench" else 1.0
    for t in turns:
        assert 0.0 <= t.quality_device <= hi and 0.0 <= t.quality_edge <= hi
    # The strong model is better on average in every set.
    assert sum(t.quality_edge for t in turns) > sum(t.quality_device for t in turns)
    if benchmark == "gsm8k":
        assert all(t.response_words_edge is not None for t in turns)
    if benchmark == "mt-bench":
        assert all(len(d.turns) <= 2 for d in dialogues)
        assert any(len(t.context) == 2 for t in turns)
