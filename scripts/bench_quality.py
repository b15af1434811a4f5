"""Live quality benchmark: GSM8K answered by the live system, scored against the gold answers.

    .venv/bin/python scripts/bench_quality.py --limit 50 [--json] [--edge-model NAME|GGUF]

A seeded random sample of GSM8K problems (``--data``, default the training
split ``../shared/data/gsm8k/train.jsonl``: 7,473 problems that neither model
pair nor the shipped router was fitted to here; nothing is tuned on them) is
answered, each problem as a new one-turn conversation, through the real
runtime (:class:`~device_runtime.runtime.orchestrator.Orchestrator`) with a
real edge service on loopback gRPC:

1. by the device SLM alone (policy ``device``) and the edge model alone
   (policy ``edge``): every answer, its latency and each side's prefill and
   decode speed (the models' own timings);
2. by ``auto`` (the shipped BERT router, eqs. 11-12) and ``random`` at
   several θ.  Each problem is answered once per side and the answers reused:
   a one-turn conversation's answer depends only on where it runs (greedy
   decoding with a fixed seed; a KV-cache hit gives the cold output, tested in
   tests/test_llm.py), and the decision is made by the real policy object on
   the same inputs the orchestrator gives it (the prompt, its token count, an
   empty history, the cost parameters and the edge client's W_q).  A policy's
   latency for a problem is the measured latency of the side it chose plus the
   measured time of its own decision (the router).  ``--verify K`` replays the
   first K problems through the orchestrator with the ``auto`` policy and
   checks that targets and answers are identical.

Answers are scored by their final number (the last "answer is N", else the
last number in the text) against the number after ``####`` in the gold
answer.  Accuracy comes with a 95% Wilson interval: with 50 problems it is
about ±10-13 points wide, so only large gaps between policies are real.

Prints a markdown table (stderr with ``--json``, which puts one JSON object
on stdout) and writes ``bench_quality.json`` and two figures into ``--out``.

``--speed gemma3-270m,qwen2.5-coder-0.5b-instruct`` instead compares the
prefill and decode speed of edge models on the same prompt (docs/models.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, add_checkout_to_path, log  # noqa: E402

INSTRUCTION = 'Solve the problem step by step, then end with "The answer is" and the final number.'
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer is[^0-9\-]{0,20}(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


# --- data and scoring ------------------------------------------------------------------


def load_problems(path: Path, limit: int, seed: int) -> list[dict]:
    """``limit`` problems drawn at random (seeded) from a GSM8K JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if limit > len(rows):
        raise SystemExit(f"--limit {limit}: {path} has only {len(rows)} problems")
    idx = random.Random(seed).sample(range(len(rows)), limit)
    return [{"index": i, "question": rows[i]["question"], "gold": gold_number(rows[i]["answer"])} for i in idx]


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def gold_number(answer: str) -> float:
    """GSM8K's gold: the number after ``####``."""
    value = _to_float(answer.rsplit("####", 1)[-1].strip())
    if value is None:
        raise ValueError(f"no number after #### in {answer[-60:]!r}")
    return value


def extract_number(text: str) -> float | None:
    """The answer's final number: the last "answer is N", else the last number."""
    found = _ANSWER_IS.findall(text) or _ANY_NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def is_correct(text: str, gold: float) -> bool:
    got = extract_number(text)
    return got is not None and math.isclose(got, gold, rel_tol=0, abs_tol=1e-6)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def prompt_of(problem: dict) -> str:
    return f"{problem['question']}\n{INSTRUCTION}"


# --- the live system -------------------------------------------------------------------


def start_system(args):
    """(edge server thread, edge client, SLM backend, cost params, router or None)."""
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profile import LiveCostSettings
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from edge_service.models import edge_model_path
    from edge_service.server import EdgeServerThread
    from edge_service.settings import EdgeSettings

    logging.getLogger("edgeroute.audit").setLevel(logging.WARNING)
    model = edge_model_path(args.edge_model, progress=sys.stderr.isatty())
    server = EdgeServerThread(EdgeSettings(
        model_path=model, n_ctx=args.n_ctx, n_slots=1, n_threads=args.threads, seed=args.seed,
    )).start()
    edge = EdgeClient(server.target, timeout_s=600.0)
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(model_path=args.slm, n_ctx=args.n_ctx, n_threads=args.threads))
    params = LiveCostSettings(alpha=args.alpha, profile=args.profile, benchmark=args.benchmark).cost_params()
    return server, edge, slm, params, model


