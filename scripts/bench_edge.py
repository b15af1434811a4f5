"""Edge service benchmarks; prints markdown tables (the numbers in docs/live.md come from here).

    python scripts/bench_edge.py [--model GGUF] [--trials 15] [--history-trials 5] [--threads 1] [--json]

1. gRPC on loopback against in-process: the same GGUF, prompt and settings
   through ``LlamaConversation`` directly and through ``EdgeClient`` ->
   ``edgeroute serve`` (in a thread) on 127.0.0.1.  p50 TTFT and decode
   throughput, trials interleaved so that machine load hits both alike.
2. A follow-up turn with ~1,500 tokens of history on a warm session, against
   the same turn with no history and against re-prefilling the whole history.

The same follow-up on the device SLM, and edge session reuse after device turns
(driven by the orchestrator), are in ``scripts/bench_live.py``; shared helpers
are in ``scripts/bench_common.py``.

Nothing here is asserted: run it, read the table.  Progress goes to stderr;
with ``--json`` stdout carries one JSON object instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import add_checkout_to_path, assistant, history_messages, iqr, log, median_ci, user

add_checkout_to_path()  # run from a checkout without installing


def bench_grpc_vs_inprocess(model: Path, threads: int, trials: int, max_tokens: int) -> dict:
    from device_runtime.link.edge_client import EdgeClient, GenerationParams
    from device_runtime.llm.adapter import load_llama
    from device_runtime.llm.conversation import LlamaConversation
    from device_runtime.llm.prompt_format import resolve_prompt_format
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    n_ctx = 1024
    llama = load_llama(model, n_ctx=n_ctx, n_threads=threads)
    local = LlamaConversation(llama, resolve_prompt_format(llama))
    params = GenerationParams(max_tokens=max_tokens)
    rows = {"in-process": [], "grpc": []}
    settings = EdgeSettings(model_path=model, n_ctx=n_ctx, n_slots=1, n_threads=threads)
    with EdgeServerThread(settings) as edge, EdgeClient(edge.target) as client:
        for t in range(trials + 1):  # trial 0 warms both up and is dropped
            prompt = [user(f"Trial {t}. Count from 1 to 100, separated by commas: 1, 2, 3,")]

            def run_local():
                # In-process: time to the first chunk and from there to the end.
                t0 = time.perf_counter()
                first = None
                for _ in local.stream(prompt, max_tokens=max_tokens):
                    if first is None:
                        first = time.perf_counter()
                end = time.perf_counter()
                return (first - t0, local.last_stats.output_tokens, end - first)

            def run_grpc():
                # The same turn through gRPC on loopback (a new session: no history).
                sid = client.open_session()
                r = client.generate(sid, prompt, params).consume()
                client.close_session(sid)
                return (r.ttft_s, r.output_tokens, r.total_s - r.ttft_s)

            # Alternate the order, so that neither path always runs second.
            if t % 2:
                grpc_row, local_row = run_grpc(), run_local()
            else:
                local_row, grpc_row = run_local(), run_grpc()
            if t > 0:
                rows["in-process"].append(local_row)
                rows["grpc"].append(grpc_row)
            log(f"trial {t}: in-process ttft {local_row[0]*1e3:.1f} ms, grpc ttft {grpc_row[0]*1e3:.1f} ms")
    llama.close()
    out = {}
    for name, rs in rows.items():
        ttft = statistics.median(r[0] for r in rs)
        # Decode throughput after the first chunk: (tokens - 1) / time.
        tok = sum(r[1] - 1 for r in rs)
        secs = sum(r[2] for r in rs)
        out[name] = {"p50_ttft_ms": ttft * 1e3, "decode_tok_s": tok / secs if secs else float("nan"),
                     "mean_output_tokens": statistics.mean(r[1] for r in rs)}
    out["ttft_diff_ms"] = out["grpc"]["p50_ttft_ms"] - out["in-process"]["p50_ttft_ms"]
    # Per-trial differences (same prompt, back to back) are less exposed to
    # load drift than the difference of the two medians.
    diffs = [(g[0] - l[0]) * 1e3 for g, l in zip(rows["grpc"], rows["in-process"])]
    out["paired_ttft_diff_ms"] = {
        "median": statistics.median(diffs),
        "grpc_first": statistics.median(diffs[0::2]),  # trials 1, 3, ...: gRPC ran first
        "in_process_first": statistics.median(diffs[1::2]),
        "iqr": iqr(diffs),
        "ci95": median_ci(diffs),
        "min": min(diffs),
        "max": max(diffs),
    }
    out["decode_ratio"] = out["grpc"]["decode_tok_s"] / out["in-process"]["decode_tok_s"]
    return out


def bench_echo(model: Path, threads: int, repeats: int = 50) -> dict:
    """p50 Echo round trip on loopback: the link cost gRPC adds, without the model's noise."""
    from device_runtime.link.edge_client import EdgeClient
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    sizes = [(0, 0), (1024, 0), (0, 1024), (65536, 0), (0, 65536), (1 << 20, 0), (0, 1 << 20)]
    out = {}
    settings = EdgeSettings(model_path=model, n_ctx=256, n_slots=1, n_threads=threads)
    with EdgeServerThread(settings) as edge, EdgeClient(edge.target) as client:
        client.ping(0)
        for up, down in sizes:
            rtts = [client.ping(up, down) for _ in range(repeats)]
            out[f"{up}/{down}"] = statistics.median(rtts) * 1e3
    return out


