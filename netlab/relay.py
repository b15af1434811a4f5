"""A userspace TCP relay that adds one-way delay and jitter, per direction.

The kernel here has no ``netem``, so delay lives in userspace: each direction
of each connection is a delay line.  A chunk read at time t is written at
``max(t + delay + U(-jitter, +jitter), release time of the previous chunk)``:
jitter varies the delay but never reorders bytes, as on a real TCP path.
An end of stream travels the same way (half-close is passed on); a reset by
either side, or a side that fails, resets both connections.

Because the delay is added after the bytes are read, the TCP connections on
either side of the relay see only their own (short) path, so the relay adds
latency without capping throughput; the rate is shaped separately by ``tbf``.

Run it standalone (e.g. inside a namespace with ``ip netns exec``)::

    python -m netlab.relay --listen 127.0.0.1:7000 --upstream 10.0.0.2:50051 \
        --delay-up-ms 20 --delay-down-ms 20 --jitter-ms 2

It prints ``READY <host>:<port>`` on stdout once listening, and exits cleanly on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Bytes read per socket read.  Small enough that delay applies at a fine grain.
CHUNK_BYTES = 64 * 1024

#: What a reset becomes in a delay line: it travels with the delay, as a FIN
#: does, and the far side's connection is then reset too.
_RESET = object()


class _Reset(ConnectionError):
    """A peer reset its connection; the relay resets the other side."""


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s connection with RST, not FIN (a plain close sends FIN
    unless unread data is pending)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


#: The last stretch of each wait is a blocking ``time.sleep`` instead of an
#: asyncio timer: epoll's timeout is in whole milliseconds (rounded up), which
#: made every chunk late by ~0.5 ms on average, +1 ms on a round trip.
FINE_SLEEP_S = 0.002


@dataclass(frozen=True)
class RelaySettings:
    """Delay line settings.  Delays are one-way, in seconds."""

    delay_up_s: float = 0.0
    """Added to bytes travelling client -> upstream (device -> edge)."""
    delay_down_s: float = 0.0
    """Added to bytes travelling upstream -> client (edge -> device)."""
    jitter_s: float = 0.0
    """Each chunk's delay is drawn uniformly from delay ± jitter (clipped at 0)."""
    max_buffer_bytes: int = 16 * 1024 * 1024
    """Bytes held per direction before the relay stops reading (backpressure)."""
    seed: int | None = None
    """Seed of the jitter draw, for reproducible runs."""

    def __post_init__(self) -> None:
        for name in ("delay_up_s", "delay_down_s", "jitter_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.max_buffer_bytes, int) or self.max_buffer_bytes < CHUNK_BYTES:
            raise ValueError(f"max_buffer_bytes must be an int >= {CHUNK_BYTES}")


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); raises ValueError with a clear message."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class _DelayLine:
    """One direction of one connection: read, hold for the delay, write in order."""

    def __init__(self, relay: "DelayRelay", direction: str) -> None:
        settings = relay.settings
        self._relay = relay
        self._direction = direction
        self._rng = relay._rng
        self._queue: asyncio.Queue[tuple[float, object]] = asyncio.Queue()
        self._last_release = 0.0
        self._buffered = 0
        self._max_buffer = settings.max_buffer_bytes
        self._drained = asyncio.Event()
        self._drained.set()

    def _release_time(self, now: float) -> float:
        # Read the settings per chunk: reconfigure() takes effect on open connections.
        settings = self._relay.settings
        delay = settings.delay_up_s if self._direction == "up" else settings.delay_down_s
        if settings.jitter_s:
            delay = max(0.0, delay + self._rng.uniform(-settings.jitter_s, settings.jitter_s))
        # Never before the previous chunk: jitter must not reorder bytes.
        self._last_release = max(now + delay, self._last_release)
        return self._last_release

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        end: object = None  # EOF
        try:
            while True:
                await self._drained.wait()
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                self._buffered += len(data)
                if self._buffered >= self._max_buffer:
                    self._drained.clear()
                self._queue.put_nowait((self._release_time(loop.time()), data))
        except (ConnectionError, OSError):
            end = _RESET
        # EOF (or a reset) travels with the same delay as data would.
        self._queue.put_nowait((self._release_time(loop.time()), end))

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                release, data = await self._queue.get()
                wait = release - loop.time()
                if wait > FINE_SLEEP_S:
                    await asyncio.sleep(wait - FINE_SLEEP_S)
                    wait = release - loop.time()
                if wait > 0:
                    # Blocks the loop for at most FINE_SLEEP_S (+ the timer's own
                    # overshoot): other chunks are late by no more than that.
                    time.sleep(wait)
                if data is _RESET:
                    _abort_with_reset(writer)  # as the peer on the other side did
                    raise _Reset(f"{self._direction}: the sending side reset its connection")
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    await writer.drain()
                    break
                writer.write(data)
                await writer.drain()
                self._buffered -= len(data)
                if self._buffered < self._max_buffer:
                    self._drained.set()
        except _Reset:
            raise
        except (ConnectionError, OSError) as exc:
            # The receiving side is gone: nothing more can be delivered.
            raise _Reset(f"{self._direction}: the receiving side failed: {exc}") from None


