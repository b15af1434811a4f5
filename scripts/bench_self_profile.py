"""How well ``edgeroute demo`` predicts its own turns: each side's median
relative prediction error, run after run (docs/profiling.md, "Self-profiling").

    python scripts/bench_self_profile.py --runs 3
    python scripts/bench_self_profile.py --runs 2 -- --dialogues ../shared/data/mtbench101/mtbench101.jsonl --limit 5 --max-turns 3
    python scripts/bench_self_profile.py --runs 2 --repo OLD_CHECKOUT      # the same on another checkout

Each run is one ``edgeroute demo --json`` (a new process: models loaded, the
edge started, the self-profile taken, the dialogues played); arguments after
``--`` go to the demo.  Per run it prints the edge share, per side the number
of turns, the median of |predicted − measured| / measured (the prediction the
decision used) and the same with the answer's actual length
(``predicted_posthoc_s``), and the self-profile's time as the demo logged it.
The last row pools the turns of all runs.  ``--json`` prints the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF_PROFILE_LINE = re.compile(r"self-profile in ([0-9.]+) s")


def run_demo(repo: Path, demo_args: list[str], timeout_s: float) -> tuple[list[dict], float | None, float]:
    """(telemetry records, self-profile seconds or None, wall seconds) of one demo run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "device_runtime.cli", "demo", "--json", *demo_args],
        capture_output=True, text=True, cwd=repo, env=env, timeout=timeout_s,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo exited {proc.returncode}: {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    found = SELF_PROFILE_LINE.search(proc.stderr)
    return records, (float(found.group(1)) if found else None), wall


def side_errors(records: list[dict], side: str) -> tuple[int, float | None, float | None]:
    """(turns, median relative error, median post-hoc relative error) of one side."""
    mine = [r for r in records if r["target"] == side and not r["fallback"] and r["measured_s"] > 0]
    errs = [abs(r["predicted_s"][side] - r["measured_s"]) / r["measured_s"] for r in mine]
    post = [abs(r["predicted_posthoc_s"] - r["measured_s"]) / r["measured_s"]
            for r in mine if "predicted_posthoc_s" in r]
    return len(errs), (statistics.median(errs) if errs else None), (statistics.median(post) if post else None)


def row(name: str, records: list[dict], profile_s: float | None, wall_s: float | None) -> dict:
    out = {"run": name, "turns": len(records),
           "edge_share": sum(r["target"] == "edge" for r in records) / max(1, len(records)),
           "self_profile_s": profile_s, "wall_s": wall_s}
    for side in ("device", "edge"):
        n, med, post = side_errors(records, side)
        out.update({f"{side}_n": n, f"{side}_err": med, f"{side}_err_posthoc": post})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def print_table(rows: list[dict]) -> None:
    print("| run | turns | edge share | device n | device err | device err (actual length) "
          "| edge n | edge err | edge err (actual length) | self-profile s | demo wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = "-" if r["self_profile_s"] is None else f"{r['self_profile_s']:.1f}"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
        print(f"| {r['run']} | {r['turns']} | {r['edge_share']:.2f} | {r['device_n']} | {_pct(r['device_err'])} "
              f"| {_pct(r['device_err_posthoc'])} | {r['edge_n']} | {_pct(r['edge_err'])} "
              f"| {_pct(r['edge_err_posthoc'])} | {sp} | {wall} |")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="demo runs (each a new process)")
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose demo runs (default: this one)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per demo run")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--out", type=Path, help="also write every run's telemetry here (JSONL, with a `run` key)")
    args = p.parse_args(own)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    from tqdm import tqdm

    rows, pooled = [], []
    for i in tqdm(range(args.runs), desc="demo runs", file=sys.stderr):
        records, profile_s, wall = run_demo(args.repo.resolve(), demo_args, args.timeout)
        rows.append(row(str(i + 1), records, profile_s, wall))
        pooled += records
        if args.out is not None:
            with args.out.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps({"run": i + 1, **r}) + "\n" for r in records)
    rows.append(row("all", pooled, None, None))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
