"""A real edge gateway (the default edge model, llama_cpp backend) in its own
process, whose answers can stall after their first chunk: fault injection for
tests/test_gateways.py, which SIGKILLs the process in the middle of an answer.

    python tests/_gateway_proc.py PORT STALL_FROM

Generate calls number STALL_FROM and later (1-based; 0: none) yield their
first real chunk and then wait until cancelled, so that the kill lands
mid-stream whatever the model would have answered.  Everything else is the
real server and the real model.  Runs until killed.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class StallingSlot:
    """A real slot whose streams from the ``stall_from``-th call on stop after one chunk."""

    def __init__(self, real, backend: "StallingBackend") -> None:
        self._real = real
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._real, name)

    def stream(self, messages, params, cancel, kv_owner=None, **more):
        self._backend.calls += 1
        stall = 0 < self._backend.stall_from <= self._backend.calls
        for chunk in self._real.stream(messages, params, cancel, kv_owner, **more):
            yield chunk
            if stall:
                while not cancel.is_set():
                    cancel.wait(0.05)
                return


class StallingBackend:
    """The real backend, handing out :class:`StallingSlot` wrappers."""

    def __init__(self, real, stall_from: int) -> None:
        self._real = real
        self.stall_from = stall_from
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    def new_slot(self):
        return StallingSlot(self._real.new_slot(), self)


def main() -> None:
    from edge_service.backends.base import BACKENDS
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    port, stall_from = int(sys.argv[1]), int(sys.argv[2])
    settings = EdgeSettings(n_ctx=2048, n_slots=1, n_threads=1)
    backend = StallingBackend(BACKENDS.create("llama_cpp", settings), stall_from)
    server = EdgeServerThread(settings, port=port, backend=backend).start()
    print(f"ready {server.target}", flush=True)
    stop = threading.Event()
    while not stop.is_set():
        time.sleep(1.0)


if __name__ == "__main__":
    main()
