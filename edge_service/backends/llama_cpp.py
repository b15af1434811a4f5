"""The llama-cpp-python backend: one ``Llama`` context per slot on one GGUF.

Prompt formatting, prefix reuse of the KV cache, streaming with cancel and
the per-turn counts all come from :mod:`device_runtime.llm.conversation`, the
same code the device SLM runs, so both sides count prefill and cached tokens
the same way.  Slots load the same file; llama.cpp maps the weights with
mmap, so each extra slot costs its KV cache and compute buffers, not another
copy of the weights.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Hashable, Iterator, Sequence

from device_runtime.llm.adapter import load_kv, load_llama, save_kv
from device_runtime.llm.conversation import (
    ContextOverflowError,
    Continuation,
    GenerationStats,
    InvalidMessagesError,
    LlamaConversation,
)
from device_runtime.llm.prompt_format import resolve_prompt_format
from edge_service.backends.base import BACKENDS, Backend, Slot
from edge_service.errors import InvalidArgument
from edge_service.kv_store import HostKvStore, KvSnapshot
from edge_service.settings import EdgeSettings
from edgeroute.v1.types import GenerationParams

log = logging.getLogger(__name__)


class LlamaSlot(Slot):
    def __init__(self, conversation: LlamaConversation, store: HostKvStore | None = None) -> None:
        self.conversation = conversation
        #: Whose KV the context holds (None: nobody's yet, it is empty).
        self.kv_owner: Hashable = None
        #: Where the KV goes when another owner takes the slot (None: dropped).
        self.store = store
        #: The owner's session is gone: its KV is not worth keeping.
        self.owner_gone = False

    supports_pause = True

    @property
    def last_stats(self) -> GenerationStats | None:  # type: ignore[override]
        return self.conversation.last_stats

    @property
    def last_continuation(self) -> Continuation | None:  # type: ignore[override]
        return self.conversation.last_continuation

    def stream(
        self,
        messages: Sequence[dict],
        params: GenerationParams,
        cancel: threading.Event,
        kv_owner: Hashable = None,
        pause: threading.Event | None = None,
        continuation: Continuation | None = None,
    ) -> Iterator[str]:
        try:
            if kv_owner != self.kv_owner:
                self._forget_for(kv_owner, messages)
            else:
                self.owner_gone = False
            yield from self.conversation.stream(
                list(messages),
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=params.stop,
                cancel=cancel,
                pause=pause,
                continuation=continuation,
            )
        except (ContextOverflowError, InvalidMessagesError) as exc:
            raise InvalidArgument(str(exc)) from exc

    def count_tokens(self, messages: Sequence[dict]) -> int:
        try:
            return self.conversation.count_tokens(list(messages))
        except (ContextOverflowError, InvalidMessagesError) as exc:
            raise InvalidArgument(str(exc)) from exc

    def _forget_for(self, kv_owner: Hashable, messages: Sequence[dict]) -> None:
        """Drop the KV another owner computed, so the prefix match cannot
        report how much of this prompt it shared with theirs.

        A request the conversation would refuse is refused first, with the KV
        untouched: the session pool then gives the slot back to the session
        it displaced, whose cache is still valid.
        """
        conversation = self.conversation
        n_tokens = conversation.count_tokens(list(messages))
        if n_tokens >= conversation.n_ctx:
            raise ContextOverflowError(
                f"the conversation is {n_tokens} tokens but the context window is "
                f"{conversation.n_ctx}; start a new conversation or load the model with a larger n_ctx"
            )
        self._offload()
        conversation.reset()
        self.kv_owner = kv_owner
        self.owner_gone = False
        self._restore(kv_owner)

    def _offload(self) -> None:
        """Copy the outgoing owner's KV to the host store, unless its session is gone."""
        llama = self.conversation.llama
        if self.store is None or self.kv_owner is None or self.owner_gone or llama.n_tokens == 0:
            return
        owner = self.kv_owner
        blob, tokens = save_kv(llama)
        self.store.put(owner, KvSnapshot(blob, tokens))
        if self.owner_gone:  # its session closed while the copy was made: drop it after all
            self.store.forget(owner)

    def _restore(self, kv_owner: Hashable) -> None:
        """Load ``kv_owner``'s KV from the host store if it is there: the
        prefix match then finds it as if the slot had never changed hands."""
        snapshot = self.store.take(kv_owner) if self.store is not None else None
        if snapshot is not None and not load_kv(self.conversation.llama, snapshot.blob, snapshot.tokens):
            log.warning("the host KV store's copy was refused by llama.cpp; prefilling instead")

    def close(self) -> None:
        self.conversation.llama.close()


@BACKENDS.register("llama_cpp")
class LlamaCppBackend(Backend):
    """Serves a GGUF with llama.cpp; instruct models use their chat template, base models ``plain``."""

    name = "llama_cpp"

    def __init__(self, settings: EdgeSettings) -> None:
        if settings.model_path is None:
            from edge_service.models import default_edge_model_path

            model_path = default_edge_model_path()
        else:
            model_path = settings.model_path
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"edge model not found: {model_path}")
        self.settings = settings
        self.model_path = Path(model_path)
        self._slots: list[LlamaSlot] = []
        self.kv_store = HostKvStore(settings.kv_offload_mib * 2**20)
        # The first context is loaded now: it answers the metadata questions
        # (prompt format, KV size) and becomes the first slot.
        self._first: LlamaSlot | None = self._load_slot()

    def _load_slot(self) -> LlamaSlot:
        llama = load_llama(
            self.model_path,
            n_ctx=self.settings.n_ctx,
            n_threads=self.settings.n_threads,
            seed=self.settings.seed,
        )
        fmt = resolve_prompt_format(llama, self.settings.prompt_format)
        slot = LlamaSlot(LlamaConversation(llama, fmt), self.kv_store if self.kv_store.budget_bytes else None)
        self._slots.append(slot)
        return slot

    @property
    def _probe(self) -> LlamaSlot:
        return self._slots[0]

    @property
    def model_name(self) -> str:
        return self.model_path.name

    @property
    def prompt_format(self) -> str:
        return self._probe.conversation.prompt_format.name

    @property
    def n_ctx(self) -> int:
        return self._probe.conversation.n_ctx

    def kv_bytes_per_slot(self) -> int | None:
        """f16 K and V for every layer at ``n_ctx`` (the SWA cache is full-size, see load_llama)."""
        meta = self._probe.conversation.llama.metadata
        arch = meta.get("general.architecture", "")
        try:
            n_layer = int(meta[f"{arch}.block_count"])
            n_head = int(meta[f"{arch}.attention.head_count"])
            n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
            n_embd = int(meta[f"{arch}.embedding_length"])
            k_len = int(meta.get(f"{arch}.attention.key_length", n_embd // n_head))
            v_len = int(meta.get(f"{arch}.attention.value_length", n_embd // n_head))
        except (KeyError, ValueError, ZeroDivisionError):
            return None
        return self.n_ctx * n_layer * n_head_kv * (k_len + v_len) * 2

    def new_slot(self) -> Slot:
        if self._first is not None:
            slot, self._first = self._first, None
            return slot
        return self._load_slot()

    def forget_kv(self, kv_owner: Hashable) -> None:
        # Mark first, then drop: a slot copying this owner's KV out right now
        # sees the mark after its put and drops the copy itself.
        for slot in self._slots:
            if slot.kv_owner == kv_owner:
                slot.owner_gone = True
        self.kv_store.forget(kv_owner)

    def close(self) -> None:
        for slot in self._slots:
            try:
                slot.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("closing a slot failed", exc_info=True)
        self._slots.clear()
