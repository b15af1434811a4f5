"""Two network namespaces (device, edge) joined by a rate-shaped veth pair.

::

    device ns                                     edge ns
    client -> 127.0.0.1:relay  -> relay -> veth == tbf ==> veth -> edge server
                                (delay+jitter)     (rate)

- The addresses are a private /30 that exists only inside the two namespaces,
  so traffic only flows between the project's own namespaces and the host's
  routing is untouched.  Parallel runs use different namespaces, so the same
  /30 may be reused.
- Names carry the creating process id, so a run cleans up after itself and
  :func:`cleanup_stale` removes what a crashed run left behind.
- The rate is shaped by ``tbf`` on both veth ends (egress of each end: uplink on
  the device side, downlink on the edge side).  This kernel has no ``netem``;
  the relay (:mod:`netlab.relay`) adds delay and jitter.
- An outage is ``ip link set <edge veth> down`` and then up: the device's
  packets are lost and its connections stall until the link returns.

Needs root and iproute2 (``ip``, ``tc``); :func:`unavailable_reason` says why
not, for test skips.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from netlab.relay import RelaySettings

log = logging.getLogger(__name__)

#: Namespace names: ``erlab-<pid>-<n>-dev`` / ``-edge``.
NS_PREFIX = "erlab"
_NS_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-(\d+)-(dev|edge)$")
#: A veth end still in the host namespace (creation interrupted before it moved).
_VETH_RE = re.compile(r"^el(\d+)x(\d+)[de](@\S+)?$")
_counter = itertools.count()

#: Repository root, so subprocesses can run ``python -m netlab.relay``.
REPO_ROOT = Path(__file__).resolve().parent.parent


class NetLabError(RuntimeError):
    """Creating or changing the emulated link failed; the message has the command."""


@dataclass(frozen=True)
class LinkSettings:
    """One emulated link condition."""

    rate_mbit: float | None = None
    """tbf rate on each veth end, in Mbit/s (10^6 bit/s); None leaves it unshaped."""
    delay_ms: float = 0.0
    """One-way delay the relay adds in each direction; the RTT grows by twice this."""
    jitter_ms: float = 0.0
    """Uniform ± jitter on each one-way delay."""
    burst_bytes: int | None = None
    """tbf bucket size; default: 0.5 ms of traffic at the rate, at least two
    full frames.  Small, so that a short transfer is not sped up by the bucket
    (a large bucket lowers the RTT intercept of a size sweep by burst/rate)."""
    name: str = "link"

    def __post_init__(self) -> None:
        if self.rate_mbit is not None and not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {self.rate_mbit!r}")
        if not self.delay_ms >= 0 or not self.jitter_ms >= 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.burst_bytes is not None and self.burst_bytes < 2048:
            raise ValueError("burst_bytes must be >= 2048")

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_mbit is None else self.rate_mbit * 1e6 / 8

    @property
    def rtt_added_s(self) -> float:
        return 2 * self.delay_ms / 1000

    def relay_settings(self, seed: int | None = None) -> RelaySettings:
        return RelaySettings(self.delay_ms / 1000, self.delay_ms / 1000, self.jitter_ms / 1000, seed=seed)


#: Link conditions used by tests and the benchmark.  Not measurements: settings.
GOOD_5G = LinkSettings(rate_mbit=100.0, delay_ms=10.0, jitter_ms=1.0, name="good-5g")
POOR = LinkSettings(rate_mbit=2.0, delay_ms=120.0, jitter_ms=20.0, name="poor")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found: install iproute2 (apt-get install iproute2)"
    return None


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetLabError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale(all_owners: bool = False) -> list[str]:
    """Delete netlab namespaces whose creating process is gone (or all of them).

    Deleting a namespace destroys the veth end inside it, and with it the pair.
    Idempotent: a namespace already gone is not an error.
    """
    removed = []
    for ns in list_namespaces():
        m = _NS_RE.match(ns)
        if not m:
            continue
        if all_owners or not _pid_alive(int(m.group(1))):
            _kill_ns_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(ns)
    # A veth pair made by a run interrupted before it moved the ends into the
    # namespaces stays in the host namespace; deleting one end deletes the pair.
    out = _run(["ip", "-o", "link", "show", "type", "veth"], check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        m = _VETH_RE.match(parts[1].strip())
        if m and (all_owners or not _pid_alive(int(m.group(1)))):
            name = parts[1].strip().split("@")[0]
            if _run(["ip", "link", "del", name], check=False).returncode == 0:
                removed.append(name)  # (its peer went with it)
    return removed


def _kill_ns_processes(ns: str) -> None:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class NetLab:
    """Create the namespaces and link on enter, remove everything on exit.

    ``popen(ns, argv)`` starts a process inside a namespace; ``start_relay``
    starts the delay relay in the device namespace; ``set_rate``,
    ``set_delay`` and ``outage`` change the link while processes run.
    """

    def __init__(self, subnet: str = "10.213.0", settings: LinkSettings = LinkSettings()) -> None:
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}\.\d{1,3}", subnet):
            raise ValueError(f"subnet must be the first three octets, e.g. '10.213.0', got {subnet!r}")
        n = next(_counter)
        pid = os.getpid()
        self.dev_ns = f"{NS_PREFIX}-{pid}-{n}-dev"
        self.edge_ns = f"{NS_PREFIX}-{pid}-{n}-edge"
        # Interface names are limited to 15 characters.
        self.dev_if = f"el{pid}x{n}d"[-15:]
        self.edge_if = f"el{pid}x{n}e"[-15:]
        self.dev_addr = f"{subnet}.1"
        self.edge_addr = f"{subnet}.2"
        self.settings = settings
        self._procs: list[subprocess.Popen] = []
        self._relay: subprocess.Popen | None = None
        self.relay_port: int | None = None
        self._up = False

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> "NetLab":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetLabError(reason)
        cleanup_stale()
        try:
            _run(["ip", "netns", "add", self.dev_ns])
            _run(["ip", "netns", "add", self.edge_ns])
            self._up = True
            _run(["ip", "link", "add", self.dev_if, "type", "veth", "peer", "name", self.edge_if])
            _run(["ip", "link", "set", self.dev_if, "netns", self.dev_ns])
            _run(["ip", "link", "set", self.edge_if, "netns", self.edge_ns])
            for ns, ifname, addr in ((self.dev_ns, self.dev_if, self.dev_addr), (self.edge_ns, self.edge_if, self.edge_addr)):
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifname])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", ifname, "up"])
                # Idle gaps between RPCs must not restart slow start: each Echo
                # would otherwise measure TCP ramp-up instead of the rate.
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"], check=False)
            self.set_rate(self.settings.rate_mbit, self.settings.burst_bytes)
        except BaseException:  # Ctrl-C half way too: nothing may be left behind
            self.close()
            raise

    def close(self) -> None:
        """Stop every process started here and delete both namespaces (idempotent)."""
        for proc in reversed(self._procs):
            _stop(proc)
        self._procs.clear()
        self._relay = None
        for ns in (self.dev_ns, self.edge_ns):
            _kill_ns_processes(ns)
            _run(["ip", "netns", "del", ns], check=False)
        # Normally gone with its namespace; remove it if creation failed half way.
        _run(["ip", "link", "del", self.dev_if], check=False)
        self._up = False

    # -- processes ------------------------------------------------------------

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns``; it is stopped on :meth:`close`."""
        env = dict(kw.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(self.exec_prefix(ns) + argv, env=env, **kw)
        self._procs.append(proc)
        return proc

    def start_relay(self, upstream_port: int, settings: LinkSettings | None = None, seed: int | None = None) -> int:
        """The delay relay in the device namespace, on 127.0.0.1, forwarding to
        the edge's veth address.  Returns the port the device should dial."""
        if self._relay is not None:
            raise NetLabError("relay already running")
        s = settings or self.settings
        argv = [
            sys.executable, "-m", "netlab.relay",
            "--listen", "127.0.0.1:0",
            "--upstream", f"{self.edge_addr}:{upstream_port}",
            "--delay-up-ms", str(s.delay_ms),
            "--delay-down-ms", str(s.delay_ms),
            "--jitter-ms", str(s.jitter_ms),
            "--control",
        ]
        if seed is not None:
            argv += ["--seed", str(seed)]
        proc = self.popen(self.dev_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            _stop(proc)
            raise NetLabError(f"relay did not start (got {line!r})")
        self._relay = proc
        self.relay_port = int(line.rsplit(":", 1)[1])
        return self.relay_port

    def wait_port(self, ns: str, host: str, port: int, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
        """Wait until something accepts TCP connections on host:port inside ns."""
        deadline = time.monotonic() + timeout_s
        probe = [sys.executable, "-c", f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"]
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise NetLabError(f"process exited with {proc.returncode} before listening on {host}:{port}")
            if subprocess.run(self.exec_prefix(ns) + probe, capture_output=True).returncode == 0:
                return
            time.sleep(0.5)
        raise NetLabError(f"nothing listening on {host}:{port} in {ns} after {timeout_s:.0f}s")

    # -- link changes -----------------------------------------------------------

    def set_rate(self, rate_mbit: float | None, burst_bytes: int | None = None) -> None:
        """tbf on both veth ends (``None``: remove shaping).  Takes effect live."""
        for ns, ifname in ((self.dev_ns, self.dev_if), (self.edge_ns, self.edge_if)):
            if rate_mbit is None:
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "root"], check=False)
                continue
            rate_bps = rate_mbit * 1e6 / 8
            burst = burst_bytes or max(2 * 1514, int(rate_bps * 0.0005))
            # A queue that holds a whole profiling transfer (1 MiB Echo): the
            # relay-to-edge TCP path has no delay, so its window outgrows a
            # short queue, and the drops then cost retransmission timeouts
            # that would read as a slower link.
            limit = max(2 * 1024 * 1024, int(rate_bps * 0.5))
            _run([
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
                "rate", f"{int(rate_mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit),
            ])
        self.settings = LinkSettings(rate_mbit, self.settings.delay_ms, self.settings.jitter_ms, burst_bytes, self.settings.name)

    def set_delay(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """New one-way delay/jitter on the running relay (open connections too)."""
        if self._relay is None or self._relay.poll() is not None:
            raise NetLabError("relay is not running")
        self._relay.stdin.write(f"{delay_ms} {delay_ms} {jitter_ms}\n")
        self._relay.stdin.flush()
        reply = self._relay.stdout.readline().strip()
        if reply != "OK":
            raise NetLabError(f"relay refused the new delay: {reply!r}")
        self.settings = LinkSettings(self.settings.rate_mbit, delay_ms, jitter_ms, self.settings.burst_bytes, self.settings.name)

    def apply(self, settings: LinkSettings) -> None:
        """Switch the whole link (rate and relay delay) to ``settings``."""
        self.set_rate(settings.rate_mbit, settings.burst_bytes)
        if self._relay is not None:
            self.set_delay(settings.delay_ms, settings.jitter_ms)
        self.settings = settings

    def link_down(self) -> None:
        """Cut the link at the edge's end.  The device keeps its interface and
        route (marked linkdown), so its packets vanish and connections stall,
        as when a radio link drops; downing the device's own end instead would
        remove the route and fail connects at once with ENETUNREACH."""
        _run(["ip", "-n", self.edge_ns, "link", "set", self.edge_if, "down"])

    def link_up(self, timeout_s: float = 10.0) -> None:
        """Bring the link back and wait until the edge is routable again
        (the kernel re-adds the /30 route only once the carrier is up)."""
        _run(["ip", "-n", self.edge_ns, "link", "set", self.edge_if, "up"])
        # Address resolution that failed during the outage leaves a FAILED /
        # INCOMPLETE neighbour entry; the next connect would get EHOSTUNREACH.
        for ns, ifname in ((self.dev_ns, self.dev_if), (self.edge_ns, self.edge_if)):
            _run(["ip", "-n", ns, "neigh", "flush", "dev", ifname], check=False)
        deadline = time.monotonic() + timeout_s
        while True:
            link = _run(["ip", "-n", self.dev_ns, "link", "show", "dev", self.dev_if], check=False).stdout
            route = _run(["ip", "-n", self.dev_ns, "route", "get", self.edge_addr], check=False)
            if "LOWER_UP" in link and route.returncode == 0 and self.dev_if in route.stdout:
                return
            if time.monotonic() > deadline:
                raise NetLabError(f"{self.dev_if} did not come back up within {timeout_s:.0f}s")
            time.sleep(0.05)

    @contextlib.contextmanager
    def outage(self):
        """The link is down inside the block and back up after it."""
        self.link_down()
        try:
            yield
        finally:
            self.link_up()


def _stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m netlab.namespaces cleanup [--all]``: remove leftover namespaces."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m netlab.namespaces")
    parser.add_argument("action", choices=["cleanup", "check"])
    parser.add_argument("--all", action="store_true", help="also namespaces of live processes")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if args.action == "check":
        print(reason or "ok")
        return 0 if reason is None else 1
    if reason:
        print(reason, file=sys.stderr)
        return 1
    for ns in cleanup_stale(all_owners=args.all):
        print(f"removed {ns}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
