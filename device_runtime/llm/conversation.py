"""One conversation on one llama.cpp context, with its KV cache kept resident.

Shared by the device SLM and the edge service's slots.  Each turn formats the
*whole* conversation, tokenizes it and compares the tokens with those already
in the context: the longest common prefix stays in the KV cache and only the
suffix is prefilled.  The answer's tokens are decoded into the same context,
so a follow-up turn on the same model prefills only the new user message and
the template glue around it (ΔC_t = 0 in eq. 1), and a model coming back after
missing turns prefills only those turns (Fig. 2, turn 3).

The counts in :class:`GenerationStats` are read from the context itself
(``n_tokens`` before and after), never assumed.

Prompt formats live in :mod:`.prompt_format` (which also keeps message content
from forging turns, and maps the answer's text back for display), stop strings
in :mod:`.stops`, and every call into llama-cpp-python internals in
:mod:`.adapter`.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from device_runtime.core.messages import CHAT_ROLES, check_message
from device_runtime.llm import adapter
from device_runtime.llm.prompt_format import PromptFormat
from device_runtime.llm.stops import StopFilter

if TYPE_CHECKING:  # pragma: no cover
    import llama_cpp

log = logging.getLogger(__name__)

ROLES = CHAT_ROLES


class ContextOverflowError(ValueError):
    """The formatted conversation does not fit in the model's context window."""


class InvalidMessagesError(ValueError):
    """The message list is malformed (unknown role, non-string content, ...)."""


class ConversationBusyError(RuntimeError):
    """A second generation was started while one is still streaming."""


@dataclass
class GenerationStats:
    """What one turn cost the model that served it.

    ``prompt_tokens`` is the whole formatted conversation (every turn plus the
    template), ``prefill_tokens`` the part of it computed this turn and
    ``cached_tokens`` the part reused from the KV cache:
    ``prompt_tokens == prefill_tokens + cached_tokens``.
    ``ttft_s`` runs from the call to the first sampled token; ``decode_s`` from
    there to the end.
    """

    prompt_tokens: int
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float
    #: "stop" (end of turn or a stop string), "length" (max_tokens or the
    #: context window), or "cancelled".
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Continuation:
    """Where a paused answer stands (finish_reason "paused"): its tokens so
    far, all in the KV cache when it paused, and the state of its text
    filters, which held nothing back then.  :meth:`LlamaConversation.stream`
    with it goes on exactly where the answer stopped: under greedy decoding
    the rest of the answer is the one an unpaused run gives."""

    ids: tuple[int, ...]
    #: The stop filter still strips leading blanks (nothing was emitted yet).
    lstrip: bool
    #: The answer filter is at the start of a line.
    line_start: bool


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    """Check a chat message list; the last message must be the user's."""
    if not messages:
        raise InvalidMessagesError("messages must not be empty")
    out = [
        check_message(m, f"message {i}", roles=ROLES, error=InvalidMessagesError)
        for i, m in enumerate(messages)
    ]
    if out[-1]["role"] != "user":
        raise InvalidMessagesError("the last message must have role 'user'")
    return out


