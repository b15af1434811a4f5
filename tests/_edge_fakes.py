"""Fault injection for the edge service tests: a backend whose slots block or fail on demand.

Only for faults and load (slots all busy, deadlines, internal errors, a
flood no client reads, queues and quotas); where the content of an answer
matters the edge tests run the real GGUF model.
"""

from __future__ import annotations

import threading

from device_runtime.llm.conversation import GenerationStats
from edge_service.backends.base import Backend, Slot


class GatedSlot(Slot):
    """Yields one chunk, then waits for ``gate`` (or cancel), then finishes or raises ``fail``."""

    def __init__(self, backend: "FaultBackend") -> None:
        self.backend = backend
        self.last_stats = None

    def stream(self, messages, params, cancel, kv_owner=None):
        self.last_stats = None
        self.backend.started.set()
        yield "chunk"
        while not self.backend.gate.is_set() and not cancel.is_set():
            cancel.wait(0.01)
        if self.backend.fail is not None:
            raise self.backend.fail
        self.last_stats = GenerationStats(
            prompt_tokens=len(messages), prefill_tokens=len(messages), cached_tokens=0,
            output_tokens=1, prefill_s=0.0, decode_s=0.0, ttft_s=0.0,
            finish_reason="cancelled" if cancel.is_set() else "stop",
        )


class FaultBackend(Backend):
    name = "fault"

    def __init__(self, *, fail: BaseException | None = None, gate_open: bool = False) -> None:
        self.gate = threading.Event()
        if gate_open:
            self.gate.set()
        self.started = threading.Event()
        self.fail = fail

    model_name = "fault"  # type: ignore[assignment]
    prompt_format = "plain"  # type: ignore[assignment]
    n_ctx = 64  # type: ignore[assignment]

    def kv_bytes_per_slot(self):
        return None

    def new_slot(self):
        return GatedSlot(self)


class ScriptedSlot(Slot):
    """Does what the last message says, so that one server can hold, flood
    and answer in one test:

    - ``hold``: one chunk, then wait for the backend's gate (or cancel);
    - ``flood``: 16 KiB chunks until cancelled (a stream no client can keep up with);
    - ``tokens N``: N one-token chunks, cut at ``max_tokens`` (finish "length");
    - anything else: one chunk, ``ok``.

    A token is a whitespace-separated word: ``count_tokens`` and
    ``prompt_tokens`` count the words of every message.
    """

    FLOOD_CHUNK = "x" * 16384

    def __init__(self, backend: "ScriptedBackend") -> None:
        self.backend = backend
        self.last_stats = None

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) for m in messages)

    def stream(self, messages, params, cancel, kv_owner=None):
        self.last_stats = None
        self.backend.started.set()
        command = messages[-1]["content"].split()
        n = 0
        if command[:1] == ["flood"]:
            while not cancel.is_set():
                n += 1
                yield self.FLOOD_CHUNK
        elif command[:1] == ["tokens"]:
            for _ in range(min(int(command[1]), params.max_tokens)):
                n += 1
                yield "t "
        else:
            n += 1
            yield "chunk" if command[:1] == ["hold"] else "ok"
            while command[:1] == ["hold"] and not self.backend.gate.is_set() and not cancel.is_set():
                cancel.wait(0.01)
        reason = "cancelled" if cancel.is_set() else ("length" if n >= params.max_tokens else "stop")
        prompt = self.count_tokens(messages)
        self.last_stats = GenerationStats(
            prompt_tokens=prompt, prefill_tokens=prompt, cached_tokens=0, output_tokens=n,
            prefill_s=0.0, decode_s=0.0, ttft_s=0.0, finish_reason=reason,
        )


class ScriptedBackend(FaultBackend):
    """The backend of :class:`ScriptedSlot` (its ``gate`` releases ``hold``)."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__()

    def new_slot(self):
        return ScriptedSlot(self)
