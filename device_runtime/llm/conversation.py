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

``llama_cpp`` is imported only inside the functions that need it.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from device_runtime.messages import CHAT_ROLES, check_message

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


# --- prompt formats -----------------------------------------------------------


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


class PromptFormat(ABC):
    """Turns a message list into prompt tokens that end with the answer's cue."""

    name: str = ""
    #: Stop strings: the answer ends before the first one and excludes it.
    stop: tuple[str, ...] = ()
    #: Strip whitespace at the start of an answer (a plain "Assistant:" cue
    #: makes the model begin with a space).
    lstrip_answer: bool = False

    @abstractmethod
    def render(self, messages: Sequence[dict]) -> str:
        """The prompt text, ending where the assistant's answer begins."""

    @abstractmethod
    def tokenize(self, llama: "llama_cpp.Llama", messages: Sequence[dict]) -> list[int]:
        """The prompt tokens."""


class ChatTemplateFormat(PromptFormat):
    """The GGUF's own ``tokenizer.chat_template`` (Jinja2), e.g. SmolLM2-Instruct."""

    name = "chat-template"

    def __init__(self, llama: "llama_cpp.Llama") -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("this GGUF has no tokenizer.chat_template; use the 'plain' format")
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        eos = llama._model.token_get_text(eos_id) if eos_id != -1 else ""
        bos = llama._model.token_get_text(bos_id) if bos_id != -1 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self.stop = (eos,) if eos else ()

    def render(self, messages: Sequence[dict]) -> str:
        return self._formatter(messages=list(messages)).prompt

    def tokenize(self, llama: "llama_cpp.Llama", messages: Sequence[dict]) -> list[int]:
        # The template writes its own special tokens (BOS included if it wants
        # one), as llama-cpp-python's chat handlers do.
        return llama.tokenize(self.render(messages).encode("utf-8"), add_bos=False, special=True)


class PlainFormat(PromptFormat):
    """``User: ...\\nAssistant: ...`` turns, for base models without a template.

    Special tokens in user text are not parsed (``special=False``), so a user
    cannot inject control tokens.  Generation stops at the next ``\\nUser:``.
    """

    name = "plain"
    stop = ("\nUser:",)
    lstrip_answer = True
    _LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}

    def render(self, messages: Sequence[dict]) -> str:
        parts = [f"{self._LABELS[m['role']]}: {m['content'].strip()}\n" for m in messages]
        return "".join(parts) + "Assistant:"

    def tokenize(self, llama: "llama_cpp.Llama", messages: Sequence[dict]) -> list[int]:
        add_bos = llama.token_bos() != -1
        return llama.tokenize(self.render(messages).encode("utf-8"), add_bos=add_bos, special=False)


PromptFormatFactory = Callable[["llama_cpp.Llama"], PromptFormat]
PROMPT_FORMATS: dict[str, PromptFormatFactory] = {
    "chat-template": ChatTemplateFormat,
    "plain": lambda llama: PlainFormat(),
}


def available_prompt_formats() -> list[str]:
    return ["auto", *sorted(PROMPT_FORMATS)]


def resolve_prompt_format(llama: "llama_cpp.Llama", name: str = "auto") -> PromptFormat:
    """``auto``: the GGUF's chat template if it has one, else ``plain``."""
    if name == "auto":
        name = "chat-template" if llama.metadata.get("tokenizer.chat_template") else "plain"
    try:
        factory = PROMPT_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown prompt format {name!r}; expected one of {available_prompt_formats()}"
        ) from None
    return factory(llama)


# --- model loading --------------------------------------------------------------


