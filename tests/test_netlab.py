"""The emulated link: the delay relay on loopback, and the namespaces + tbf link.

Timing assertions here compare the delay the relay is *configured* to add with
the delay it adds (a behaviour of the tool under test), with wide bounds.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from netlab.namespaces import LinkSettings, NetLab, cleanup_stale, list_namespaces, unavailable_reason
from netlab.relay import RelaySettings, RelayThread, parse_control_line, parse_hostport


# -- a tiny TCP echo server on loopback ---------------------------------------


class EchoServer:
    """Echoes every byte back; closes when the peer closes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def __enter__(self) -> "EchoServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self.sock.close()


def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return bytes(got), time.perf_counter() - t0


# -- relay on loopback (no root needed) ------------------------------------------


def test_settings_validate():
    with pytest.raises(ValueError):
        RelaySettings(delay_up_s=-1)
    with pytest.raises(ValueError):
        RelaySettings(max_buffer_bytes=10)
    with pytest.raises(ValueError):
        parse_hostport("nope")
    assert parse_hostport("10.0.0.2:50051") == ("10.0.0.2", 50051)
    new = parse_control_line("30 40 5", RelaySettings())
    assert (new.delay_up_s, new.delay_down_s, new.jitter_s) == (0.03, 0.04, 0.005)
    with pytest.raises(ValueError):
        parse_control_line("30 40", RelaySettings())


def test_relay_adds_configured_delay_and_keeps_bytes():
    payload = os.urandom(200_000)
    with EchoServer() as echo:
        _, base = _roundtrip(echo.port, b"x")
        with RelayThread(("127.0.0.1", 0), ("127.0.0.1", echo.port), RelaySettings(0.05, 0.03)) as relay:
            got, rtt = _roundtrip(relay.port, b"ping")
            assert got == b"ping"
            # 50 ms up + 30 ms down; loose upper bound for a busy 2-core box.
            assert 0.08 <= rtt < 0.08 + base + 0.25
            got, _ = _roundtrip(relay.port, payload)
            assert got == payload


def test_relay_jitter_stays_in_bounds_and_preserves_order():
    settings = RelaySettings(0.02, 0.02, jitter_s=0.01, seed=1)
    with EchoServer() as echo, RelayThread(("127.0.0.1", 0), ("127.0.0.1", echo.port), settings) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            received = bytearray()
            sent = bytearray()
            for i in range(30):
                msg = f"{i:04d}".encode() * 16
                sent += msg
                t0 = time.perf_counter()
                s.sendall(msg)
                need = len(sent)
                while len(received) < need:
                    received += s.recv(65536)
                rtts.append(time.perf_counter() - t0)
                # Back-to-back writes with random delays must arrive in order.
                s.sendall(b"a" * 10)
                s.sendall(b"b" * 10)
                sent += b"a" * 10 + b"b" * 10
            while len(received) < len(sent):
                received += s.recv(65536)
    assert bytes(received) == bytes(sent)
    # Each RTT is two draws from 20 ± 10 ms: within [20, 60] ms plus processing.
    assert min(rtts) >= 0.02
    assert max(rtts) < 0.06 + 0.2
    assert max(rtts) - min(rtts) > 0.002, "jitter should vary the delay"