class LlamaConversation:
    """A conversation whose KV cache stays in one ``llama_cpp.Llama`` context.

    Not thread-safe: one stream at a time (a second raises
    :class:`ConversationBusyError`).  The context belongs to this conversation;
    another conversation on the same ``Llama`` would only cost prefix misses,
    never wrong output, because every turn is matched against the real tokens.
    """

    def __init__(self, llama: "llama_cpp.Llama", prompt_format: PromptFormat) -> None:
        self.llama = llama
        self.prompt_format = prompt_format
        self.last_stats: GenerationStats | None = None
        #: After an answer that paused: how to go on with it.
        self.last_continuation: Continuation | None = None
        self._busy = threading.Lock()

    @property
    def n_ctx(self) -> int:
        # llama.cpp may pad the window up (to 256), but llama-cpp-python's
        # token buffer keeps the size that was asked for.
        return min(int(self.llama.n_ctx()), len(self.llama.input_ids))

    @property
    def cached_tokens(self) -> int:
        """Tokens currently held in the KV cache."""
        return int(self.llama.n_tokens)

    def count_tokens(self, messages: Sequence[dict]) -> int:
        """Prompt tokens of ``messages`` in this format (validation included)."""
        return len(self.prompt_format.tokenize(self.llama, validate_messages(messages)))

    def reset(self) -> None:
        """Forget the KV cache; the next turn prefills everything."""
        self.llama.reset()
        adapter.clear_kv(self.llama)

    def stream(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] | None = None,
        cancel: threading.Event | None = None,
        pause: threading.Event | None = None,
        continuation: Continuation | None = None,
    ) -> Iterator[str]:
        """Answer the last user message of ``messages``, yielding text chunks.

        ``pause``: once set, the answer stops between two tokens, after one
        token at least and where its filters hold no text back, with
        finish_reason "paused" and :attr:`last_continuation` set; the same call
        with that ``continuation`` (and the same messages and ``max_tokens``)
        goes on from there.

        Validation and the overflow check happen before the first chunk, so a
        bad request raises on the first ``next()``.  After the iterator is
        exhausted (or closed), :attr:`last_stats` describes the turn.

        If the prompt leaves fewer than ``max_tokens`` free positions in the
        context window, the answer is cut at the window (finish_reason
        "length"); a prompt that fills the window raises
        :class:`ContextOverflowError`.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        return self._stream(messages, max_tokens, (temperature, top_p, seed), stop, cancel, pause, continuation)

    def _stream(self, messages, max_tokens, sampling, stop, cancel, pause, continuation) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise ConversationBusyError("this conversation is already generating")
        try:
            t0 = time.perf_counter()
            self.last_stats = self.last_continuation = None
            done = list(continuation.ids) if continuation is not None else []
            tokens = self._prompt_tokens(messages, extra=len(done)) + done
            budget = min(max_tokens - len(done), self.n_ctx - len(tokens))
            stats = self.last_stats = self._reuse_prefix(tokens)
            if not self._prefill(tokens[stats.cached_tokens:], stats, t0, cancel):
                return
            sampler = adapter.make_sampler(*sampling)
            stops = list(self.prompt_format.stop) + [s for s in (stop or ()) if s]
            resume = continuation or Continuation((), self.prompt_format.lstrip_answer, True)
            text_filter = StopFilter(stops, resume.lstrip)
            answer = self.prompt_format.answer_filter(line_start=resume.line_start)
            state = _Decoding(sampler, text_filter, answer, done, pause)
            yield from self._decode(state, stats, budget, t0, cancel)
        except GeneratorExit:
            # The caller stopped reading: as good as a cancel.
            if self.last_stats is not None:
                self.last_stats.finish_reason = "cancelled"
            raise
        finally:
            self._busy.release()

    def _prompt_tokens(self, messages: list[dict], extra: int = 0) -> list[int]:
        """The whole conversation's tokens; with ``extra`` more (a paused
        answer's), it must leave room for one answer token."""
        tokens = self.prompt_format.tokenize(self.llama, validate_messages(messages))
        n_ctx = self.n_ctx
        if len(tokens) + extra >= n_ctx:
            raise ContextOverflowError(
                f"the conversation is {len(tokens)} tokens but the context window is "
                f"{n_ctx}; start a new conversation or load the model with a larger n_ctx"
            )
        return tokens

    def _reuse_prefix(self, tokens: list[int]) -> GenerationStats:
        """Keep the longest common prefix of ``tokens`` and the context; evict the rest.

        At least one token is always left to evaluate, to get fresh logits.
        """
        llama = self.llama
        reuse = 0
        for a, b in zip(adapter.held_tokens(llama), tokens):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(tokens) - 1)
        if reuse < llama.n_tokens and not adapter.drop_kv_from(llama, reuse):
            reuse = 0  # partial removal unsupported (recurrent models): start over
        if reuse == 0:
            self.reset()
        llama.n_tokens = reuse
        return GenerationStats(
            prompt_tokens=len(tokens), prefill_tokens=0, cached_tokens=reuse,
            output_tokens=0, prefill_s=0.0, decode_s=0.0, ttft_s=0.0,
        )

    def _prefill(
        self, suffix: list[int], stats: GenerationStats, t0: float, cancel: threading.Event | None
    ) -> bool:
        """Evaluate ``suffix`` in batches; False if cancelled before the end.

        A cancel is checked between batches, so a long prompt stops early.
        """
        llama = self.llama
        n_batch = max(1, int(llama.n_batch))
        done = True
        for i in range(0, len(suffix), n_batch):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                done = False
                break
            llama.eval(suffix[i : i + n_batch])
        stats.prefill_tokens = llama.n_tokens - stats.cached_tokens
        stats.prefill_s = time.perf_counter() - t0
        return done

    def _decode(
        self, state: "_Decoding", stats: GenerationStats, budget: int, t0: float, cancel: threading.Event | None,
    ) -> Iterator[str]:
        """Sample up to ``budget`` tokens, yielding the text the stop filter lets through."""
        llama = self.llama
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # After the stops are cut: the format's own view of the answer (the
        # plain format unescapes turn labels, see prompt_format).
        text_filter, answer = state.text_filter, state.answer
        t_first = None
        stats.finish_reason = "length"
        try:
            while stats.output_tokens < budget:
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                if stats.output_tokens and state.may_pause(decoder):
                    # Every token so far is in the context and every character emitted.
                    stats.finish_reason = "paused"
                    self.last_continuation = Continuation(tuple(state.ids), text_filter.lstrip, answer.line_start)
                    break
                token = adapter.sample(state.sampler, llama)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                if adapter.is_end_of_generation(llama, token):
                    stats.finish_reason = "stop"
                    break
                stats.output_tokens += 1
                state.ids.append(token)
                piece = decoder.decode(adapter.token_bytes(llama, token))
                chunk = answer.feed(text_filter.feed(piece))
                # The answer's tokens go into the context, so the next turn
                # finds them there.  The last one (or an EOG token) is not
                # evaluated: the next turn's prefill covers it.
                if stats.output_tokens < budget and not text_filter.stopped:
                    llama.eval([token])
                if chunk:
                    yield chunk
                if text_filter.stopped:
                    stats.finish_reason = "stop"
                    break
            # Bytes still in the decoder are a character cut off by the stop
            # or the length limit: dropped, not emitted as U+FFFD.
            tail = answer.feed(text_filter.flush()) + answer.flush()
            if tail:
                yield tail
        finally:
            if t_first is not None:
                stats.decode_s = time.perf_counter() - t_first


@dataclass
class _Decoding:
    """One answer's decoding state: the sampler, its text filters, the answer's
    tokens so far (a continuation's included) and the pause request."""

    sampler: Any
    text_filter: StopFilter
    answer: Any  # prompt_format.AnswerFilter
    ids: list[int]
    pause: threading.Event | None

    def may_pause(self, decoder: codecs.IncrementalDecoder) -> bool:
        """A pause was asked for, and nothing is held back: no stop-string
        prefix, no half line of the answer filter, no partial UTF-8 character."""
        return (
            self.pause is not None and self.pause.is_set() and not self.text_filter.pending
            and not self.answer.pending and not decoder.getstate()[0]
        )
