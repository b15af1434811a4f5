"""The openai backend (the edge as a gateway) against the in-process backend; prints markdown tables.

    python scripts/bench_gateway.py [--trials 15] [--max-tokens 32] [--sessions 8] [--turns 2] [--json]

1. One request at a time, on the same GGUF (the default edge model), three
   paths interleaved trial by trial so that machine load hits all alike:
   ``EdgeClient`` -> ``edgeroute serve`` with the in-process ``llama_cpp``
   backend; ``EdgeClient`` -> ``edgeroute serve --backend openai`` -> one
   ``python -m llama_cpp.server``; and the same engine called directly over
   HTTP (httpx, streaming).  TTFT p50/p95 and decode tokens per second; the
   gateway's overhead is its TTFT against the direct call, in the same run.
2. ``--sessions`` concurrent sessions of ``--turns`` turns each through the
   gateway, with one replica against two: aggregate output tokens per second
   and TTFT p50/p95.

The engine uses llama-cpp-python's ``gemma`` chat format (the GGUF has no
template; the in-process backend formats it ``plain``), so the in-process row
answers a differently formatted prompt: compare its decode rate, and read the
overhead from the gateway and direct rows.  Progress goes to stderr; with
``--json`` stdout carries one JSON object instead of the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_common import add_checkout_to_path, log, user

add_checkout_to_path()  # run from a checkout without installing


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(model: Path, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """One llama-cpp-python server on a free port; (process, base URL) once it answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "edge",
           "--chat_format", "gemma", "--n_ctx", "1024", "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", "false", "--verbose", "false"]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"the replica exited; see {log_path}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the replica did not start within two minutes")


