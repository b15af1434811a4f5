"""What ``edgeroute chat`` and ``edgeroute demo`` share: flags, building the runtime, playing turns.

Output rule: with ``--json`` stdout carries only telemetry lines (one per
turn); tables, streamed text and logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

from device_runtime.cli.calibrate import apply_calibration
from device_runtime.core.flags import add_flags, flag, from_args
from device_runtime.link.breaker import DEFAULT_COOL_DOWN_S, MAX_COOL_DOWN_S, parse_edge_targets
from device_runtime.link.credentials import ENV_TOKEN, ChannelSecurity, CredentialsError, EdgeSecuritySettings
from device_runtime.link.estimation import QueueWaitSettings
from device_runtime.link.profile import LiveCostSettings
from device_runtime.llm.slm import SLMSettings
from device_runtime.routing.policies import PolicySettings
from device_runtime.runtime.dialogues import ScriptItem
from device_runtime.runtime.orchestrator import OrchestratorSettings
from device_runtime.runtime.self_profile import SelfProfileSettings
from device_runtime.runtime.telemetry import TelemetryLog, TurnTelemetry

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.llm.slm import SLMBackend
    from device_runtime.routing.answer_length import LiveLengths
    from device_runtime.routing.cost_model import CostParams
    from device_runtime.routing.policies import Policy
    from device_runtime.runtime.orchestrator import Orchestrator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeCliSettings:
    """The runtime options of ``chat`` and ``demo`` that belong to no library
    settings class: the edge client's deadline and what the command prints."""

    edge_timeout: float = field(default=120.0, metadata=flag("edge call deadline (s)"))
    edge_cool_down: float = field(default=DEFAULT_COOL_DOWN_S, metadata=flag(
        "with several --edge addresses: seconds one that failed is skipped before it is tried again"
    ))
    online: bool = field(default=False, metadata=flag(
        "show the online estimates of γ, B and δ in the telemetry's `estimates` key (online "
        "estimation itself, an EWMA with outlier rejection updated from every turn, is on by "
        "default: see --no-online)"
    ))
    no_online: bool = field(default=False, metadata=flag(
        "keep the cost parameters fixed (the self-profile's, --profile's or the preset's) "
        "instead of updating them from every turn"
    ))
    json: bool = field(default=False, metadata=flag("stdout: one telemetry JSON line per turn, nothing else"))
    answer_lengths: str = field(default="default", metadata=flag(
        "answer-length model JSON: each turn's L_r of both sides from its prompt "
        "(scripts/fit_answer_lengths.py; 'default': the one shipped for the default model pair, "
        "corrected online for another; 'none': the profile's averages for every turn)",
        metavar="FILE",
    ))


def add_runtime_args(p: argparse.ArgumentParser, *, max_tokens: int = 128) -> None:
    """The ``device runtime`` option group, each option from its settings class
    (in the order ``--help`` has always listed them); ``max_tokens``: this
    command's default answer cap."""
    g = p.add_argument_group("device runtime")
    add_flags(g, PolicySettings, only=["policy"])
    add_flags(g, SLMSettings)
    add_flags(g, PolicySettings, only=["router", "bundle", "threshold"])
    g.add_argument("--calibration", metavar="FILE",
                   help="θ and α from `edgeroute calibrate --out FILE` (docs/simulation.md)")
    add_flags(g, LiveCostSettings)
    add_flags(g, OrchestratorSettings, defaults={"max_tokens": max_tokens})
    add_flags(g, RuntimeCliSettings)
    add_flags(g, SelfProfileSettings)
    add_flags(g, QueueWaitSettings)
    add_security_args(p)


def add_security_args(p: argparse.ArgumentParser) -> None:
    """The edge link's TLS and token flags (``chat``, ``demo --edge``, ``profile``)."""
    add_flags(p.add_argument_group("edge link security (docs/security.md)"), EdgeSecuritySettings)


EDGE_HELP = ("edge service address, or several stateless gateways of one fleet tried in order "
             "(HOST:PORT[,HOST2:PORT2...]; see --edge-cool-down)")


