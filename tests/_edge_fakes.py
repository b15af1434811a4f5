"""Fault injection for the edge service tests: a backend whose slots block or fail on demand.

Only for faults (slots all busy, deadlines, internal errors); everything
else in the edge tests runs the real GGUF model.
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
