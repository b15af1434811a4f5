"""``edgeroute chat``: talk to the device runtime, interactively or from a script.

    edgeroute chat --edge 127.0.0.1:50051                  # interactive, streamed
    edgeroute chat --edge HOST:PORT --script turns.jsonl --json
    edgeroute chat --edge HOST:PORT --tls-ca ca.crt --token-file edge.token   # TLS and a token
    edgeroute chat --edge 10.0.0.5:50051,10.0.0.6:50051   # two gateways of one fleet, tried in order

Script lines are ``{"prompt": str}`` (a turn in the current conversation) or an
MT-Bench-101 dialogue ``{"history": [{"user": str}, ...]}`` (a new conversation).
Interactive commands: ``/new`` starts a new conversation, ``/quit`` (or EOF) ends.
Turns the edge could not answer run on the device; the run still exits 0.  The
token may also come from the EDGEROUTE_TOKEN environment variable.

Every turn is journaled (``--journal FILE``, default
$XDG_STATE_HOME/edgeroute/journal.sqlite3; ``--no-journal``): ``--resume``
continues the most recent conversation, ``--conversation ID`` a given one,
after a crash too.  A user message whose turn was interrupted is offered
again: interactively, an empty line sends it; with ``--script`` it is printed
on stderr and not sent (a script that starts with it sends it once).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from device_runtime.cli.runner import add_runtime_args

    p = subparsers.add_parser(
        "chat",
        help="chat with the device runtime (router + SLM + edge)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from device_runtime.cli.runner import EDGE_HELP

    p.add_argument("--edge", metavar="HOST:PORT[,...]",
                   help=EDGE_HELP + "; without it, edge turns fall back to the device")
    p.add_argument("--script", metavar="FILE", help="replay turns from a JSONL file instead of stdin")
    p.add_argument("--no-text", action="store_true", help="do not print the answers (script mode)")
    add_runtime_args(p)
    from device_runtime.cli.journal import add_chat_journal_args

    add_chat_journal_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from device_runtime.runtime.dialogues import ScriptError, load_script
    from device_runtime.cli.runner import (
        Output, build_orchestrator, edge_security, edge_targets, format_summary, play,
    )

    items = None
    if args.script:
        try:
            items = load_script(args.script)
        except ScriptError as exc:
            print(f"edgeroute chat: {exc}", file=sys.stderr)
            return 2
    try:
        targets = edge_targets(args)
        security = edge_security(args, targets)
    except ValueError as exc:  # an address, a credentials file or flag: before any model loads
        print(f"edgeroute chat: {exc}", file=sys.stderr)
        return 2
    if not args.edge and args.policy != "device":
        log.warning("no --edge given: turns routed to the edge run on the device")
    from device_runtime.cli.journal import attach_for_chat, open_for_chat

    journal = None
    try:
        journal, resume = open_for_chat(args)  # a bad journal fails before any model loads
        orch = build_orchestrator(args, targets, security)
        pending = attach_for_chat(orch, journal, resume, os.environ)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"edgeroute chat: {exc}", file=sys.stderr)
        if journal is not None:
            journal.close()
        return 2
    if pending is not None:
        how = "an empty line sends it again" if items is None else "not sent (script mode)"
        print(f"[interrupted before its answer was journaled: {pending!r}; {how}]", file=sys.stderr, flush=True)
    out = Output(json_mode=args.json, show_text=not args.no_text, table=False)
    rc = 0
    try:
        if items is not None:
            play(orch, items, out)
        else:
            _interactive(orch, out, pending)
    except (ValueError, RuntimeError) as exc:
        # e.g. a conversation longer than the context window, a router failure
        print(f"edgeroute chat: {exc}", file=sys.stderr)
        rc = 1
    finally:
        orch.close()
        if orch.edge is not None:
            orch.edge.close()
        if journal is not None:
            journal.close()
    print(format_summary(orch.telemetry.summary(), orch.telemetry), file=sys.stderr)
    return rc


def _interactive(orch, out, offered: str | None = None) -> None:
    import threading

    stderr = out.stderr
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 become U+FFFD instead of ending the chat.
        sys.stdin.reconfigure(errors="replace")
    print("edgeroute chat: /new starts a new conversation, /quit ends", file=stderr, flush=True)
    while True:
        print("you> ", end="", file=stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        prompt = line.strip()
        if not prompt and offered is not None:
            prompt = offered  # the interrupted message, sent again
        offered = None
        if not prompt:
            continue
        if prompt == "/quit":
            break
        if prompt == "/new":
            orch.new_conversation()
            print("[new conversation]", file=stderr, flush=True)
            continue
        cancel = threading.Event()

        def on_text(chunk: str) -> None:
            out.text_stream.write(chunk)
            out.text_stream.flush()

        def on_event(kind: str, detail: str) -> None:
            if kind == "edge_lost":
                print(f"\n[edge lost mid-answer ({detail}); the answer restarts]", file=stderr, flush=True)
            elif kind == "truncated":
                print(f"[context window: {detail}]", file=stderr, flush=True)

        try:
            result = orch.turn(prompt, on_text=on_text, on_event=on_event, cancel=cancel)
        except ValueError as exc:
            # Refused before anything ran (a prompt too long for the window,
            # text the models cannot take): the conversation is as it was.
            print(f"[not sent: {exc}]", file=stderr, flush=True)
            continue
        except KeyboardInterrupt:
            # The turn is dropped; the transcript and the KV caches stay consistent.
            print("\n[interrupted]", file=stderr, flush=True)
            continue
        print(file=out.text_stream, flush=True)
        rec = result.telemetry
        out.telemetry(rec)
        p = "-" if rec.p is None else f"{rec.p:.2f}"
        fb = " (fallback)" if rec.fallback else ""
        print(f"[{rec.target}{fb} p={p} {rec.measured_s:.2f}s ttft={rec.ttft_s:.2f}s "
              f"prefill={rec.prefill_tokens} cached={rec.cached_tokens} out={rec.output_tokens}]",
              file=stderr, flush=True)
