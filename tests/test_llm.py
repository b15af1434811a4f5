"""The llm layer: stop filtering, prompt formats, and the resident-KV conversation on
the real device SLM (SmolLM2-135M-Instruct GGUF)."""

from __future__ import annotations

import threading

import pytest

from device_runtime.llm import adapter
from device_runtime.llm.adapter import load_llama
from device_runtime.llm.conversation import (
    ContextOverflowError,
    ConversationBusyError,
    InvalidMessagesError,
    LlamaConversation,
)
from device_runtime.llm.models import ModelNotFoundError, default_slm_path, resolve_model_path
from device_runtime.llm.prompt_format import PlainFormat, prompt_format_choices, resolve_prompt_format
from device_runtime.llm.stops import StopFilter

MAX_TOKENS = 12


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def llama():
    return load_llama(default_slm_path(), n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def cold_llama():
    return load_llama(default_slm_path(), n_ctx=1024, n_threads=1)


def run(conv, messages, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    text = "".join(conv.stream(messages, **kw))
    return text, conv.last_stats


# --- pure parts ----------------------------------------------------------------


def test_stop_filter_holds_back_partial_stop_and_cuts_at_it():
    f = StopFilter(["\nUser:"], lstrip=True)
    assert f.feed("  Hello") == "Hello"
    assert f.feed(" there\nUs") == " there"  # "\nUs" might start a stop string
    assert f.feed("er: next") == ""
    assert f.stopped and f.flush() == ""


def test_stop_filter_matches_a_stop_at_the_very_start_of_an_answer():
    """The plain format strips an answer's leading whitespace; an answer that
    opens with a made-up user turn must still stop there, not leak it."""
    f = StopFilter(["\nUser:"], lstrip=True)
    assert f.feed("\nUser: what is 2+2?\nAssistant: 4") == ""
    assert f.stopped and f.flush() == ""
    g = StopFilter(["\nUser:"], lstrip=True)
    assert g.feed("\n") == "" and g.feed("\n Hi") == "Hi"  # leading blanks still stripped
    assert g.feed("\nUser:") == "" and g.stopped


def test_stop_filter_releases_held_text_that_was_not_a_stop():
    f = StopFilter(["\nUser:"], lstrip=False)
    assert f.feed("a\nU") == "a"
    assert f.feed("niverse") == "\nUniverse"
    assert f.flush() == ""


def test_plain_format_renders_turns_and_cue():
    text = PlainFormat().render([user("Hi"), assistant(" Hello "), user("Bye")])
    assert text == "User: Hi\nAssistant: Hello\nUser: Bye\nAssistant:"


def test_prompt_format_choices_are_auto_then_the_registered_formats():
    assert prompt_format_choices() == ["auto", "chat-template", "plain"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(tmp_path / "nope.gguf", default_slm_path)
    with pytest.raises(FileNotFoundError):
        load_llama(tmp_path / "nope.gguf")


# --- real model ------------------------------------------------------------------


@pytest.mark.slow
def test_auto_format_uses_the_gguf_chat_template(llama):
    fmt = resolve_prompt_format(llama, "auto")
    assert fmt.name == "chat-template"
    assert "<|im_start|>assistant" in fmt.render([user("hi")])
    expected = r"unknown prompt format 'nope'; expected one of \['auto', 'chat-template', 'plain'\]"
    with pytest.raises(ValueError, match=expected):
        resolve_prompt_format(llama, "nope")


@pytest.mark.slow
def test_follow_up_prefills_only_new_tokens_and_matches_a_cold_run(llama, cold_llama):
    fmt = resolve_prompt_format(llama)
    conv = LlamaConversation(llama, fmt)
    conv.reset()
    msgs = [user("Name three colours.")]
    first, s1 = run(conv, msgs)
    assert s1.cached_tokens == 0 and s1.prefill_tokens == s1.prompt_tokens
    assert s1.output_tokens > 0 and first

    msgs = msgs + [assistant(first), user("And three animals?")]
    second, s2 = run(conv, msgs)
    assert s2.prompt_tokens == s2.prefill_tokens + s2.cached_tokens
    # The first prompt and (all but the last of) the answer stay in the KV cache.
    assert s2.cached_tokens >= s1.prompt_tokens + s1.output_tokens - 1 - 2
    new_only = s2.prompt_tokens - s1.prompt_tokens
    assert 0 < s2.prefill_tokens <= new_only

    cold = LlamaConversation(cold_llama, resolve_prompt_format(cold_llama))
    cold.reset()
    cold_text, s3 = run(cold, msgs)
    assert s3.cached_tokens == 0 and s3.prefill_tokens == s2.prompt_tokens
    assert cold_text == second  # greedy: the reused cache changes nothing


@pytest.mark.slow
def test_coming_back_after_missed_turns_prefills_only_those(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    conv.reset()
    msgs = [user("Say hello.")]
    a1, s1 = run(conv, msgs)
    # Two turns answered elsewhere (e.g. on the edge), then back here.
    missed = [assistant(a1), user("Count to three."), assistant("One, two, three."),
              user("Now to five."), assistant("One, two, three, four, five.")]
    msgs = msgs + missed + [user("Thanks!")]
    _, s2 = run(conv, msgs)
    assert s2.cached_tokens >= s1.prompt_tokens
    assert s2.prefill_tokens == s2.prompt_tokens - s2.cached_tokens
    assert s2.prefill_tokens <= s2.prompt_tokens - s1.prompt_tokens


@pytest.mark.slow
def test_repeating_the_same_prompt_recomputes_one_token_only(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    conv.reset()
    msgs = [user("What is two plus two?")]
    a, s1 = run(conv, msgs, max_tokens=1)
    b, s2 = run(conv, msgs, max_tokens=1)
    assert a == b
    assert s2.cached_tokens == s1.prompt_tokens - 1 and s2.prefill_tokens == 1


@pytest.mark.slow
def test_cancel_stops_between_tokens(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    cancel = threading.Event()
    chunks = []
    for chunk in conv.stream([user("Write a long story about a dragon.")], max_tokens=64, cancel=cancel):
        chunks.append(chunk)
        cancel.set()
    stats = conv.last_stats
    assert stats.finish_reason == "cancelled"
    assert 1 <= stats.output_tokens < 64
    # Cancelled before it starts: nothing is generated.
    already = threading.Event()
    already.set()
    assert list(conv.stream([user("Hi")], max_tokens=8, cancel=already)) == []
    assert conv.last_stats.finish_reason == "cancelled" and conv.last_stats.output_tokens == 0


def _paused_at(conv, messages, after_chunks, **kw):
    """The answer paused after ``after_chunks`` chunks, then continued: (text, stats of each part)."""
    pause = threading.Event()
    chunks = []
    for chunk in conv.stream(messages, pause=pause, **kw):
        chunks.append(chunk)
        if len(chunks) == after_chunks:
            pause.set()
    first = conv.last_stats
    continuation = conv.last_continuation
    assert first.finish_reason == "paused" and continuation is not None
    assert len(continuation.ids) == first.output_tokens
    rest = "".join(conv.stream(messages, continuation=continuation, **kw))
    return "".join(chunks) + rest, first, conv.last_stats


@pytest.mark.parametrize("fmt", ["chat-template", "plain"])
def test_a_paused_answer_goes_on_as_if_never_paused(llama, cold_llama, fmt):
    """Greedy: pausing between tokens and continuing (its KV kept, or dropped
    and rebuilt from the tokens) gives the answer of a run never paused."""
    messages = [user("Name three fruits.")]  # lines: the plain format holds line starts back
    kw = {"max_tokens": 40}
    whole, whole_stats = run(LlamaConversation(cold_llama, resolve_prompt_format(cold_llama, fmt)), messages, **kw)
    conv = LlamaConversation(llama, resolve_prompt_format(llama, fmt))
    text, first, rest = _paused_at(conv, messages, 5, **kw)
    assert text == whole
    assert first.output_tokens + rest.output_tokens == whole_stats.output_tokens
    assert rest.prefill_tokens == 1  # only the last token, for fresh logits
    assert rest.finish_reason == whole_stats.finish_reason
    # The KV lost in between (another session took the context): rebuilt from the tokens.
    pause = threading.Event()
    it = conv.stream(messages, pause=pause, **kw)
    head = next(it)
    pause.set()
    head += "".join(it)
    conv.reset()
    tail = "".join(conv.stream(messages, continuation=conv.last_continuation, **kw))
    assert head + tail == whole and conv.last_stats.cached_tokens == 0


def test_a_pause_waits_for_held_back_text_and_a_continuation_checks_the_window(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama, "plain"))
    pause = threading.Event()
    pause.set()  # asked for before the first token: one token comes first
    text = "".join(conv.stream([user("Say hello.")], max_tokens=8, pause=pause))
    assert conv.last_stats.finish_reason == "paused" and conv.last_stats.output_tokens >= 1
    assert text and conv.last_continuation.lstrip is False
    long = conv.last_continuation.__class__(tuple([1] * 2000), False, False)
    with pytest.raises(ContextOverflowError):
        next(conv.stream([user("Say hello.")], max_tokens=8, continuation=long))


@pytest.mark.slow
def test_closing_the_stream_early_counts_as_cancelled(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    it = conv.stream([user("Tell me about the sea.")], max_tokens=32)
    next(it)
    it.close()
    assert conv.last_stats.finish_reason == "cancelled"
    # The conversation is free again.
    assert run(conv, [user("Hi")], max_tokens=2)[1].output_tokens >= 1


@pytest.mark.slow
def test_a_second_concurrent_stream_is_refused(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    it = conv.stream([user("Tell me a joke.")], max_tokens=16)
    next(it)
    with pytest.raises(ConversationBusyError):
        next(conv.stream([user("Hi")], max_tokens=2))
    it.close()


@pytest.mark.slow
def test_overflow_is_a_clear_error_and_the_window_caps_the_answer():
    small = load_llama(default_slm_path(), n_ctx=64, n_threads=1)
    conv = LlamaConversation(small, resolve_prompt_format(small))
    with pytest.raises(ContextOverflowError, match="context window is 64"):
        next(conv.stream([user("word " * 200)], max_tokens=4))
    # A prompt that fits but leaves less room than max_tokens stops at the window.
    prompt = [user("Tell me a long story " + "please " * 3)]
    n = conv.count_tokens(prompt)
    assert n < 64
    _, stats = run(conv, prompt, max_tokens=500)
    assert stats.output_tokens <= 64 - n
    small.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "must not be empty"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([user("a"), assistant("b")], "last message"),
        (["hello"], "not an object"),
    ],
)
def test_bad_messages_are_rejected(llama, messages, match):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    with pytest.raises(InvalidMessagesError, match=match):
        next(conv.stream(messages, max_tokens=2))


@pytest.mark.slow
def test_bad_parameters_are_rejected(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    with pytest.raises(ValueError, match="max_tokens"):
        conv.stream([user("hi")], max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        conv.stream([user("hi")], max_tokens=1, top_p=0.0)


@pytest.mark.slow
def test_plain_format_stops_at_the_next_user_turn(llama):
    conv = LlamaConversation(llama, resolve_prompt_format(llama, "plain"))
    conv.reset()
    text, stats = run(conv, [user("Hi"), assistant("Hello!"), user("How are you?")], max_tokens=48)
    assert "\nUser:" not in text
    assert stats.prompt_tokens == stats.prefill_tokens


@pytest.mark.slow
def test_base_model_plain_format_reuses_a_prefix_longer_than_the_sliding_window():
    """Gemma 3 (the edge model) attends locally over 512 tokens; swa_full keeps the
    whole prefix reusable, and the reused cache gives the cold run's output."""
    from edge_service.models import default_edge_model_path

    path = default_edge_model_path()
    warm_llama = load_llama(path, n_ctx=1024, n_threads=1)
    fmt = resolve_prompt_format(warm_llama)
    assert fmt.name == "plain"  # a base model: no chat template
    warm = LlamaConversation(warm_llama, fmt)
    facts = " ".join(f"Box {i} holds {i * 3} marbles." for i in range(70))
    msgs = [user(facts + " How many marbles are in box 2?")]
    a1, s1 = run(warm, msgs, max_tokens=8)
    assert s1.prompt_tokens > 600
    msgs = msgs + [assistant(a1), user("And in box 5?")]
    a2, s2 = run(warm, msgs, max_tokens=8)
    assert s2.cached_tokens >= s1.prompt_tokens and s2.prefill_tokens < 30
    warm_llama.close()
    cold_llama = load_llama(path, n_ctx=1024, n_threads=1)
    a3, s3 = run(LlamaConversation(cold_llama, fmt), msgs, max_tokens=8)
    assert s3.cached_tokens == 0 and a3 == a2
    cold_llama.close()


@pytest.mark.slow
def test_a_character_cut_by_the_length_limit_is_dropped_not_replaced(llama, monkeypatch):
    """The last token may end inside a multi-byte character: its bytes are
    dropped, no U+FFFD reaches the answer (or the transcript)."""
    # A token whose bytes are only the first part of a character.
    vocab_size = llama.n_vocab()
    partial = next(t for t in range(vocab_size)
                   if (b := adapter.token_bytes(llama, t)) and b[-1] >= 0xC0 and len(b) <= 3)

    class Scripted:  # fault injection: the sampler picks the tokens
        def sample(self, ctx, idx):
            return partial

    monkeypatch.setattr(adapter, "make_sampler", lambda *a: Scripted())
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    text, stats = run(conv, [user("Say something.")], max_tokens=1)
    assert stats.finish_reason == "length" and "\ufffd" not in text
