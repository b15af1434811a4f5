"""How well can a turn's answer length L_r be guessed before the turn?

The cost model charges L̄_r decode steps (eqs. 3, 5).  On the emulated link the
timing model is accurate once the answer's length is known (docs/profiling.md,
the post-hoc columns), so the ex-ante prediction error is mostly the length
guess.  This script measures how far off the guesses are, on real models:

    python scripts/bench_answer_length.py --data-dir ../shared/data [--dialogues 120] [--max-tokens 24]

Both models (the device SLM and the edge LLM, in-process over loopback gRPC)
answer the first two user turns of ``--dialogues`` random MT-Bench-101
dialogues, the second turn with the model's own first answer as context.
Lengths are device-SLM tokens of the answer text, the cost model's unit.  For
each model it prints the median relative error |guess − L_r| / L_r of:

- ``mean``, ``median``: one constant from the other folds (5-fold CV);
- ``linear(log L_p, log C)``: least squares on the prompt and context length;
- ``conversation`` (second turns only): what the runtime's online estimate
  does, the mean of this conversation's earlier answers with the running mean
  counted as one more answer (``OnlineSettings.length_prior_answers = 1``);
- ``best constant, first turns``: the one constant that, chosen after seeing
  every first-turn answer, minimizes the median error: a lower bound for any
  guess that knows nothing of the turn (not a usable guess).

``--rows JSON`` re-evaluates the per-turn lengths of an earlier ``--out`` file
without running the models.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def collect(args) -> list[dict]:
    from tqdm import tqdm

    from device_runtime.link.edge_client import EdgeClient, GenerationParams, new_session_id
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    path = args.data_dir / "mtbench101" / "mtbench101.jsonl"
    if not path.is_file():
        raise SystemExit(f"bench_answer_length: {path} not found (give --data-dir)")
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    rows = [r for r in rows if len(r.get("history", [])) >= 2]
    picked = random.Random(args.seed).sample(rows, min(args.dialogues, len(rows)))
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_ctx=2048, n_threads=args.threads))
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    out = []
    with EdgeServerThread(EdgeSettings(n_ctx=2048, n_slots=1, n_threads=args.threads)) as server, \
            EdgeClient(server.target) as edge:

        def on_edge(messages):
            sid = new_session_id()
            try:
                return edge.generate(sid, messages, params, open_session=True).consume().text
            finally:
                edge.close_session(sid)

        def on_device(messages):
            slm.reset()
            return "".join(slm.stream(messages, max_tokens=args.max_tokens, temperature=0.0))

        for row in tqdm(picked, desc="dialogues", file=sys.stderr):
            for model, answer in (("device", on_device), ("edge", on_edge)):
                messages: list[dict] = []
                for k in range(2):
                    prompt = row["history"][k]["user"]
                    text = answer(messages + [{"role": "user", "content": prompt}])
                    out.append({
                        "dialogue": row.get("id"), "model": model, "turn": k + 1,
                        "prompt_tokens": slm.count_tokens(prompt),
                        "context_tokens": sum(slm.count_tokens(m["content"]) for m in messages),
                        "answer_tokens": slm.count_tokens(text) if text else 0,
                    })
                    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
    slm.close()
    return out


def median_rel_error(guess, actual) -> float:
    guess, actual = np.asarray(guess, float), np.asarray(actual, float)
    return float(np.median(np.abs(guess - actual) / np.maximum(actual, 1.0)))


def evaluate(rows: list[dict], seed: int = 0, folds: int = 5) -> dict:
    """Median relative length error of each guess, per model (5-fold CV by dialogue)."""
    result = {}
    for model in ("device", "edge"):
        rs = [r for r in rows if r["model"] == model]
        dialogues = sorted({r["dialogue"] for r in rs}, key=str)
        random.Random(seed).shuffle(dialogues)
        fold_of = {d: i % folds for i, d in enumerate(dialogues)}
        guesses: dict[str, list] = {"mean": [], "median": [], "linear(log L_p, log C)": []}
        actual = []
        for f in range(folds):
            train = [r for r in rs if fold_of[r["dialogue"]] != f]
            test = [r for r in rs if fold_of[r["dialogue"]] == f]
            if not train or not test:
                continue
            y = np.array([r["answer_tokens"] for r in train], float)

            def feats(rr):
                return np.array([[1.0, np.log1p(r["prompt_tokens"]), np.log1p(r["context_tokens"])] for r in rr])

            w = np.linalg.lstsq(feats(train), y, rcond=None)[0]
            guesses["mean"] += [y.mean()] * len(test)
            guesses["median"] += [float(np.median(y))] * len(test)
            guesses["linear(log L_p, log C)"] += list(feats(test) @ w)
            actual += [r["answer_tokens"] for r in test]
        out = {name: median_rel_error(g, actual) for name, g in guesses.items()}
        # Second turns: the conversation's first answer shrunk to the mean of the
        # other folds' answers (out of fold, as the columns above).
        by_dialogue = {}
        for r in rs:
            by_dialogue.setdefault(r["dialogue"], {})[r["turn"]] = r["answer_tokens"]
        fold_mean = {
            f: statistics.fmean(r["answer_tokens"] for r in rs if fold_of[r["dialogue"]] != f)
            for f in set(fold_of.values())
        }
        pairs = [(t[1], t[2], fold_mean[fold_of[d]]) for d, t in by_dialogue.items() if 1 in t and 2 in t]
        out["mean, second turns"] = median_rel_error([m for _, _, m in pairs], [b for _, b, _ in pairs])
        out["conversation, second turns"] = median_rel_error([(a + m) / 2 for a, _, m in pairs],
                                                              [b for _, b, _ in pairs])
        first = [r["answer_tokens"] for r in rs if r["turn"] == 1]
        out["best constant, first turns"] = min(
            median_rel_error([c] * len(first), first) for c in np.arange(1.0, max(first) + 0.5, 0.5)
        )
        lengths = [r["answer_tokens"] for r in rs]
        out["n"] = len(rs)
        out["answer_tokens_p10_p50_p90"] = [float(v) for v in np.percentile(lengths, [10, 50, 90])]
        result[model] = out
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--dialogues", type=int, default=120)
    ap.add_argument("--max-tokens", type=int, default=24, help="answer cap, as in scripts/bench_link.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the per-turn lengths and results as JSON")
    ap.add_argument("--rows", type=Path, default=None, metavar="JSON",
                    help="re-evaluate the lengths saved by an earlier --out instead of running the models")
    args = ap.parse_args(argv)
    if args.rows is not None:
        try:
            saved = json.loads(args.rows.read_text())
            rows, args.max_tokens = saved["rows"], saved["max_tokens"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ap.error(f"--rows {args.rows}: not an --out file of this script ({exc})")
        args.dialogues = len({r["dialogue"] for r in rows})
    elif args.dialogues < 5:
        ap.error("--dialogues must be >= 5 (5-fold cross-validation)")
    else:
        rows = collect(args)
    result = evaluate(rows, seed=args.seed)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "result": result, "max_tokens": args.max_tokens}, indent=2))
    names = [k for k in result["edge"] if k not in ("n", "answer_tokens_p10_p50_p90")]
    print(f"{args.dialogues} MT-Bench-101 dialogues x 2 turns, answers capped at {args.max_tokens} generated "
          "tokens, lengths in device-SLM tokens; median |guess - L_r| / L_r")
    print()
    print("| model | turns | L_r p10 / p50 / p90 | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for model, r in result.items():
        p = " / ".join(f"{v:.0f}" for v in r["answer_tokens_p10_p50_p90"])
        print(f"| {model} | {r['n']} | {p} | " + " | ".join(f"{r[k]:.2f}" for k in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
