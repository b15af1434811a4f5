"""A fault-injecting stand-in for an OpenAI-compatible engine, for the
``openai`` backend's fast tests: it replays the recorded stream shapes of
tests/fixtures/engines/ and injects what a real engine does only by accident
(error statuses, a dropped connection mid-answer, a stall).  The real engine
is tested in tests/test_gateway_integration.py.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ENGINES = Path(__file__).parent / "fixtures" / "engines"


class FaultyEngine:
    """One fake upstream on 127.0.0.1; ``mode`` picks what ``/chat/completions`` does:

    ``replay:<file>`` streams the fixture; ``status:<code>`` answers that error;
    ``drop`` sends one chunk of text then closes the connection; ``stall``
    sends one chunk then only pings until the client hangs up (``hung_up`` is set).
    """

    def __init__(self, mode: str = "replay:vllm.sse", api_key: str | None = None) -> None:
        self.mode = mode
        self.api_key = api_key
        self.requests: list[tuple[dict, dict]] = []  # (headers, body) of each chat request
        self.hung_up = threading.Event()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if not engine._authorised(self):
                    return self._json(401, {"error": {"message": "Invalid API key"}})
                self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                engine.requests.append((dict(self.headers), body))
                if not engine._authorised(self):
                    return self._json(401, {"error": {"message": "Invalid API key"}})
                engine._answer(self)

            def _json(self, status: int, data: dict) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.handler = Handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _authorised(self, h: BaseHTTPRequestHandler) -> bool:
        return self.api_key is None or h.headers.get("Authorization") == f"Bearer {self.api_key}"

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        kind, _, arg = self.mode.partition(":")
        if kind == "status":
            return h._json(int(arg), {"error": {"message": f"injected {arg}"}})
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        first = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
        if kind == "replay":
            h.wfile.write((ENGINES / arg).read_bytes())
        elif kind == "drop":
            h.wfile.write(first)
            h.wfile.flush()
            h.close_connection = True
        elif kind == "stall":
            h.wfile.write(first)
            try:
                for _ in range(600):  # at most a minute
                    time.sleep(0.1)
                    h.wfile.write(b": ping\n\n")
                    h.wfile.flush()
            except OSError:
                self.hung_up.set()

    def __enter__(self) -> "FaultyEngine":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
