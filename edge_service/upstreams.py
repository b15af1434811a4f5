"""Upstream engines of the ``openai`` backend: which replica serves a session.

Session affinity is rendezvous (highest-random-weight) hashing of the
session's affinity key over the upstream URLs: every URL gets a pseudo-random
score for the key, and the session goes to the best-scoring healthy one.  Each
gateway computes the same order from the same URLs, so several stateless
gateways send a session to the same replica without sharing state, and adding
or removing one of N upstreams moves only the sessions whose best URL it is
(about 1/N of them), which keeps the others' prefix caches warm.

Health comes from two sources: a probe (``GET <url>/models``, bounded in time
and bytes) every ``--upstream-health-interval`` seconds, and the calls
themselves (a connect failure or a 5xx marks the URL down at once).  A URL
that is down is tried only after every healthy one, so a stale mark costs a
turn nothing but a later try.

No httpx at import: the probe takes the caller's client.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pragma: no cover
    import httpx

log = logging.getLogger(__name__)

MAX_UPSTREAMS = 64
#: Bytes of a /models answer read at most (a long model list is cut, not buffered).
MAX_PROBE_BYTES = 64 * 1024


def parse_upstream_urls(urls: Iterable[str]) -> tuple[str, ...]:
    """The ``--upstream`` URLs, normalised (no trailing slash); ``ValueError``
    naming the flag for an empty list, a non-HTTP URL, credentials in the URL
    (they belong in ``--upstream-api-key-file``), or a duplicate."""
    out: list[str] = []
    for url in urls:
        parts = urlsplit(str(url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--upstream {url!r} must be an http:// or https:// URL such as http://10.0.0.5:8000/v1")
        if parts.username or parts.password:
            raise ValueError("--upstream URLs must not carry credentials; use --upstream-api-key-file")
        if parts.query or parts.fragment:
            raise ValueError(f"--upstream {url!r} must not have a query or fragment")
        normal = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        if normal in out:
            raise ValueError(f"--upstream {normal} is given twice")
        out.append(normal)
    if not out:
        raise ValueError("--backend openai needs at least one --upstream URL")
    if len(out) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} --upstream URLs, got {len(out)}")
    return tuple(out)


def rendezvous_score(key: str, url: str) -> int:
    """The URL's weight for ``key``: a 64-bit hash of both (stable across
    processes and Python versions, unlike ``hash``)."""
    digest = hashlib.blake2b(f"{url}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, urls: Sequence[str]) -> list[str]:
    """``urls`` from the most to the least preferred for ``key``."""
    return sorted(urls, key=lambda url: rendezvous_score(key, url), reverse=True)


@dataclass
class UpstreamHealth:
    """What the gateway knows of one upstream."""

    url: str
    healthy: bool = True
    #: Why it was last marked down ('' while healthy).
    reason: str = ""
    #: ``time.monotonic`` of the last change.
    since: float = 0.0


class UpstreamSet:
    """The upstream URLs with their health; thread-safe."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls = parse_upstream_urls(urls)
        self._health = {url: UpstreamHealth(url, since=time.monotonic()) for url in self.urls}
        self._lock = threading.Lock()

    def plan(self, key: str) -> list[str]:
        """Every URL, in the order a turn of ``key`` tries them: healthy ones by
        rendezvous order, then the ones marked down (a stale mark must not
        fail a turn that one of them could serve)."""
        order = rendezvous_order(key, self.urls)
        with self._lock:
            up = [u for u in order if self._health[u].healthy]
        return up + [u for u in order if u not in up]

    def healthy(self) -> list[str]:
        with self._lock:
            return [u for u in self.urls if self._health[u].healthy]

    def mark(self, url: str, healthy: bool, reason: str = "") -> None:
        """Record a probe's or a call's verdict; a change is logged once."""
        with self._lock:
            state = self._health[url]
            changed = state.healthy != healthy
            state.healthy, state.reason = healthy, "" if healthy else reason
            if changed:
                state.since = time.monotonic()
        if changed and healthy:
            log.info("upstream %s is up", url)
        elif changed:
            log.warning("upstream %s is down: %s", url, reason)

    async def probe(self, client: "httpx.AsyncClient", url: str, headers: dict[str, str],
                    timeout_s: float) -> list[str] | None:
        """``GET <url>/models``: the model ids it lists, or None when it is
        down (connect failure, an error status, not JSON) or slow.  Marks the
        URL, except when it is only slow."""
        import asyncio
        import json

        import httpx

        async def get() -> tuple[int, bytes]:
            async with client.stream("GET", f"{url}/models", headers=headers, timeout=timeout_s) as resp:
                return resp.status_code, await read_bounded(resp, MAX_PROBE_BYTES)

        try:
            status, body = await asyncio.wait_for(get(), timeout_s)
            if status in (401, 403):
                reason = f"HTTP {status}: the engine refuses the gateway's API key (--upstream-api-key-file)"
                self.mark(url, False, reason)
                return None
            if status != 200:
                self.mark(url, False, f"HTTP {status} on /models")
                return None
            data = json.loads(body).get("data", [])
            models = [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]
        except (httpx.ReadTimeout, asyncio.TimeoutError):
            # Connected but slow: a busy engine (llama-cpp-python's server
            # answers /models only between generations) is not a dead one.
            # Its state stays; a call that times out marks it down.
            log.debug("upstream %s is slow to answer its health probe", url)
            return None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.mark(url, False, f"health probe failed: {type(exc).__name__}")
            return None
        self.mark(url, True)
        return models

    async def probe_all(self, client: "httpx.AsyncClient", headers: dict[str, str],
                        timeout_s: float) -> list[str]:
        """Probe every URL at once; the model ids of the first that answers."""
        import asyncio

        results = await asyncio.gather(*(self.probe(client, u, headers, timeout_s) for u in self.urls))
        return next((r for r in results if r), [])


async def read_bounded(resp: "httpx.Response", limit: int) -> bytes:
    """At most ``limit`` bytes of a streamed response's body (the rest is dropped)."""
    out = bytearray()
    async for piece in resp.aiter_bytes():
        out += piece[: limit - len(out)]
        if len(out) >= limit:
            break
    return bytes(out)
