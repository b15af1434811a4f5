"""``edgeroute profile``: measure γ_s, γ_e, τ_r, B and δ and write PROFILE.json.

    edgeroute profile --edge HOST:PORT --out PROFILE.json [--json]
    edgeroute profile --edge HOST:PORT --tls-ca ca.crt --token-file edge.token --out PROFILE.json

What is measured, and how, is :mod:`device_runtime.link.profiler`; this module
parses the flags (made by :class:`~device_runtime.link.profiler.ProfileSettings`),
reads the real text to measure on (MT-Bench-101 under ``--data-dir``, else the
demo dialogues: :mod:`device_runtime.runtime.dialogues`) and writes and prints
the profile.  Parts can be skipped (``--parts``); a skipped part's keys keep the
paper's Table I values and ``sources`` says so.  With ``--json`` stdout carries
only the profile; progress and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from device_runtime.core.flags import add_flags, from_args

log = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from device_runtime.link.profiler import PARTS, ProfileSettings

    p = subparsers.add_parser(
        "profile",
        help="measure γ_s, γ_e, τ_r, B and δ; write PROFILE.json",
        description=__doc__.split("\n\n")[0],
    )
    add_flags(p, ProfileSettings, only=["edge"])
    p.add_argument("--out", metavar="PROFILE.json", help="where to write the profile")
    p.add_argument("--json", action="store_true", help="print the profile on stdout, nothing else")
    # --parts keeps its comma-separated text as the default; argparse parses it like a given value.
    add_flags(p, ProfileSettings, exclude=["edge"], defaults={"parts": ",".join(PARTS)})
    from device_runtime.cli.runner import add_security_args

    add_security_args(p)
    p.set_defaults(func=run)
    return p


def _check_out(out: str) -> str | None:
    """Why ``--out`` cannot be written (checked before minutes of measuring); None if it can."""
    path = Path(out)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot write --out {out}: {exc.strerror or exc}"
    return None


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.json:
        print("edgeroute profile: give --out PROFILE.json and/or --json", file=sys.stderr)
        return 2
    problem = _check_out(args.out) if args.out else None
    if problem is not None:
        print(f"edgeroute profile: {problem}", file=sys.stderr)
        return 2
    from device_runtime.cli.runner import edge_security
    from device_runtime.link.profiler import ProfileSettings, run_profile

    try:
        settings = from_args(ProfileSettings, args)
        security = edge_security(args, settings.edge)
    except ValueError as exc:
        print(f"edgeroute profile: {exc}", file=sys.stderr)
        return 2
    from device_runtime.link.edge_client import EdgeError, EdgeUnavailable
    from device_runtime.llm.models import ModelNotFoundError
    from device_runtime.runtime.dialogues import sample_prompts, sample_texts

    texts = sample_texts(settings.data_dir)
    prompts = sample_prompts(settings.data_dir, settings.answer_prompts)
    try:
        profile = run_profile(settings, texts, prompts, security=security)
    except EdgeUnavailable as exc:
        print(f"edgeroute profile: the edge at {settings.edge} is unreachable: {exc}", file=sys.stderr)
        return 1
    except (EdgeError, ModelNotFoundError, RuntimeError) as exc:
        print(f"edgeroute profile: {exc}", file=sys.stderr)
        return 1
    return _emit(args, profile)


def _emit(args: argparse.Namespace, profile: dict) -> int:
    """Write ``--out``, print the summary on stderr and, with ``--json``, the profile on stdout."""
    from device_runtime.link.profile import write_profile

    rc = 0
    if args.out:
        try:
            path = write_profile(args.out, profile)
            log.info("wrote %s", path)
        except OSError as exc:  # e.g. the disk filled up meanwhile: keep the --json output
            print(f"edgeroute profile: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            rc = 1
    summary = {k: profile[k] for k in ("gamma_s_prefill", "gamma_s_decode", "gamma_e_prefill",
                                       "gamma_e_decode", "tau_r", "bandwidth_tokens_per_s",
                                       "overhead_s", "bytes_per_token")}
    for k, v in summary.items():
        print(f"{k:>24} = {v:.6g}   ({profile['sources'][k]})", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(profile) + "\n")
    return rc
