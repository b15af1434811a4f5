"""Validation benchmark: MT-Bench-101 dialogues through the live system over an emulated link.

    sudo .venv/bin/python scripts/bench_link.py --data-dir ../shared/data [--bundle DIR]

For each link setting (a good 5G-like link and a poor one, :mod:`netlab.namespaces`):

1. profile the link (and, once, γ_s, γ_e, τ_r) with ``edgeroute profile`` from the
   device namespace, as a deployed device would;
2. replay the same dialogues under each policy (device, edge, random, BERT
   without context, BERT with context), the device runtime in the device
   namespace, the edge service in the edge namespace;
3. report per policy: mean and p95 turn latency, edge share, and the cost
   model's prediction error median |predicted − measured| / measured for the
   turns each target served, both for the live prediction (``predicted_s``,
   with the average answer length L̄_r) and the post-hoc one
   (``predicted_posthoc_s``, the same equations with the answer's actual length).

With ``--phases good-5g:6,poor:6,good-5g:6`` it instead runs one policy
(``--phase-policy``, default ``bert-ctx``) through link phases that change
between turns, as when a device walks out of coverage and back.  Each phase
replays the same turns (new conversations), so only the link differs: which
target each turn took, and per phase how many of the turns the first phase
sent to the edge went to the edge again (``bench_link_phases.json``).

Prints a markdown table on stdout, writes ``bench_link.json`` and plots into
``--out``.  Needs root (network namespaces).  Sized for a 2-core machine: a
few dialogues, a few turns each, short answers; the sizes are printed with
the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from netlab.namespaces import GOOD_5G, POOR, LinkSettings, NetLab, unavailable_reason  # noqa: E402

log = logging.getLogger("bench_link")

POLICIES = ("device", "edge", "random", "bert-noctx", "bert-ctx")
LINKS = {
    "good-5g": GOOD_5G,
    "poor": POOR,
    # No added delay: what δ is left is the software path (gRPC, relay).
    "no-delay": LinkSettings(rate_mbit=100.0, delay_ms=0.0, name="no-delay"),
    # The profiler test's link (tests/test_profile.py): no jitter.
    "test-50ms": LinkSettings(rate_mbit=20.0, delay_ms=25.0, name="test-50ms"),
}


def pick_dialogues(path: Path, n: int, max_turns: int) -> list[dict]:
    """``n`` dialogues spread evenly over the file (so several tasks appear), cut to ``max_turns``."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path}: no dialogues")
    step = max(1, len(lines) // n)
    out = []
    for line in lines[::step][:n]:
        d = json.loads(line)
        prompts = [t["user"] for t in d["history"] if t.get("user", "").strip()][:max_turns]
        out.append({"task": d.get("task"), "id": d.get("id"), "prompts": prompts})
    return out


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]


def summarize(records: list[dict]) -> dict:
    measured = [r["measured_s"] for r in records]
    out = {
        "turns": len(records),
        "mean_s": statistics.fmean(measured),
        "p95_s": p95(measured),
        "edge_share": sum(r["target"] == "edge" for r in records) / len(records),
        "fallbacks": sum(r["fallback"] for r in records),
    }
    for target in ("device", "edge"):
        served = [r for r in records if r["target"] == target and not r["fallback"] and r["measured_s"] > 0]
        errs = [abs(r["predicted_s"][target] - r["measured_s"]) / r["measured_s"] for r in served]
        out[f"pred_err_{target}"] = statistics.median(errs) if errs else None
        out[f"n_{target}"] = len(errs)
        # The same turns, predicted with the answer's actual length (records
        # from before the key existed have none).
        posthoc = [
            abs(r["predicted_posthoc_s"] - r["measured_s"]) / r["measured_s"]
            for r in served
            if r.get("predicted_posthoc_s") is not None
        ]
        out[f"pred_err_posthoc_{target}"] = statistics.median(posthoc) if posthoc else None
        out[f"n_posthoc_{target}"] = len(posthoc)
    return out


