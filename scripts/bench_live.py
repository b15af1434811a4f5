#!/usr/bin/env python
"""Device-runtime benchmarks of issue 4, printed as Markdown tables.

    python scripts/bench_live.py                  # both
    python scripts/bench_live.py --only history --reps 5

1. ``history``: a follow-up turn on the device SLM with ~``--history-tokens``
   tokens of history resident in its KV cache, against the same turn with no
   history and against re-prefilling the whole history (cold cache).
2. ``session``: the orchestrator plays edge, device, device, edge, device on a
   loopback edge service; the returning edge session's prefill/cached counts
   come from the server's own records.

gRPC loopback vs in-process, the Echo round trip and the same follow-up on the
edge model (through gRPC) are in ``scripts/bench_edge.py``; shared helpers are in
``scripts/bench_common.py``.  Nothing is asserted: run it, read the tables.
Timings are wall-clock on whatever machine runs this; quote ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_common import add_checkout_to_path, history_messages, log, timed_stream, user

add_checkout_to_path()  # run from a checkout without installing


def question(i: int) -> str:
    return f"Question {i}: list three things that are {('red', 'green', 'blue', 'yellow', 'white')[i % 5]}."


# --- 1. device SLM follow-up with history -----------------------------------------------


def bench_history(args) -> None:
    from device_runtime.llm.adapter import load_llama
    from device_runtime.llm.conversation import LlamaConversation
    from device_runtime.llm.prompt_format import resolve_prompt_format
    from device_runtime.llm.models import default_slm_path

    path = Path(args.slm) if args.slm else default_slm_path()
    print(f"\n### Device SLM follow-up turn with ~{args.history_tokens} tokens of history "
          f"({args.reps} reps, p50 TTFT, threads {args.threads})\n")
    print("| model | history tokens | resident history: prefill / TTFT (ms) | no history: prefill / TTFT (ms) "
          "| cold re-prefill: prefill / TTFT (ms) | resident ÷ no history | cold ÷ resident |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    llama = load_llama(path, n_ctx=4096, n_threads=args.threads)
    try:
        conv = LlamaConversation(llama, resolve_prompt_format(llama))
        hist = history_messages(args.history_tokens, conv.count_tokens)
        n_hist = conv.count_tokens(hist + [user("?")])
        res = {"resident": [], "none": [], "cold": []}
        for rep in range(-1, args.reps):  # rep -1 warms up and is dropped
            q = user(question(rep))
            # Resident: the history is already in the KV cache (warmed by the
            # previous rep or the warm-up); only the new question is computed.
            if rep == -1:
                conv.reset()
                list(conv.stream(hist + [q], max_tokens=1))
            ttft, _, _ = timed_stream(conv.stream(hist + [q], max_tokens=1))
            res["resident"].append((ttft, conv.last_stats.prefill_tokens))
            conv.reset()
            ttft, _, _ = timed_stream(conv.stream([q], max_tokens=1))
            res["none"].append((ttft, conv.last_stats.prefill_tokens))
            conv.reset()
            ttft, _, _ = timed_stream(conv.stream(hist + [q], max_tokens=1))
            res["cold"].append((ttft, conv.last_stats.prefill_tokens))
            log(f"history bench rep {rep + 1}/{args.reps}: resident {res['resident'][-1][0] * 1e3:.0f} ms, "
                f"none {res['none'][-1][0] * 1e3:.0f} ms, cold {res['cold'][-1][0] * 1e3:.0f} ms")
    finally:
        llama.close()
    res = {k: v[1:] for k, v in res.items()}  # drop the warm-up rep
    med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
    pre = {k: round(statistics.median(p for _, p in v)) for k, v in res.items()}
    print(f"| {path.name} | {n_hist} | {pre['resident']} / {med['resident'] * 1e3:.1f} | "
          f"{pre['none']} / {med['none'] * 1e3:.1f} | {pre['cold']} / {med['cold'] * 1e3:.1f} | "
          f"{med['resident'] / med['none']:.2f}× | {med['cold'] / med['resident']:.1f}× |")


# --- 2. edge session reuse -----------------------------------------------------------------


def bench_session(args) -> None:
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profile import live_cost_params
    from device_runtime.routing.policies import Policy, PolicyDecision
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    class Plan(Policy):
        name = "plan"

        def __init__(self, targets):
            self.targets = list(targets)

        def choose(self, params, turn, prompt, context):
            return PolicyDecision(self.targets.pop(0), None, None, {"device": 0.0, "edge": 0.0})

    server = EdgeServerThread(EdgeSettings(model_path=args.edge_model, n_ctx=4096, n_slots=1,
                                           n_threads=args.threads)).start()
    client = EdgeClient(server.target)
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(model_path=args.slm, n_threads=args.threads))
    plan = ["edge", "device", "device", "edge", "device"]
    prompts = ["Hello! Can you help me plan a picnic?", "What food should I bring?",
               "And what drinks?", "How many people can share one blanket?", "Thanks, goodbye."]
    orch = Orchestrator(slm, Plan(plan), live_cost_params(), edge=client,
                        settings=OrchestratorSettings(max_tokens=args.decode_tokens))
    recs = [orch.turn(p).telemetry for p in prompts]
    sid = orch.edge_session.id
    server.servicer.wait_for_record(
        lambda r: len([x for x in server.servicer.records if x.session_id == sid]) >= 2, 10)
    returning = [r for r in server.servicer.records if r.session_id == sid][1]
    orch.close()
    client.close()
    server.stop()
    slm.close()
    print(f"\n### Edge session reuse after two device turns (max_tokens {args.decode_tokens})\n")
    print("| turn | target | L_p | C_t | prefill_tokens | cached_tokens | measured_s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in recs:
        print(f"| {r.turn} | {r.target} | {r.prompt_tokens} | {r.context_tokens} | {r.prefill_tokens} | "
              f"{r.cached_tokens} | {r.measured_s:.3f} |")
    print(f"\nServer's record of turn 4: prompt_tokens {returning.prompt_tokens} (the whole formatted "
          f"conversation, what an edge without the session would prefill), prefill_tokens "
          f"{returning.prefill_tokens}, cached_tokens {returning.cached_tokens}: the returning session "
          f"computed the two device turns, the new prompt and template glue, and reused its own first turn.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("history", "session"), action="append")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--history-tokens", type=int, default=1500)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--slm", help="device GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--edge-model", help="edge GGUF for the session bench (default: Gemma 3 270M)")
    args = p.parse_args(argv)
    which = args.only or ["history", "session"]
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in which:
        {"history": bench_history, "session": bench_session}[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
