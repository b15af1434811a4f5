"""What journaling a turn costs, under ``synchronous=FULL`` and ``NORMAL``.

    .venv/bin/python scripts/bench_journal.py [--turns 200] [--dir DIR]

A turn is two transactions (:meth:`Journal.begin_turn` before routing,
:meth:`Journal.complete_turn` after the answer), each a commit of the WAL:
FULL fsyncs the WAL at every commit, NORMAL only at checkpoints.  Each
setting journals ``--turns`` turns of a realistic size (a 300-character
prompt, a 1,200-character answer, a telemetry record) into a fresh journal in
``--dir`` (default: a temporary directory beside the default journal, so on
the file system the journal lives on) and prints a markdown table of the
per-turn time: median, p95 and mean, and the file size.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_runtime.runtime.journal import Journal, JournalSettings, default_journal_path  # noqa: E402

TELEMETRY = {
    "turn": 1, "target": "edge", "policy": "auto", "p": 0.61, "p_fused": 0.58,
    "predicted_s": {"device": 2.1, "edge": 1.4}, "measured_s": 1.52, "ttft_s": 0.31,
    "prompt_tokens": 70, "context_tokens": 900, "prefill_tokens": 80, "cached_tokens": 890,
    "output_tokens": 128, "fallback": False,
}


def time_turns(path: Path, synchronous: str, turns: int) -> list[float]:
    """Seconds per journaled turn (begin + complete)."""
    prompt, answer = "p" * 300, "a" * 1200
    times = []
    with Journal(path, JournalSettings(synchronous=synchronous)) as journal:
        conversation = None
        for i in range(turns):
            t0 = time.perf_counter()
            conversation, turn = journal.begin_turn(conversation, f"{i} {prompt}")
            journal.complete_turn(conversation, turn, answer, TELEMETRY, "sess", 2 * turn)
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where the journals are written")
    args = ap.parse_args()
    base = args.dir or default_journal_path().parent
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-journal-", dir=base))
    try:
        print(f"{args.turns} turns per setting, journals in {tmp}\n")
        print("| synchronous | median ms/turn | p95 ms/turn | mean ms/turn | file KiB |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for sync in ("normal", "full"):
            path = tmp / f"{sync}.sqlite3"
            times = sorted(time_turns(path, sync, args.turns))
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            size = path.stat().st_size / 1024
            print(f"| {sync.upper()} | {statistics.median(times) * 1e3:.2f} | {p95 * 1e3:.2f} | "
                  f"{statistics.fmean(times) * 1e3:.2f} | {size:.0f} |")
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
