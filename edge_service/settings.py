"""Typed settings of the edge service, validated when built.

Each field carries its flag (help text, and name where it differs from the
field), so ``edgeroute serve`` builds its options from this class with
:mod:`device_runtime.core.flags` and defaults and help texts are written only
here.  Nothing below reads the environment.

Every limit of the service under load and abuse (queue, quotas, sizes,
rates, transport) is a field here with its default; docs/operations.md lists
them with the reasons for the defaults and how to size them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from device_runtime.core.flags import flag
from device_runtime.llm.prompt_format import prompt_format_choices
from edge_service.backends.base import BACKENDS

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: Room for the protobuf/gRPC framing around an Echo payload.
ECHO_OVERHEAD_BYTES = 1024
#: Stop strings the API takes at most (``edgeroute.v1.types``); the setting may lower it.
MAX_STOP_STRINGS = 16
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
        default=256,
        metadata=flag(
            "open sessions (transcripts) kept in all; at the limit a new session closes the "
            "opener's own least recently used idle session, or is refused (RESOURCE_EXHAUSTED)"
        ),
    )
    # --- load and abuse (docs/operations.md) ------------------------------------
    max_sessions_per_principal: int = field(
        default=32,
        metadata=flag(
            "open sessions per principal; one more closes that principal's least recently "
            "used idle session (never another principal's)"
        ),
    )
    max_concurrent_per_principal: int = field(
        default=8,
        metadata=flag("Generate calls of one principal running or waiting for a slot; more are RESOURCE_EXHAUSTED"),
    )
    max_slots_per_principal: int | None = field(
        default=None,
        metadata=flag(
            "KV slots one principal may hold while another principal has used the edge in the last "
            "minute (default: all slots but one, at least one); alone, a principal may use every slot",
            metavar="N",
        ),
    )
    session_ttl_s: float = field(
        default=3600.0,
        metadata=flag("seconds an idle session's transcript is kept (retention)", name="--session-ttl",
                      metavar="SECONDS"),
    )
    queue_timeout_s: float = field(
        default=30.0,
        metadata=flag(
            "seconds a Generate waits for a free KV slot (principals take turns) before "
            "RESOURCE_EXHAUSTED with the expected wait",
            name="--queue-timeout", metavar="SECONDS",
        ),
    )
    max_queue: int = field(default=256, metadata=flag("Generate calls waiting for a slot at once; more are refused"))
    max_output_tokens: int = field(
        default=512,
        metadata=flag("largest max_tokens served; a larger request is clipped to it (and done says so)"),
    )
    max_input_tokens: int | None = field(
        default=None,
        metadata=flag("prompt tokens (transcript plus new messages) a Generate may have; more are "
                      "INVALID_ARGUMENT; unset: only the context window limits it"),
    )
    max_messages: int = field(default=1024, metadata=flag("messages in one Generate request"))
    max_stop_strings: int = field(default=16, metadata=flag("stop strings in one Generate request (at most 16)"))
    max_stop_chars: int = field(default=256, metadata=flag("total characters of a request's stop strings"))
    max_message_bytes: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES, metadata=flag("largest gRPC message accepted or sent, in bytes",
                                                         metavar="BYTES"),
    )
    max_echo_bytes: int = field(
        default=1024 * 1024,
        metadata=flag("largest Echo response_bytes (also bounded by --max-message-bytes less 1 KiB)",
                      metavar="BYTES"),
    )
    echo_rate: float = field(default=20.0, metadata=flag("Echo calls per second per principal (token bucket)"))
    echo_burst: int = field(default=100, metadata=flag("Echo calls a principal may make at once (bucket size)"))
    max_generation_s: float = field(
        default=120.0,
        metadata=flag("seconds one generation may run; then it is cancelled (DEADLINE_EXCEEDED)",
                      metavar="SECONDS"),
    )
    preempt_after_s: float = field(
        default=2.0,
        metadata=flag("seconds a generation holds its KV slot before it pauses between two tokens for "
                      "a waiting Generate of a principal with less slot time used; it goes on (its KV "
                      "kept in the host store) when a slot is free and its turn comes; 0: never "
                      "(llama_cpp backend only)", metavar="SECONDS"),
    )
    stream_stall_timeout_s: float = field(
        default=30.0,
        metadata=flag("seconds a Generate stream may wait for its client to read; then it is cancelled "
                      "(CANCELLED) and its slot freed", name="--stream-stall-timeout", metavar="SECONDS"),
    )
    # --- transport (gRPC channel arguments) ------------------------------------------
    keepalive_time_s: float = field(
        default=60.0, metadata=flag("seconds between the server's keepalive pings", name="--keepalive-time",
                                    metavar="SECONDS"),
    )
    keepalive_timeout_s: float = field(
        default=20.0,
        metadata=flag("seconds a client has to answer a keepalive ping before its connection is closed",
                      name="--keepalive-timeout", metavar="SECONDS"),
    )
    min_ping_interval_s: float = field(
        default=10.0,
        metadata=flag("shortest interval between a client's pings; pinging faster twice closes the "
                      "connection (ping abuse)", name="--min-ping-interval", metavar="SECONDS"),
    )
    max_connection_idle_s: float = field(
        default=600.0,
        metadata=flag("close a connection without calls for this long (clients reconnect)",
                      name="--max-connection-idle", metavar="SECONDS"),
    )
    max_connection_age_s: float = field(
        default=3600.0,
        metadata=flag("close any connection after about this long (clients reconnect)",
                      name="--max-connection-age", metavar="SECONDS"),
    )
    max_connection_age_grace_s: float = field(
        default=150.0,
        metadata=flag("seconds running calls get to finish when a connection reaches its age",
                      name="--max-connection-age-grace", metavar="SECONDS"),
    )
    max_concurrent_streams: int = field(default=32, metadata=flag("concurrent calls on one connection"))
    max_concurrent_rpcs: int = field(
        default=512, metadata=flag("concurrent calls on the whole server (health watches included); "
                                   "more are RESOURCE_EXHAUSTED")
    )
    metrics_port: int | None = field(
        default=None, metadata=flag("serve Prometheus metrics over HTTP on this port (unset or 0: off)",
                                    metavar="PORT"),
    )
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=flag("address of the metrics endpoint (it has no authentication)", metavar="HOST"),
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
    kv_offload_mib: int = field(
        default=256,
        metadata=flag(
            "MiB of host memory for the KV caches of sessions whose slot another session took "
            "(llama_cpp backend): their next turn continues from that state instead of "
            "prefilling the transcript again (0: off)",
            metavar="MIB",
        ),
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

    # --- the openai backend (docs/deploy.md) ------------------------------------
    upstream: tuple[str, ...] = field(
        default=(),
        metadata=flag(
            "--backend openai: base URL of an OpenAI-compatible engine or router, ending in /v1 "
            "(repeat for replicas; sessions are spread by consistent hashing of their id)",
            metavar="URL",
        ),
    )
    upstream_model: str | None = field(
        default=None,
        metadata=flag("--backend openai: the model name sent upstream (default: the first one the "
                      "upstream's /models lists)", metavar="NAME"),
    )
    upstream_api_key_file: Path | None = field(
        default=None,
        metadata=flag("--backend openai: file holding the API key the gateway sends upstream "
                      "(Authorization: Bearer); read once at start", metavar="FILE"),
    )
    upstream_connect_timeout_s: float = field(
        default=3.0,
        metadata=flag("seconds to connect to an upstream before trying the next one",
                      name="--upstream-connect-timeout", metavar="SECONDS"),
    )
    upstream_read_timeout_s: float = field(
        default=60.0,
        metadata=flag("seconds an upstream may go silent (before its first token, or between two "
                      "chunks) before the turn fails UNAVAILABLE", name="--upstream-read-timeout",
                      metavar="SECONDS"),
    )
    upstream_health_interval_s: float = field(
        default=5.0,
        metadata=flag("seconds between health probes (GET /models) of each upstream",
                      name="--upstream-health-interval", metavar="SECONDS"),
    )
    upstream_cache_salt: bool = field(
        default=True,
        metadata=flag("send a cache_salt per session (per principal with --kv-sharing principal) so "
                      "that engines that take it (vLLM, SGLang) share prefix cache only within it; "
                      "engines that do not know the field ignore it (llama.cpp's and "
                      "llama-cpp-python's servers do)"),
    )
    upstream_cache_isolated: bool = field(
        default=False,
        metadata=flag("the engines honour cache_salt (vLLM, SGLang with --upstream-cache-salt): pass "
                      "their cached-token counts on to the devices; without it the count is "
                      "reported unknown, since an engine whose prefix cache is shared across "
                      "principals would tell one principal what another sent"),
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
        self._check_limits()
        if self.n_threads is not None:
            _check_int("n_threads", self.n_threads, 1)
        if self.kv_budget_mb is not None and not (_finite(self.kv_budget_mb) and self.kv_budget_mb > 0):
            raise ValueError(f"kv_budget_mb must be a positive number, got {self.kv_budget_mb!r}")
        if not (_finite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s!r}")
        _check_int("seed", self.seed, 0)
        self._check_security()
        self._check_upstreams()

    def _check_upstreams(self) -> None:
        """``--upstream`` goes with ``--backend openai`` (and it needs one);
        the URLs are checked by :func:`edge_service.upstreams.parse_upstream_urls`."""
        from edge_service.upstreams import parse_upstream_urls

        object.__setattr__(self, "upstream", tuple(self.upstream or ()))
        if self.upstream_api_key_file is not None:
            object.__setattr__(self, "upstream_api_key_file", Path(self.upstream_api_key_file).expanduser())
        if self.backend == "openai":
            object.__setattr__(self, "upstream", parse_upstream_urls(self.upstream))
        elif self.upstream:
            raise ValueError("--upstream is for --backend openai")
        for name in ("upstream_connect_timeout_s", "upstream_read_timeout_s", "upstream_health_interval_s"):
            value = getattr(self, name)
            if not (_finite(value) and 0 < value <= 3600):
                raise ValueError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")

    def _check_limits(self) -> None:
        for name in ("max_sessions_per_principal", "max_concurrent_per_principal", "max_queue",
                     "max_output_tokens", "max_messages", "max_stop_chars", "echo_burst",
                     "max_concurrent_streams", "max_concurrent_rpcs"):
            _check_int(name, getattr(self, name), 1)
        if self.max_slots_per_principal is not None:
            _check_int("max_slots_per_principal", self.max_slots_per_principal, 1)
        _check_int("max_stop_strings", self.max_stop_strings, 0)
        _check_int("kv_offload_mib", self.kv_offload_mib, 0)
        if self.max_stop_strings > MAX_STOP_STRINGS:
            raise ValueError(f"max_stop_strings must be <= {MAX_STOP_STRINGS} (the API's own limit)")
        _check_int("max_echo_bytes", self.max_echo_bytes, 0)
        if self.max_input_tokens is not None:
            _check_int("max_input_tokens", self.max_input_tokens, 1)
        for name in ("session_ttl_s", "queue_timeout_s", "echo_rate", "max_generation_s",
                     "stream_stall_timeout_s", "keepalive_time_s", "keepalive_timeout_s",
                     "min_ping_interval_s", "max_connection_idle_s", "max_connection_age_s"):
            value = getattr(self, name)
            if not (_finite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
            if value * 1000 > 2**31 - 1:  # gRPC takes milliseconds in a signed 32-bit integer
                raise ValueError(f"{name} must be below {(2**31 - 1) // 1000} s, got {value!r}")
        if not (_finite(self.preempt_after_s) and self.preempt_after_s >= 0):
            raise ValueError(f"preempt_after_s must be >= 0 s (0: never), got {self.preempt_after_s!r}")
        grace = self.max_connection_age_grace_s
        if not (_finite(grace) and 0 <= grace * 1000 <= 2**31 - 1):
            raise ValueError(f"max_connection_age_grace_s must be >= 0 s, got {grace!r}")
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, 0)
            if self.metrics_port > 65535:
                raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")

    @property
    def echo_cap_bytes(self) -> int:
        """The largest Echo ``response_bytes``: ``max_echo_bytes``, and room for
        the framing within ``max_message_bytes``."""
        return max(0, min(self.max_echo_bytes, self.max_message_bytes - ECHO_OVERHEAD_BYTES))

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
