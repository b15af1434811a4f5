"""The ``openai`` backend in front of real engines: two (and for the failover
test three) ``python -m llama_cpp.server`` replicas on loopback serving the
default edge GGUF, the gateway (``EdgeServerThread``) in front, and the
device's ``EdgeClient`` talking to it.  Each replica's access log counts the
requests it served, independently of the gateway's own record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("llama_cpp.server.app")  # the edge-openai extra

from device_runtime.link.edge_client import EdgeClient, EdgeUnavailable  # noqa: E402
from edge_service.backends.openai_wire import affinity_key  # noqa: E402
from edge_service.server import EdgeServerThread  # noqa: E402
from edge_service.settings import EdgeSettings  # noqa: E402
from edge_service.upstreams import rendezvous_order  # noqa: E402
from edgeroute.v1.types import GenerationParams  # noqa: E402

pytestmark = pytest.mark.slow

API_KEY = "sk-test-replica-b"
PARAMS = GenerationParams(max_tokens=12, temperature=0.0)
CHAT = "POST /v1/chat/completions"


class Replica:
    """One llama-cpp-python server process; its stdout is its request log."""

    def __init__(self, port: int, log: Path, api_key: str | None = None) -> None:
        from edge_service.models import default_edge_model_path

        self.url = f"http://127.0.0.1:{port}/v1"
        self.log = log
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_edge_model_path()),
               # The GGUF has no chat template (the edge formats it 'plain'); llama-cpp-python's
               # fallback (llama-2) makes this model answer nothing, its gemma format answers.
               "--model_alias", "edge", "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1",
               "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "false",
               "--verbose", "false"]
        if api_key:
            cmd += ["--api_key", api_key]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=1)
                return
            except urllib.error.HTTPError:  # 401: up, and wants its key
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"replica {self.url} did not start")

    def chat_requests(self) -> int:
        return self.log.read_text(errors="replace").count(CHAT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._out.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, free_port):
    """Replica A (no key) and B (``--api_key``), started together (model load: seconds)."""
    logs = tmp_path_factory.mktemp("replicas")
    started = [Replica(free_port(), logs / "a.log"), Replica(free_port(), logs / "b.log", API_KEY)]
    try:
        for r in started:
            r.wait_ready()
        yield started
    finally:
        for r in started:
            r.stop()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("key") / "upstream.key"
    path.write_text(API_KEY + "\n")
    path.chmod(0o600)
    return path


def gateway(urls, key_file=None, **kw) -> EdgeServerThread:
    settings = EdgeSettings(backend="openai", upstream=tuple(urls), upstream_api_key_file=key_file,
                            n_slots=4, upstream_health_interval_s=1.0, **kw)
    return EdgeServerThread(settings)


def turn(client: EdgeClient, sid: str, history: list[dict], text: str, **kw):
    """One user turn through the device's client; the history grows by it."""
    msgs = [*history, {"role": "user", "content": text}]
    stream = client.generate(sid, msgs if not history else msgs[-1:], PARAMS, open_session=not history, **kw)
    answer = "".join(stream)
    history += [msgs[-1], {"role": "assistant", "content": answer}]
    return stream.result


def _three_per_replica(urls: list[str]) -> list[str]:
    """Six session ids, three homed on each replica.  The replicas' URLs carry
    free ports, so six arbitrary ids would all hash to one replica in about 3%
    of runs, and the test could not show that both take sessions."""
    homes: dict[str, list[str]] = {u: [] for u in urls}
    for i in range(1000):
        sid = f"affinity-{i}"
        home = homes[rendezvous_order(affinity_key("anonymous", sid), urls)[0]]
        if len(home) < 3:
            home.append(sid)
        if all(len(v) == 3 for v in homes.values()):
            return [sid for v in homes.values() for sid in v]
    raise AssertionError("rendezvous hashing put 1000 ids on one replica")


def test_streaming_and_affinity_over_two_replicas(replicas, key_file):
    a, b = replicas
    before = a.chat_requests() + b.chat_requests()
    with gateway([a.url, b.url], key_file) as edge:
        client = EdgeClient(edge.target)
        sessions = _three_per_replica([a.url, b.url])
        for sid in sessions:
            history: list[dict] = []
            for text in ("Name a colour.", "And another?", "Thanks!"):
                result = turn(client, sid, history, text)
                assert result.output_tokens >= 1 and result.cached_tokens_unknown
                assert not result.kv_restored  # the session stayed on its replica
        served = edge.servicer.backend.served
        client.close()
    for sid in sessions:
        key = affinity_key("anonymous", sid)
        used = {url for k, url in served if k == key}
        assert used == {rendezvous_order(key, [a.url, b.url])[0]}  # every turn on its home replica
    assert {url for _, url in served} == {a.url, b.url}  # both replicas took sessions
    # The engines saw exactly the turns: none lost, none sent twice.
    assert a.chat_requests() + b.chat_requests() - before == len(sessions) * 3


def test_cancel_closes_the_upstream_stream(replicas, key_file):
    a, _ = replicas
    with gateway([a.url]) as edge:
        client = EdgeClient(edge.target)
        long = GenerationParams(max_tokens=400, temperature=0.0)
        msgs = [{"role": "user", "content": "Count from one to two hundred in words."}]
        stream = client.generate("cancel-1", msgs, long, open_session=True)
        next(iter(stream))
        stream.cancel()
        deadline = time.monotonic() + 60
        while "Disconnected from client" not in a.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the replica never saw the gateway hang up"
            time.sleep(0.1)
        # The replica is free again: the next turn is answered in full.
        assert turn(client, "cancel-2", [], "Say hi.").finish_reason in ("stop", "length")
        client.close()


def test_a_killed_replica_fails_over_without_losing_a_turn(replicas, key_file, free_port, tmp_path):
    a, _ = replicas
    doomed = Replica(free_port(), tmp_path / "c.log")
    try:
        doomed.wait_ready()
        urls = [a.url, doomed.url]
        # A session whose home is the replica about to die.
        sid = next(s for s in (f"failover-{i}" for i in range(100))
                   if rendezvous_order(affinity_key("anonymous", s), urls)[0] == doomed.url)
        with gateway(urls) as edge:
            client = EdgeClient(edge.target)
            history: list[dict] = []
            assert not turn(client, sid, history, "Name a fruit.").kv_restored
            assert doomed.chat_requests() == 1
            doomed.stop()
            result = turn(client, sid, history, "Name another fruit.")
            assert result.kv_restored  # replica A prefilled the whole conversation
            assert edge.servicer.backend.served[-1][1] == a.url
            session = edge.servicer.pool._sessions[("anonymous", sid)]
            assert [m.content for m in session.transcript] == [m["content"] for m in history]
            client.close()
    finally:
        doomed.stop()


def test_the_upstream_api_key(replicas, key_file):
    _, b = replicas
    with gateway([b.url], key_file) as edge:
        client = EdgeClient(edge.target)
        assert turn(client, "key-1", [], "Say hi.").output_tokens >= 1
        client.close()
    with gateway([b.url], upstream_model="edge") as edge:  # no key: the probe cannot list models
        client = EdgeClient(edge.target)
        with pytest.raises(EdgeUnavailable, match="credentials"):
            turn(client, "key-2", [], "Say hi.")
        client.close()
