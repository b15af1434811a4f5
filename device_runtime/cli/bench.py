"""``edgeroute bench``: benchmarks that print tables (for docs/, never asserted in tests).

    edgeroute bench router --bundle FULL_EXPORT_DIR [--repeats N] [--data-dir DIR]

Each benchmark registers itself in ``BENCHES`` with a function that adds its
options and one that runs it; ``edgeroute bench NAME`` dispatches.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

from device_runtime.core.flags import add_flags, flag, from_args
from device_runtime.core.registry import Registry


@dataclass(frozen=True)
class Bench:
    """One ``edgeroute bench`` subcommand: its help line, the function that adds
    its options and the one that runs it (heavy imports stay inside ``run``)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> Bench.  A new benchmark registers one entry.
BENCHES: Registry[Bench] = Registry("benchmark")


# --- router -------------------------------------------------------------------


@dataclass(frozen=True)
class RouterBenchSettings:
    """The ``edgeroute bench router`` options that have a value (export/router_bench.py
    runs the benchmark).  Defined here rather than beside the benchmark so that
    listing the command never imports the export stack."""

    data_dir: str | None = field(default=None, metadata=flag(
        "RouteLLM-layout data dir for validation metrics (default ../shared/data/routellm)"
    ))
    repeats: int = field(default=50, metadata=flag("timed runs per length and precision"))
    #: Comma-separated, as typed on the command line.
    lengths: str = field(default="32,128,512", metadata=flag("token lengths to time"))

    def token_lengths(self) -> list[int]:
        """``lengths`` as token counts, each in [1, 512]."""
        lengths = [int(x) for x in self.lengths.split(",") if x.strip()]
        if not lengths or not all(1 <= n <= 512 for n in lengths):
            raise ValueError(f"--lengths must be token counts in [1, 512], got {self.lengths!r}")
        return lengths


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True,
                   help="a full export directory (model.onnx, model_fp32.onnx, pytorch/), as written by edgeroute export")
    defaults = {f.name: f.default for f in dataclasses.fields(RouterBenchSettings)}
    add_flags(p, RouterBenchSettings, help_suffix={
        name: f" (default {defaults[name]})" for name in ("repeats", "lengths")
    })
    p.add_argument("--no-pytorch", action="store_true", help="skip the PyTorch column (no torch installed)")
    p.add_argument("--no-quality", action="store_true", help="skip the validation APGR/CPT rows")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of tables")


def _router_run(args: argparse.Namespace) -> int:
    from export.router_bench import BenchError, format_tables, run_router_bench

    settings = from_args(RouterBenchSettings, args)
    try:
        result = run_router_bench(
            args.bundle, data_dir=settings.data_dir, repeats=settings.repeats, lengths=settings.token_lengths(),
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


BENCHES.register("router")(Bench(
    help="latency, size and validation APGR/CPT: FP32 ONNX vs INT8 ONNX vs PyTorch",
    add_arguments=_router_args,
    run=_router_run,
))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks that print tables (see docs/)")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    for name in BENCHES.names():
        bench = BENCHES.get(name)
        p = sub.add_parser(name, help=bench.help)
        bench.add_arguments(p)
        p.set_defaults(func=bench.run)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
