"""Run ``edgeroute`` until its fault hook pauses it, then ``kill -9`` it
(tests/test_journal_cli.py, tests/test_journal_crash.py; the hook:
device_runtime/cli/faults.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAUSED = "edgeroute-fault: paused at "


@dataclass
class Killed:
    """What a killed run left: its telemetry lines, its stderr, where it paused."""

    records: list[dict]
    stderr: str
    paused: str | None
    returncode: int


def kill_at(args: list[str], env: dict[str, str], fault: str, timeout: float = 300) -> Killed:
    """``edgeroute ARGS`` with ``EDGEROUTE_FAULT=fault``, SIGKILLed as soon
    as it says it paused (or when it ends by itself: ``paused`` is None)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_runtime.cli", *args], cwd=ROOT, text=True,
        env={**env, "EDGEROUTE_FAULT": fault}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines, paused = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(PAUSED):
                paused = line[len(PAUSED):].strip()
                proc.send_signal(signal.SIGKILL)
                break
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
    records = [json.loads(x) for x in out.splitlines()]
    return Killed(records, "".join(lines) + err, paused, proc.returncode)
