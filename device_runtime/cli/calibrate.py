"""``edgeroute calibrate``: choose θ (eq. 12) for a target, eq. (9) on recorded data.

    edgeroute calibrate --benchmark {mmlu,gsm8k,mt-bench} --data-dir DIR --router NAME \\
        (--target-quality Q | --target-edge-share S) [--split val] [--bootstrap N] [--out FILE] [--json]
    edgeroute calibrate --telemetry FILE --target-edge-share S [--alpha A] [--out FILE] [--json]

With ``--json`` stdout carries exactly one JSON object; progress bars and logs
go to stderr.  ``--out FILE`` writes the calibration file that ``chat`` and
``demo`` take as ``--calibration FILE`` (θ and α).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field

from device_runtime.core.flags import add_flags, flag, from_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrateOutput:
    """Where ``calibrate`` puts its result."""

    out: str | None = field(default=None, metadata=flag(
        "write the calibration file here (for chat/demo --calibration)", metavar="FILE"))
    json: bool = field(default=False, metadata=flag("print only the JSON result on stdout"))
    no_progress: bool = field(default=False, metadata=flag("no progress bars on stderr"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    from device_runtime.sim.calibration import CalibrateSettings

    p = subparsers.add_parser(
        "calibrate",
        help="choose θ for a target quality or edge share (eq. 9) on a trace or on telemetry",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, CalibrateSettings)
    add_flags(p, CalibrateOutput)
    p.set_defaults(func=run)
    return p


def _fail(message: str) -> int:
    print(f"edgeroute calibrate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from device_runtime.sim.calibration import (
        CalibrateSettings, CalibrationError, calibrate_telemetry_file, calibrate_trace,
    )
    from device_runtime.sim.simulate import SimulationError
    from device_runtime.sim.traces import TraceError

    try:
        settings = from_args(CalibrateSettings, args)
        if settings.telemetry is not None:
            summary, calibration = calibrate_telemetry_file(settings)
        else:
            summary, calibration = calibrate_trace(settings, progress=not args.no_progress)
        if args.out:
            calibration.write(args.out)
            log.info("wrote %s", args.out)
    except (CalibrationError, TraceError, SimulationError) as exc:
        return _fail(str(exc))
    sys.stdout.write(json.dumps(summary) + "\n" if args.json else format_result(summary))
    return 0


def format_result(summary: dict) -> str:
    """A few plain lines: θ, α, the target and what θ gives on the data."""
    on = summary["calibrated_on"]
    where = (f"{on['benchmark']} split {on['split']} ({on['n']} turns)" if on["source"] == "trace"
             else f"telemetry {on['file']} ({on['n']} turns, {on['n_settled']} settled without the router)")
    target = ", ".join(f"{k} {v:g}" for k, v in summary["target"].items())
    lines = [f"calibrated on {where}; target {target}",
             f"threshold θ = {summary['threshold']:.6g}  (α = {summary['alpha']:g})"]
    intervals = summary.get("interval_95", {})
    for key in ("quality", "edge_share", "mean_latency_s"):
        if key in summary:
            ci = intervals.get(key)
            band = f"  [95% {ci['low']:.4g}, {ci['high']:.4g}]" if ci else ""
            lines.append(f"{key:<15}{summary[key]:.4g}{band}")
    return "\n".join(lines) + "\n"


def apply_calibration(args: argparse.Namespace) -> None:
    """``--calibration FILE`` of chat/demo: θ and α from the file into ``args``.

    The file wins over ``--threshold`` and ``--alpha`` (a calibration is a
    pair: a θ chosen under one α means nothing under another); the log says
    which values it replaced.  A bad file is a ValueError (exit 2, before any
    model loads).
    """
    from device_runtime.sim.calibration import Calibration, CalibrationError

    try:
        calibration = Calibration.read(args.calibration)
    except CalibrationError as exc:
        raise ValueError(str(exc)) from None
    router = getattr(calibration, "router", None)
    if router not in (None, "", "bert"):
        # chat and demo score turns with the bundle's BERT router: a θ chosen
        # for another router's scores does not mean the same edge share here.
        log.warning("%s was calibrated for the %r router; chat and demo route with bert",
                    args.calibration, router)
    replaced = f"θ = {args.threshold:g}, α = {'preset' if args.alpha is None else format(args.alpha, 'g')}"
    args.threshold, args.alpha = float(calibration.threshold), float(calibration.alpha)
    log.info("θ = %.6g, α = %g from %s (calibrated on %s; replaces %s)", args.threshold, args.alpha,
             args.calibration, calibration.calibrated_on.get("source", "?"), replaced)