def make_orchestrator(slm, edge, params, policy, args):
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    settings = OrchestratorSettings(max_tokens=args.max_tokens, temperature=0.0, seed=args.seed)
    return Orchestrator(slm, policy, params, edge=edge, settings=settings)


def answer_all(orch, problems: list[dict], desc: str) -> list[dict]:
    """Each problem as a new one-turn conversation through ``orch``."""
    from tqdm import tqdm

    out = []
    for prob in tqdm(problems, desc=desc, unit="q", file=sys.stderr):
        orch.new_conversation()
        res = orch.turn(prompt_of(prob))
        t = res.telemetry
        rec = {"text": res.text, "target": t.target, "fallback": t.fallback, "measured_s": t.measured_s,
               "ttft_s": t.ttft_s, "output_tokens": t.output_tokens, "prefill_tokens": t.prefill_tokens,
               "correct": is_correct(res.text, prob["gold"])}
        if t.target == "edge" and res.edge_result is not None:
            er = res.edge_result
            rec.update(prefill_s=er.prefill_s, decode_s=er.decode_s, queue_s=er.queue_s)
        elif t.target == "device" and orch.slm.last_stats is not None:
            st = orch.slm.last_stats
            rec.update(prefill_s=st.prefill_s, decode_s=st.decode_s)
        out.append(rec)
    return out


def speed(records: list[dict]) -> dict:
    """Prefill and decode tokens per second over all answers (the models' own timings)."""
    pre_s = sum(r.get("prefill_s", 0.0) for r in records)
    dec_s = sum(r.get("decode_s", 0.0) for r in records)
    pre_t = sum(r["prefill_tokens"] for r in records)
    out_t = sum(r["output_tokens"] for r in records)
    return {"prefill_tok_s": pre_t / pre_s if pre_s else None,
            "decode_tok_s": out_t / dec_s if dec_s else None,
            "mean_output_tokens": out_t / len(records) if records else None,
            "capped_share": sum(r["output_tokens"] >= r.get("cap", 10**9) for r in records) / max(1, len(records))}


# --- policies by reuse -----------------------------------------------------------------


def decide_all(policy, slm, edge, params, problems: list[dict], max_tokens: int) -> list[dict]:
    """The policy's decision for each problem on the inputs the orchestrator
    would give it (see ``Orchestrator._turn``): a new conversation's ledger,
    the prompt's SLM token count, an empty history, ``params`` with the edge
    client's W_q.  Also the decision's own time."""
    from device_runtime.routing.cost_model import ContextLedger

    out = []
    for prob in problems:
        prompt = prompt_of(prob)
        t0 = time.perf_counter()
        queue_s = edge.expected_queue_s()
        p = params if queue_s is None else params.with_(edge_queue_s=queue_s)
        turn = ContextLedger().turn_inputs(
            slm.count_tokens(prompt),
            response_device=min(p.response.device, max_tokens),
            response_edge=min(p.response.edge, max_tokens),
        )
        d = policy.choose(p, turn, prompt, [])
        out.append({"target": d.target, "p": d.p, "p_fused": d.p_fused, "decide_s": time.perf_counter() - t0,
                    "edge_queue_s": queue_s})
    return out


def point(name: str, theta: float | None, decisions: list[dict], sides: dict, problems: list[dict]) -> dict:
    """Accuracy (with its Wilson interval), edge share and mean latency of a
    policy whose answers are the chosen side's."""
    n = len(problems)
    chosen = [sides[d["target"]][i] for i, d in enumerate(decisions)]
    k = sum(r["correct"] for r in chosen)
    lo, hi = wilson(k, n)
    lat = [r["measured_s"] + d["decide_s"] for r, d in zip(chosen, decisions)]
    fused = [d["p_fused"] for d in decisions if d.get("p_fused") is not None]
    margin = min((abs(f - theta) for f in fused), default=None) if theta is not None else None
    return {"policy": name, "threshold": theta, "n": n, "correct": k, "accuracy": k / n, "margin": margin,
            "ci95": [lo, hi], "edge_share": sum(d["target"] == "edge" for d in decisions) / n,
            "mean_latency_s": statistics.fmean(lat)}


