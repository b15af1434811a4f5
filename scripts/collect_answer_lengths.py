"""Answer lengths of the device SLM and the edge model on held-apart prompts:
the training rows of the live response-length model (docs/profiling.md,
"Answer lengths").

    python scripts/collect_answer_lengths.py --out lengths.jsonl            # about 25 min on 2 cores
    python scripts/collect_answer_lengths.py --out l.jsonl --n-chat 8 --n-math 2 --max-tokens 64   # a quick look

Prompts: user turns of MT-Bench-101 dialogues at every position (the turns
before it, with the data set's own answers, as history) and GSM8K training
questions, drawn with a fixed seed; never the demo's dialogues.  Each model
answers greedily, capped at ``--max-tokens``, exactly as a live turn is made:
the device SLM through its backend (its system message), the edge model
through a loopback edge service in a new session.  Lengths are counted in
device-SLM tokens, the unit of the cost model.  One JSON object per prompt
and side: ``{"side", "source", "prompt", "turn", "history_tokens", "answer_tokens", "capped", "max_tokens"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Each earlier answer of the data set is cut to this many characters: the
#: history is context, and a bounded one keeps the prefill short.
HISTORY_CHARS = 600


def sample_prompts(data_dir: Path, n_chat: int, n_math: int, seed: int) -> list[dict]:
    """``n_chat`` MT-Bench-101 turns (with their history) and ``n_math`` GSM8K questions."""
    rng = random.Random(seed)
    dialogues = [json.loads(line) for line in (data_dir / "mtbench101" / "mtbench101.jsonl").open()]
    rows = []
    for d in rng.sample(dialogues, n_chat):
        turns = d["history"]
        j = rng.randrange(len(turns))
        history = []
        for t in turns[:j]:
            history += [{"role": "user", "content": t["user"]},
                        {"role": "assistant", "content": t["bot"][:HISTORY_CHARS]}]
        rows.append({"source": f"mtbench101:{d['task']}", "turn": j + 1, "history": history,
                     "prompt": turns[j]["user"]})
    questions = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").open()]
    for q in rng.sample(questions, n_math):
        rows.append({"source": "gsm8k", "turn": 1, "history": [], "prompt": q["question"]})
    return rows


def device_lengths(rows: list[dict], max_tokens: int, threads: int | None):
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings

    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_threads=threads))
    for row in rows:
        slm.reset()
        messages = [*row["history"], {"role": "user", "content": row["prompt"]}]
        text = "".join(slm.stream(messages, max_tokens=max_tokens, temperature=0.0))
        yield row, slm.count_tokens(text), slm.last_stats.output_tokens >= max_tokens, slm.count_tokens


def edge_lengths(rows: list[dict], max_tokens: int, threads: int | None, count_tokens, edge_model: str | None):
    from device_runtime.link.edge_client import EdgeClient, GenerationParams, new_session_id
    from edge_service.models import DEMO_EDGE_MODEL, edge_model_path
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    settings = EdgeSettings(model_path=edge_model_path(edge_model or DEMO_EDGE_MODEL), n_ctx=4096,
                            n_slots=1, n_threads=threads)
    with EdgeServerThread(settings, host="127.0.0.1", port=0) as server, EdgeClient(server.target) as client:
        for row in rows:
            sid = new_session_id()
            messages = [*row["history"], {"role": "user", "content": row["prompt"]}]
            try:
                res = client.generate(sid, messages, GenerationParams(max_tokens=max_tokens, temperature=0.0),
                                      open_session=True, timeout_s=600).consume()
            finally:
                client.close_session(sid)
            yield row, count_tokens(res.text), res.output_tokens >= max_tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    ap.add_argument("--n-chat", type=int, default=72, help="MT-Bench-101 turns")
    ap.add_argument("--n-math", type=int, default=24, help="GSM8K questions")
    ap.add_argument("--max-tokens", type=int, default=192, help="cap on each answer")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads of each model")
    ap.add_argument("--edge-model", default=None, help="edge GGUF or model name (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from tqdm import tqdm

    rows = sample_prompts(args.data_dir, args.n_chat, args.n_math, args.seed)
    t0 = time.perf_counter()
    count = None
    with args.out.open("w") as out:
        def write(side: str, row: dict, n: int, capped: bool) -> None:
            out.write(json.dumps({"side": side, "source": row["source"], "turn": row["turn"],
                                  "prompt": row["prompt"], "history_tokens": count(
                                      " ".join(m["content"] for m in row["history"])) if row["history"] else 0,
                                  "answer_tokens": n, "capped": capped,
                                  "max_tokens": args.max_tokens}) + "\n")
            out.flush()

        for row, n, capped, count in tqdm(device_lengths(rows, args.max_tokens, args.threads),
                                          total=len(rows), desc="device", file=sys.stderr):
            write("device", row, n, capped)
        for row, n, capped in tqdm(edge_lengths(rows, args.max_tokens, args.threads, count, args.edge_model),
                                   total=len(rows), desc="edge", file=sys.stderr):
            write("edge", row, n, capped)
    print(f"{2 * len(rows)} answers in {time.perf_counter() - t0:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
