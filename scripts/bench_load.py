"""Load benchmark of the edge (issue 14): many conversations from several principals, then an abuser.

    python scripts/bench_load.py [--conversations 16] [--principals 4] [--turns 3] [--max-tokens 24]
        [--slots 2] [--threads 1] [--n-ctx 2048] [--alone N] [--no-abuse]
        [--abuser-streams 2] [--abuser-max-tokens N] [--churn-interval-ms 10] [--stalled-readers 1]
        [--edge-setting NAME=VALUE ...] [--model GGUF] [--json]

One edge (``EdgeServerThread``, real gRPC on loopback, bearer tokens on, the
default Gemma 3 270M unless ``--model``) serves, with greedy decoding:

1. **alone**: each conversation by itself, one after the other (its reference
   answers; ``--alone N`` runs an evenly spaced sample of N);
2. **loaded**: all conversations at once, ``--principals`` principals sharing
   them round-robin, each conversation its own client (a phone) and session,
   each turn sending only the new user message with the transcript length and
   digest, as the device does;
3. **abuse**: the same with an abusive principal alongside: ``--abuser-streams``
   loops of maximum-length generations (``max_tokens`` far above the server's
   ``--max-output-tokens``), a loop opening sessions every
   ``--churn-interval-ms`` and never closing them (0: no churn), and
   ``--stalled-readers`` streams that are opened and never read.  Its churn
   runs into its own session quota, which closes its own least recently used
   idle sessions, those of its long generations still waiting for a slot
   included (their NOT_FOUND shows among its refusals): with churn the
   abuser holds the slots less than without.

For each phase: throughput (output tokens per second of wall time), p50 and
p95 TTFT (from the turn's first try to its first chunk, as the client sees
it: refused tries, queue, prefill and link),
the server's queue wait (``done.queue_s``), KV and session evictions (from the
server), sessions the well-behaved clients lost (NOT_FOUND or OUT_OF_RANGE,
then reopened with the whole conversation) and calls refused
(RESOURCE_EXHAUSTED, retried).  Isolation: under greedy decoding each
conversation's answers should equal its answers alone.  The abuse phase
reports the ratio of the well-behaved p95 TTFT with and without the abuser
(issue 14's target: within 2x).

Nothing here is asserted: run it, read the tables (docs/operations.md has
them with the command).  Progress goes to stderr; with ``--json`` stdout
carries one JSON object instead of the tables.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TOPICS = ["rivers", "mountains", "bridges", "clocks", "gardens", "trains", "bees", "lighthouses",
          "maps", "violins", "glaciers", "markets", "kites", "deserts", "libraries", "harbours",
          "comets", "orchards", "windmills", "caves"]
FOLLOW_UPS = ["Why does that matter to people?", "Say it again in at most five words.",
              "Give one more example.", "What is a common mistake about it?"]
#: What the abuser asks for: an answer that does not stop by itself.
LONG_PROMPT = "Count from 1 to 5000, separated by commas: 1, 2, 3,"
#: Tries per turn before a well-behaved client gives up on it.
MAX_ATTEMPTS = 20
PHASES = ("alone", "loaded", "abuse")


@dataclass(frozen=True)
class Config:
    """The benchmark's sizes and the edge's settings."""

    conversations: int = 16
    principals: int = 4
    turns: int = 3
    max_tokens: int = 24
    slots: int = 2
    threads: int = 1
    n_ctx: int = 2048
    alone: int | None = None  # None: every conversation
    abuse: bool = True
    abuser_streams: int = 2
    abuser_max_tokens: int = 2**31 - 1
    churn_interval_s: float = 0.01
    stalled_readers: int = 1
    #: Seconds the abuser runs before the well-behaved conversations start.
    abuser_head_start_s: float = 2.0
    model: str | None = None
    edge_settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("conversations", "principals", "turns", "max_tokens", "slots", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.alone is not None and not 0 <= self.alone <= self.conversations:
            raise ValueError("alone must be in [0, conversations]")


# --- pure parts (tested in tests/test_bench_load.py) ---------------------------------


def principal_of(conversation: int, principals: int) -> str:
    """Conversations are dealt to the principals round-robin."""
    return f"user{conversation % principals}"


def conversation_prompts(conversation: int, turns: int) -> list[str]:
    """The user messages of one conversation: a topic of its own, then follow-ups."""
    topic = TOPICS[conversation % len(TOPICS)]
    if conversation >= len(TOPICS):
        topic = f"{topic} (number {conversation // len(TOPICS) + 1})"
    first = f"Tell me one short fact about {topic}."
    return [first] + [FOLLOW_UPS[(conversation + t) % len(FOLLOW_UPS)] for t in range(turns - 1)]


def alone_sample(conversations: int, alone: int | None) -> list[int]:
    """The conversations run alone: all of them, or ``alone`` evenly spaced ones."""
    if alone is None or alone >= conversations:
        return list(range(conversations))
    if alone <= 0:
        return []
    step = conversations / alone
    return sorted({int(i * step) for i in range(alone)})


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between order statistics; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class TurnRecord:
    """One turn of a well-behaved conversation, as its client saw it."""

    conversation: int
    principal: str
    turn: int
    text: str
    output_tokens: int
    ttft_s: float  # from the turn's first try to its first chunk: refused tries, queue, prefill, link
    total_s: float
    queue_s: float  # the edge's done.queue_s of the try that was served
    kv_restored: bool
    lost_sessions: int = 0  # NOT_FOUND / OUT_OF_RANGE before this turn was served (then reopened)
    refused: int = 0  # RESOURCE_EXHAUSTED before it was served (then retried)


def summarize(records: list[TurnRecord], wall_s: float, failures: int = 0) -> dict:
    """The figures of one phase."""
    ttft = [r.ttft_s for r in records]
    queue = [r.queue_s for r in records]
    tokens = sum(r.output_tokens for r in records)
    return {
        "conversations": len({r.conversation for r in records}),
        "turns": len(records),
        "failed_turns": failures,
        "output_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "queue_p50_s": percentile(queue, 50),
        "queue_p95_s": percentile(queue, 95),
        "queue_max_s": max(queue) if queue else None,
        "kv_restored": sum(r.kv_restored for r in records),
        "lost_sessions": sum(r.lost_sessions for r in records),
        "refused": sum(r.refused for r in records),
    }


def answers_by_conversation(records: list[TurnRecord]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for r in sorted(records, key=lambda r: (r.conversation, r.turn)):
        out.setdefault(r.conversation, []).append(r.text)
    return out


def isolation(alone: list[TurnRecord], loaded: list[TurnRecord], examples: int = 3) -> dict:
    """How many of the conversations run alone answered the same, turn by turn,
    under load; the first differing turn of up to ``examples`` conversations."""
    ref, got = answers_by_conversation(alone), answers_by_conversation(loaded)
    compared = [c for c in ref if c in got]
    turns_equal = sum(a == b for c in compared for a, b in zip(ref[c], got[c]))
    turns = sum(min(len(ref[c]), len(got[c])) for c in compared)
    differ = [c for c in compared if ref[c] != got[c]]
    shown = []
    for c in differ[:examples]:
        t = next(i for i, (a, b) in enumerate(zip(ref[c], got[c])) if a != b)
        shown.append({"conversation": c, "turn": t, "alone": ref[c][t][:200], "loaded": got[c][t][:200]})
    return {"conversations_compared": len(compared), "conversations_equal": len(compared) - len(differ),
            "turns_compared": turns, "turns_equal": turns_equal, "differ": differ, "examples": shown}


def _fmt(value, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}{unit}"


def tables(results: dict) -> str:
    """The markdown tables of a run (its JSON object)."""
    lines = ["| phase | conv. | turns | tokens/s | TTFT p50 | TTFT p95 | queue p50 | queue p95 | queue max "
             "| KV evictions | session evictions | lost sessions | refused | failed | answers equal alone |",
             "|" + " --- |" * 15]
    for phase in PHASES:
        s = results["phases"].get(phase)
        if s is None:
            continue
        iso = results.get("isolation", {}).get(phase)
        equal = f"{iso['turns_equal']}/{iso['turns_compared']} turns" if iso else "(reference)"
        ev = results.get("evictions", {}).get(phase, {})
        lines.append(
            f"| {phase} | {s['conversations']} | {s['turns']} | {_fmt(s['tokens_per_s'], digits=1)} "
            f"| {_fmt(s['ttft_p50_s'], ' ms', 1e3, 0)} | {_fmt(s['ttft_p95_s'], ' ms', 1e3, 0)} "
            f"| {_fmt(s['queue_p50_s'], ' ms', 1e3, 0)} | {_fmt(s['queue_p95_s'], ' ms', 1e3, 0)} "
            f"| {_fmt(s['queue_max_s'], ' ms', 1e3, 0)} | {ev.get('kv', '–')} | {ev.get('session', '–')} "
            f"| {s['lost_sessions']} | {s['refused']} | {s['failed_turns']} | {equal} |"
        )
    abuser = results.get("abuser")
    if abuser:
        lines += ["", "| abuser | value |", "| --- | --- |"]
        lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in abuser.items()]
    for phase, iso in results.get("isolation", {}).items():
        for ex in iso.get("examples", []):
            lines.append(f"\n{phase}: conversation {ex['conversation']}, turn {ex['turn']} differs: alone "
                         f"{ex['alone']!r}, under load {ex['loaded']!r}; one cold prefill of the same "
                         f"conversation answers as {ex.get('cold_prefill', '?')}.")
    ratio = results.get("p95_ttft_ratio")
    if ratio is not None:
        lines += ["", f"Well-behaved p95 TTFT with the abuser / without: **{ratio:.2f}x** (target: within 2x)."]
    return "\n".join(lines)


def parse_edge_settings(items: list[str]) -> dict:
    """``NAME=VALUE`` pairs for EdgeSettings (numbers and booleans as literals, else strings)."""
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"--edge-setting takes NAME=VALUE, got {item!r}")
        try:
            out[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[name] = raw
    return out


# --- the edge and its clients ---------------------------------------------------------


def principal_names(cfg: Config) -> list[str]:
    return [f"user{i}" for i in range(cfg.principals)]


def start_edge(cfg: Config, token_file: Path, backend=None):
    """The edge in this process (its pool's counters are read directly)."""
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    settings = EdgeSettings(
        model_path=Path(cfg.model) if cfg.model else None, n_ctx=cfg.n_ctx, n_slots=cfg.slots,
        n_threads=cfg.threads, auth_tokens=token_file, **cfg.edge_settings,
    )
    return EdgeServerThread(settings, backend=backend).start()


def evictions_of(edge) -> dict:
    pool = edge.servicer.pool
    return {"kv": getattr(pool, "evictions", 0), "session": getattr(pool, "session_evictions", 0),
            "ttl": getattr(pool, "expirations", 0)}


def client_for(edge, token: str, timeout_s: float = 300.0):
    from device_runtime.link.credentials import ChannelSecurity
    from device_runtime.link.edge_client import EdgeClient

    return EdgeClient(edge.target, security=ChannelSecurity(token=token), timeout_s=timeout_s)


def serve_turn(client, state: dict, prompt: str, max_tokens: int) -> tuple:
    """One turn as the device sends it; returns (result, seconds from the
    turn's first try to the try that was served, lost, refused).

    Until the edge has answered once on the session, every try opens it
    (``open_session`` with the whole conversation), so a refused first try
    costs nothing.  A session the edge lost afterwards (NOT_FOUND, or
    OUT_OF_RANGE: its transcript is not ours) is counted and reopened under a
    new id with the whole conversation, as after a restart; a refused call
    (RESOURCE_EXHAUSTED) is counted and retried after a pause."""
    import grpc

    from device_runtime.core.messages import transcript_digest
    from device_runtime.link.edge_client import EdgeError, GenerationParams, new_session_id

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    message = {"role": "user", "content": prompt}
    history = state["history"]
    lost = refused = 0
    t_turn = time.perf_counter()
    for attempt in range(MAX_ATTEMPTS):
        t_try = time.perf_counter()
        try:
            if not state["confirmed"]:
                state["sid"] = state["sid"] or new_session_id()
                stream = client.generate(state["sid"], [*history, message], params, open_session=True)
            else:
                stream = client.generate(state["sid"], [message], params, transcript_length=len(history),
                                         transcript_digest=transcript_digest(history))
            result = stream.consume()
            state["confirmed"] = True
            return result, t_try - t_turn, lost, refused
        except EdgeError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE) and state["confirmed"]:
                lost += 1
                state["sid"], state["confirmed"] = None, False
            elif exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused += 1
                time.sleep(min(0.05 * 2**attempt, 2.0))
            else:
                raise
    raise RuntimeError(f"turn not served after {MAX_ATTEMPTS} attempts ({lost} lost, {refused} refused)")