def auto_thresholds(p_fused: list[float], shares=(0.1, 0.25, 0.5, 0.75, 0.9)) -> list[float]:
    """θ values that put about ``shares`` of the problems on the edge, from
    the p̃ of this run (sweep points for the curve; nothing is fitted to them)."""
    xs = sorted(p_fused)
    # Midway between neighbouring p̃, so that no problem sits on θ: a decision
    # then does not hang on the last digits of the latency term (W_q).
    cuts = {min(len(xs) - 1, max(1, round((1 - s) * len(xs)))) for s in shares}
    thetas = {round((xs[j - 1] + xs[j]) / 2, 6) for j in cuts}
    return sorted(thetas | {round(xs[0] - 0.01, 6), round(xs[-1] + 0.01, 6)})


def sweep(args, slm, edge, params, problems: list[dict], sides: dict) -> list[dict]:
    """``auto`` and ``random`` at several θ, each decision by the real policy."""
    from device_runtime.routing.policies import AutoPolicy, RandomPolicy
    from device_runtime.routing.routers.base import ROUTERS

    router = ROUTERS.create("bert", **({"bundle": args.bundle} if args.bundle else {}))
    probe = decide_all(AutoPolicy(router, 0.5, skip_settled=False), slm, edge, params, problems, args.max_tokens)
    fused = [d["p_fused"] for d in probe]
    thetas = args.auto_thresholds or auto_thresholds(fused)
    points = []
    for theta in thetas:
        ds = decide_all(AutoPolicy(router, theta), slm, edge, params, problems, args.max_tokens)
        points.append(point("auto", theta, ds, sides, problems))
    for theta in args.random_thresholds:
        # A fresh seeded policy per θ: the draws a live run with this seed makes.
        ds = decide_all(RandomPolicy(theta, seed=args.seed), slm, edge, params, problems, args.max_tokens)
        points.append(point("random", theta, ds, sides, problems))
    return points, probe


def verify(args, slm, edge, params, problems: list[dict], sides: dict) -> dict:
    """Replay the first ``--verify`` problems through the orchestrator with
    ``auto`` at the median p̃ and compare with the reused answers."""
    from device_runtime.routing.policies import AutoPolicy
    from device_runtime.routing.routers.base import ROUTERS

    subset = problems[: args.verify]
    router = ROUTERS.create("bert", **({"bundle": args.bundle} if args.bundle else {}))
    probe = decide_all(AutoPolicy(router, 0.5, skip_settled=False), slm, edge, params, subset, args.max_tokens)
    theta = statistics.median(d["p_fused"] for d in probe)
    policy = AutoPolicy(router, theta)
    predicted = decide_all(policy, slm, edge, params, subset, args.max_tokens)
    live = answer_all(make_orchestrator(slm, edge, params, policy, args), subset, "verify auto")
    same_target = sum(p["target"] == r["target"] for p, r in zip(predicted, live))
    same_text = sum(r["text"] == sides[p["target"]][i]["text"] for i, (p, r) in enumerate(zip(predicted, live)))
    return {"n": len(subset), "threshold": theta, "same_target": same_target, "same_answer": same_text,
            "edge_turns": sum(r["target"] == "edge" for r in live)}


def run(args) -> dict:
    from device_runtime.routing.policies import FixedPolicy

    problems = load_problems(args.data, args.limit, args.seed)
    server, edge, slm, params, model = start_system(args)
    result = {"data": str(args.data), "n": len(problems), "seed": args.seed, "max_tokens": args.max_tokens,
              "threads": args.threads, "edge_model": str(model), "slm": str(slm.model_path),
              "alpha": params.alpha, "benchmark_preset": args.benchmark, "profile": args.profile,
              "problems": [p["index"] for p in problems]}
    try:
        sides = {}
        for side in args.sides:
            orch = make_orchestrator(slm, edge, params, FixedPolicy(side), args)
            sides[side] = answer_all(orch, problems, f"{side} answers")
            for r in sides[side]:
                r["cap"] = args.max_tokens
            result[f"speed_{side}"] = speed(sides[side])
            result.setdefault("points", []).append(point(side, None, [{"target": side, "decide_s": 0.0}] * len(problems),
                                                         sides, problems))
        if set(sides) == {"device", "edge"}:
            points, probe = sweep(args, slm, edge, params, problems, sides)
            result["points"] += points
            result["p"] = [d["p"] for d in probe]
            result["p_fused"] = [d["p_fused"] for d in probe]
            result["edge_queue_s"] = probe[0]["edge_queue_s"]
            if args.verify:
                result["verify"] = verify(args, slm, edge, params, problems, sides)
        result["answers"] = {s: [{k: r[k] for k in ("text", "correct", "measured_s", "output_tokens")}
                                 for r in recs] for s, recs in sides.items()}
    finally:
        edge.close()
        server.stop()
    return result


