"""Prometheus metrics of the edge (``serve --metrics-port P``).

Each server has its own ``CollectorRegistry`` (nothing is registered in the
library's global one on import), served over HTTP by prometheus-client's own
server on a separate port.  What to alert on is in docs/operations.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 40, 80, 160, 320)


@dataclass
class EdgeMetrics:
    """The edge's metrics; build with :meth:`create`."""

    registry: Any
    sessions: Any = field(default=None)
    busy_slots: Any = field(default=None)
    queue_depth: Any = field(default=None)
    queue_wait: Any = field(default=None)
    ttft: Any = field(default=None)
    decode_rate: Any = field(default=None)
    prefill_tokens: Any = field(default=None)
    cached_tokens: Any = field(default=None)
    output_tokens: Any = field(default=None)
    calls: Any = field(default=None)
    auth_failures: Any = field(default=None)
    evictions: Any = field(default=None)
    limit_hits: Any = field(default=None)
    preemptions: Any = field(default=None)

    @classmethod
    def create(cls) -> "EdgeMetrics":
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            sessions=Gauge("edgeroute_sessions", "open sessions (transcripts held)", registry=r),
            busy_slots=Gauge("edgeroute_busy_slots", "KV slots generating now", registry=r),
            queue_depth=Gauge("edgeroute_queue_depth", "Generate calls waiting for a KV slot", registry=r),
            queue_wait=Histogram("edgeroute_queue_wait_seconds", "time a Generate waited for a slot",
                                 buckets=_LATENCY_BUCKETS, registry=r),
            ttft=Histogram("edgeroute_ttft_seconds", "server-side time to the first token",
                           buckets=_LATENCY_BUCKETS, registry=r),
            decode_rate=Histogram("edgeroute_decode_tokens_per_second", "decode speed of a Generate",
                                  buckets=_RATE_BUCKETS, registry=r),
            prefill_tokens=Counter("edgeroute_prefill_tokens", "prompt tokens computed", registry=r),
            cached_tokens=Counter("edgeroute_cached_tokens", "prompt tokens reused from KV", registry=r),
            output_tokens=Counter("edgeroute_output_tokens", "tokens generated", registry=r),
            calls=Counter("edgeroute_calls", "RPCs by method and status code", ["method", "code"], registry=r),
            auth_failures=Counter("edgeroute_auth_failures", "calls refused as UNAUTHENTICATED", registry=r),
            evictions=Counter("edgeroute_evictions", "sessions closed to make room (session), past the TTL "
                              "(ttl), KV slots taken from idle sessions (kv)", ["kind"], registry=r),
            limit_hits=Counter("edgeroute_limit_hits", "calls refused, clipped or cancelled by a limit",
                               ["limit"], registry=r),
            preemptions=Counter("edgeroute_preemptions", "generations paused to give their slot to a "
                                "waiting principal with less slot time used (--preempt-after-s)", registry=r),
        )

    def bind(self, *, sessions: Callable[[], float], busy_slots: Callable[[], float],
             queue_depth: Callable[[], float]) -> None:
        """Read the gauges from the server at scrape time (from the HTTP thread:
        the callables must be thread-safe)."""
        self.sessions.set_function(sessions)
        self.busy_slots.set_function(busy_slots)
        self.queue_depth.set_function(queue_depth)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start the HTTP endpoint (a daemon thread); returns (server, thread):
        ``server.shutdown()`` stops it."""
        from prometheus_client import start_http_server

        return start_http_server(port, addr=host, registry=self.registry)

    def hit(self, limit: str) -> None:
        self.limit_hits.labels(limit=limit).inc()

    def call(self, method: str, code: str) -> None:
        """One finished RPC (fed by the audit interceptor)."""
        self.calls.labels(method=method, code=code).inc()
        if code == "UNAUTHENTICATED":
            self.auth_failures.inc()

    def observe_generation(self, *, queue_s: float, ttft_s: float, decode_s: float,
                           prefill: int, cached: int, output: int) -> None:
        self.queue_wait.observe(max(0.0, queue_s))
        self.ttft.observe(max(0.0, ttft_s))
        if output > 1 and decode_s > 0:
            self.decode_rate.observe((output - 1) / decode_s)
        self.prefill_tokens.inc(max(0, prefill))
        self.cached_tokens.inc(max(0, cached))
        self.output_tokens.inc(max(0, output))

    def render(self) -> str:
        """The exposition text (what the endpoint serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")