def load_llama(
    model_path: str | Path,
    *,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> "llama_cpp.Llama":
    """Load a GGUF for single-sequence chat with prefix reuse."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF not found: {path}")
    if n_ctx < 16:
        raise ValueError(f"n_ctx must be >= 16, got {n_ctx}")
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        seed=seed,
        verbose=verbose,
        # Sliding-window models (Gemma 3): a full-size SWA cache keeps every
        # position of a prefix we reuse, not only the last window.
        swa_full=True,
    )


def _token_bytes(llama: "llama_cpp.Llama", token: int) -> bytes:
    """The raw piece of one token (with its leading space, if any)."""
    import llama_cpp

    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buf, size, 0, False)
    if n < 0:  # piece longer than the buffer: llama.cpp reports the size needed
        size = -n
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buf, size, 0, False)
    return buf.raw[: max(n, 0)]


def _make_sampler(temperature: float, top_p: float, seed: int):
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    if temperature <= 0.0:
        sampler.add_greedy()
    else:
        sampler.add_top_p(top_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(seed)
    return sampler


class _StopFilter:
    """Holds back text that could be the start of a stop string.

    Stop strings are matched in the text as generated; ``lstrip`` strips the
    answer's leading whitespace from what is emitted only (a stop string that
    starts with a newline, such as the plain format's ``"\nUser:"``, must
    still match at the very start of an answer).
    """

    def __init__(self, stop: Sequence[str], lstrip: bool) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""
        self.lstrip = lstrip
        self.stopped = False

    def _emit(self, out: str) -> str:
        if self.lstrip:
            out = out.lstrip()
            if not out:
                return ""
            self.lstrip = False
        return out

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return self._emit(out)
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return self._emit(out)

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return self._emit(out)


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
        self.llama._ctx.kv_cache_clear()

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
    ) -> Iterator[str]:
        """Answer the last user message of ``messages``, yielding text chunks.

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
        return self._stream(messages, max_tokens, temperature, top_p, seed, stop, cancel)

    def _stream(self, messages, max_tokens, temperature, top_p, seed, stop, cancel) -> Iterator[str]:
        import llama_cpp

        if not self._busy.acquire(blocking=False):
            raise ConversationBusyError("this conversation is already generating")
        llama = self.llama
        t_first = None
        try:
            t0 = time.perf_counter()
            self.last_stats = None
            tokens = self.prompt_format.tokenize(llama, validate_messages(messages))
            n_ctx = self.n_ctx
            if len(tokens) >= n_ctx:
                raise ContextOverflowError(
                    f"the conversation is {len(tokens)} tokens but the context window is "
                    f"{n_ctx}; start a new conversation or load the model with a larger n_ctx"
                )
            budget = min(max_tokens, n_ctx - len(tokens))

            # Longest common prefix with what the context already holds.  At
            # least one token is always evaluated, to get fresh logits.
            held = llama._input_ids
            reuse = 0
            for a, b in zip(held, tokens):
                if a != b:
                    break
                reuse += 1
            reuse = min(reuse, len(tokens) - 1)
            if reuse < llama.n_tokens and not llama._ctx.kv_cache_seq_rm(-1, reuse, -1):
                reuse = 0  # partial removal unsupported (recurrent models): start over
            if reuse == 0:
                self.reset()
            llama.n_tokens = reuse
            stats = GenerationStats(
                prompt_tokens=len(tokens), prefill_tokens=0, cached_tokens=reuse,
                output_tokens=0, prefill_s=0.0, decode_s=0.0, ttft_s=0.0,
            )
            self.last_stats = stats

            suffix = tokens[reuse:]
            n_batch = max(1, int(llama.n_batch))
            for i in range(0, len(suffix), n_batch):
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    stats.prefill_tokens = llama.n_tokens - reuse
                    stats.prefill_s = time.perf_counter() - t0
                    return
                llama.eval(suffix[i : i + n_batch])
            t_prefilled = time.perf_counter()
            stats.prefill_tokens = llama.n_tokens - reuse
            stats.prefill_s = t_prefilled - t0

            sampler = _make_sampler(temperature, top_p, seed)
            vocab = llama._model.vocab
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = list(self.prompt_format.stop) + [s for s in (stop or ()) if s]
            text_filter = _StopFilter(stops, self.prompt_format.lstrip_answer)
            stats.finish_reason = "length"
            while stats.output_tokens < budget:
                if cancel is not None and cancel.is_set():
                    stats.finish_reason = "cancelled"
                    break
                token = sampler.sample(llama._ctx, -1)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.ttft_s = t_first - t0
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.finish_reason = "stop"
                    break
                stats.output_tokens += 1
                chunk = text_filter.feed(decoder.decode(_token_bytes(llama, token)))
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
            tail = text_filter.flush()
            if tail:
                yield tail
        except GeneratorExit:
            # The caller stopped reading: as good as a cancel.
            if self.last_stats is not None:
                self.last_stats.finish_reason = "cancelled"
            raise
        finally:
            if self.last_stats is not None and t_first is not None:
                self.last_stats.decode_s = time.perf_counter() - t_first
            self._busy.release()
