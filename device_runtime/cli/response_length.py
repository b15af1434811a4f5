"""Fit the per-query response-length model on a trace's train split and report
R²/MAE on its val split (:mod:`device_runtime.sim.response_length`)::

    python -m device_runtime.cli.response_length --data-dir ../shared/data/routellm [--out M.json] [--json]

A module of its own rather than an ``edgeroute`` subcommand: it is a research
step (docs/simulation.md), and ``edgeroute --help`` lists only what a user runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from device_runtime.core.flags import add_flags, from_args


def build_parser() -> argparse.ArgumentParser:
    from device_runtime.sim.response_length import FitSettings

    ap = argparse.ArgumentParser(
        prog="python -m device_runtime.cli.response_length",
        description="Fit the per-query response-length model on a trace's train split and "
        "report R²/MAE on its val split.",
    )
    ap.add_argument("--data-dir", required=True, help="RouteLLM-format data directory")
    ap.add_argument("--benchmark", default="gsm8k", choices=["gsm8k"], help="trace with recorded responses")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    add_flags(ap, FitSettings, only=["l2"])
    ap.add_argument("--out", default=None, help="write the fitted model JSON here")
    ap.add_argument("--json", action="store_true", help="print only the JSON report on stdout")
    return ap


def format_report(benchmark: str, report: dict) -> str:
    """The plain-text table: R²/MAE per target and predictor."""
    lines = [
        f"{benchmark}: train n={report['n_train']}, val n={report['n_val']} (words)",
        f"{'target':<8}{'predictor':<15}{'R²':>8}{'MAE':>8}",
    ]
    for target in ("device", "edge"):
        for name in ("predicted", "train_mean", "paper_average"):
            if name in report[target]:
                r = report[target][name]
                lines.append(f"{target:<8}{name:<15}{r['r2']:>8.3f}{r['mae']:>8.1f}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from device_runtime.sim.response_length import FitSettings, LengthModelError, evaluate, fit_trace
    from device_runtime.sim.traces import TraceError, load_trace

    args = build_parser().parse_args(argv)
    try:
        dialogues = load_trace(args.benchmark, args.data_dir)
        model = fit_trace(
            dialogues, benchmark=args.benchmark, val_fraction=args.val_fraction,
            settings=from_args(FitSettings, args),
        )
        report = evaluate(model, dialogues, val_fraction=args.val_fraction)
    except (TraceError, LengthModelError, ValueError) as exc:
        print(f"response_length: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        model.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return 0
    sys.stdout.write(format_report(args.benchmark, report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