def run_conversation(edge, token: str, cfg: Config, index: int, progress, out: list, errors: Counter) -> None:
    """One phone: its own client and session, its turns one after the other."""
    principal = principal_of(index, cfg.principals)
    state = {"sid": None, "confirmed": False, "history": []}
    with client_for(edge, token) as client:
        for turn, prompt in enumerate(conversation_prompts(index, cfg.turns)):
            try:
                result, retried_s, lost, refused = serve_turn(client, state, prompt, cfg.max_tokens)
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                errors[type(exc).__name__ + ": " + str(exc)[:120]] += 1
                progress.update(cfg.turns - turn)
                return
            state["history"] += [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": result.text}]
            out.append(TurnRecord(
                conversation=index, principal=principal, turn=turn, text=result.text,
                # From the turn's first try: refused tries are part of what the user waits.
                output_tokens=result.output_tokens, ttft_s=retried_s + result.ttft_s,
                total_s=retried_s + result.total_s,
                queue_s=result.queue_s, kv_restored=result.kv_restored,
                lost_sessions=lost, refused=refused,
            ))
            progress.update(1)


def run_phase(edge, tokens: dict, cfg: Config, indexes: list[int], progress, *, concurrent: bool) -> tuple:
    """Run the conversations ``indexes`` (all at once, or one after the other);
    returns (records, wall seconds, failed turns, error counts)."""
    records: list[TurnRecord] = []
    errors: Counter = Counter()

    def one(i: int) -> None:
        run_conversation(edge, tokens[principal_of(i, cfg.principals)], cfg, i, progress, records, errors)

    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,), name=f"conv-{i}") for i in indexes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in indexes:
            one(i)
    wall = time.perf_counter() - t0
    return records, wall, len(indexes) * cfg.turns - len(records), errors