def run_profile(lab: NetLab, target: str, out: Path, parts: str, args) -> dict:
    cmd = lab.exec_prefix(lab.dev_ns) + [
        sys.executable, "-m", "device_runtime.cli.main", "profile", "--edge", target, "--out", str(out),
        "--parts", parts, "--data-dir", str(args.data_dir), "--link-reps", "3",
        "--prompt-tokens", "32,128,256", "--max-tokens", str(args.max_tokens), "--reps", "1",
        "--threads", str(args.threads),
    ]
    if args.bundle:
        cmd += ["--bundle", args.bundle]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    links = list(results["links"])
    policies = list(results["policies"])
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 3.6), squeeze=False)
    for ax, link in zip(axes[0], links):
        rows = results["links"][link]["summary"]
        xs = range(len(policies))
        ax.bar([x - 0.2 for x in xs], [rows[p]["mean_s"] for p in policies], 0.4, label="mean")
        ax.bar([x + 0.2 for x in xs], [rows[p]["p95_s"] for p in policies], 0.4, label="p95")
        for x, p in zip(xs, policies):
            ax.annotate(f"{rows[p]['edge_share']:.0%}", (x, rows[p]["p95_s"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), policies, rotation=20)
        ax.set_title(f"{link} (labels: edge share)")
        ax.set_ylabel("turn latency (s)")
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "link_latency.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4), squeeze=False)
    for ax, link in zip(axes[0], links):
        recs = [r for p in policies for r in results["links"][link]["records"][p] if not r["fallback"]]
        for target, marker, color in (("device", "o", "C0"), ("edge", "^", "C1")):
            served = [r for r in recs if r["target"] == target]
            pts = [(r["predicted_s"][target], r["measured_s"]) for r in served]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=14, color=color, label=target, alpha=0.7)
            # Hollow: the same turns predicted with the answer's actual length.
            post = [(r["predicted_posthoc_s"], r["measured_s"]) for r in served
                    if r.get("predicted_posthoc_s") is not None]
            if post:
                ax.scatter(*zip(*post), marker=marker, s=18, facecolors="none", edgecolors=color,
                           linewidths=0.8, label=f"{target} (post-hoc)", alpha=0.8)
        hi = max([r["measured_s"] for r in recs] + [r["predicted_s"][r["target"]] for r in recs]
                 + [r.get("predicted_posthoc_s") or 0.0 for r in recs] + [0.1])
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel("predicted (s, eqs. 6-7; hollow: actual answer length)")
        ax.set_ylabel("measured (s)")
        ax.set_title(link)
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "link_prediction.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def table(results: dict) -> str:
    """The markdown table: latency, edge share, and per target the live and post-hoc prediction errors."""
    lines = [
        "| link | policy | turns | mean s | p95 s | edge share | fallbacks | pred. err device (n) | "
        "pred. err device (post-hoc) (n) | pred. err edge (n) | pred. err edge (post-hoc) (n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def err(s: dict, key: str, n_key: str) -> str:
        v = s.get(key)
        return f"{'-' if v is None else f'{v:.0%}'} ({s.get(n_key, 0)})"

    for link, data in results["links"].items():
        for policy, s in data["summary"].items():
            lines.append(
                f"| {link} | {policy} | {s['turns']} | {s['mean_s']:.2f} | {s['p95_s']:.2f} | "
                f"{s['edge_share']:.0%} | {s['fallbacks']} | "
                + " | ".join(
                    err(s, f"pred_err{kind}_{target}", f"n{kind}_{target}")
                    for target in ("device", "edge") for kind in ("", "_posthoc")
                )
                + " |"
            )
    return "\n".join(lines)


def worker_args(args, profile_path: Path, system: str) -> list[str]:
    """The device worker's flags for one run.  ``system`` is a system line unique
    to the run: the edge's slots reuse KV by prompt prefix across sessions, and a
    run must not inherit another run's cache of the same dialogues."""
    extra = ["--profile", str(profile_path), "--max-tokens", str(args.max_tokens),
             "--threshold", str(args.threshold), "--seed", str(args.seed), "--threads", str(args.threads),
             *(["--online"] if args.online else []),
             *(["--alpha", repr(args.alpha)] if args.alpha is not None else []),
             "--system", system]
    if args.bundle:
        extra += ["--bundle", args.bundle]
    return extra


def parse_phases(text: str) -> list[tuple[str, int]]:
    """``"good-5g:6,poor:6,good-5g:6"`` -> [(link, turns), ...]; ValueError names what is wrong."""
    phases = []
    for part in text.split(","):
        name, sep, n = part.strip().partition(":")
        if name not in LINKS:
            raise ValueError(f"unknown link {name!r} in --phases; expected one of {', '.join(LINKS)}")
        if not sep or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--phases entries are LINK:TURNS with TURNS >= 1, got {part!r}")
        phases.append((name, int(n)))
    if len(phases) < 2:
        raise ValueError("--phases needs at least two phases")
    return phases


def phase_summary(records: list[dict]) -> list[dict]:
    """Per phase: turns, edge share, mean latency, and a comparison with the first
    phase, which replayed the same turns: how many of the turns it sent to the
    edge (the "hard" turns on that link) went to the edge again, and the first
    turn of the phase that went to the edge at all."""
    phases = list(dict.fromkeys(r["phase"] for r in records))
    by_phase = {ph: [r for r in records if r["phase"] == ph] for ph in phases}
    first = by_phase[phases[0]]
    out = []
    for ph in phases:
        recs = by_phase[ph]
        hard = [k for k, r in enumerate(first[: len(recs)]) if r["target"] == "edge"]
        out.append({
            "phase": ph, "link": recs[0]["link"], "turns": len(recs),
            "edge_share": sum(r["target"] == "edge" for r in recs) / len(recs),
            "mean_s": statistics.fmean(r["measured_s"] for r in recs),
            # Over the turns both phases have (phases of unequal length compare their common prefix).
            "same_as_first": sum(r["target"] == f["target"] for r, f in zip(recs, first)) / min(len(recs), len(first)),
            "hard_turns": len(hard),
            "hard_on_edge": sum(recs[k]["target"] == "edge" for k in hard),
            "first_edge_turn": next((k + 1 for k, r in enumerate(recs) if r["target"] == "edge"), None),
        })
    return out


def run_phases(args, dialogues: list[dict]) -> int:
    from netlab.live import EDGE_PORT, DeviceWorker, start_edge

    phases = parse_phases(args.phases)
    # Every phase replays the same turns, so that only the link differs between them.
    prompts = [(di, p) for di, d in enumerate(dialogues) for p in d["prompts"]]
    longest = max(n for _, n in phases)
    if len(prompts) < longest:
        raise SystemExit(f"bench_link: a {longest}-turn phase needs more prompts than the {len(prompts)} "
                         f"of --dialogues {args.dialogues} x --max-turns {args.max_turns}")
    records: list[dict] = []
    t_start = time.perf_counter()
    with NetLab(settings=LINKS[phases[0][0]]) as lab:
        start_edge(lab, extra=["--n-slots", "1", "--threads", str(args.threads),
                               *(["--model", args.edge_model] if args.edge_model else [])])
        relay = lab.start_relay(EDGE_PORT, seed=args.seed)
        target = f"127.0.0.1:{relay}"
        # Profiled once, on the first phase's link, as a deployed device would be.
        profile_path = args.out / "profile_phases.json"
        parts = "link,edge,slm" + (",router" if args.phase_policy.startswith("bert") else "")
        run_profile(lab, target, profile_path, parts, args)
        extra = worker_args(args, profile_path, "Conversation run phases.")
        with DeviceWorker(lab, target, args.phase_policy, extra=extra) as dev:
            for k, (name, n) in enumerate(phases):
                lab.apply(LINKS[name])
                log.info("phase %d: %s for %d turns", k + 1, name, n)
                last_dialogue = None
                for di, prompt in prompts[:n]:
                    if di != last_dialogue:
                        dev.new_conversation()
                        last_dialogue = di
                    time.sleep(args.think_time)
                    reply = dev.turn(prompt)
                    records.append({**reply["telemetry"], "phase": f"{k + 1}:{name}", "link": name,
                                    "estimates_after": reply.get("estimates"), "comm_s": reply.get("comm_s")})
    summary = phase_summary(records)
    result = {"policy": args.phase_policy, "online": args.online, "threshold": args.threshold,
              "alpha": args.alpha, "think_time_s": args.think_time, "phases": phases, "summary": summary,
              "records": records,
              "wall_s": time.perf_counter() - t_start}
    (args.out / "bench_link_phases.json").write_text(json.dumps(result, indent=2))
    print(f"policy {args.phase_policy}; online estimation: {'on' if args.online else 'off'}; "
          f"α = {args.alpha if args.alpha is not None else 'preset'}, θ = {args.threshold:g}; "
          f"wall {result['wall_s']:.0f} s")
    print()
    print("| # | phase | p | p̃ | target | measured s | predicted device / edge s |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for i, r in enumerate(records, 1):
        print(f"| {i} | {r['phase']} | {fmt(r.get('p'))} | {fmt(r.get('p_fused'))} | {r['target']} | "
              f"{r['measured_s']:.2f} | {r['predicted_s']['device']:.2f} / {r['predicted_s']['edge']:.2f} |")
    print()
    print("| phase | turns | edge share | mean s | same target as phase 1 | phase-1 edge turns on the edge | first edge turn |")
    print("|---|---|---|---|---|---|---|")
    for row in summary:
        fe = "-" if row["first_edge_turn"] is None else f"turn {row['first_edge_turn']}"
        print(f"| {row['phase']} | {row['turns']} | {row['edge_share']:.0%} | {row['mean_s']:.2f} | "
              f"{row['same_as_first']:.0%} | {row['hard_on_edge']} of {row['hard_turns']} | {fe} |")
    return 0


def profile_links(links: dict[str, LinkSettings], args) -> int:
    """The profiler's accuracy: configured RTT (2 × relay delay) and tbf rate vs the Echo fit."""
    from netlab.live import EDGE_PORT, start_edge

    print("| link | configured RTT ms | profiled δ ms | err | configured rate MB/s | profiled B up / down / used MB/s | err (used) | R² up / down |")
    print("|---|---|---|---|---|---|---|---|")
    with NetLab(settings=next(iter(links.values()))) as lab:
        start_edge(lab, extra=["--n-slots", "1", "--n-ctx", "512"])
        relay = lab.start_relay(EDGE_PORT, seed=args.seed)
        for name, setting in links.items():
            lab.apply(setting)
            prof = run_profile(lab, f"127.0.0.1:{relay}", args.out / f"linkprofile_{name}.json", "link", args)
            fit = prof["fit"]["link"]
            rtt, rate = setting.rtt_added_s, setting.rate_bytes_per_s
            print(
                f"| {name} | {rtt * 1e3:.0f} | {prof['overhead_s'] * 1e3:.1f} | "
                f"{(prof['overhead_s'] / rtt - 1) if rtt else float('nan'):+.1%} | "
                f"{rate / 1e6:.3f} | {fit['up']['bandwidth_bytes_per_s'] / 1e6:.3f} / {fit['down']['bandwidth_bytes_per_s'] / 1e6:.3f} / "
                f"{prof['bandwidth_bytes_per_s'] / 1e6:.3f} | {prof['bandwidth_bytes_per_s'] / rate - 1:+.1%} | "
                f"{fit['up'].get('r_squared', float('nan')):.4f} / {fit['down'].get('r_squared', float('nan')):.4f} |",
                flush=True,
            )
    return 0


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--dialogues", type=int, default=3, help="MT-Bench-101 dialogues per policy and link")
    ap.add_argument("--max-turns", type=int, default=3, help="user turns per dialogue")
    ap.add_argument("--max-tokens", type=int, default=24, help="answer cap on both sides")
    ap.add_argument("--links", default="good-5g,poor", help=f"comma-separated from {','.join(LINKS)}")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--bundle", help="router bundle for the BERT policies (default: the shipped one)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=None,
                    help="α of eq. (11) for every run (default: the mt-bench preset's)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "link")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edge-model", metavar="GGUF", help="edge model file (default: the edge service's, Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of the device SLM and of the edge model each (1: they do not "
                         "fight over the 2 cores of the test machine)")
    ap.add_argument("--online", action="store_true",
                    help="online estimation in every run (γ, B, δ and L̄_r updated after each turn)")
    ap.add_argument("--phases", help="LINK:TURNS,... run --phase-policy through link phases instead "
                    "(e.g. good-5g:6,poor:6,good-5g:6)")
    ap.add_argument("--phase-policy", default="bert-ctx", choices=POLICIES)
    ap.add_argument("--think-time", type=float, default=0.0, metavar="S",
                    help="seconds between turns, as a user typing (the runtime probes the link "
                         "while idle, OnlineSettings.idle_probe_s); default 0: back to back")
    ap.add_argument("--profile-only", action="store_true",
                    help="only profile each link: configured vs measured RTT and rate")
    args = ap.parse_args(argv)
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha >= 0):
        ap.error(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if not (math.isfinite(args.think_time) and args.think_time >= 0):
        ap.error(f"--think-time must be a finite number >= 0, got {args.think_time}")
    return ap, args


def usable_policies(args) -> list[str] | None:
    """The ``--policies`` to run (BERT ones dropped, with a warning, when the bundle
    cannot be loaded); None after printing the error for unknown names."""
    policies = [p for p in args.policies.split(",") if p]
    if bad := set(policies) - set(POLICIES):
        print(f"bench_link: unknown policies {sorted(bad)}", file=sys.stderr)
        return None
    if any(p.startswith("bert") for p in policies):
        from device_runtime.routing.routers.base import ROUTERS, RouterError

        try:
            ROUTERS.create("bert", bundle=args.bundle)
        except (RouterError, FileNotFoundError) as exc:
            log.warning("BERT policies skipped: %s", exc)
            policies = [p for p in policies if not p.startswith("bert")]
    return policies


def new_results(args, dialogues: list[dict], policies: list[str]) -> dict:
    """``bench_link.json`` before any link is run: the run's settings and sizes."""
    from device_runtime.routing.cost_model import paper_params

    return {
        "threads": args.threads,
        "online": args.online,
        # The α of every run; alpha_from says whether --alpha set it.
        "alpha": args.alpha if args.alpha is not None else paper_params("mt-bench").alpha,
        "alpha_from": "--alpha" if args.alpha is not None else "mt-bench preset",
        "think_time_s": args.think_time,
        "sizes": {
            "dialogues": len(dialogues), "turns_per_policy": sum(len(d["prompts"]) for d in dialogues),
            "max_tokens": args.max_tokens, "dialogue_ids": [d["id"] for d in dialogues],
        },
        "policies": policies,
        "links": {},
    }


def link_profile(lab: NetLab, target: str, name: str, base_profile: dict | None, policies, args) -> dict:
    """PROFILE.json for link ``name``: γ_s, γ_e, τ_r and the link the first time
    (``base_profile`` None), then only the link, merged into ``base_profile``."""
    profile_path = args.out / f"profile_{name}.json"
    if base_profile is None:
        log.info("profiling γ_s, γ_e, τ_r and the %s link", name)
        parts = "link,edge,slm" + (",router" if any(p.startswith("bert") for p in policies) else "")
        return run_profile(lab, target, profile_path, parts, args)
    log.info("profiling the %s link", name)
    link_only = run_profile(lab, target, profile_path, "link", args)
    profile = {**base_profile, **{k: link_only[k] for k in ("overhead_s", "bandwidth_tokens_per_s", "bandwidth_bytes_per_s")}}
    profile["fit"] = {**base_profile["fit"], "link": link_only["fit"]["link"]}
    # This link's fit says whether its δ and B were measured or estimated.
    profile["sources"] = {**base_profile.get("sources", {}),
                          **{k: v for k, v in link_only.get("sources", {}).items()
                             if k in ("overhead_s", "bandwidth_tokens_per_s")}}
    profile_path.write_text(json.dumps(profile, indent=2))
    return profile


def replay(lab: NetLab, target: str, name: str, policy: str, dialogues: list[dict], args) -> list[dict]:
    """Every dialogue under one policy on link ``name``: one record per turn."""
    from netlab.live import DeviceWorker

    extra = worker_args(args, args.out / f"profile_{name}.json", f"Conversation run {name}/{policy}.")
    recs = []
    with DeviceWorker(lab, target, policy, extra=extra) as dev:
        for d in dialogues:
            dev.new_conversation()
            for prompt in d["prompts"]:
                time.sleep(args.think_time)
                reply = dev.turn(prompt)
                recs.append({**reply["telemetry"], "estimates_after": reply.get("estimates"),
                             "comm_s": reply.get("comm_s")})
    return recs


def run_links(args, links: dict[str, LinkSettings], policies: list[str], dialogues: list[dict], results: dict) -> None:
    """Profile each link, then replay the dialogues under each policy; fills ``results["links"]``."""
    from netlab.live import EDGE_PORT, start_edge

    with NetLab(settings=next(iter(links.values()))) as lab:
        start_edge(lab, extra=["--n-slots", "1", "--threads", str(args.threads),
                               *(["--model", args.edge_model] if args.edge_model else [])])
        relay = lab.start_relay(EDGE_PORT, seed=args.seed)
        target = f"127.0.0.1:{relay}"
        base_profile = None
        for name, setting in links.items():
            lab.apply(setting)
            profile = link_profile(lab, target, name, base_profile, policies, args)
            if base_profile is None:
                base_profile = profile
            entry = {"setting": {"rate_mbit": setting.rate_mbit, "delay_ms": setting.delay_ms, "jitter_ms": setting.jitter_ms},
                     "profile": {k: v for k, v in profile.items() if not isinstance(v, dict)},
                     "records": {}, "summary": {}}
            for policy in policies:
                log.info("%s / %s", name, policy)
                recs = replay(lab, target, name, policy, dialogues, args)
                entry["records"][policy] = recs
                entry["summary"][policy] = summarize(recs)
            results["links"][name] = entry


def print_report(results: dict, dialogues: list[dict], figs: list[Path], args) -> None:
    print(f"online estimation: {'on' if args.online else 'off'}; threads per model: {args.threads}; "
          f"α = {results['alpha']:g} ({results['alpha_from']}), θ = {args.threshold:g}")
    print(f"dialogues: {len(dialogues)} (ids {results['sizes']['dialogue_ids']}), "
          f"{results['sizes']['turns_per_policy']} turns per policy and link, max_tokens {args.max_tokens}, "
          f"wall {results['wall_s']:.0f} s")
    for name, entry in results["links"].items():
        p = entry["profile"]
        print(f"{name}: {entry['setting']} -> profiled overhead_s {p['overhead_s']:.4f}, "
              f"B {p['bandwidth_bytes_per_s'] / 1e6:.2f} MB/s ({p['bandwidth_tokens_per_s']:.3g} tokens/s)")
    print()
    print(table(results))
    print()
    print("figures: " + ", ".join(str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in figs))


def main(argv: list[str] | None = None) -> int:
    ap, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    reason = unavailable_reason()
    if reason:
        print(f"bench_link: {reason}", file=sys.stderr)
        return 2
    if args.phases:
        try:
            parse_phases(args.phases)
        except ValueError as exc:
            ap.error(str(exc))
    links = {name: LINKS[name] for name in args.links.split(",")}
    policies = usable_policies(args)
    if policies is None:
        return 2
    dialogues = pick_dialogues(args.data_dir / "mtbench101" / "mtbench101.jsonl", args.dialogues, args.max_turns)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phases:
        return run_phases(args, dialogues)
    t_start = time.perf_counter()
    results = new_results(args, dialogues, policies)
    if args.profile_only:
        return profile_links(links, args)
    run_links(args, links, policies, dialogues, results)
    results["wall_s"] = time.perf_counter() - t_start
    (args.out / "bench_link.json").write_text(json.dumps(results, indent=2))
    figs = plot(results, args.out)
    print_report(results, dialogues, figs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
