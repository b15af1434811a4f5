"""Domain types of the edge API, converted to and from protobuf at the gRPC boundary.

The server and the client work with these dataclasses; generated message
types appear only in ``to_pb``/``from_pb``.  Constructors validate, so a
``from_pb`` on a bad request raises ``ValueError`` with a message fit for the
client (the server maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Sequence

from edgeroute.v1 import edge_pb2

RoleName = Literal["system", "user", "assistant"]
ROLES: tuple[RoleName, ...] = ("system", "user", "assistant")
FinishReason = Literal["stop", "length"]

_ROLE_TO_PB = {
    "system": edge_pb2.ROLE_SYSTEM,
    "user": edge_pb2.ROLE_USER,
    "assistant": edge_pb2.ROLE_ASSISTANT,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}
_FINISH_TO_PB = {"stop": edge_pb2.FINISH_REASON_STOP, "length": edge_pb2.FINISH_REASON_LENGTH}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}

MAX_SEED = 2**32 - 1
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class Message:
    """One chat message; ``to_dict`` gives the ``{"role", "content"}`` form used elsewhere."""

    role: RoleName
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"message content must be a string, got {type(self.content).__name__}")

    @classmethod
    def from_dict(cls, message: Mapping[str, object]) -> "Message":
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"a message needs 'role' and 'content', got {message!r:.80}")
        return cls(role=message["role"], content=message["content"])  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def to_pb(self) -> edge_pb2.Message:
        return edge_pb2.Message(role=_ROLE_TO_PB[self.role], content=self.content)

    @classmethod
    def from_pb(cls, pb: edge_pb2.Message) -> "Message":
        role = _ROLE_FROM_PB.get(pb.role)
        if role is None:
            name = edge_pb2.Role.Name(pb.role) if pb.role in edge_pb2.Role.values() else str(pb.role)
            raise ValueError(f"message role must be system, user or assistant, got {name}")
        return cls(role=role, content=pb.content)


def messages_to_pb(messages: Iterable[Mapping[str, object] | Message]) -> list[edge_pb2.Message]:
    return [(m if isinstance(m, Message) else Message.from_dict(m)).to_pb() for m in messages]


def messages_from_pb(messages: Sequence[edge_pb2.Message]) -> list[Message]:
    return [Message.from_pb(m) for m in messages]


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters of one Generate call."""

    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        stop = tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", stop)

    def to_pb(self) -> edge_pb2.GenerationParams:
        return edge_pb2.GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=list(self.stop),
        )

    @classmethod
    def from_pb(cls, pb: edge_pb2.GenerationParams) -> "GenerationParams":
        return cls(
            max_tokens=pb.max_tokens,
            # float32 on the wire: round so that 0.7 stays 0.7 rather than 0.699999988.
            temperature=round(pb.temperature, 6),
            top_p=round(pb.top_p, 6) if pb.HasField("top_p") else 1.0,
            seed=pb.seed,
            stop=tuple(pb.stop),
        )


