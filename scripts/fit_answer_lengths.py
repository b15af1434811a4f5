"""Fit the live answer-length model on collected answers and report how well it
predicts held-out turns (docs/profiling.md, "Answer lengths").

    python scripts/collect_answer_lengths.py --out lengths.jsonl
    python scripts/fit_answer_lengths.py lengths.jsonl --out device_runtime/data/answer_lengths.json

The report is 5-fold cross-validation over the prompts: per side and answer
cap, the median relative error |predicted − actual| / actual of the expected
capped length and its mean absolute error, for the model and for one constant
(the training folds' mean capped length, what the self-profile's L̄_r is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_runtime.routing.answer_length import SIDES, fit  # noqa: E402


def load_rows(path: Path, train_cap: int | None = None) -> tuple[list[str], list[bool], dict[str, list[float]], int]:
    """(prompts, follow-up flags, tokens per side, the cap) of a collect_answer_lengths.py file."""
    by_side: dict[str, list[dict]] = {s: [] for s in SIDES}
    for line in path.open():
        r = json.loads(line)
        by_side[r["side"]].append(r)
    dev, edge = by_side["device"], by_side["edge"]
    if len(dev) != len(edge) or any(a["prompt"] != b["prompt"] for a, b in zip(dev, edge)):
        raise SystemExit(f"{path}: the device and edge rows do not pair up")
    caps = {r.get("max_tokens", train_cap) for r in dev + edge}
    if len(caps) != 1 or None in caps:
        raise SystemExit(f"{path}: give --train-cap (the rows name caps {sorted(map(str, caps))})")
    return ([r["prompt"] for r in dev], [r["turn"] > 1 for r in dev],
            {"device": [r["answer_tokens"] for r in dev], "edge": [r["answer_tokens"] for r in edge]}, caps.pop())


def cross_validate(prompts, follow, tokens, train_cap: int, caps, folds: int = 5, l2: float = 1.0) -> list[dict]:
    n = len(prompts)
    order = np.random.default_rng(0).permutation(n)
    rows = []
    for cap in caps:
        for side in SIDES:
            actual = np.minimum(np.asarray(tokens[side], float), cap)
            model_pred, const_pred = np.empty(n), np.empty(n)
            for k in range(folds):
                test = order[k::folds]
                train = np.setdiff1d(order, test)
                m = fit([prompts[i] for i in train], [follow[i] for i in train],
                        {s: [tokens[s][i] for i in train] for s in SIDES}, train_cap=train_cap, l2=l2)
                model_pred[test] = m.predict_many([prompts[i] for i in test], [follow[i] for i in test], cap)[side]
                const_pred[test] = actual[train].mean()
            keep = actual > 0
            for name, pred in (("constant L̄_r", const_pred), ("answer-length model", model_pred)):
                rel = np.abs(pred[keep] - actual[keep]) / actual[keep]
                rows.append({"cap": cap, "side": side, "predictor": name,
                             "median_rel_err": float(statistics.median(rel)),
                             "mae_tokens": float(np.abs(pred - actual).mean())})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lengths", type=Path, help="JSONL from scripts/collect_answer_lengths.py")
    ap.add_argument("--out", type=Path, default=None, help="write the model fitted on all rows here")
    ap.add_argument("--caps", default="48,128", help="answer caps to report")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--train-cap", type=int, default=None, help="the collection's cap, for rows that do not name it")
    args = ap.parse_args(argv)
    prompts, follow, tokens, cap = load_rows(args.lengths, args.train_cap)
    caps = [int(c) for c in args.caps.split(",")]
    print(f"{len(prompts)} prompts, answers collected with a cap of {cap} tokens; 5-fold cross-validation\n")
    print("| cap | side | predictor | median relative error | MAE (tokens) |")
    print("|---|---|---|---|---|")
    for r in cross_validate(prompts, follow, tokens, cap, caps, l2=args.l2):
        print(f"| {r['cap']} | {r['side']} | {r['predictor']} | {r['median_rel_err']:.0%} | {r['mae_tokens']:.1f} |")
    if args.out:
        model = fit(prompts, follow, tokens, train_cap=cap, l2=args.l2,
                    source=f"{args.lengths.name}: {len(prompts)} prompts (MT-Bench-101 turns, GSM8K questions)")
        model.save(args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
