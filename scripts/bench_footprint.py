"""The device runtime's footprint on x86 and on aarch64 (emulated), as a table.

    .venv/bin/python scripts/bench_footprint.py            # x86 and, when built, aarch64
    .venv/bin/python scripts/bench_footprint.py --no-arm64 # x86 only

For each architecture and each context window it starts a fresh process (the
``--probe`` mode of this script, run by that architecture's python: the aarch64
one through ``scripts/arm64.sh run``) that imports the device stack, loads the
router and the SLM, scores turns and generates a few tokens, then reports:

* install size: the device packages (onnxruntime, llama_cpp, tokenizers, grpc,
  numpy, protobuf, ...) where that interpreter imports them from, and the models
  (the SLM GGUF, the router bundle);
* resident memory (VmHWM, the peak) after the router and the SLM are loaded
  and have run, at n_ctx 2048 and 4096.  Under qemu-user it is the emulator's
  process, translated code included: an upper bound for a board;
* cold start: from the parent's spawn to the first routed-and-answered token;
* router latency: the median of single-turn scores (batch 1, one thread).

Emulated times are qemu's, not a board's; the docs say so beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The device extra's import names (and what they pull in that a device ships).
PACKAGES = ["onnxruntime", "llama_cpp", "tokenizers", "grpc", "grpc_health", "google.protobuf", "numpy",
            "huggingface_hub", "jinja2", "markupsafe", "tqdm"]
#: Fixed turns for the router latency (no data set needed).
TURNS = [
    "What is the capital of France?",
    "Prove that the square root of two is irrational.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "A train leaves at 3pm at 60 km/h; another at 4pm at 90 km/h. When does the second catch up?",
    "Summarise the causes of the French Revolution in three sentences.",
]


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def package_sizes() -> dict[str, int]:
    """Bytes of each device package where this interpreter finds it."""
    import importlib.util

    sizes = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        sizes[name] = sum(tree_bytes(Path(p)) for p in spec.submodule_search_locations)
    return sizes


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def probe(n_ctx: int, threads: int) -> dict:
    """Run the device stack once in this process; one JSON object of measurements."""
    from device_runtime.llm.models import default_slm_path
    from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
    from device_runtime.routing.bundle import default_bundle_dir
    from device_runtime.routing.routers.bert import BertRouter

    router = BertRouter(None, threads=threads)
    router.score(TURNS[0], [])
    slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_ctx=n_ctx, n_threads=threads))
    first = None
    for _ in slm.stream([{"role": "user", "content": TURNS[0]}], max_tokens=8, temperature=0.0):
        first = first or time.time()
    latencies = []
    for turn in TURNS * 4:
        t0 = time.perf_counter()
        router.score(turn, [])
        latencies.append(time.perf_counter() - t0)
    import platform

    return {
        "machine": platform.machine(), "n_ctx": n_ctx, "ready_at": first,
        "rss_peak_kib": vm_kib("VmHWM"), "rss_kib": vm_kib("VmRSS"),
        "router_ms": 1000 * statistics.median(latencies),
        "packages": package_sizes(),
        "models": {"slm_gguf": tree_bytes(default_slm_path()), "router_bundle": tree_bytes(default_bundle_dir())},
    }


def run_probe(cmd: list[str], n_ctx: int, threads: int, env: dict | None = None) -> dict:
    args = [*cmd, str(Path(__file__).resolve()), "--probe", "--n-ctx", str(n_ctx), "--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"probe failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["cold_start_s"] = result["ready_at"] - t0
    return result


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: dict[str, list[dict]]) -> str:
    """Markdown: one column per architecture, the probes at each n_ctx."""
    cols = list(rows)
    out = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

    def line(label, fn):
        out.append(f"| {label} | " + " | ".join(fn(rows[c]) for c in cols) + " |")

    line("device packages (wheels installed)", lambda r: mib(sum(r[0]["packages"].values())))
    line("  of which onnxruntime / llama_cpp", lambda r: f"{mib(r[0]['packages'].get('onnxruntime', 0))} / "
         f"{mib(r[0]['packages'].get('llama_cpp', 0))}")
    line("models (SLM GGUF + router bundle)", lambda r: f"{mib(r[0]['models']['slm_gguf'])} + "
         f"{mib(r[0]['models']['router_bundle'])}")
    for i, probe_row in enumerate(rows[cols[0]]):
        n = probe_row["n_ctx"]
        line(f"peak RSS, router + SLM, n_ctx {n}", lambda r, i=i: mib(r[i]["rss_peak_kib"] * 1024))
    line("cold start to first token (n_ctx 2048)", lambda r: f"{r[0]['cold_start_s']:.2f} s")
    line("router latency, median, batch 1, 1 thread", lambda r: f"{r[0]['router_ms']:.1f} ms")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-arm64", action="store_true", help="measure x86 only")
    ap.add_argument("--json", action="store_true", help="print the raw measurements as JSON too")
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.n_ctx[0], args.threads)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    rows: dict[str, list[dict]] = {}
    rows["x86_64"] = [run_probe([sys.executable], n, args.threads, env) for n in args.n_ctx]
    if not args.no_arm64:
        arm = ["bash", str(ROOT / "scripts" / "arm64.sh"), "run", "--", "python"]
        rows["aarch64 (emulated, qemu-user)"] = [run_probe(arm, n, args.threads) for n in args.n_ctx]
    if args.json:
        print(json.dumps(rows, indent=1), file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