@dataclass(frozen=True)
class GenerationSummary:
    """The final message of a Generate stream: usage and server timings.

    ``prefill_tokens`` are the prompt tokens the edge computed in this call and
    ``cached_tokens`` those it reused from the session's KV cache, so
    ``prefill_tokens + cached_tokens == prompt_tokens``.  ``prefill_s`` and
    ``decode_s`` are the two phases of the edge's compute time (γ_e times the
    token counts in the paper's eqs. 1 and 5).
    """

    prompt_tokens: int
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float = 0.0
    queue_s: float = 0.0
    finish_reason: FinishReason = "stop"
    kv_restored: bool = False
    #: The server's ``--max-output-tokens`` when it clipped the request's
    #: ``max_tokens`` to it; None when the request's own value was used.
    max_tokens_clipped_to: int | None = None
    #: The server could not tell the cached tokens (an upstream engine that
    #: does not report them): ``cached_tokens`` is then 0 and ``prefill_tokens``
    #: an upper bound; plan as if nothing was cached.
    cached_tokens_unknown: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens_clipped_to is not None and (
            not isinstance(self.max_tokens_clipped_to, int) or self.max_tokens_clipped_to < 1
        ):
            raise ValueError(f"max_tokens_clipped_to must be an integer >= 1, got {self.max_tokens_clipped_to!r}")
        for name in ("prompt_tokens", "prefill_tokens", "cached_tokens", "output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("prefill_s", "decode_s", "ttft_s", "queue_s"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.finish_reason not in _FINISH_TO_PB:
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")

    def to_pb(self) -> edge_pb2.GenerateDone:
        return edge_pb2.GenerateDone(
            usage=edge_pb2.Usage(
                prompt_tokens=self.prompt_tokens,
                prefill_tokens=self.prefill_tokens,
                cached_tokens=self.cached_tokens,
                output_tokens=self.output_tokens,
                cached_tokens_unknown=self.cached_tokens_unknown,
            ),
            timings=edge_pb2.ServerTimings(
                prefill_s=self.prefill_s, decode_s=self.decode_s, ttft_s=self.ttft_s, queue_s=self.queue_s
            ),
            finish_reason=_FINISH_TO_PB[self.finish_reason],
            kv_restored=self.kv_restored,
            max_tokens_clipped_to=self.max_tokens_clipped_to,
        )

    @classmethod
    def from_pb(cls, pb: edge_pb2.GenerateDone) -> "GenerationSummary":
        return cls(
            prompt_tokens=pb.usage.prompt_tokens,
            prefill_tokens=pb.usage.prefill_tokens,
            cached_tokens=pb.usage.cached_tokens,
            output_tokens=pb.usage.output_tokens,
            prefill_s=pb.timings.prefill_s,
            decode_s=pb.timings.decode_s,
            ttft_s=pb.timings.ttft_s,
            queue_s=pb.timings.queue_s,
            finish_reason=_FINISH_FROM_PB.get(pb.finish_reason, "stop"),
            kv_restored=pb.kv_restored,
            max_tokens_clipped_to=pb.max_tokens_clipped_to if pb.HasField("max_tokens_clipped_to") else None,
            cached_tokens_unknown=pb.usage.cached_tokens_unknown,
        )


@dataclass(frozen=True)
class ServerInfo:
    """What an edge server runs, its limits, and its load now.

    The fields after ``max_message_bytes`` were added later: an older server
    sends none of them, and they read as 0 (``expected_queue_wait_s``: None).
    """

    backend: str
    model: str
    prompt_format: str
    n_ctx: int
    n_slots: int
    max_sessions: int
    max_message_bytes: int
    #: Generate calls waiting for a KV slot now, and slots generating.
    queue_depth: int = 0
    busy_slots: int = 0
    #: Median wait of the recent calls that waited for a slot (0: none did).
    queue_wait_s: float = 0.0
    #: Expected wait of a call arriving now (0 with a slot free); None: not measured yet.
    expected_queue_wait_s: float | None = None
    max_output_tokens: int = 0
    max_input_tokens: int = 0
    max_echo_bytes: int = 0
    max_sessions_per_principal: int = 0
    max_concurrent_per_principal: int = 0
    queue_timeout_s: float = 0.0

    def to_pb(self) -> edge_pb2.ServerInfo:
        return edge_pb2.ServerInfo(**{name: getattr(self, name) for name in _SERVER_INFO_FIELDS})

    @classmethod
    def from_pb(cls, pb: edge_pb2.ServerInfo) -> "ServerInfo":
        values = {name: getattr(pb, name) for name in _SERVER_INFO_FIELDS}
        if not pb.HasField("expected_queue_wait_s"):
            values["expected_queue_wait_s"] = None
        return cls(**values)


_SERVER_INFO_FIELDS = tuple(ServerInfo.__dataclass_fields__)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
