r"""Prompt formats: a message list to the tokens that cue the assistant's answer.

Instruct GGUFs carry their own chat template; base models get a plain
``User:``/``Assistant:`` layout.  Formats are registered by name so that the
CLI's choices come from here (:func:`prompt_format_choices`).

No role forging.  Message content comes from users, and on the edge from any
device, so no content may start a turn of its own.  The device and the edge
both format prompts here, so both get the same guarantee.

* **Chat templates** write turns with control tokens (``<|im_start|>``,
  ``<start_of_turn>``...).  Only the template's own text is tokenized with
  special-token parsing on: each message's content is swapped for a
  placeholder before the template is rendered, the control tokens are located
  in the template's text alone, and the content goes back in as plain text
  (``special=False``), so ``<|im_end|>`` typed by a user stays seven ordinary
  tokens.  For content without control-token text the result is exactly the
  tokens of the whole rendered prompt, so KV prefix reuse and outputs are
  unchanged.
* **Plain** turns are lines that start with ``User:``, ``Assistant:`` or
  ``System:``, and generation stops at ``"\nUser:"``, so a label at the start
  of a line inside content would forge a turn.  :func:`escape` puts a
  backslash before such a label (and one more before one already escaped:
  ``\User:`` becomes ``\\User:``), which :func:`unescape` takes off again: the
  escape is reversible for any text.  Labels are matched case-insensitively,
  after any blanks, with blanks allowed before the colon, and at every line
  start Python's ``str.splitlines`` knows.  A backslash rather than an invisible
  character: it survives every text pipeline and a reader can see it.  The
  model sees escaped labels in its prompt and may write one, so answers are
  unescaped as they stream (:class:`Unescaper`); that also makes the next
  turn's escaped transcript tokenize back to the tokens the model generated.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

from device_runtime.core.registry import Registry
from device_runtime.llm import adapter

if TYPE_CHECKING:  # pragma: no cover
    import llama_cpp


#: Role -> the label the plain format writes at the start of its turn.
PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}

# Characters after which ``str.splitlines`` starts a new line.
_BREAK = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_START = f"(?:^|(?<=[{_BREAK}]))"
_BLANK = rf"[^\S{_BREAK}]"  # whitespace that does not end a line
_LABEL = "(?:" + "|".join(PLAIN_LABELS.values()) + ")"
_TURN = rf"(?={_LABEL}{_BLANK}*:)"
# A line that starts (after blanks) with backslashes, possibly none, then a label.
_ESCAPABLE = re.compile(rf"{_LINE_START}({_BLANK}*)(\\*){_TURN}", re.IGNORECASE)
# The same with at least one backslash: what escape() wrote.
_ESCAPED = re.compile(rf"{_LINE_START}({_BLANK}*)\\(\\*){_TURN}", re.IGNORECASE)
# A line start that may still turn into an escaped label as more text arrives.
_PREFIXES = "|".join(
    re.escape(label[:k]) for label in PLAIN_LABELS.values() for k in range(len(label))
)
_PARTIAL = re.compile(
    rf"{_BLANK}*(?:\\+(?:{_PREFIXES}|{_LABEL}{_BLANK}*))?", re.IGNORECASE
)
_LINE_END = re.compile(f"[{_BREAK}]")


def escape(text: str) -> str:
    """``text`` with every line that starts with a turn label (after blanks and
    backslashes) given one more backslash: no line of it can start a plain turn."""
    return _ESCAPABLE.sub(lambda m: m[1] + m[2] + "\\", text)


def unescape(text: str) -> str:
    """The inverse of :func:`escape`: ``unescape(escape(t)) == t`` for any ``t``."""
    return _ESCAPED.sub(lambda m: m[1] + m[2], text)


class AnswerFilter:
    """Maps an answer's streamed text to what the caller sees; here unchanged."""

    #: Text held back until more arrives (none here).
    pending = ""
    #: At the start of a line (where the plain format's labels are escaped).
    line_start = True

    def feed(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


class Unescaper(AnswerFilter):
    """:func:`unescape` on streamed text: ``"".join(feed(c) for c in chunks) +
    flush() == unescape("".join(chunks))`` however the text is chunked.

    The start of a line is held back while it could still become an escaped
    label (blanks, backslashes, part of a label), never longer than that line.
    """

    def __init__(self, line_start: bool = True) -> None:
        self.pending = ""
        self.line_start = line_start

    def feed(self, text: str) -> str:
        self.pending += text
        out: list[str] = []
        while self.pending:
            if self.line_start:
                m = _ESCAPED.match(self.pending)
                if m is not None:
                    out.append(m[1] + m[2])
                    self.pending = self.pending[m.end():]
                elif _PARTIAL.fullmatch(self.pending):
                    break  # undecided until more text arrives
                self.line_start = False
            end = _LINE_END.search(self.pending)
            cut = len(self.pending) if end is None else end.end()
            out.append(self.pending[:cut])
            self.pending = self.pending[cut:]
            self.line_start = end is not None
        return "".join(out)

    def flush(self) -> str:
        """The held-back start of the last line: it never became an escaped label."""
        out, self.pending = self.pending, ""
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
        """The prompt tokens; no message's content can produce a turn of its own."""

    def answer_filter(self, line_start: bool = True) -> AnswerFilter:
        """A new filter for one answer's text (after its stop strings are cut);
        ``line_start``: whether the text goes on at the start of a line (a
        paused answer's does not, unless it paused after a line end)."""
        return AnswerFilter()


PromptFormatFactory = Callable[["llama_cpp.Llama"], PromptFormat]
#: Name -> factory taking the loaded model (a template needs its metadata).
PROMPT_FORMATS: Registry[PromptFormatFactory] = Registry("prompt format", error=ValueError)

# Stands for message i while the template is rendered: private-use characters,
# which no template writes.  Content never enters the rendered text, so no
# content can fake a placeholder either.
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000([0-9]+)\ue001")


def _text_tokens(llama: "llama_cpp.Llama", text: str) -> list[int]:
    """Tokens of ``text`` with special-token parsing off (no BOS)."""
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []


def _split_controls(llama: "llama_cpp.Llama", text: str) -> list[str | int]:
    """Template text split into plain text and the control tokens it writes.

    llama.cpp itself finds the control tokens (``special=True``); their text is
    then cut out of ``text``, leaving the plain pieces to be tokenized together
    with the content next to them, as llama.cpp would tokenize the whole prompt.
    """
    ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    controls = [t for t in ids if adapter.is_control_token(llama, t)]
    if not controls:
        return [text]
    by_text = {adapter.token_text(llama, t): t for t in controls}
    pattern = "|".join(re.escape(s) for s in sorted(by_text, key=len, reverse=True))
    parts = re.split(f"({pattern})", text)
    out: list[str | int] = [by_text[p] if k % 2 else p for k, p in enumerate(parts) if k % 2 or p]
    if sum(isinstance(p, int) for p in out) != len(controls):
        # Fail closed: a vocabulary whose control-token text cannot be found.
        raise ValueError(f"cannot locate the control tokens of the template text {text!r}")
    return out


@PROMPT_FORMATS.register("chat-template")
class ChatTemplateFormat(PromptFormat):
    """The GGUF's own ``tokenizer.chat_template`` (Jinja2), e.g. SmolLM2-Instruct."""

    name = "chat-template"

    def __init__(self, llama: "llama_cpp.Llama") -> None:
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("this GGUF has no tokenizer.chat_template; use the 'plain' format")
        eos = adapter.token_text(llama, llama.token_eos())
        bos = adapter.token_text(llama, llama.token_bos())
        self._formatter = adapter.chat_formatter(template, eos, bos)
        self.stop = (eos,) if eos else ()
        self._trims = self._template_trims_content()
        self.tokenize(llama, [{"role": "user", "content": "hi"}])  # fail at load, not mid-chat

    def _template_trims_content(self) -> bool:
        """Whether the template strips content (``| trim``): a placeholder has no
        blanks to strip, so the content is stripped here instead."""
        probe = _PLACEHOLDER.format(0)
        try:
            text = self.render([{"role": "user", "content": f" {probe} "}])
        except Exception:  # noqa: BLE001 - a template with its own rules; assume no trim
            return False
        return probe in text and f" {probe} " not in text

    def render(self, messages: Sequence[dict]) -> str:
        return self._formatter(messages=list(messages)).prompt

    def tokenize(self, llama: "llama_cpp.Llama", messages: Sequence[dict]) -> list[int]:
        # The template writes its own special tokens (BOS included if it wants
        # one); content is only ever plain text, see the module docstring.
        contents = [m["content"].strip() if self._trims else m["content"] for m in messages]
        masked = [{"role": m["role"], "content": _PLACEHOLDER.format(i)}
                  for i, m in enumerate(messages)]
        pieces = _PLACEHOLDER_RE.split(self.render(masked))
        tokens: list[int] = []
        text: list[str] = []  # plain text since the last control token
        for k, piece in enumerate(pieces):
            if k % 2:
                text.append(contents[int(piece)])
                continue
            for part in _split_controls(llama, piece):
                if isinstance(part, str):
                    text.append(part)
                else:
                    tokens += _text_tokens(llama, "".join(text)) + [part]
                    text = []
        return tokens + _text_tokens(llama, "".join(text))


class PlainFormat(PromptFormat):
    """``User: ...\\nAssistant: ...`` turns, for base models without a template.

    Special tokens in user text are not parsed (``special=False``), and turn
    labels at line starts inside content are escaped (:func:`escape`), so no
    content can start a turn.  Generation stops at the next ``\\nUser:``.
    """

    name = "plain"
    stop = ("\nUser:",)
    lstrip_answer = True

    def render(self, messages: Sequence[dict]) -> str:
        parts = [f"{PLAIN_LABELS[m['role']]}: {escape(m['content'].strip())}\n" for m in messages]
        return "".join(parts) + "Assistant:"

    def tokenize(self, llama: "llama_cpp.Llama", messages: Sequence[dict]) -> list[int]:
        add_bos = llama.token_bos() != -1
        return llama.tokenize(self.render(messages).encode("utf-8"), add_bos=add_bos, special=False)

    def answer_filter(self, line_start: bool = True) -> AnswerFilter:
        return Unescaper(line_start)


@PROMPT_FORMATS.register("plain")
def _plain_format(llama: "llama_cpp.Llama") -> PlainFormat:
    """The plain layout needs nothing from the model."""
    return PlainFormat()


def prompt_format_choices() -> list[str]:
    """Every valid format name, ``auto`` first: the CLI's ``choices``."""
    return ["auto", *PROMPT_FORMATS.names()]


def resolve_prompt_format(llama: "llama_cpp.Llama", name: str = "auto") -> PromptFormat:
    """``auto``: the GGUF's chat template if it has one, else ``plain``."""
    if name == "auto":
        name = "chat-template" if llama.metadata.get("tokenizer.chat_template") else "plain"
    if name not in PROMPT_FORMATS:
        # Not the registry's own message: "auto" is a valid choice too.
        raise ValueError(
            f"unknown prompt format {name!r}; expected one of {prompt_format_choices()}"
        )
    return PROMPT_FORMATS.create(name, llama)