class DelayRelay:
    """An asyncio TCP relay: listen, connect upstream per client, delay both ways."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        settings: RelaySettings = RelaySettings(),
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.settings = settings
        self._rng = random.Random(settings.seed)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("relay is not started")
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, *self.listen)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        self._writers.add(c_writer)
        u_writer = None
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                log.warning("relay: upstream %s:%d unreachable: %s", *self.upstream, exc)
                return
            self._writers.add(u_writer)
            up = _DelayLine(self, "up")
            down = _DelayLine(self, "down")
            pumps = [
                asyncio.ensure_future(coro)
                for coro in (up.pump_in(c_reader), up.pump_out(u_writer),
                             down.pump_in(u_reader), down.pump_out(c_writer))
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                pumps_left = [t for t in pumps if not t.done()]
                for t in pumps_left:
                    t.cancel()
                await asyncio.gather(*pumps_left, return_exceptions=True)
            failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                # One side reset or failed: reset both (a half-open connection
                # would hold its sockets and buffers until the relay stops).
                log.debug("relay: connection reset: %s", failed[0])
                for w in (c_writer, u_writer):
                    _abort_with_reset(w)
        except asyncio.CancelledError:
            # close() cancels open connections; ending here is the normal path
            # (re-raising would make asyncio log the handler task as failed).
            pass
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._tasks.discard(task)

    def reconfigure(self, settings: RelaySettings) -> None:
        """New delays for every chunk read from now on (open connections included).

        A shorter delay never makes a later chunk overtake an earlier one.
        """
        self.settings = settings

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RelayThread:
    """Run a :class:`DelayRelay` on its own event loop thread (for tests and tools).

    Use as a context manager; ``port`` is the listening port once entered.
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], settings: RelaySettings = RelaySettings()) -> None:
        self.relay = DelayRelay(listen, upstream, settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-relay", daemon=True)

    @property
    def port(self) -> int:
        return self.relay.port

    def __enter__(self) -> "RelayThread":
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.relay.start(), self._loop).result(timeout=10)
        except BaseException:
            # e.g. the port is taken: no loop thread is left running.
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reconfigure(self, settings: RelaySettings) -> None:
        self._loop.call_soon_threadsafe(self.relay.reconfigure, settings)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.relay.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def parse_control_line(line: str, current: RelaySettings) -> RelaySettings:
    """``"DELAY_UP_MS DELAY_DOWN_MS JITTER_MS"`` -> new settings (the control protocol)."""
    parts = line.split()
    if len(parts) != 3:
        raise ValueError(f"expected 'DELAY_UP_MS DELAY_DOWN_MS JITTER_MS', got {line!r}")
    up, down, jitter = (float(x) / 1000 for x in parts)
    return RelaySettings(up, down, jitter, current.max_buffer_bytes, current.seed)


def _control_thread(relay: DelayRelay, loop: asyncio.AbstractEventLoop) -> None:
    """Reconfigure from stdin lines, so a test can degrade a live link without
    changing the address the client dials.  Replies ``OK`` or ``ERR ...``.

    A daemon thread, not the loop's executor: a blocked ``readline`` must not
    hold up shutdown.
    """
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            settings = parse_control_line(line, relay.settings)
        except ValueError as exc:
            print(f"ERR {exc}", flush=True)
            continue
        loop.call_soon_threadsafe(relay.reconfigure, settings)
        print("OK", flush=True)


async def _serve(relay: DelayRelay, control: bool) -> None:
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = relay.listen[0]
    print(f"READY {host}:{relay.port}", flush=True)
    if control:
        threading.Thread(target=_control_thread, args=(relay, loop), daemon=True).start()
    await stop.wait()
    await relay.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netlab.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-up-ms", type=float, default=0.0, help="one-way delay device -> edge")
    parser.add_argument("--delay-down-ms", type=float, default=0.0, help="one-way delay edge -> device")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± jitter on each delay")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--control",
        action="store_true",
        help="read 'DELAY_UP_MS DELAY_DOWN_MS JITTER_MS' lines on stdin to change the delays live",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = RelaySettings(
            delay_up_s=args.delay_up_ms / 1000,
            delay_down_s=args.delay_down_ms / 1000,
            jitter_s=args.jitter_ms / 1000,
            seed=args.seed,
        )
        relay = DelayRelay(parse_hostport(args.listen), parse_hostport(args.upstream), settings)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(relay, args.control))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
