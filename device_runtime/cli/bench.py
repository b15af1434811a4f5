"""``edgeroute bench``: benchmarks that print tables (for docs/, never asserted in tests).

    edgeroute bench router --bundle FULL_EXPORT_DIR [--repeats N] [--data-dir DIR]

Each benchmark registers itself in ``BENCHES`` with a function that adds its
options and one that runs it; ``edgeroute bench NAME`` dispatches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

#: name -> (help, add_arguments(parser), run(args) -> exit status).  A new
#: benchmark adds one entry; heavy imports stay inside its run function.
BENCHES: dict[str, tuple[str, Callable, Callable]] = {}


# --- router -------------------------------------------------------------------


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True,
                   help="a full export directory (model.onnx, model_fp32.onnx, pytorch/), as written by edgeroute export")
    p.add_argument("--data-dir", default=None, help="RouteLLM-layout data dir for validation metrics (default ../shared/data/routellm)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs per length and precision (default 50)")
    p.add_argument("--lengths", default="32,128,512", help="token lengths to time (default 32,128,512)")
    p.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch column (no torch installed)")
    p.add_argument("--no-quality", action="store_true", help="skip the validation APGR/CPT rows")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of tables")


def _router_run(args: argparse.Namespace) -> int:
    from device_runtime.router_bench import BenchError, format_tables, run_router_bench

    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        if not lengths or not all(1 <= n <= 512 for n in lengths):
            raise ValueError(f"--lengths must be token counts in [1, 512], got {args.lengths!r}")
        result = run_router_bench(
            args.bundle, data_dir=args.data_dir, repeats=args.repeats, lengths=lengths,
            pytorch=not args.no_pytorch, quality=not args.no_quality,
        )
    except (BenchError, ValueError) as exc:
        print(f"edgeroute bench router: {exc}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(format_tables(result))
    return 0


BENCHES["router"] = (
    "latency, size and validation APGR/CPT: FP32 ONNX vs INT8 ONNX vs PyTorch",
    _router_args,
    _router_run,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that print tables (see docs/)")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name, (help_text, add_args, run) in BENCHES.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=run)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
