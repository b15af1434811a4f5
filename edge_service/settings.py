"""Typed settings of the edge service, validated when built.

Each field carries its flag (help text, and name where it differs from the
field), so ``edgeroute serve`` builds its options from this class with
:mod:`device_runtime.core.flags` and defaults and help texts are written only
here.  Nothing below reads the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from device_runtime.core.flags import flag
from device_runtime.llm.prompt_format import prompt_format_choices
from edge_service.backends.base import BACKENDS

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Who may reuse a slot's cached prompt prefix (``--kv-sharing``).
KV_SHARING_CHOICES = ("session", "principal")


@dataclass(frozen=True)
class EdgeSettings:
    """Everything that shapes an edge server."""

    #: GGUF to serve; ``None``: the default edge model (Gemma 3 270M Q4_K_M).
    model_path: Path | None = field(
        default=None,
        metadata=flag("GGUF file to serve; default: Gemma 3 270M Q4_K_M", name="--model", metavar="GGUF"),
    )
    backend: str = field(default="llama_cpp", metadata=flag("model backend", choices=BACKENDS.names))
    prompt_format: str = field(
        default="auto",
        metadata=flag(
            "auto (the GGUF's chat template, else plain), chat-template or plain",
            choices=prompt_format_choices,
        ),
    )
    n_ctx: int = field(default=2048, metadata=flag("context window of each slot, in tokens"))
    n_slots: int = field(
        default=2, metadata=flag("KV slots (llama.cpp contexts); sessions beyond share them by LRU")
    )
    kv_budget_mb: float | None = field(
        default=None,
        metadata=flag("memory bound on all slots' KV caches in MiB; lowers n_slots to fit"),
    )
    # metavar: the option's placeholder stays the one of the flag's name.
    n_threads: int | None = field(
        default=None,
        metadata=flag(
            "CPU threads per slot (default: half the cores to decode, all to prefill)",
            name="--threads",
            metavar="THREADS",
        ),
    )
    max_sessions: int = field(
        default=256, metadata=flag("open sessions (transcripts) kept; more are refused")
    )
    # A server-side limit the clients must match; not a command-line knob.
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata=flag("largest gRPC message accepted or sent", cli=False)
    )
    shutdown_grace_s: float = field(
        default=5.0,
        metadata=flag("seconds running streams get to finish on shutdown", name="--grace", metavar="GRACE"),
    )
    seed: int = field(default=0, metadata=flag("llama.cpp context seed", cli=False))
    # --- security (docs/security.md) ------------------------------------------
    tls_cert: Path | None = field(
        default=None, metadata=flag("serve TLS with this PEM certificate (chain)", metavar="FILE")
    )
    tls_key: Path | None = field(
        default=None, metadata=flag("the PEM private key of --tls-cert", metavar="FILE")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=flag(
            "mTLS: clients must present a certificate signed by this PEM CA; its subject "
            "becomes the caller's principal (needs --tls-cert)",
            metavar="FILE",
        ),
    )
    auth_tokens: Path | None = field(
        default=None,
        metadata=flag(
            "bearer-token file, one 'principal<TAB>sha256-hex-of-token' per line "
            "(edgeroute token new NAME); SIGHUP reloads it",
            metavar="FILE",
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=flag(
            "serve on a non-loopback address without TLS and authentication "
            "(anyone who reaches the port can use, read and close every session)"
        ),
    )
    reflection: bool = field(
        default=False, metadata=flag("serve gRPC server reflection (needs auth when auth is on)")
    )
    kv_sharing: str = field(
        default="session",
        metadata=flag(
            "who may reuse a slot's cached prompt prefix: 'session' (only the session that "
            "computed it) or 'principal' (any session of the same principal; faster when one "
            "user has several sessions, but those sessions can then see each other's "
            "prompts through cached_tokens)",
            choices=KV_SHARING_CHOICES,
        ),
    )

    def __post_init__(self) -> None:
        if self.model_path is not None:
            object.__setattr__(self, "model_path", Path(self.model_path).expanduser())
        if not self.backend:
            raise ValueError("backend must be a non-empty name")
        _check_int("n_ctx", self.n_ctx, 16)
        _check_int("n_slots", self.n_slots, 1)
        _check_int("max_sessions", self.max_sessions, 1)
        # Below ~64 KiB even a short prompt would not fit in one message.
        _check_int("max_message_bytes", self.max_message_bytes, 64 * 1024)
        if self.max_message_bytes > 2**31 - 1:
            raise ValueError("max_message_bytes must fit in a signed 32-bit integer (gRPC limit)")
        if self.n_threads is not None:
            _check_int("n_threads", self.n_threads, 1)
        if self.kv_budget_mb is not None and not (_finite(self.kv_budget_mb) and self.kv_budget_mb > 0):
            raise ValueError(f"kv_budget_mb must be a positive number, got {self.kv_budget_mb!r}")
        if not (_finite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s!r}")
        _check_int("seed", self.seed, 0)
        self._check_security()

    def _check_security(self) -> None:
        """Combinations only; the files are read by :mod:`edge_service.security`."""
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if self.kv_sharing not in KV_SHARING_CHOICES:
            raise ValueError(f"kv_sharing must be one of {', '.join(KV_SHARING_CHOICES)}, got {self.kv_sharing!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticated(self) -> bool:
        """Every call but health needs a principal (a token or a client certificate)."""
        return self.auth_tokens is not None or self.tls_client_ca is not None

    def with_(self, **changes) -> "EdgeSettings":
        return replace(self, **changes)

    def slots_within_budget(self, kv_bytes_per_slot: int | None) -> int:
        """``n_slots``, lowered so that all slots' KV fits ``kv_budget_mb`` (at least one slot)."""
        if self.kv_budget_mb is None or not kv_bytes_per_slot:
            return self.n_slots
        fit = int(self.kv_budget_mb * 1024 * 1024 // kv_bytes_per_slot)
        if fit < 1:
            raise ValueError(
                f"kv_budget_mb={self.kv_budget_mb} is below one slot's KV cache "
                f"({kv_bytes_per_slot / 2**20:.1f} MiB at n_ctx={self.n_ctx}); "
                "raise the budget or lower n_ctx"
            )
        return min(self.n_slots, fit)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
