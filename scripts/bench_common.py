"""Helpers shared by ``scripts/bench_edge.py`` and ``scripts/bench_live.py``.

Both scripts put ``scripts/`` on ``sys.path`` (Python does so for the script's own
folder), so this module is imported as ``bench_common``.  Nothing happens on import.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_checkout_to_path() -> None:
    """Let the scripts run from a checkout without installing the project."""
    for p in (str(ROOT / "proto"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


TOPICS = ["rivers", "mountains", "bridges", "clocks", "gardens", "trains", "bees", "lighthouses",
          "maps", "violins", "glaciers", "markets", "kites", "deserts", "libraries", "harbours",
          "comets", "orchards", "windmills", "caves"]


def history_messages(target_tokens: int, count_tokens) -> list[dict]:
    """A made-up dialogue of just under ``target_tokens`` prompt tokens (team-written filler).

    ``count_tokens(messages)`` counts the formatted prompt in the serving model's
    tokens, so each model gets the history length it will actually hold (the
    ``context_tokens`` C_t of eqs. 3-4).
    """
    history: list[dict] = []
    i = 0
    while True:
        topic = TOPICS[i % len(TOPICS)]
        turn = [
            user(f"Question {i + 1}: tell me one plain fact about {topic} and why it matters."),
            assistant(
                f"Fact {i + 1}: {topic} have been studied for a long time. People care about {topic} "
                f"because they shape daily life, trade and travel in many places, and because "
                f"learning how {topic} work helps us plan better for the years ahead."
            ),
        ]
        if count_tokens([*history, *turn, user("ok")]) > target_tokens:
            return history
        history += turn
        i += 1


def timed_stream(chunks) -> tuple[float, float, int]:
    """(ttft_s, seconds from first to last chunk, number of chunks) as a caller sees a stream."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for _ in chunks:
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        n += 1
    end = time.perf_counter()
    return (first or end) - t0, (last or end) - (first or end), n


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval for the median (order statistics).

    The number of values below the true median is Binomial(n, 1/2); the interval
    [x_(k), x_(n+1-k)] covers the median with probability >= ``level``.  Needs no
    assumption about the (skewed, load-dependent) timing distribution.
    """
    xs = sorted(values)
    n = len(xs)
    if n < 6:
        return (xs[0], xs[-1])
    alpha = (1.0 - level) / 2.0
    cdf = 0.0
    k = 0
    # Largest k with P(Binom(n, 1/2) <= k - 1) <= alpha.
    while True:
        nxt = cdf + math.comb(n, k) / 2 ** n
        if nxt > alpha:
            break
        cdf = nxt
        k += 1
    k = max(k, 1)
    return (xs[k - 1], xs[n - k])
