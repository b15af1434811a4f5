"""The live system on the emulated link: an edge server in the edge namespace,
the relay, and a device worker (:mod:`netlab.device_worker`) in the device
namespace, driven from outside.  Used by tests and ``scripts/bench_link.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from netlab.namespaces import NetLab, NetLabError

EDGE_PORT = 50051


def start_edge(lab: NetLab, port: int = EDGE_PORT, extra: list[str] | None = None, timeout_s: float = 300.0) -> subprocess.Popen:
    """``edgeroute serve`` on the edge's veth address; returns once it accepts connections."""
    # The veth address is not loopback, so serve needs --insecure: the link
    # is a private pair of namespaces made by this run, with nobody else on it.
    argv = [sys.executable, "-m", "device_runtime.cli.main", "serve", "--host", lab.edge_addr, "--port", str(port),
            "--insecure"]
    proc = lab.popen(lab.edge_ns, argv + list(extra or []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lab.wait_port(lab.edge_ns, lab.edge_addr, port, timeout_s=timeout_s, proc=proc)
    except NetLabError as exc:
        err = proc.stderr.read()[-2000:] if proc.poll() is not None else ""
        raise NetLabError(f"{exc}\n{err}") from None
    # Nobody reads it from here on: let the server's logs go nowhere rather than fill a pipe.
    proc.stderr.close()
    return proc


class DeviceWorker:
    """A :mod:`netlab.device_worker` process in the device namespace."""

    def __init__(self, lab: NetLab, edge_target: str, policy: str, *, extra: list[str] | None = None,
                 stderr=None) -> None:
        argv = [sys.executable, "-m", "netlab.device_worker", "--edge", edge_target, "--policy", policy]
        self.proc = lab.popen(lab.dev_ns, argv + list(extra or []), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=stderr, text=True)
        hello = self._read()
        if not hello.get("ready"):
            raise NetLabError(f"device worker did not start: {hello}")
        self.online = bool(hello.get("online"))

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise NetLabError(f"device worker exited ({self.proc.poll()})")
        return json.loads(line)

    def _call(self, msg: dict) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise NetLabError(f"device worker: {reply['error']}")
        return reply

    def turn(self, prompt: str) -> dict[str, Any]:
        return self._call({"cmd": "turn", "prompt": prompt})

    def new_conversation(self) -> None:
        self._call({"cmd": "new_conversation"})

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "DeviceWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