def test_relay_reconfigure_applies_to_open_connection():
    with EchoServer() as echo, RelayThread(("127.0.0.1", 0), ("127.0.0.1", echo.port), RelaySettings(0.0, 0.0)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def rt() -> float:
                t0 = time.perf_counter()
                s.sendall(b"z")
                assert s.recv(10) == b"z"
                return time.perf_counter() - t0

            rt()
            relay.reconfigure(RelaySettings(0.06, 0.06))
            time.sleep(0.05)
            assert rt() >= 0.12


def test_relay_unreachable_upstream_closes_client():
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with RelayThread(("127.0.0.1", 0), ("127.0.0.1", port)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            assert s.recv(10) == b""  # closed, not hung


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_client_reset_resets_upstream_and_frees_the_connection():
    """A device that drops its connection mid-download must not leave the relay
    reading for it until its buffer fills (then hanging there)."""
    server = socket.create_server(("127.0.0.1", 0))
    upstream_error = []

    def flood() -> None:
        conn, _ = server.accept()
        try:
            while True:
                conn.sendall(b"x" * 65536)
        except OSError as exc:
            upstream_error.append(exc)
        finally:
            conn.close()

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    with RelayThread(("127.0.0.1", 0), server.getsockname(), RelaySettings(0.005, 0.005)) as relay:
        c = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        assert c.recv(1024)
        _reset(c)
        assert _wait_for(lambda: not relay.relay._tasks), "the relay still holds the connection"
        t.join(5)
        assert upstream_error and isinstance(upstream_error[0], ConnectionError)
    server.close()


def test_an_upstream_reset_reaches_the_client_as_a_reset():
    server = socket.create_server(("127.0.0.1", 0))

    def accept_and_reset() -> None:
        conn, _ = server.accept()
        conn.recv(10)
        _reset(conn)

    t = threading.Thread(target=accept_and_reset, daemon=True)
    t.start()
    with RelayThread(("127.0.0.1", 0), server.getsockname(), RelaySettings(0.005, 0.005)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            c.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                while c.recv(1024):  # a clean EOF here would read b"" and end the loop
                    pass
                raise AssertionError("the client saw a clean close, not a reset")
        assert _wait_for(lambda: not relay.relay._tasks)
    t.join(5)
    server.close()


def test_relay_shuts_down_cleanly_with_open_connections():
    with EchoServer() as echo:
        relay = RelayThread(("127.0.0.1", 0), ("127.0.0.1", echo.port), RelaySettings(0.01, 0.01))
        relay.__enter__()
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        s.sendall(b"hello")
        assert s.recv(10) == b"hello"
        relay.close()
        assert s.recv(10) == b""  # the relay dropped the connection
        s.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=1)


def test_relay_cli_process_stops_on_sigterm():
    with EchoServer() as echo:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netlab.relay", "--listen", "127.0.0.1:0",
             "--upstream", f"127.0.0.1:{echo.port}", "--delay-up-ms", "10", "--control"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith("READY 127.0.0.1:")
            port = int(line.rsplit(":", 1)[1])
            assert _roundtrip(port, b"abc")[0] == b"abc"
            proc.stdin.write("bad line\n")
            proc.stdin.flush()
            assert proc.stdout.readline().startswith("ERR")
            proc.stdin.write("5 5 0\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "OK"
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_relay_cli_rejects_bad_address():
    proc = subprocess.run(
        [sys.executable, "-m", "netlab.relay", "--listen", "nope", "--upstream", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "HOST:PORT" in proc.stderr


# -- namespaces + tbf (root) ----------------------------------------------------------

_REASON = unavailable_reason()
netns = pytest.mark.skipif(_REASON is not None, reason=f"netlab: {_REASON}")

# Inside the edge namespace: echo each request, or answer a "GET n" with n bytes.
_SINK = r"""
import socket, sys, threading
def serve(c):
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = c.recv(16)
            if not head:
                break
            n = int(head.decode())
            c.sendall(b"x" * n)
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

_CLIENT = r"""
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for n in map(int, sys.argv[2:]):
    t0 = time.perf_counter()
    s.sendall(f"{n:016d}".encode())
    got = 0
    while got < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            sys.exit("connection closed")
        got += len(chunk)
    print(n, time.perf_counter() - t0, flush=True)
"""


def _start_sink(lab: NetLab) -> int:
    proc = lab.popen(lab.edge_ns, [sys.executable, "-c", _SINK, lab.edge_addr], stdout=subprocess.PIPE, text=True)
    return int(proc.stdout.readline())


def _client(lab: NetLab, port: int, sizes: list[int]) -> list[tuple[int, float]]:
    out = subprocess.run(
        lab.exec_prefix(lab.dev_ns) + [sys.executable, "-c", _CLIENT, str(port)] + [str(n) for n in sizes],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return [(int(a), float(b)) for a, b in (line.split() for line in out.splitlines())]


@pytest.mark.netns
@netns
def test_netlab_link_delay_rate_outage_and_cleanup():
    settings = LinkSettings(rate_mbit=8.0, delay_ms=25.0, name="test")
    with NetLab(settings=settings) as lab:
        assert lab.dev_ns in list_namespaces() and lab.edge_ns in list_namespaces()
        # The /30 exists only inside the namespaces, not on the host.
        host_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        assert lab.edge_addr + "/30" not in host_addrs
        port = _start_sink(lab)
        relay_port = lab.start_relay(port)
        small = [t for _, t in _client(lab, relay_port, [1] * 5)]
        rtt = sorted(small)[len(small) // 2]
        assert 0.05 <= rtt < 0.05 * 1.3 + 0.02
        # 1 MB at 8 Mbit/s is ~1.0 s on top of the RTT.
        (_, t_big), = _client(lab, relay_port, [1_000_000])
        rate = 1_000_000 / (t_big - rtt)
        assert settings.rate_bytes_per_s * 0.8 < rate < settings.rate_bytes_per_s * 1.15

        # Degrade live: more delay, less rate.
        lab.apply(LinkSettings(rate_mbit=2.0, delay_ms=60.0))
        small = [t for _, t in _client(lab, relay_port, [1] * 3)]
        assert sorted(small)[1] >= 0.12

        # Outage: the link is down, a connection attempt stalls; back up, it works.
        with lab.outage():
            with pytest.raises(subprocess.TimeoutExpired):
                subprocess.run(
                    lab.exec_prefix(lab.dev_ns) + [sys.executable, "-c", _CLIENT, str(relay_port), "1"],
                    capture_output=True, timeout=3,
                )
        assert _client(lab, relay_port, [1])[0][0] == 1
        names = (lab.dev_ns, lab.edge_ns)
    assert not set(names) & set(list_namespaces())


@pytest.mark.netns
@netns
def test_cleanup_stale_removes_leftovers_of_a_dead_run():
    # A "crashed" run: namespaces named after a pid that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = f"erlab-{dead.pid}-0-dev"
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    # ... and a veth pair it made but had not yet moved into its namespaces.
    veth = f"el{dead.pid}x0d"[-15:]
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"el{dead.pid}x0e"[-15:]],
                   check=True)
    try:
        removed = cleanup_stale()
        assert leftover in removed and {veth, f"el{dead.pid}x0e"[-15:]} & set(removed)
        assert leftover not in list_namespaces()
        assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0
        assert leftover not in cleanup_stale()  # idempotent
    finally:
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


@pytest.mark.netns
@netns
def test_an_interrupted_create_leaves_nothing_behind(monkeypatch):
    import netlab.namespaces as ns_mod

    real_run = ns_mod._run
    calls = []

    def interrupt_at_veth_move(cmd, *a, **kw):  # fault injection: Ctrl-C half way
        calls.append(cmd)
        if cmd[:3] == ["ip", "link", "set"] and "netns" in cmd:
            raise KeyboardInterrupt
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(ns_mod, "_run", interrupt_at_veth_move)
    lab = NetLab(subnet="10.213.9")
    with pytest.raises(KeyboardInterrupt):
        lab.create()
    monkeypatch.setattr(ns_mod, "_run", real_run)
    assert lab.dev_ns not in list_namespaces() and lab.edge_ns not in list_namespaces()
    assert subprocess.run(["ip", "link", "show", lab.dev_if], capture_output=True).returncode != 0


def test_a_relay_that_cannot_listen_leaves_no_thread_behind():
    taken = socket.create_server(("127.0.0.1", 0))
    before = threading.active_count()
    relay = RelayThread(("127.0.0.1", taken.getsockname()[1]), ("127.0.0.1", 9))
    with pytest.raises(OSError):
        relay.__enter__()
    assert not relay._thread.is_alive() and threading.active_count() == before
    taken.close()