# --- the abuser ------------------------------------------------------------------------


@dataclass
class AbuserStats:
    long_generations: int = 0
    long_output_tokens: int = 0
    longest_answer_tokens: int = 0
    sessions_opened: int = 0
    stalled_streams: int = 0
    #: How the server ended the stalled streams (status codes), while the abuser ran.
    stalled_ended: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("stalled_ended", "refusals"):
            d[name] = dict(sorted(getattr(self, name).items())) or "none"
        return d


class Abuser:
    """One principal doing every abusive thing of issue 14 at once, in threads,
    until :meth:`stop`: maximum-length generations in loops, session churn,
    streams opened and never read."""

    def __init__(self, edge, token: str, cfg: Config) -> None:
        self.edge, self.token, self.cfg = edge, token, cfg
        self.stats = AbuserStats()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> "Abuser":
        churn = [self._churn_loop] if self.cfg.churn_interval_s > 0 else []
        jobs = [self._long_loop] * self.cfg.abuser_streams + churn + [self._stall] * self.cfg.stalled_readers
        self._threads = [threading.Thread(target=job, name=f"abuser-{i}", daemon=True) for i, job in enumerate(jobs)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _refused(self, exc: Exception) -> None:
        code = getattr(exc, "code", None)
        with self._lock:
            self.stats.refusals[getattr(code, "name", type(exc).__name__)] += 1

    def _long_loop(self) -> None:
        from device_runtime.link.edge_client import EdgeError, EdgeUnavailable, GenerationParams, new_session_id

        params = GenerationParams(max_tokens=self.cfg.abuser_max_tokens, temperature=0.0)
        with client_for(self.edge, self.token) as client:
            while not self._stop.is_set():
                sid = new_session_id()
                try:
                    stream = client.generate(sid, [{"role": "user", "content": LONG_PROMPT}], params,
                                             open_session=True)
                    for _ in stream:
                        if self._stop.is_set():
                            stream.cancel()
                    if not stream.cancelled:
                        with self._lock:
                            self.stats.long_generations += 1
                            self.stats.long_output_tokens += stream.result.output_tokens
                            self.stats.longest_answer_tokens = max(self.stats.longest_answer_tokens,
                                                                   stream.result.output_tokens)
                except (EdgeError, EdgeUnavailable) as exc:
                    self._refused(exc)
                    self._stop.wait(0.05)

    def _churn_loop(self) -> None:
        from device_runtime.link.edge_client import EdgeError, EdgeUnavailable

        with client_for(self.edge, self.token) as client:
            while not self._stop.wait(self.cfg.churn_interval_s):
                try:
                    client.open_session()
                    with self._lock:
                        self.stats.sessions_opened += 1
                except (EdgeError, EdgeUnavailable) as exc:
                    self._refused(exc)

    def _stall(self) -> None:
        """A stream opened and never read, reopened each time the server ends it."""
        from device_runtime.link.edge_client import GenerationParams, new_session_id

        params = GenerationParams(max_tokens=self.cfg.abuser_max_tokens, temperature=0.0)
        with client_for(self.edge, self.token) as client:
            while not self._stop.is_set():
                stream = client.generate(new_session_id(), [{"role": "user", "content": LONG_PROMPT}], params,
                                         open_session=True)
                with self._lock:
                    self.stats.stalled_streams += 1
                call = stream._call  # the grpc call: done() and code() without reading a message
                while not self._stop.wait(0.2) and not call.done():
                    pass
                if call.done() and not self._stop.is_set():
                    with self._lock:
                        self.stats.stalled_ended[call.code().name] += 1
                stream.cancel()


# --- the run ---------------------------------------------------------------------------


def write_tokens(directory: Path, names: list[str]) -> tuple[dict, Path]:
    from edge_service.auth import hash_token, new_token

    tokens = {name: new_token() for name in names}
    path = directory / "tokens.tsv"
    path.write_text("".join(f"{n}\t{hash_token(t)}\n" for n, t in tokens.items()))
    return tokens, path


def warm_up(edge, tokens: dict, cfg: Config) -> None:
    """One short turn per slot before anything is timed (first-call costs)."""
    from device_runtime.link.edge_client import GenerationParams

    with client_for(edge, next(iter(tokens.values()))) as client:
        for _ in range(cfg.slots):
            sid = client.open_session()
            client.generate(sid, [{"role": "user", "content": "Hello."}], GenerationParams(max_tokens=4)).consume()
            client.close_session(sid)


def run_benchmark(cfg: Config, *, backend=None, progress: bool = True) -> dict:
    """All phases against one edge; the JSON object of the run.  ``backend``:
    an edge backend instead of the model (the tests' fault backend);
    ``progress``: the bar on stderr."""
    from tqdm import tqdm

    names = principal_names(cfg)
    indexes = list(range(cfg.conversations))
    sample = alone_sample(cfg.conversations, cfg.alone)
    total = (len(sample) + cfg.conversations * (2 if cfg.abuse else 1)) * cfg.turns
    results: dict = {"config": {**asdict(cfg), "edge_settings": dict(cfg.edge_settings)}, "phases": {},
                     "isolation": {}, "evictions": {}, "errors": {}}
    with tempfile.TemporaryDirectory() as tmp, \
            tqdm(total=total, unit="turn", file=sys.stderr, mininterval=1.0, disable=not progress) as bar:
        tokens, token_file = write_tokens(Path(tmp), [*names, "abuser"])
        edge = start_edge(cfg, token_file, backend)
        try:
            results["server"] = _server_info(edge, tokens)
            warm_up(edge, tokens, cfg)
            phases = [("alone", sample, False), ("loaded", indexes, True)]
            if cfg.abuse:
                phases.append(("abuse", indexes, True))
            records = {}
            for phase, which, concurrent in phases:
                bar.set_description(phase)
                records[phase] = _run_one_phase(edge, tokens, cfg, phase, which, concurrent, bar, results)
            for phase in ("loaded", "abuse"):
                if phase in records:
                    results["isolation"][phase] = iso = isolation(records["alone"], records[phase])
                    for example in iso["examples"]:
                        example["cold_prefill"] = replay_cold(edge, tokens, cfg, records, phase, example)
        finally:
            edge.stop()
    loaded, abused = results["phases"].get("loaded"), results["phases"].get("abuse")
    if loaded and abused and loaded["ttft_p95_s"] and abused["ttft_p95_s"] is not None:
        results["p95_ttft_ratio"] = abused["ttft_p95_s"] / loaded["ttft_p95_s"]
    return results


def replay_cold(edge, tokens: dict, cfg: Config, records: dict, phase: str, example: dict) -> str:
    """Which answer a differing turn gets from one cold prefill: the turn run
    again, alone, on a new session that receives the whole conversation so
    far at once (the earlier turns are the same alone and under load).

    "loaded" means the load changed only how the prompt was prefilled (a
    slot's KV rebuilt in one batch after an eviction rather than extended turn
    by turn), which moves floating-point sums and can flip a near-tie greedy
    token; it is not one session seeing another's state.  "alone" or
    "neither" would need a closer look."""
    from device_runtime.link.edge_client import GenerationParams, new_session_id

    c, t = example["conversation"], example["turn"]
    prompts = conversation_prompts(c, cfg.turns)
    ref = answers_by_conversation(records["alone"])[c]
    got = answers_by_conversation(records[phase])[c]
    messages = []
    for i in range(t):
        messages += [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": ref[i]}]
    messages.append({"role": "user", "content": prompts[t]})
    params = GenerationParams(max_tokens=cfg.max_tokens, temperature=0.0)
    with client_for(edge, tokens[principal_of(c, cfg.principals)]) as client:
        text = client.generate(new_session_id(), messages, params, open_session=True).consume().text
    return "loaded" if text == got[t] else "alone" if text == ref[t] else "neither"


def _run_one_phase(edge, tokens, cfg, phase, which, concurrent, bar, results) -> list[TurnRecord]:
    before = evictions_of(edge)
    abuser = None
    if phase == "abuse":
        abuser = Abuser(edge, tokens["abuser"], cfg).start()
        time.sleep(cfg.abuser_head_start_s)  # let it take the slots first
    try:
        records, wall, failed, errors = run_phase(edge, tokens, cfg, which, bar, concurrent=concurrent)
    finally:
        if abuser is not None:
            abuser.stop()
    after = evictions_of(edge)
    results["phases"][phase] = summarize(records, wall, failed)
    results["evictions"][phase] = {k: after[k] - before[k] for k in after}
    if errors:
        results["errors"][phase] = dict(errors)
    if abuser is not None:
        results["abuser"] = abuser.stats.to_dict()
    return records


def _server_info(edge, tokens: dict) -> dict:
    """What the edge says it runs, and its limits (GetServerInfo)."""
    with client_for(edge, next(iter(tokens.values()))) as client:
        return asdict(client.server_info())


def machine() -> dict:
    return {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    d = Config()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=d.conversations)
    ap.add_argument("--principals", type=int, default=d.principals)
    ap.add_argument("--turns", type=int, default=d.turns)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help="answer cap of the well-behaved turns")
    ap.add_argument("--slots", type=int, default=d.slots, help="KV slots of the edge (serve --n-slots)")
    ap.add_argument("--threads", type=int, default=d.threads, help="CPU threads per slot")
    ap.add_argument("--n-ctx", type=int, default=d.n_ctx)
    ap.add_argument("--alone", type=int, default=None, help="run only N conversations alone (default: all)")
    ap.add_argument("--no-abuse", action="store_true", help="skip the phase with the abuser")
    ap.add_argument("--abuser-streams", type=int, default=d.abuser_streams,
                    help="loops of maximum-length generations")
    ap.add_argument("--abuser-max-tokens", type=int, default=d.abuser_max_tokens,
                    help="max_tokens the abuser asks for (the server clips it)")
    ap.add_argument("--churn-interval-ms", type=float, default=d.churn_interval_s * 1e3,
                    help="pause between the abuser's OpenSession calls (0: no session churn)")
    ap.add_argument("--stalled-readers", type=int, default=d.stalled_readers)
    ap.add_argument("--edge-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="an EdgeSettings field for the edge, e.g. max_concurrent_per_principal=1 (repeatable)")
    ap.add_argument("--model", default=None, help="GGUF to serve (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    a = ap.parse_args(argv)
    cfg = Config(
        conversations=a.conversations, principals=a.principals, turns=a.turns, max_tokens=a.max_tokens,
        slots=a.slots, threads=a.threads, n_ctx=a.n_ctx, alone=a.alone, abuse=not a.no_abuse,
        abuser_streams=a.abuser_streams, abuser_max_tokens=a.abuser_max_tokens,
        churn_interval_s=a.churn_interval_ms / 1e3, stalled_readers=a.stalled_readers, model=a.model,
        edge_settings=parse_edge_settings(a.edge_setting),
    )
    return cfg, a.json


def main(argv: list[str] | None = None) -> int:
    for p in (str(ROOT / "proto"), str(ROOT)):  # run from a checkout without installing
        if p not in sys.path:
            sys.path.insert(0, p)
    cfg, as_json = parse_args(argv)
    results = run_benchmark(cfg)
    results["machine"] = machine()
    if as_json:
        print(json.dumps(results, indent=2, default=str))
    else:
        m = results["machine"]
        print(f"{cfg.conversations} conversations from {cfg.principals} principals, {cfg.turns} turns, "
              f"max_tokens {cfg.max_tokens}, {cfg.slots} slot(s) x {cfg.threads} thread(s); "
              f"{m['cores']} cores, {m['date']}\n")
        print(tables(results))
        for phase, errors in results["errors"].items():
            print(f"\n{phase} errors: {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