def edge_targets(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The ``--edge`` addresses, checked (empty items, bad ports, an address
    twice: a ValueError naming it), and ``--edge-cool-down``; None without
    ``--edge``."""
    cool_down = getattr(args, "edge_cool_down", DEFAULT_COOL_DOWN_S)
    if not 0 < cool_down <= MAX_COOL_DOWN_S:
        raise ValueError(f"--edge-cool-down must be in (0, {MAX_COOL_DOWN_S:g}] seconds, got {cool_down:g}")
    if args.edge is None:
        return None
    try:
        return parse_edge_targets(args.edge)
    except ValueError as exc:
        raise ValueError(f"--edge {args.edge!r}: {exc}") from None


def edge_security(args: argparse.Namespace, target: "str | Sequence[str] | None") -> ChannelSecurity | None:
    """The checked credentials for ``target`` from the flags and, without
    ``--token-file``, the ``EDGEROUTE_TOKEN`` environment variable (read here,
    in the command, never in the library); None without a target.

    Every file is read and parsed now, and a token that would cross the
    network in clear is refused now: a :class:`CredentialsError` (one line,
    exit 2) before any model loads."""
    settings = from_args(EdgeSecuritySettings, args)
    if target is None:
        if settings.given:
            raise CredentialsError("--tls, --tls-ca, --tls-cert, --tls-key and --token-file need --edge HOST:PORT")
        return None
    security = settings.channel_security(os.environ.get(ENV_TOKEN))
    for address in parse_edge_targets(target):  # the same settings for every gateway
        security.metadata(address)
    return security


@dataclass
class DeviceSide:
    """What the device runs, built from the flags before any edge is known."""

    slm: "SLMBackend"
    policy: "Policy"
    params: "CostParams"
    settings: OrchestratorSettings
    #: Per-turn answer lengths (``--answer-lengths``; None: the params' averages).
    answer_lengths: "LiveLengths | None" = None


def build_device(args: argparse.Namespace) -> DeviceSide:
    """The SLM, policy, cost parameters and generation settings from the flags
    (a bad flag or a missing model fails here, before any edge is started)."""
    from device_runtime.llm.slm import SLM_BACKENDS
    from device_runtime.routing.policies import create_policy, validate_threshold

    if args.n_ctx <= args.max_tokens:
        raise ValueError(f"--n-ctx ({args.n_ctx}) must be larger than --max-tokens ({args.max_tokens})")
    if args.context_window is not None and args.context_window > args.n_ctx:
        raise ValueError(
            f"--context-window ({args.context_window}) cannot exceed the SLM's --n-ctx ({args.n_ctx})"
        )
    if args.online and args.no_online:
        raise ValueError("--online and --no-online contradict each other")
    settings = from_args(OrchestratorSettings, args)
    if getattr(args, "calibration", None):  # θ and α from `edgeroute calibrate` (before they are read)
        apply_calibration(args)
    params = from_args(LiveCostSettings, args).cost_params()
    policy_settings = from_args(PolicySettings, args, threshold=validate_threshold(args.threshold))
    if args.bundle and not (args.policy == "auto" and args.router == "bert"):
        raise ValueError("--bundle applies to --policy auto with --router bert")
    policy = create_policy(policy_settings)
    lengths = load_answer_lengths(args)  # a bad file fails before the SLM loads
    slm = SLM_BACKENDS.create("llama-cpp", from_args(SLMSettings, args))
    return DeviceSide(slm, policy, params, settings, lengths)


def connect_edge(
    target: "str | Sequence[str]", args: argparse.Namespace, security: ChannelSecurity | None = None,
) -> "EdgeClient":
    """An edge client for ``target`` secured by ``security`` (see
    :func:`edge_security`); it starts connecting in the background, so the
    first edge turn finds the channel ready.  ``--edge-queue``: how it keeps
    W_q, the edge's expected slot wait that each decision adds to Tᵉ.
    Several addresses: tried in order, one that failed skipped for
    ``--edge-cool-down`` seconds (:class:`~device_runtime.link.breaker.CircuitBreaker`)."""
    from device_runtime.link.edge_client import EdgeClient

    return EdgeClient(
        target, security=security, timeout_s=args.edge_timeout, queue=from_args(QueueWaitSettings, args),
        cool_down_s=getattr(args, "edge_cool_down", DEFAULT_COOL_DOWN_S),
    )


def fit_edge_window(edge: "EdgeClient", settings: OrchestratorSettings, slm_window: int) -> OrchestratorSettings:
    """``settings`` with the edge's context window when it is the smaller one.

    Without ``--context-window``, an edge whose context window is smaller than
    the SLM's sets it: otherwise a long conversation outgrows the edge, and
    every edge turn from then on is refused and falls back to the device.
    """
    from dataclasses import replace

    from device_runtime.link.edge_client import EdgeError, EdgeUnavailable

    if settings.context_window is not None:
        return settings
    try:
        edge_window = edge.server_info().n_ctx
    except (EdgeUnavailable, EdgeError) as exc:
        log.info("edge at %s not reachable yet (%s): context window from the SLM alone", edge.target, exc)
        return settings
    if 0 < edge_window < slm_window and edge_window > settings.max_tokens:
        log.info(
            "context window %d tokens, the edge's (the SLM's is %d): older turns are dropped to fit it",
            edge_window, slm_window,
        )
        return replace(settings, context_window=edge_window)
    return settings


def profiles_itself(args: argparse.Namespace) -> bool:
    """Whether :func:`assemble` measures this machine: by default, unless a
    saved ``--profile`` is given (it wins) or ``--no-self-profile``."""
    return bool(getattr(args, "self_profile", False)) and not args.profile


def load_answer_lengths(args: argparse.Namespace) -> "LiveLengths | None":
    """The ``--answer-lengths`` model, wrapped for online correction (None: ``none``)."""
    from device_runtime.routing.answer_length import AnswerLengthModel, LiveLengths

    choice = getattr(args, "answer_lengths", "none")
    if choice == "none":
        return None
    path = Path(__file__).resolve().parents[1] / "data" / "answer_lengths.json" if choice == "default" else choice
    return LiveLengths(AnswerLengthModel.load(path))


def measure_machine(device: DeviceSide, edge: "EdgeClient | None", args: argparse.Namespace) -> None:
    """The self-profile (:mod:`device_runtime.runtime.self_profile`): ``device.params``
    with this machine's γ, τ_r, δ, B and answer lengths, before the first turn."""
    import time

    from device_runtime.runtime.self_profile import self_profiled_params

    t0 = time.perf_counter()
    router = getattr(device.policy, "router", None)
    device.params, result = self_profiled_params(
        device.params, device.slm, edge, router, max_tokens=device.settings.max_tokens,
        settings=from_args(SelfProfileSettings, args),
    )
    log.info("%s; %.1f s in all", result.describe(), time.perf_counter() - t0)


def assemble(device: DeviceSide, edge: "EdgeClient | None", args: argparse.Namespace) -> "Orchestrator":
    """The orchestrator of ``device`` and ``edge`` (its window fitted to the
    edge's), after the self-profile (:func:`profiles_itself`), with online
    estimation as a turn hook unless ``--no-online``."""
    from device_runtime.runtime.orchestrator import Orchestrator

    settings = device.settings
    if edge is not None:
        settings = fit_edge_window(edge, settings, device.slm.context_window)
    if profiles_itself(args):
        measure_machine(device, edge, args)
    hooks = []
    if not args.no_online:
        from device_runtime.runtime.online import OnlineRouting, OnlineSettings

        hooks.append(OnlineRouting(device.params, OnlineSettings(report_estimates=args.online)))
    return Orchestrator(device.slm, device.policy, device.params, edge=edge, settings=settings, hooks=hooks,
                        answer_lengths=device.answer_lengths)


def build_orchestrator(
    args: argparse.Namespace, edge_target: "str | Sequence[str] | None", security: ChannelSecurity | None = None,
) -> "Orchestrator":
    """The whole runtime from the flags: the device side, then the edge client."""
    device = build_device(args)
    edge = connect_edge(edge_target, args, security) if edge_target else None
    return assemble(device, edge, args)


# --- playing turns ---------------------------------------------------------------

TABLE_HEADER = (
    f"{'dlg':>3} {'turn':>4} {'target':<8} {'p':>5} {'p~':>6} {'pred_dev':>8} {'pred_edge':>9} "
    f"{'meas_s':>7} {'ttft_s':>7} {'L_p':>5} {'C_t':>5} {'prefill':>7} {'cached':>6} {'out':>4}"
)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table_row(dialogue: int, rec: TurnTelemetry) -> str:
    target = rec.target + ("*" if rec.fallback else "")
    return (
        f"{dialogue:>3} {rec.turn:>4} {target:<8} {_fmt(rec.p, '.3f'):>5} {_fmt(rec.p_fused, '.3f'):>6} "
        f"{rec.predicted_s['device']:>8.3f} {rec.predicted_s['edge']:>9.3f} {rec.measured_s:>7.3f} "
        f"{rec.ttft_s:>7.3f} {rec.prompt_tokens:>5} {rec.context_tokens:>5} {rec.prefill_tokens:>7} "
        f"{rec.cached_tokens:>6} {rec.output_tokens:>4}"
    )


def format_summary(summary: dict, telemetry: TelemetryLog | None = None) -> str:
    """The run's summary; with its ``telemetry``, also each side's median relative
    prediction error (:func:`~device_runtime.runtime.self_profile.prediction_errors`)."""
    from device_runtime.runtime.self_profile import format_errors, prediction_errors

    if not summary.get("turns"):
        return "no turns played"
    s = summary
    errors = [format_errors(prediction_errors(telemetry))] if telemetry is not None else []
    return "\n".join([
        f"turns: {s['turns']}  (edge {s['edge_turns']}, device {s['device_turns']}, "
        f"edge_share {s['edge_share']:.2f}, fallbacks {s['fallbacks']})",
        f"measured latency: mean {s['mean_measured_s']:.3f} s, p50 {s['p50_measured_s']:.3f} s, "
        f"total {s['total_s']:.2f} s; mean TTFT {s['mean_ttft_s']:.3f} s; "
        f"mean predicted (chosen side) {s['mean_predicted_s']:.3f} s",
        f"tokens: prefilled {s['prefill_tokens']}, reused from KV {s['cached_tokens']}, "
        f"generated {s['output_tokens']}",
        *errors,
    ])


@dataclass
class Output:
    """Where each kind of output goes, following the --json rule."""

    json_mode: bool
    show_text: bool
    table: bool
    stdout: TextIO = sys.stdout
    stderr: TextIO = sys.stderr

    @property
    def text_stream(self) -> TextIO:
        return self.stderr if self.json_mode else self.stdout

    @property
    def table_stream(self) -> TextIO:
        return self.stderr if self.json_mode else self.stdout

    def telemetry(self, rec: TurnTelemetry) -> None:
        if self.json_mode:
            print(rec.to_json(), file=self.stdout, flush=True)


def play(orch: "Orchestrator", items: Sequence[ScriptItem], out: Output,
         progress: Callable[[int], None] | None = None) -> int:
    """Play script items through ``orch``; returns the number of turns played."""
    played = 0
    dialogue = 0
    if out.table:
        print(TABLE_HEADER, file=out.table_stream, flush=True)
    for item in items:
        if item.new_conversation or dialogue == 0:
            # A dialogue starts a new conversation, also after a resumed one.
            if item.new_conversation and (played or orch.turn_index):
                orch.new_conversation()
            dialogue += 1
            if out.show_text:
                print(f"--- dialogue {dialogue}: {item.source}", file=out.text_stream, flush=True)
        for prompt in item.prompts:
            if out.show_text:
                print(f"> {prompt}", file=out.text_stream, flush=True)

            def on_text(chunk: str) -> None:
                if out.show_text:
                    out.text_stream.write(chunk)
                    out.text_stream.flush()

            def on_event(kind: str, detail: str) -> None:
                if kind == "edge_lost":
                    print(f"\n[edge lost mid-answer ({detail}); the answer restarts]",
                          file=out.stderr, flush=True)
                elif kind == "truncated":
                    print(f"[context window: {detail}]", file=out.stderr, flush=True)

            result = orch.turn(prompt, on_text=on_text, on_event=on_event)
            if out.show_text:
                print(file=out.text_stream, flush=True)
            out.telemetry(result.telemetry)
            if out.table:
                print(table_row(dialogue, result.telemetry), file=out.table_stream, flush=True)
            played += 1
            if progress is not None:
                progress(1)
    return played