def bench_history(model: Path, threads: int, trials: int, history_tokens: int) -> dict:
    from device_runtime.link.edge_client import EdgeClient, GenerationParams
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    n_ctx = 4096
    settings = EdgeSettings(model_path=model, n_ctx=n_ctx, n_slots=3, n_threads=threads)
    params = GenerationParams(max_tokens=8)
    res = {"warm": [], "no_history": [], "re_prefill": []}
    with EdgeServerThread(settings) as edge, EdgeClient(edge.target) as client:
        conv = edge.servicer.pool.slots[0].conversation
        history = history_messages(history_tokens, conv.count_tokens)
        for t in range(trials):
            follow_up = user(f"Follow-up {t}: which of those facts was the most surprising?")
            # Warm: the history is already in the session's KV.
            sid = client.open_session()
            r0 = client.generate(sid, [user(f"Session {t}."), *history, user("Summarise.")], params).consume()
            warm = client.generate(sid, [follow_up], params).consume()
            # No history: the same turn alone.
            sid2 = client.open_session()
            alone = client.generate(sid2, [follow_up], params).consume()
            # Re-prefill: the same conversation as new messages on a fresh session
            # (a different opening, so no slot holds its prefix).
            sid3 = client.open_session()
            convo = [user(f"Replay {t}."), *history, user("Summarise."), assistant(r0.text), follow_up]
            cold = client.generate(sid3, convo, params).consume()
            for s in (sid, sid2, sid3):
                client.close_session(s)
            res["warm"].append(warm)
            res["no_history"].append(alone)
            res["re_prefill"].append(cold)
            log(f"trial {t}: warm {warm.ttft_s*1e3:.0f} ms ({warm.prefill_tokens} prefilled of "
                 f"{warm.prompt_tokens}), alone {alone.ttft_s*1e3:.0f} ms, re-prefill {cold.ttft_s*1e3:.0f} ms "
                 f"({cold.prefill_tokens} prefilled)")
    out = {}
    for name, rs in res.items():
        out[name] = {
            "p50_ttft_ms": statistics.median(r.ttft_s for r in rs) * 1e3,
            "prompt_tokens": int(statistics.median(r.prompt_tokens for r in rs)),
            "prefill_tokens": int(statistics.median(r.prefill_tokens for r in rs)),
        }
    out["warm_over_no_history"] = out["warm"]["p50_ttft_ms"] / out["no_history"]["p50_ttft_ms"]
    out["re_prefill_over_warm"] = out["re_prefill"]["p50_ttft_ms"] / out["warm"]["p50_ttft_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--history-trials", type=int, default=None,
                        help="follow-up trials (default: max(3, trials // 3)); each re-prefills the history")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)

    from edge_service.models import default_edge_model_path

    model = Path(args.model) if args.model else default_edge_model_path()
    log(f"model {model.name}, {args.threads} thread(s), {args.trials} trials")
    history_trials = args.history_trials or max(3, args.trials // 3)
    results = {
        "model": model.name,
        "threads": args.threads,
        "trials": args.trials,
        "history_trials": history_trials,
        "grpc_vs_inprocess": bench_grpc_vs_inprocess(model, args.threads, args.trials, args.max_tokens),
        "echo_p50_ms": bench_echo(model, args.threads),
        "history": bench_history(model, args.threads, history_trials, args.history_tokens),
    }
    if args.json:
        print(json.dumps(results))
        return 0
    g = results["grpc_vs_inprocess"]
    print(f"### gRPC loopback vs in-process ({model.name}, {args.threads} thread(s), {args.trials} trials, "
          f"max_tokens {args.max_tokens})\n")
    print("| path | p50 TTFT (ms) | decode (tok/s) |\n|---|---:|---:|")
    for name in ("in-process", "grpc"):
        print(f"| {name} | {g[name]['p50_ttft_ms']:.1f} | {g[name]['decode_tok_s']:.1f} |")
    p = g["paired_ttft_diff_ms"]
    print(f"\nTTFT difference (gRPC - in-process): {g['ttft_diff_ms']:+.1f} ms between the medians; "
          f"per trial (paired): median {p['median']:+.1f} ms, 95% CI of that median "
          f"[{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] ms, IQR {p['iqr']:.1f} ms, range "
          f"[{p['min']:+.1f}, {p['max']:+.1f}] ms ({p['grpc_first']:+.1f} ms when gRPC "
          f"ran first, {p['in_process_first']:+.1f} ms when it ran second). "
          f"Decode throughput ratio: {g['decode_ratio']*100:.1f}%\n")
    print("### Echo round trip on loopback (p50 of 50)\n")
    print("| up bytes | down bytes | p50 RTT (ms) |\n|---:|---:|---:|")
    for key, ms in results["echo_p50_ms"].items():
        up, down = key.split("/")
        print(f"| {up} | {down} | {ms:.2f} |")
    print()
    h = results["history"]
    print(f"### Follow-up turn with ~{args.history_tokens} tokens of history (edge, via gRPC, "
          f"{history_trials} trials)\n")
    print("| turn | p50 TTFT (ms) | prompt tokens | prefill tokens |\n|---|---:|---:|---:|")
    for name, label in (("warm", "follow-up, warm session"), ("no_history", "same turn, no history"),
                        ("re_prefill", "follow-up, whole history re-prefilled")):
        print(f"| {label} | {h[name]['p50_ttft_ms']:.1f} | {h[name]['prompt_tokens']} | {h[name]['prefill_tokens']} |")
    print(f"\nwarm / no history: {h['warm_over_no_history']:.2f}x; "
          f"re-prefill / warm: {h['re_prefill_over_warm']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
