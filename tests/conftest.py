"""Fixtures shared by the test files: the real edge server, the real device
SLM, and the ``edgeroute`` command line in a subprocess.

The model fixtures are session-scoped: each loads its GGUF once for the whole
run.  Tests that need a server in a particular state (a fault-injecting
backend, other settings) start their own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on the path, no hub access."""
    env = {**os.environ, **OFFLINE_ENV, **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_edgeroute(*args: str, stdin: str | None = None, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``edgeroute ARGS`` as a user runs it: a new process, text in and out."""
    return subprocess.run(
        [sys.executable, "-m", "device_runtime.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env if env is not None else cli_env(),
    )


@pytest.fixture(scope="session", autouse=True)
def _private_state_dir(tmp_path_factory):
    """``chat`` journals by default into ``$XDG_STATE_HOME``: in tests that is
    a temporary directory, never the user's own journal."""
    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli("chat", "--edge", target, stdin=..., timeout=...)``."""
    return run_edgeroute


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function that returns a loopback port nobody listens on (at the time of the call)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def edge_server():
    """The default edge model (Gemma 3 270M) served on loopback: one slot, 2,048 tokens."""
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    server = EdgeServerThread(EdgeSettings(n_ctx=2048, n_slots=1, n_threads=1)).start()
    yield server
    server.stop()


@pytest.fixture
def principals(tmp_path):
    """alice's, bob's and carol's bearer tokens, and the token file naming them
    (``serve --token-file``)."""
    from edge_service.auth import hash_token, new_token

    tokens = {name: new_token() for name in ("alice", "bob", "carol")}
    path = tmp_path / "tokens.tsv"
    path.write_text("".join(f"{name}\t{hash_token(tok)}\n" for name, tok in tokens.items()))
    return tokens, path


@pytest.fixture(scope="session")
def slm():
    """The default device SLM (SmolLM2-135M-Instruct) at 2,048 tokens."""
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings

    backend = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_ctx=2048, n_threads=1))
    yield backend
    backend.close()
