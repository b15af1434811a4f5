"""Which edge address the device calls next: a list tried in order, with a
short circuit breaker on one that failed.

Several stateless ``edgeroute serve`` gateways can serve one fleet; the device
is given their addresses (``--edge A,B``).  The first is preferred.  An
address that fails (cannot connect, UNAVAILABLE, a deadline) is skipped for
``cool_down_s`` seconds, then tried again, so a dead gateway costs one failed
call per cool-down instead of one per turn, and a gateway that comes back
gets its conversations back.  When every address is cooling down, the one
whose cool-down ends first is tried anyway: the breaker orders the addresses,
it never leaves a call with nowhere to go (with one address it changes
nothing).

The clock is injected (``time.monotonic`` by default) so tests step it.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Sequence

__all__ = ["CircuitBreaker", "DEFAULT_COOL_DOWN_S", "MAX_COOL_DOWN_S", "MAX_EDGE_ADDRESSES", "parse_edge_targets"]

#: Seconds a failed address is skipped (``--edge-cool-down``).
DEFAULT_COOL_DOWN_S = 10.0
#: The longest cool-down accepted: a breaker is short by design.
MAX_COOL_DOWN_S = 3600.0
#: The most addresses one ``--edge`` list may hold.
MAX_EDGE_ADDRESSES = 16


def _check_address(item: str) -> str:
    """``item`` as HOST:PORT (``[v6]:PORT`` for IPv6), or ValueError saying why not."""
    if not item:
        raise ValueError("an empty address (two commas, or a comma at either end)")
    host, sep, port = item.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not HOST:PORT")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{item!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if host.strip("[]") == "" or any(c.isspace() for c in host):
        raise ValueError(f"{item!r} has no host name")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{item!r}: the port must be a number from 1 to 65535")
    return f"{host}:{int(port)}"


def parse_edge_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """The edge addresses of ``--edge A,B`` (a comma-separated string, or a
    sequence of addresses), checked: each HOST:PORT with a port in 1-65535,
    no empty item, no address twice, at most :data:`MAX_EDGE_ADDRESSES`.
    A ValueError names the bad item."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [i.strip() if isinstance(i, str) else i for i in items]
    if not items or items == [""]:
        raise ValueError("no edge address: give HOST:PORT[,HOST2:PORT2...]")
    if len(items) > MAX_EDGE_ADDRESSES:
        raise ValueError(f"{len(items)} edge addresses; at most {MAX_EDGE_ADDRESSES}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"an edge address must be a string, got {item!r}")
        address = _check_address(item)
        if address in out:
            raise ValueError(f"{address} is listed twice")
        out.append(address)
    return tuple(out)


class CircuitBreaker:
    """Cool-downs of a fixed list of addresses (thread-safe).

    :meth:`candidates` is the order in which a call tries them;
    :meth:`failed` opens an address's breaker for ``cool_down_s``;
    :meth:`succeeded` closes it early.
    """

    def __init__(
        self, addresses: Sequence[str], cool_down_s: float = DEFAULT_COOL_DOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not addresses:
            raise ValueError("a circuit breaker needs at least one address")
        if not (isinstance(cool_down_s, (int, float)) and math.isfinite(cool_down_s)
                and 0 < cool_down_s <= MAX_COOL_DOWN_S):
            raise ValueError(f"cool_down_s must be in (0, {MAX_COOL_DOWN_S:g}], got {cool_down_s!r}")
        self.addresses = tuple(addresses)
        self.cool_down_s = float(cool_down_s)
        self._clock = clock
        self._open_until: dict[str, float] = {}
        self._failures = {a: 0 for a in self.addresses}
        self._lock = threading.Lock()

    def cooling(self, address: str) -> bool:
        """Whether ``address`` failed less than ``cool_down_s`` ago."""
        with self._lock:
            return self._cooling(address, self._clock())

    def _cooling(self, address: str, now: float) -> bool:
        until = self._open_until.get(address)
        return until is not None and now < until

    def candidates(self) -> list[str]:
        """The addresses to try for a call, in order: those not cooling down,
        in the listed order; when every one is, only the one whose cool-down
        ends first (one attempt, not one per address)."""
        with self._lock:
            now = self._clock()
            ready = [a for a in self.addresses if not self._cooling(a, now)]
            if ready:
                return ready
            return [min(self.addresses, key=lambda a: self._open_until[a])]

    def failed(self, address: str) -> None:
        """``address`` failed now: skip it for ``cool_down_s``."""
        with self._lock:
            self._open_until[address] = self._clock() + self.cool_down_s
            self._failures[address] += 1

    def succeeded(self, address: str) -> None:
        """``address`` answered: its breaker is closed."""
        with self._lock:
            self._open_until.pop(address, None)

    @property
    def failures(self) -> dict[str, int]:
        """Failures seen per address since the start (for tests and logs)."""
        with self._lock:
            return dict(self._failures)
