"""``edgeroute router score``: JSONL turns on stdin, one ``{"score": p}`` per line on stdout.

Each input line is ``{"prompt": str, "context": [{"role": "user"|"assistant",
"content": str}, ...]}`` (``context`` optional).  Higher p means the edge LLM
is more likely needed (eq. 10).  Every line is validated before any scoring,
so a malformed line fails the whole run with its line number and nothing on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO, TextIO


class InputError(ValueError):
    """A JSONL input line is malformed."""


def parse_turn(line: str, lineno: int) -> tuple[str, list[dict[str, str]]]:
    """Validate one JSONL line into (prompt, context)."""
    from device_runtime.routing.bundle import validate_messages
    from device_runtime.core.messages import is_text

    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"line {lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"line {lineno}: expected a JSON object")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"line {lineno}: 'prompt' must be a non-empty string")
    if not is_text(prompt):
        raise InputError(f"line {lineno}: 'prompt' is not valid Unicode text (it holds a lone surrogate)")
    try:
        context = validate_messages(obj.get("context"), "context")
    except ValueError as exc:
        raise InputError(f"line {lineno}: {exc}") from None
    return prompt, context


def read_turns(stream: TextIO | BinaryIO) -> list[tuple[str, list[dict[str, str]]]]:
    """All turns of a JSONL stream (text, or bytes that must be UTF-8); blank
    lines are malformed too (one score per line)."""
    turns = []
    for lineno, line in enumerate(stream, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"line {lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        turns.append(parse_turn(line, lineno))
    return turns


def _score(args: argparse.Namespace) -> int:
    from device_runtime.routing.bundle import BundleError
    from device_runtime.routing.routers.base import RouterError

    try:
        turns = read_turns(sys.stdin.buffer)
    except InputError as exc:
        print(f"edgeroute router score: {exc}", file=sys.stderr)
        return 2
    try:
        from device_runtime.routing.routers.bert import BertRouter

        router = BertRouter(args.bundle, threads=args.threads, batch_size=args.batch_size)
    except (RouterError, BundleError) as exc:
        print(f"edgeroute router score: {exc}", file=sys.stderr)
        return 1
    out = sys.stdout
    try:
        for start in range(0, len(turns), 256):
            for p in router.score_batch(turns[start : start + 256]):
                out.write(json.dumps({"score": p}) + "\n")
        out.flush()
    except BrokenPipeError:
        # The reader stopped (e.g. `| head`): nothing more to say, and no
        # second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 1
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("router", help="score turns with the BERT router (eq. 10)")
    sub = parser.add_subparsers(dest="router_command", metavar="ACTION")
    score = sub.add_parser(
        "score",
        help="JSONL {prompt, context} on stdin -> JSONL {score} on stdout, in order",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    score.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    score.add_argument(
        "--batch-size", type=int, default=1,
        help="turns per onnxruntime call (default 1: INT8 dynamic quantization scales "
        "activations per batch, so batch 1 makes a turn's score independent of its neighbours)",
    )
    score.set_defaults(func=_score)
    parser.set_defaults(func=lambda args: (parser.print_help(sys.stderr), 2)[1])
