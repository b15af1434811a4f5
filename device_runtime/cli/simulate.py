"""``edgeroute simulate``: trace-driven evaluation on RouteLLM-format data.

    edgeroute simulate --benchmark {mmlu,gsm8k,mt-bench} --data-dir DIR \\
        --routers random,oracle[,bert] [--preset paper] [--alpha A] [--out DIR] [--json]

With ``--json`` stdout carries exactly one JSON object; progress bars and logs
go to stderr.  ``--out DIR`` writes ``summary.json`` and the PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BENCHMARK_CHOICES = ("mmlu", "gsm8k", "mt-bench")


def _router_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of router names")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"router listed twice in {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0.0 and math.isfinite(value)) or value > 1e6:
        raise argparse.ArgumentTypeError(f"expected a finite number in [0, 1e6], got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="sweep routing thresholds over recorded traces (APGR, CPT, plots)",
        description=(
            "Trace-driven evaluation (paper Sec. IV): each turn is charged the latency of "
            "eqs. (1)-(8) for the model the policy picked, and earns that model's recorded quality."
        ),
    )
    p.add_argument("--benchmark", required=True, choices=BENCHMARK_CHOICES)
    p.add_argument(
        "--data-dir",
        required=True,
        help="directory laid out like RouteLLM's routellm/evals/ (mmlu/, gsm8k/, mt_bench/)",
    )
    p.add_argument(
        "--routers",
        type=_router_list,
        default=["random", "oracle"],
        help="comma-separated router names (random, oracle, bert); default: random,oracle",
    )
    p.add_argument("--preset", default="paper", choices=["paper"], help="cost parameters (Table I-III)")
    p.add_argument(
        "--profile",
        default=None,
        metavar="JSON",
        help="PROFILE.json from `edgeroute profile`: its measured γ_s, γ_e, τ_r, B, δ and per-call "
        "times replace the preset's, converted from device-SLM tokens to the traces' words with "
        "the profile's bytes_per_token (α and the response lengths stay the preset's)",
    )
    p.add_argument("--alpha", type=_nonneg_float, default=None, help="latency weight α of eq. (11)")
    p.add_argument(
        "--tau-r",
        type=_nonneg_float,
        default=None,
        help="router per-token time τ_r in s (eq. 4) for routers that do not set their own; "
        "random and oracle cost 0",
    )
    p.add_argument(
        "--upload-mode",
        default="paper",
        choices=["paper", "session"],
        help="paper: upload C_t + L_p (eq. 3); session: only what the edge has not seen",
    )
    p.add_argument("--bundle", default=None, help="router bundle directory for --routers bert")
    p.add_argument(
        "--response-lengths",
        default="average",
        choices=["average", "train-mean", "predicted", "true"],
        help="L̄_r the decision (eq. 11) uses: average = the preset's (paper); train-mean = this "
        "trace's train-split mean; predicted = per-query regression (device_runtime.response_length); "
        "true = the recorded lengths (oracle). Non-average needs GSM8K's recorded responses",
    )
    p.add_argument(
        "--charge-lengths",
        default=None,
        choices=["average", "true", "scaled"],
        help="L_r each turn is charged: the preset's average, the recorded length, or the recorded "
        "length rescaled to the preset's mean (non-average decisions are rescaled alike); "
        "default: average with --response-lengths average, true otherwise",
    )
    p.add_argument(
        "--length-model",
        default=None,
        metavar="JSON",
        help="fitted length model for --response-lengths predicted; default: fit on the train split",
    )
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val"],
        help="keep dialogues whose first prompt falls in this hash split (traces.split_of)",
    )
    p.add_argument("--val-fraction", type=_fraction, default=0.2, help="fraction in the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the random router")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N dialogues only")
    p.add_argument("--points", type=_positive_int, default=41, help="number of thresholds θ (>= 3)")
    p.add_argument("--no-decontaminate", action="store_true", help="keep contaminated prompts")
    p.add_argument("--out", default=None, help="write summary.json and PNG plots here")
    p.add_argument("--json", action="store_true", help="print only the JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
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


def run(args: argparse.Namespace) -> int:
    from device_runtime import cost_model
    from device_runtime.metrics import MetricError
    from device_runtime.simulate import SimConfig, SimulationError, build_router, simulate
    from device_runtime.traces import TraceError, load_trace, split_of

    if args.points < 3:
        return _fail(f"--points must be at least 3, got {args.points}")
    if args.out:
        # Before the sweep: a bad --out or a missing plot extra fails fast.
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            return _fail("--out draws plots and needs matplotlib: pip install 'edgeroute[plot]'")
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create --out {args.out}: {exc.strerror or exc}")
    try:
        dialogues = load_trace(args.benchmark, args.data_dir, decontaminate=not args.no_decontaminate)
    except TraceError as exc:
        return _fail(str(exc))
    full_trace = dialogues
    if args.split != "all":
        dialogues = [
            d for d in dialogues if split_of(d.turns[0].prompt, args.val_fraction) == args.split
        ]
    if args.limit is not None:
        dialogues = dialogues[: args.limit]
    if not dialogues:
        return _fail("no dialogues left to simulate (check --data-dir, --split and --limit)")
    log.info("%s: %d dialogues, %d turns", args.benchmark, len(dialogues), sum(len(d.turns) for d in dialogues))

    params = cost_model.preset(args.preset, args.benchmark, args.upload_mode)
    tokens_per_word = None
    if args.profile is not None:
        from device_runtime.profile import ProfileError, apply_profile, in_words, load_profile

        try:
            profile = load_profile(args.profile, require_all=False)
            if "bytes_per_token" not in profile:
                raise ProfileError(
                    f"{args.profile}: no bytes_per_token, which converts its per-token times "
                    "to the traces' words"
                )
            # The profile counts device-SLM tokens; the traces (and the paper) count words.
            tokens_per_word = _bytes_per_word(full_trace) / float(profile["bytes_per_token"])
            params = in_words(apply_profile(profile, params), tokens_per_word)
        except ProfileError as exc:
            return _fail(str(exc))
        log.info("profile: %.3f device-SLM tokens per word of these traces", tokens_per_word)
    if args.alpha is not None:
        params = params.with_(alpha=args.alpha)
    if args.tau_r is not None:
        params = params.with_(tau_r=args.tau_r)

    charge_lengths = args.charge_lengths or ("average" if args.response_lengths == "average" else "true")
    length_kw = {}
    if (args.response_lengths, charge_lengths) != ("average", "average"):
        from device_runtime.response_length import LengthModel, LengthModelError, length_plan

        try:
            model = LengthModel.load(args.length_model) if args.length_model else None
            # The whole trace, before --split: a fitted model sees only train rows.
            length_kw["lengths"] = length_plan(
                args.response_lengths,
                charge_lengths,
                full_trace,
                benchmark=args.benchmark,
                model=model,
                val_fraction=args.val_fraction,
                average=params.response,
            )
        except LengthModelError as exc:
            return _fail(str(exc))

    try:
        # Build every router before the long sweep, so a missing bundle fails fast.
        factories = {}
        for name in args.routers:
            router = build_router(name, dialogues, seed=args.seed, bundle=args.bundle)
            if name == "random":
                # Stateful: a fresh one per policy, so both policies get the same draws.
                factories[name] = lambda: build_router("random", dialogues, seed=args.seed)
            else:
                factories[name] = lambda router=router: router
        result = simulate(
            SimConfig(benchmark=args.benchmark, params=params, points=args.points, **length_kw),
            dialogues,
            factories,
            progress=not args.no_progress,
        )
    except (SimulationError, MetricError) as exc:
        return _fail(str(exc))

    summary = result.to_dict()
    summary["preset"] = args.preset
    summary["split"] = args.split
    summary["seed"] = args.seed
    summary["data_dir"] = str(args.data_dir)
    if tokens_per_word is not None:
        summary["profile"] = {"path": str(args.profile), "tokens_per_word": tokens_per_word}
    if length_kw:  # absent by default, so the paper-mode summary is unchanged
        summary["response_lengths"] = {"decision": args.response_lengths, "charge": charge_lengths}

    if args.out:
        from device_runtime.plots import plot_summary

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for path in plot_summary(summary, out):
            log.info("wrote %s", path)
        log.info("wrote %s", out / "summary.json")

    if args.json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        sys.stdout.write(format_table(summary))
    return 0


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
    return "\n".join(lines) + "\n"