def direct_turn(client, url: str, prompt: list[dict], max_tokens: int) -> tuple[float, int, float]:
    """The engine over HTTP with no gateway: (ttft_s, output chunks, seconds after the first)."""
    body = {"model": "edge", "messages": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            delta = (json.loads(line[5:])["choices"] or [{}])[0].get("delta", {})
            if delta.get("content"):
                last = time.perf_counter()
                first = first or last
                n += 1
    end = time.perf_counter()
    return (first or end) - t0, n, (last or end) - (first or end)


def edge_turn(client, prompt: list[dict], params) -> tuple[float, int, float]:
    """One turn through an edge server on a new session: (ttft_s, output tokens, seconds after the first)."""
    sid = client.open_session()
    r = client.generate(sid, prompt, params).consume()
    client.close_session(sid)
    return r.ttft_s, r.output_tokens, r.total_s - r.ttft_s


def summarize(rows: list[tuple[float, int, float]]) -> dict:
    ttft = sorted(r[0] for r in rows)
    tok, secs = sum(max(0, r[1] - 1) for r in rows), sum(r[2] for r in rows)
    return {"p50_ttft_ms": statistics.median(ttft) * 1e3,
            "p95_ttft_ms": statistics.quantiles(ttft, n=20)[18] * 1e3 if len(ttft) >= 2 else ttft[0] * 1e3,
            "decode_tok_s": tok / secs if secs else float("nan"),
            "mean_output_tokens": statistics.mean(r[1] for r in rows)}


def bench_single(model: Path, url: str, threads: int, trials: int, max_tokens: int) -> dict:
    import httpx

    from device_runtime.link.edge_client import EdgeClient, GenerationParams
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings
    from tqdm import tqdm

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    local = EdgeSettings(model_path=model, n_ctx=1024, n_slots=1, n_threads=threads)
    gate = EdgeSettings(backend="openai", upstream=(url,), n_slots=1)
    rows: dict[str, list] = {"in-process": [], "gateway": [], "direct": []}
    with EdgeServerThread(local) as e1, EdgeServerThread(gate) as e2, \
            EdgeClient(e1.target) as c1, EdgeClient(e2.target) as c2, httpx.Client(timeout=120) as http:
        paths = {"in-process": lambda p: edge_turn(c1, p, params), "gateway": lambda p: edge_turn(c2, p, params),
                 "direct": lambda p: direct_turn(http, url, p, max_tokens)}
        names = list(paths)
        for t in tqdm(range(trials + 1), desc="single requests", file=sys.stderr):  # trial 0 warms up
            order = names[t % 3:] + names[:t % 3]  # rotate, so no path always runs first
            for name in order:
                # A prompt of its own per path: the engine keeps the last prompt's KV, and a
                # repeated prompt would time a cache hit, not the path.
                prompt = [user(f"Trial {t} ({name}). Count from 1 to 100, separated by commas: 1, 2, 3,")]
                row = paths[name](prompt)
                if t > 0:
                    rows[name].append(row)
    out = {name: summarize(rs) for name, rs in rows.items()}
    diffs = [(g[0] - d[0]) * 1e3 for g, d in zip(rows["gateway"], rows["direct"])]
    direct_p50 = out["direct"]["p50_ttft_ms"]
    out["gateway_overhead"] = {
        "p50_diff_ms": out["gateway"]["p50_ttft_ms"] - direct_p50,
        "paired_median_ms": statistics.median(diffs),
        "pct_of_direct_p50": 100 * (out["gateway"]["p50_ttft_ms"] - direct_p50) / direct_p50,
    }
    return out


def bench_concurrent(urls: list[str], sessions: int, turns: int, max_tokens: int) -> dict:
    """``sessions`` threads, each a session of ``turns`` turns, through one gateway over ``urls``."""
    from device_runtime.link.edge_client import EdgeClient, GenerationParams
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    settings = EdgeSettings(backend="openai", upstream=tuple(urls), n_slots=sessions,
                            max_concurrent_per_principal=sessions, max_slots_per_principal=sessions)
    results: list = []
    lock = threading.Lock()
    with EdgeServerThread(settings) as edge, EdgeClient(edge.target) as client:

        def session(i: int) -> None:
            sid, history = f"bench-{i}", []
            for k in range(turns):
                msg = user(f"Session {i}, turn {k}: list five {['fruits', 'colours', 'animals'][k % 3]}.")
                r = client.generate(sid, [*history, msg] if not history else [msg], params,
                                    open_session=not history).consume()
                history += [msg, {"role": "assistant", "content": r.text}]
                with lock:
                    results.append(r)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    ttft = sorted(r.ttft_s for r in results)
    return {"replicas": len(urls), "turns": len(results), "wall_s": wall,
            "output_tok_s": sum(r.output_tokens for r in results) / wall,
            "p50_ttft_ms": statistics.median(ttft) * 1e3, "p95_ttft_ms": statistics.quantiles(ttft, n=20)[18] * 1e3}


def print_tables(out: dict) -> None:
    s = out["single"]
    print("| path | p50 TTFT (ms) | p95 TTFT (ms) | decode (tok/s) |\n| --- | ---: | ---: | ---: |")
    for name in ("in-process", "gateway", "direct"):
        r = s[name]
        print(f"| {name} | {r['p50_ttft_ms']:.1f} | {r['p95_ttft_ms']:.1f} | {r['decode_tok_s']:.1f} |")
    o = s["gateway_overhead"]
    print(f"\ngateway TTFT overhead over the direct HTTP call: {o['p50_diff_ms']:+.1f} ms at p50 "
          f"({o['pct_of_direct_p50']:+.1f} % of the direct p50; paired median {o['paired_median_ms']:+.1f} ms)\n")
    print("| replicas | turns | wall (s) | output tok/s | p50 TTFT (ms) | p95 TTFT (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in out["concurrent"]:
        print(f"| {r['replicas']} | {r['turns']} | {r['wall_s']:.1f} | {r['output_tok_s']:.1f} | "
              f"{r['p50_ttft_ms']:.0f} | {r['p95_ttft_ms']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M Q4_K_M)")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each engine and the in-process backend")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    from edge_service.models import default_edge_model_path

    model = Path(args.model) if args.model else default_edge_model_path()
    out: dict = {"date": datetime.date.today().isoformat(), "model": model.name, "cpus": os.cpu_count(),
                 "args": vars(args)}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            log("starting two llama-cpp-python replicas")
            for i in range(2):
                procs.append(start_replica(model, args.threads, Path(tmp) / f"replica{i}.log"))
            urls = [url for _, url in procs]
            out["single"] = bench_single(model, urls[0], args.threads, args.trials, args.max_tokens)
            out["concurrent"] = []
            for n in (1, 2):
                log(f"{args.sessions} concurrent sessions on {n} replica(s)")
                out["concurrent"].append(bench_concurrent(urls[:n], args.sessions, args.turns, args.max_tokens))
        finally:
            for proc, _ in procs:
                proc.kill()
                proc.wait(10)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_tables(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
