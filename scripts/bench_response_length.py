"""Does a per-query response-length prediction improve the routing decision? (issue 5, item 3)

On GSM8K (the one trace with recorded responses), every turn is CHARGED its
recorded response lengths; only the L̄_r the DECISION (eq. 11) sees changes:

- average     the paper's Table II averages (136.3 / 460.1 words), the default
- train-mean  this trace's train-split means (one number per target)
- predicted   the ridge model of device_runtime.sim.response_length, fitted on the train split
- true        the recorded lengths themselves: an oracle bound on length knowledge

For each router (random over several seeds, bert) and split (val, all), it
prints APGR and the mean latency at which the curve first reaches target
accuracies (min latency over the piecewise-linear curve with quality >= target).

    python scripts/bench_response_length.py --data-dir ../shared/data/routellm [--seeds 5] [--no-bert]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def latency_at_quality(curve, target: float) -> float | None:
    """Lowest mean latency on the piecewise-linear curve whose quality reaches ``target``."""
    best = None
    pts = [(c.quality, c.mean_latency_s) for c in curve]
    for q, lat in pts:
        if q >= target:
            best = lat if best is None else min(best, lat)
    for (q0, l0), (q1, l1) in zip(pts, pts[1:]):
        if (q0 - target) * (q1 - target) < 0:  # strictly crosses between two operating points
            lat = l0 + (target - q0) / (q1 - q0) * (l1 - l0)
            best = lat if best is None else min(best, lat)
    return best


MODES = ("average", "train-mean", "predicted", "true")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seeds", type=int, default=5, help="random router seeds 0..N-1 (averaged)")
    ap.add_argument("--no-bert", action="store_true")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--targets", default="0.70,0.75,0.80")
    ap.add_argument("--points", type=int, default=41)
    ap.add_argument(
        "--charge",
        default="true",
        choices=["true", "scaled"],
        help="true: recorded lengths; scaled: recorded lengths rescaled to Table II's means",
    )
    ap.add_argument("--json", action="store_true", help="print only JSON on stdout")
    return ap.parse_args(argv)


def scored_routers(args, dialogues) -> dict[str, list[tuple[object, list]]]:
    """Router name -> [(router, its scores over all dialogues)]: one per random seed, one BERT."""
    from device_runtime.sim.simulate import build_router, score_turns

    routers: dict[str, list[tuple[object, list]]] = {"random": []}
    for seed in range(args.seeds):
        r = build_router("random", dialogues, seed=seed)
        routers["random"].append((r, score_turns(r, dialogues)))
    if not args.no_bert:
        r = build_router("bert", dialogues, bundle=args.bundle)
        routers["bert"] = [(r, score_turns(r, dialogues, progress=True, desc="bert: scoring"))]
    return routers


def mode_row(runs, params, sub, keep, plan, targets, points, dev_q, edge_q) -> tuple[float, dict]:
    """(mean APGR, target -> mean latency or None) of one router's runs under one decision mode."""
    from device_runtime.sim.metrics import router_metrics
    from device_runtime.sim.simulate import sweep

    apgrs, lats = [], {t: [] for t in targets}
    for router, scores in runs:
        curve = sweep(
            router.cost_params(params),
            sub,
            [scores[i] for i in keep],
            with_context=True,
            points=points,
            lengths=plan,
        )
        apgrs.append(router_metrics(curve, dev_q, edge_q).apgr)
        for t in targets:
            lats[t].append(latency_at_quality(curve, t))
    latency_at = {
        str(t): (None if any(v is None for v in lats[t]) else float(np.mean(lats[t]))) for t in targets
    }
    return float(np.mean(apgrs)), latency_at


def split_rows(split, dialogues, routers, plans, params, targets, points) -> list[dict]:
    """One row per router and decision mode on one split ("val" or "all")."""
    from device_runtime.sim.simulate import baseline
    from device_runtime.sim.traces import split_of

    keep = [i for i, d in enumerate(dialogues) if split == "all" or split_of(d.turns[0].prompt) == split]
    sub = [dialogues[i] for i in keep]
    # Baselines depend only on the charge (recorded lengths), the same in every mode.
    dev = baseline(params, sub, "device", lengths=plans["average"])
    edge = baseline(params, sub, "edge", lengths=plans["average"])
    rows = []
    for name, runs in routers.items():
        for mode in MODES:
            apgr, latency_at = mode_row(
                runs, params, sub, keep, plans[mode], targets, points, dev.quality, edge.quality
            )
            rows.append(
                {
                    "split": split,
                    "n": len(sub),
                    "router": name,
                    "decision": mode,
                    "apgr": apgr,
                    "latency_at": latency_at,
                    "all_device": dev.to_dict(),
                    "all_edge": edge.to_dict(),
                }
            )
    return rows


def print_table(rows: list[dict], args, targets: list[float]) -> None:
    head = "".join(f"{'T@' + format(t, '.2f'):>9}" for t in targets)
    what = "recorded lengths" if args.charge == "true" else "recorded lengths rescaled to Table II means"
    print(f"GSM8K, charge = {what}; random = mean over seeds 0..{args.seeds - 1}")
    last = None
    for r in rows:
        if r["split"] != last:
            last = r["split"]
            print(
                f"\nsplit {r['split']} (n={r['n']}): all-device acc {r['all_device']['quality']:.3f} "
                f"{r['all_device']['mean_latency_s']:.2f} s, all-edge acc {r['all_edge']['quality']:.3f} "
                f"{r['all_edge']['mean_latency_s']:.2f} s"
            )
            print(f"{'router':<8}{'decision':<12}{'APGR':>7}{head}")
        cells = "".join(
            f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in r["latency_at"].values()
        )
        print(f"{r['router']:<8}{r['decision']:<12}{r['apgr']:>7.3f}{cells}")


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]

    from device_runtime.routing import cost_model
    from device_runtime.sim.length_plan import length_plan
    from device_runtime.sim.traces import load_trace

    benchmark = "gsm8k"
    dialogues = load_trace(benchmark, args.data_dir)
    params = cost_model.preset("paper", benchmark)
    plans = {m: length_plan(m, args.charge, dialogues, benchmark=benchmark, average=params.response) for m in MODES}
    routers = scored_routers(args, dialogues)
    rows = []
    for split in ("val", "all"):
        rows += split_rows(split, dialogues, routers, plans, params, targets, args.points)
    if args.json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    print_table(rows, args, targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
