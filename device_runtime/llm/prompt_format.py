"""Prompt formats: a message list to the tokens that cue the assistant's answer.

Instruct GGUFs carry their own chat template; base models get a plain
``User:``/``Assistant:`` layout.  Formats are registered by name so that the
CLI's choices come from here (:func:`prompt_format_choices`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

from device_runtime.core.registry import Registry
from device_runtime.llm import adapter

if TYPE_CHECKING:  # pragma: no cover
    import llama_cpp


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


PromptFormatFactory = Callable[["llama_cpp.Llama"], PromptFormat]
#: Name -> factory taking the loaded model (a template needs its metadata).
PROMPT_FORMATS: Registry[PromptFormatFactory] = Registry("prompt format", error=ValueError)


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