def speed_compare(args) -> str:
    """Prefill and decode tokens/s of each ``--speed`` model on the same prompt
    (``--limit`` problems joined, ~100 tokens each), trials interleaved so
    that machine load hits every model alike; the models' own timings."""
    from device_runtime.llm.adapter import load_llama
    from device_runtime.llm.conversation import LlamaConversation
    from device_runtime.llm.prompt_format import resolve_prompt_format
    from edge_service.models import edge_model_path

    problems = load_problems(args.data, args.limit, args.seed)
    msgs = [{"role": "user", "content": "\n\n".join(prompt_of(p) for p in problems)}]
    convs = {}
    for name in args.speed:
        llama = load_llama(edge_model_path(name), n_ctx=args.n_ctx, n_threads=args.threads)
        convs[name] = LlamaConversation(llama, resolve_prompt_format(llama))
    stats = {name: [] for name in convs}
    for _ in range(args.reps):
        for name, conv in convs.items():
            conv.reset()  # a cold prefill every trial
            gen = conv.stream(msgs, max_tokens=64, temperature=0.0, seed=args.seed)
            for _chunk in gen:
                pass
            stats[name].append(conv.last_stats)
    lines = [f"{args.threads} thread(s), {args.reps} interleaved trials, prompt of {args.limit} problems",
             "", "| model | prompt tokens | prefill tok/s (median) | decode tok/s (median) | output tokens |",
             "|---|---|---|---|---|"]
    for name, sts in stats.items():
        cold = [st for st in sts if st.prefill_tokens > 0]
        pre = statistics.median(st.prefill_tokens / st.prefill_s for st in cold) if cold else float("nan")
        dec = statistics.median(st.output_tokens / st.decode_s for st in sts if st.decode_s > 0)
        lines.append(f"| {name} | {sts[0].prompt_tokens} | {pre:.0f} | {dec:.1f} | {sts[0].output_tokens} |")
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------


