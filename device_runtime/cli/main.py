"""The ``edgeroute`` console script.

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``
and sets ``func`` on its parser.  Those modules keep heavy imports (torch,
onnxruntime, llama_cpp, grpc) inside the command functions, so ``edgeroute --help``
stays fast and a device never imports the export stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand name -> module that defines it.  Order is the order in --help.
COMMANDS: dict[str, str] = {
    "simulate": "device_runtime.cli.simulate",
    "calibrate": "device_runtime.cli.calibrate",
    "router": "device_runtime.cli.router",
    "export": "export.cli",
    "serve": "edge_service.cli",
    "chat": "device_runtime.cli.chat",
    "demo": "device_runtime.cli.demo",
    "profile": "device_runtime.cli.profile",
    "bench": "device_runtime.cli.bench",
    "token": "device_runtime.cli.token",
    "models": "device_runtime.cli.models",
    "journal": "device_runtime.cli.journal",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeroute",
        description="Quality-latency aware routing between a device SLM and an edge LLM.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A command whose optional module is absent (e.g. export on a device
            # install) is still listed, with the reason it cannot run.
            if exc.name and not module_name.startswith(exc.name) and exc.name != module_name:
                missing = exc.name
            else:
                missing = module_name
            p = sub.add_parser(name, help=f"(unavailable: {missing} not installed)")
            p.set_defaults(func=_unavailable(name, missing))
            continue
        module.add_parser(sub)
    return parser


def _unavailable(name: str, missing: str):
    def run(args: argparse.Namespace) -> int:
        print(f"edgeroute {name}: unavailable, module {missing!r} is not installed", file=sys.stderr)
        return 2

    return run


# Top-level module of an optional dependency -> the extra that installs it
# (for the edge server, grpc and llama_cpp come with "edge" instead).
_EXTRA_OF = {
    "torch": "export", "transformers": "export", "onnx": "export",
    "matplotlib": "plot",
    "onnxruntime": "device", "tokenizers": "device", "llama_cpp": "device",
    "grpc": "device", "grpc_health": "device", "google": "device",
    "grpc_reflection": "edge",
}


def _missing_extra(command: str, exc: ModuleNotFoundError) -> str | None:
    """The extra to install for a command that needs ``exc.name``; None if it
    is not an optional dependency (a genuine bug, raised as it is)."""
    top = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra == "device" and command == "serve":
        extra = "edge"
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        extra = _missing_extra(args.command, exc)
        if extra is None:
            raise
        print(
            f"edgeroute {args.command}: needs module {exc.name!r}, which is not installed: "
            f"pip install 'edgeroute[{extra}]'",
            file=sys.stderr,
        )
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
