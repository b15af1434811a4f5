"""``edgeroute simulate``: trace-driven evaluation on RouteLLM-format data.

    edgeroute simulate --benchmark {mmlu,gsm8k,mt-bench} --data-dir DIR \\
        --routers random,oracle[,bert] [--preset paper] [--alpha A] [--threshold T] [--out DIR] [--json]

With ``--json`` stdout carries exactly one JSON object; progress bars and logs
go to stderr.  ``--out DIR`` writes ``summary.json`` and the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.core.flags import add_flags, flag, from_args

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulateOutput:
    """Where ``simulate`` puts its results; not part of the experiment
    (:class:`~device_runtime.sim.experiment.SimulateSettings`)."""

    out: str | None = field(default=None, metadata=flag("write summary.json and PNG plots here"))
    json: bool = field(default=False, metadata=flag("print only the JSON summary on stdout"))
    no_progress: bool = field(default=False, metadata=flag("no progress bars on stderr"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    from device_runtime.sim.experiment import SimulateSettings

    p = subparsers.add_parser(
        "simulate",
        help="sweep routing thresholds over recorded traces (APGR, CPT, plots)",
        description=(
            "Trace-driven evaluation (paper Sec. IV): each turn is charged the latency of "
            "eqs. (1)-(8) for the model the policy picked, and earns that model's recorded quality."
        ),
    )
    add_flags(p, SimulateSettings)
    add_flags(p, SimulateOutput)
    p.set_defaults(func=run)
    return p


def _bytes_per_word(dialogues) -> float:
    """UTF-8 bytes per whitespace-separated word of the traces' prompts."""
    n_bytes = n_words = 0
    for d in dialogues:
        for t in d.turns:
            n_bytes += len(t.prompt.encode("utf-8"))
            n_words += len(t.prompt.split())
    return n_bytes / max(n_words, 1)


def _fail(message: str) -> int:
    print(f"edgeroute simulate: error: {message}", file=sys.stderr)
    return 2


def _precheck(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags or ``--out``, before any work; None if nothing."""
    if args.points < 3:
        return f"--points must be at least 3, got {args.points}"
    if args.out:
        # Before the sweep: a bad --out or a missing plot extra fails fast.
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            return "--out draws plots and needs matplotlib: pip install 'edgeroute[plot]'"
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create --out {args.out}: {exc.strerror or exc}"
    return None


def run(args: argparse.Namespace) -> int:
    from device_runtime.routing import cost_model
    from device_runtime.sim.experiment import SimulateSettings, run_simulation, select_dialogues
    from device_runtime.sim.metrics import MetricError
    from device_runtime.sim.response_length import LengthModelError
    from device_runtime.sim.simulate import SimulationError
    from device_runtime.sim.traces import TraceError

    problem = _precheck(args)
    if problem is not None:
        return _fail(problem)
    settings = from_args(SimulateSettings, args)
    try:
        full_trace, dialogues = select_dialogues(settings)
    except (TraceError, SimulationError) as exc:
        return _fail(str(exc))
    log.info("%s: %d dialogues, %d turns", args.benchmark, len(dialogues), sum(len(d.turns) for d in dialogues))

    params = cost_model.preset(args.preset, args.benchmark, args.upload_mode)
    tokens_per_word = None
    if args.profile is not None:
        from device_runtime.link.profile import Profile, ProfileError, in_words

        try:
            profile = Profile.read(args.profile)
            # The profile counts device-SLM tokens; the traces (and the paper) count words.
            tokens_per_word = profile.tokens_per_word(_bytes_per_word(full_trace))
            params = in_words(profile.cost_params(params), tokens_per_word)
        except ProfileError as exc:
            return _fail(str(exc))
        log.info("profile: %.3f device-SLM tokens per word of these traces", tokens_per_word)
    try:
        summary = run_simulation(
            settings, full_trace, dialogues, params,
            tokens_per_word=tokens_per_word, progress=not args.no_progress,
        )
    except (LengthModelError, SimulationError, MetricError) as exc:
        return _fail(str(exc))
    if args.out:
        write_out(summary, Path(args.out))
    sys.stdout.write(json.dumps(summary) + "\n" if args.json else format_table(summary))
    return 0


def write_out(summary: dict, out: Path) -> None:
    """``summary.json`` and the PNG plots in ``out``."""
    from device_runtime.sim.plots import plot_summary

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for path in plot_summary(summary, out):
        log.info("wrote %s", path)
    log.info("wrote %s", out / "summary.json")


def format_table(summary: dict) -> str:
    """A plain-text table of the summary: baselines, then APGR/CPT per router."""
    unit = "score" if summary["benchmark"] == "mt-bench" else "acc"
    lines = [
        f"benchmark {summary['benchmark']}  n={summary['n']}  α={summary['params']['alpha']}  "
        f"upload={summary['params']['upload_mode']}",
        f"{'policy':<22}{unit:>8}{'latency_s':>12}",
        f"{'all-device':<22}{summary['all_device']['quality']:>8.3f}{summary['all_device']['mean_latency_s']:>12.2f}",
        f"{'all-edge':<22}{summary['all_edge']['quality']:>8.3f}{summary['all_edge']['mean_latency_s']:>12.2f}",
        "",
        f"{'router':<22}{'APGR':>8}{'CPT(50%)':>10}{'CPT(80%)':>10}",
    ]
    for name, r in summary["routers"].items():
        lines.append(f"{name:<22}{r['apgr']:>8.3f}{r['cpt50']:>10.3f}{r['cpt80']:>10.3f}")
    at = {name: r["at_threshold"] for name, r in summary["routers"].items() if "at_threshold" in r}
    if at:
        theta = next(iter(at.values()))["threshold"]
        lines += ["", f"{'at θ = ' + format(theta, '.4g'):<22}{unit:>8}{'edge_share':>12}{'latency_s':>12}"]
        for name, p in at.items():
            lines.append(f"{name:<22}{p['quality']:>8.3f}{p['edge_share']:>12.3f}{p['mean_latency_s']:>12.2f}")
    return "\n".join(lines) + "\n"
