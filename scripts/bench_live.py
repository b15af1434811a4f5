#!/usr/bin/env python
"""Live-system benchmarks of issue 4, printed as Markdown tables.

    python scripts/bench_live.py                  # all three
    python scripts/bench_live.py --only grpc --reps 15

1. ``grpc``: the edge model served over gRPC on loopback against the same model
   in-process (both through ``LlamaConversation``): p50 TTFT difference and
   decode throughput ratio, measured on the client as the caller sees them.
2. ``history``: a follow-up turn with ~``--history-tokens`` tokens of history
   resident in the KV cache, against the same turn with no history and
   against re-prefilling the whole history (cold cache), per model.
3. ``session``: an edge session returning after two device turns, with the
   server's own prefill/cached counts.

Timings are wall-clock on whatever machine runs this; quote ratios from one run.
Modes are interleaved rep by rep so that background load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_stream(chunks):
    """(ttft_s, decode_tokens_per_s-ish clock, n_chunks, text) as a caller sees a stream."""
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


def question(i: int) -> str:
    return f"Question {i}: list three things that are {('red', 'green', 'blue', 'yellow', 'white')[i % 5]}."


# --- 1. gRPC loopback vs in-process ---------------------------------------------------


def bench_grpc(args) -> None:
    from device_runtime.edge_client import EdgeClient, GenerationParams
    from device_runtime.llama_session import LlamaConversation, load_llama, resolve_prompt_format
    from edge_service.models import default_edge_model_path
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    model = Path(args.edge_model) if args.edge_model else default_edge_model_path()
    llama = load_llama(model, n_ctx=2048, n_threads=args.threads)
    conv = LlamaConversation(llama, resolve_prompt_format(llama))
    settings = EdgeSettings(model_path=model, n_ctx=2048, n_slots=1, n_threads=args.threads)
    server = EdgeServerThread(settings).start()
    client = EdgeClient(server.target)
    # "\n\n" never stops a plain-format answer early more than "\nUser:" does;
    # a fixed length keeps the decode comparison like for like.
    params = GenerationParams(max_tokens=args.decode_tokens)
    rows = {"in-process": [], "grpc": []}
    try:
        for rep in range(-1, args.reps):  # rep -1 warms both up
            for mode in ("in-process", "grpc"):
                msgs = [{"role": "user", "content": question(rep + 100)}]
                if mode == "in-process":
                    ttft, dec, n = timed_stream(conv.stream(msgs, max_tokens=args.decode_tokens))
                    out = conv.last_stats.output_tokens
                else:
                    sid = client.open_session()
                    stream = client.generate(sid, msgs, params)
                    ttft, dec, n = timed_stream(stream)
                    out = stream.result.output_tokens
                    client.close_session(sid)
                if rep >= 0:
                    rows[mode].append((ttft, dec, n, out))
            log(f"grpc bench rep {rep + 1}/{args.reps}")
    finally:
        client.close()
        server.stop()
        llama.close()

    def p50(mode, i):
        return statistics.median(r[i] for r in rows[mode])

    def tput(mode):
        # Chunks after the first, over the time between first and last chunk.
        return sum(r[2] - 1 for r in rows[mode]) / sum(r[1] for r in rows[mode])

    print(f"\n### gRPC loopback vs in-process (edge model {model.name}, {args.reps} reps, "
          f"max_tokens {args.decode_tokens}, threads {args.threads})\n")
    print("| mode | p50 TTFT (ms) | decode (chunks/s) | mean output tokens |")
    print("|---|---:|---:|---:|")
    for mode in rows:
        print(f"| {mode} | {p50(mode, 0) * 1e3:.1f} | {tput(mode):.1f} | "
              f"{statistics.fmean(r[3] for r in rows[mode]):.1f} |")
    diff = (p50("grpc", 0) - p50("in-process", 0)) * 1e3
    print(f"\np50 TTFT difference (gRPC − in-process): **{diff:+.1f} ms**; "
          f"decode throughput ratio (gRPC / in-process): **{tput('grpc') / tput('in-process'):.3f}**")


# --- 2. follow-up with history -----------------------------------------------------------


def history_messages(conv, target_tokens: int) -> list[dict]:
    """Team-written filler turns until the formatted history reaches ``target_tokens``."""
    msgs: list[dict] = []
    i = 0
    while True:
        msgs += [
            {"role": "user", "content": f"Note {i}: the parcel number {1000 + i} goes to shelf "
                                        f"{i % 7} in room {i % 3}. Please remember it."},
            {"role": "assistant", "content": f"Noted: parcel {1000 + i}, shelf {i % 7}, room {i % 3}."},
        ]
        i += 1
        if conv.count_tokens(msgs + [{"role": "user", "content": "?"}]) >= target_tokens:
            return msgs


def bench_history(args) -> None:
    from device_runtime.llama_session import LlamaConversation, load_llama, resolve_prompt_format
    from device_runtime.models import default_slm_path
    from edge_service.models import default_edge_model_path

    models = [("device SLM", Path(args.slm) if args.slm else default_slm_path()),
              ("edge LLM", Path(args.edge_model) if args.edge_model else default_edge_model_path())]
    print(f"\n### Follow-up turn with ~{args.history_tokens} tokens of history "
          f"({args.reps} reps, p50 TTFT, threads {args.threads})\n")
    print("| model | history tokens | resident history: prefill / TTFT (ms) | no history: prefill / TTFT (ms) "
          "| cold re-prefill: prefill / TTFT (ms) | resident ÷ no history | cold ÷ resident |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, path in models:
        llama = load_llama(path, n_ctx=4096, n_threads=args.threads)
        conv = LlamaConversation(llama, resolve_prompt_format(llama))
        hist = history_messages(conv, args.history_tokens)
        n_hist = conv.count_tokens(hist + [{"role": "user", "content": "?"}])
        res = {"resident": [], "none": [], "cold": []}
        for rep in range(-1, args.reps):
            q = {"role": "user", "content": question(rep)}
            # Resident: the history is already in the KV cache (warmed by the
            # previous rep or the warm-up); only the new question is computed.
            if rep == -1:
                conv.reset()
                list(conv.stream(hist + [q], max_tokens=1))
            ttft, _, _ = timed_stream(conv.stream(hist + [q], max_tokens=1))
            s = conv.last_stats
            res["resident"].append((ttft, s.prefill_tokens))
            conv.reset()
            ttft, _, _ = timed_stream(conv.stream([q], max_tokens=1))
            res["none"].append((ttft, conv.last_stats.prefill_tokens))
            conv.reset()
            ttft, _, _ = timed_stream(conv.stream(hist + [q], max_tokens=1))
            res["cold"].append((ttft, conv.last_stats.prefill_tokens))
            log(f"history bench {label} rep {rep + 1}/{args.reps}")
        res = {k: v[1:] for k, v in res.items()}  # drop the warm-up rep
        med = {k: statistics.median(t for t, _ in v) for k, v in res.items()}
        pre = {k: round(statistics.median(p for _, p in v)) for k, v in res.items()}
        print(f"| {label} ({path.name}) | {n_hist} | {pre['resident']} / {med['resident'] * 1e3:.1f} | "
              f"{pre['none']} / {med['none'] * 1e3:.1f} | {pre['cold']} / {med['cold'] * 1e3:.1f} | "
              f"{med['resident'] / med['none']:.2f}× | {med['cold'] / med['resident']:.1f}× |")
        llama.close()


# --- 3. edge session reuse ---------------------------------------------------------------


def bench_session(args) -> None:
    from device_runtime.edge_client import EdgeClient
    from device_runtime.orchestrator import (
        Orchestrator, OrchestratorSettings, Policy, PolicyDecision, live_cost_params,
    )
    from device_runtime.slm import SLMSettings, create_slm
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
    slm = create_slm("llama-cpp", SLMSettings(model_path=args.slm, n_threads=args.threads))
    plan = ["edge", "device", "device", "edge", "device"]
    prompts = ["Hello! Can you help me plan a picnic?", "What food should I bring?",
               "And what drinks?", "How many people can share one blanket?", "Thanks, goodbye."]
    orch = Orchestrator(slm, Plan(plan), live_cost_params(), edge=client,
                        settings=OrchestratorSettings(max_tokens=args.decode_tokens))
    recs = [orch.turn(p).telemetry for p in prompts]
    sid = orch._edge_session
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
    p.add_argument("--only", choices=("grpc", "history", "session"), action="append")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--history-tokens", type=int, default=1500)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--slm", help="device GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--edge-model", help="edge GGUF (default: Gemma 3 270M)")
    args = p.parse_args(argv)
    which = args.only or ["grpc", "history", "session"]
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in which:
        {"grpc": bench_grpc, "history": bench_history, "session": bench_session}[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
