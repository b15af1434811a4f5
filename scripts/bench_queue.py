#!/usr/bin/env python
"""Queueing in the cost model (issue 14, item 2), printed as a Markdown table.

    python scripts/bench_queue.py                       # MT-Bench-101 if --data-dir has it
    python scripts/bench_queue.py --dialogues 2 --busy-clients 1

One edge on loopback (the default Gemma model, one KV slot, bearer tokens on)
and the device runtime (SmolLM2, the shipped router, ``--online``) play the
same dialogues several ways:

- on the idle edge: ``edge`` only, and ``auto``;
- with the edge saturated by ``--busy-clients`` other principals, each with
  its own token, sending ``--busy-tokens``-long generations in a loop: ``edge``
  only, ``auto`` as the paper has it (``--no-edge-queue``: Tᵉ of an idle edge),
  and ``auto`` with W_q, the edge's expected wait for a slot, in Tᵉ.

Per row: mean latency and TTFT of a turn (from the start of the turn, routing
included), the share of turns answered on the edge, fallbacks (no slot within
the edge's ``--queue-timeout``), the mean wait for a slot of the edge turns
(the edge's ``done.queue_s``), and the mean W_q the decisions added to Tᵉ.
Nothing is asserted: wall-clock numbers on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_common import add_checkout_to_path, log

add_checkout_to_path()  # run from a checkout without installing

REPO = Path(__file__).resolve().parent.parent
#: A prompt that keeps a small model writing until max_tokens.
BUSY_PROMPT = "Count from 1 to 1000, one number per line, and do not stop early."


@dataclass
class Row:
    load: str
    policy: str
    queue_term: str
    measured: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    fallbacks: int = 0
    waits: list[float] = field(default_factory=list)
    w_q: list[float] = field(default_factory=list)

    def cells(self) -> str:
        n = len(self.measured)
        edge_share = sum(t == "edge" for t in self.targets) / n
        wait = f"{statistics.fmean(self.waits):.2f}" if self.waits else "–"
        w_q = f"{statistics.fmean(self.w_q):.2f}" if self.w_q else "–"
        return (f"| {self.load} | {self.policy} | {self.queue_term} | {n} | {statistics.fmean(self.measured):.2f} | "
                f"{statistics.fmean(self.ttft):.2f} | {edge_share:.0%} | {self.fallbacks} | {wait} | {w_q} |")


def pick_dialogues(args) -> list[tuple[str, ...]]:
    """``--dialogues`` dialogues spread over MT-Bench-101 (else the shipped demo
    dialogues), each cut to ``--max-turns`` user turns."""
    from device_runtime.runtime.dialogues import MTBENCH101, load_dialogues

    path = args.data_dir / MTBENCH101
    items = load_dialogues(path if path.is_file() else None, max_turns=args.max_turns)
    if not path.is_file():
        log(f"{path} not found: the shipped demo dialogues")
    step = max(1, len(items) // args.dialogues)
    return [item.prompts for item in items[::step][: args.dialogues]]


def token_file(directory: Path, principals: list[str]) -> tuple[Path, dict[str, str]]:
    from edge_service.auth import hash_token, new_token

    tokens = {p: new_token() for p in principals}
    path = directory / "tokens.tsv"
    path.write_text("".join(f"{p}\t{hash_token(t)}\n" for p, t in tokens.items()), encoding="utf-8")
    return path, tokens


def client(target: str, token: str, **kw):
    from device_runtime.link.credentials import ChannelSecurity
    from device_runtime.link.edge_client import EdgeClient

    return EdgeClient(target, security=ChannelSecurity(token=token), timeout_s=600, **kw)


def busy_loop(target: str, token: str, max_tokens: int, stop: threading.Event, done: list[int]) -> None:
    """Another principal: max-length generations, one after another, each in a new session."""
    from device_runtime.link.edge_client import EdgeError, EdgeUnavailable, GenerationParams, new_session_id

    with client(target, token) as edge:
        while not stop.is_set():
            sid = new_session_id()
            try:
                edge.generate(sid, [{"role": "user", "content": BUSY_PROMPT}], GenerationParams(max_tokens=max_tokens),
                              open_session=True).consume()
                done.append(1)
                edge.close_session(sid)
            except (EdgeError, EdgeUnavailable) as exc:
                log(f"busy client: {exc}")
                stop.wait(0.5)


def play(slm, policy, params, target: str, token: str, dialogues, args, row: Row, *, queue_term: bool) -> Row:
    """The dialogues through one orchestrator (``--online``), new edge client."""
    from device_runtime.link.estimation import QueueWaitSettings
    from device_runtime.runtime.online import OnlineRouting, OnlineSettings
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    with client(target, token, queue=QueueWaitSettings(edge_queue=queue_term)) as edge:
        edge.server_info()  # on connect, as `edgeroute chat --edge` does
        orch = Orchestrator(slm, policy, params, edge=edge, settings=OrchestratorSettings(max_tokens=args.max_tokens),
                            hooks=[OnlineRouting(params, OnlineSettings(idle_probe_s=None))])
        for prompts in dialogues:
            orch.new_conversation()
            for prompt in prompts:
                w_q = edge.expected_queue_s()
                r = orch.turn(prompt)
                rec = r.telemetry
                row.measured.append(rec.measured_s)
                row.ttft.append(rec.ttft_s)
                row.targets.append(rec.target)
                row.fallbacks += rec.fallback
                if w_q is not None and policy.name == "auto":
                    row.w_q.append(w_q)
                if r.edge_result is not None:
                    row.waits.append(r.edge_result.queue_s)
                log(f"  {row.load:>6} {row.policy:<5} {row.queue_term:<4} {rec.target:<6} "
                    f"{rec.measured_s:6.2f} s  W_q {w_q if w_q is not None else 0:5.2f} s"
                    + (f"  waited {r.edge_result.queue_s:5.2f} s" if r.edge_result else "")
                    + ("  FALLBACK" if rec.fallback else ""))
        orch.close()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--dialogues", type=int, default=3)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64, help="the device's answer cap, both sides")
    p.add_argument("--busy-clients", type=int, default=2, help="other principals saturating the edge")
    p.add_argument("--busy-tokens", type=int, default=256, help="max_tokens of their generations")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the edge and of the SLM")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="the edge's --queue-timeout")
    p.add_argument("--skip-idle", action="store_true", help="only the rows under load")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    from device_runtime.link.profile import live_cost_params
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from device_runtime.routing.policies import FixedPolicy, PolicySettings, create_policy
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    dialogues = pick_dialogues(args)
    busy_names = [f"busy-{i + 1}" for i in range(args.busy_clients)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path, tokens = token_file(Path(tmp), ["device", *busy_names])
        settings = EdgeSettings(n_ctx=2048, n_slots=1, n_threads=args.threads, auth_tokens=tokens_path,
                                queue_timeout_s=args.queue_timeout)
        server = EdgeServerThread(settings).start()
        slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_ctx=2048, n_threads=args.threads))
        auto, edge_only = create_policy(PolicySettings()), FixedPolicy("edge")
        params = live_cost_params()
        run = lambda policy, load, term, row_term: play(  # noqa: E731
            slm, policy, params, server.target, tokens["device"], dialogues, args,
            Row(load, policy.name, row_term), queue_term=term)
        rows = []
        try:
            if not args.skip_idle:
                rows += [run(edge_only, "idle", True, "–"), run(auto, "idle", True, "W_q")]
            stop, done = threading.Event(), []
            busy = [threading.Thread(target=busy_loop, args=(server.target, tokens[n], args.busy_tokens, stop, done),
                                     daemon=True) for n in busy_names]
            for t in busy:
                t.start()
            time.sleep(2.0)  # the busy clients hold the slot and queue behind each other
            rows += [run(edge_only, "loaded", True, "–"), run(auto, "loaded", False, "none"),
                     run(auto, "loaded", True, "W_q")]
            stop.set()
            for t in busy:
                t.join(600)
        finally:
            slm.close()
            server.stop()
    n_turns = sum(len(d) for d in dialogues)
    print(f"\n### Device policies against an edge saturated by {args.busy_clients} other principal(s) "
          f"({len(dialogues)} dialogues, {n_turns} turns per row; edge: 1 slot, busy generations of "
          f"{args.busy_tokens} tokens; device max_tokens {args.max_tokens}; --online)\n")
    print("| edge | policy | W_q in Tᵉ | turns | mean latency (s) | mean TTFT (s) | edge share | fallbacks "
          "| mean slot wait of edge turns (s) | mean W_q predicted (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row.cells())
    print(f"\nBackground generations completed: {len(done)}; wall time {time.perf_counter() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
