"""Latency and edge share where each router's swept curve first reaches a target quality.

Reads the ``summary.json`` files that ``edgeroute simulate --out docs/figures/<benchmark>`` wrote
and interpolates linearly along each curve (in sweep order) to the first crossing of the
target: the numbers quoted in docs/simulation.md ("Reading the numbers against the paper's
text").  ``scripts/paper_claims.py`` gives the exact eq. (9) optimum instead.

    python scripts/curve_points.py [--figures docs/figures] [--target mmlu=0.76 --target mt-bench=9.0 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TARGETS = {"mmlu": 0.76, "gsm8k": 0.80, "mt-bench": 9.0}


def first_crossing(curve: list[dict], target: float) -> tuple[float, float] | None:
    """(mean latency, edge share) where the curve first reaches ``target``, or None."""
    for a, z in zip(curve, curve[1:]):
        if z["quality"] >= target:
            f = 0.0 if a["quality"] >= target else (target - a["quality"]) / (z["quality"] - a["quality"])
            return (a["mean_latency_s"] + f * (z["mean_latency_s"] - a["mean_latency_s"]),
                    a["edge_share"] + f * (z["edge_share"] - a["edge_share"]))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--target", action="append", default=[], metavar="BENCHMARK=Q")
    args = ap.parse_args(argv)
    targets = dict(DEFAULT_TARGETS)
    for item in args.target:
        name, _, value = item.partition("=")
        targets[name] = float(value)
    for benchmark, target in targets.items():
        path = Path(args.figures) / benchmark / "summary.json"
        if not path.is_file():
            print(f"{benchmark}: no {path}", file=sys.stderr)
            continue
        summary = json.loads(path.read_text())
        for name, r in summary["routers"].items():
            hit = first_crossing(r["curve"], target)
            where = "not reached" if hit is None else f"latency {hit[0]:.2f} s, edge share {hit[1]:.3f}"
            print(f"{benchmark} {name} at {target:g}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