def table(result: dict) -> str:
    lines = [f"GSM8K problems: {result['n']} (seed {result['seed']}, {result['data']}); max_tokens "
             f"{result['max_tokens']}, {result['threads']} threads per model; edge {Path(result['edge_model']).name}; "
             f"alpha {result['alpha']} ({result['benchmark_preset']} preset)",
             "", "| policy | θ | edge share | accuracy | 95% CI | correct | mean latency s |",
             "|---|---|---|---|---|---|---|"]
    for pt in result.get("points", []):
        theta = "-" if pt["threshold"] is None else f"{pt['threshold']:.3f}"
        lo, hi = pt["ci95"]
        lines.append(f"| {pt['policy']} | {theta} | {pt['edge_share']:.2f} | {pt['accuracy']:.2f} | "
                     f"{lo:.2f}-{hi:.2f} | {pt['correct']}/{pt['n']} | {pt['mean_latency_s']:.2f} |")
    for side in ("device", "edge"):
        sp = result.get(f"speed_{side}")
        if sp:
            lines.append(f"\n{side}: prefill {sp['prefill_tok_s']:.0f} tok/s, decode {sp['decode_tok_s']:.1f} tok/s, "
                         f"mean answer {sp['mean_output_tokens']:.0f} tokens, {sp['capped_share']:.0%} hit the cap")
    margins = [p["margin"] for p in result.get("points", []) if p["policy"] == "auto" and p.get("margin") is not None]
    if margins:
        lines.append(f"\nauto: smallest |p~ - θ| over its points {min(margins):.4f}; "
                     f"edge client's W_q in the decisions {result.get('edge_queue_s')}")
    if "verify" in result:
        v = result["verify"]
        lines.append(f"\nverify (auto, θ={v['threshold']:.3f}, first {v['n']} problems through the orchestrator): "
                     f"{v['same_target']}/{v['n']} same target, {v['same_answer']}/{v['n']} same answer "
                     f"({v['edge_turns']} on the edge)")
    return "\n".join(lines)


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Quality against latency and against edge share (the paper's Figs. 3-5),
    with each point's 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, x_label, stem in (("mean_latency_s", "Mean latency per problem (s, measured)", "latency"),
                                 ("edge_share", "Edge LLM usage (share of problems)", "edge_share")):
        fig, ax = plt.subplots(figsize=(8, 5.2))
        for name, style in (("auto", "-"), ("random", "--")):
            pts = sorted((p for p in result["points"] if p["policy"] == name), key=lambda p: p["edge_share"])
            if not pts:
                continue
            ax.errorbar([p[x_key] for p in pts], [p["accuracy"] for p in pts],
                        yerr=[[p["accuracy"] - p["ci95"][0] for p in pts], [p["ci95"][1] - p["accuracy"] for p in pts]],
                        linestyle=style, marker=".", capsize=3, label=f"{name} (θ sweep)" if name == "random" else "BERT router (auto, θ sweep)")
        for name, marker in (("device", "s"), ("edge", "^")):
            for p in (p for p in result["points"] if p["policy"] == name):
                ax.plot([p[x_key]], [p["accuracy"]], marker=marker, color="black", linestyle="none", markersize=8,
                        label=f"all {name} ({p['accuracy']:.2f})")
        ax.set_xlabel(x_label)
        ax.set_ylabel("GSM8K accuracy (final number)")
        ax.set_title(f"Live GSM8K, {result['n']} problems, 95% Wilson intervals\n"
                     f"device {Path(result['slm']).name}, edge {Path(result['edge_model']).name}", fontsize=8.5)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out_dir / f"gsm8k_live_quality_vs_{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from edge_service.models import DEMO_EDGE_MODEL

    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl")
    ap.add_argument("--limit", type=int, default=50, help="problems (seeded random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per model (the sides run in turn)")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--edge-model", default=DEMO_EDGE_MODEL, help="edge model name or GGUF path")
    ap.add_argument("--slm", default=None, help="device SLM GGUF (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--bundle", default=None, help="router bundle (default: the shipped one)")
    ap.add_argument("--benchmark", default="gsm8k", help="cost-model preset for L̄_r and α (Tables I-III)")
    ap.add_argument("--profile", default=None, help="PROFILE.json for the cost model (default: the preset's γ)")
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--sides", default="device,edge", help="which sides answer; policies need both")
    ap.add_argument("--auto-thresholds", type=floats, default=None,
                    help="θ for auto (default: θ putting ~10/25/50/75/90%% of problems on the edge)")
    ap.add_argument("--random-thresholds", type=floats, default=floats("0.1,0.3,0.5,0.7,0.9"))
    ap.add_argument("--verify", type=int, default=3, help="replay the first K problems live under auto (0: skip)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "live-quality")
    ap.add_argument("--json", action="store_true", help="stdout: one JSON object; the table goes to stderr")
    ap.add_argument("--speed", type=lambda t: [x for x in t.split(",") if x], default=None, metavar="M1,M2",
                    help="only compare the prefill/decode speed of these edge models (names or GGUFs)")
    ap.add_argument("--reps", type=int, default=5, help="--speed: interleaved trials per model")
    args = ap.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    if not args.sides or set(args.sides) - {"device", "edge"}:
        ap.error("--sides: device and/or edge")
    if args.limit < 1 or args.max_tokens < 1 or args.verify < 0:
        ap.error("--limit and --max-tokens must be >= 1, --verify >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    add_checkout_to_path()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = parse_args(argv)
    if args.speed:
        print(speed_compare(args), flush=True)
        return 0
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quality.json").write_text(json.dumps(result, indent=1))
    figs = plot(result, args.out) if len(result.get("points", [])) > 2 else []
    text = table(result) + "".join(f"\nfigure: {f}" for f in figs) + f"\nwall time {result['wall_s']:.0f} s"
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "answers"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
