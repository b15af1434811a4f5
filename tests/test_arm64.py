"""The device runtime on aarch64 (scripts/arm64.sh's build under qemu-user) against x86.

These run only where ``bash scripts/arm64.sh setup`` has built its cache
(``EDGEROUTE_ARM64_CACHE``, default ~/.cache/edgeroute-arm64); otherwise they
skip and say so.  ``EDGEROUTE_ARM64=0`` skips them even then.  Each check runs
the same thing on both architectures in separate processes:

* the router: p on a few hundred validation turns (the export's split rule,
  never training turns), compared decision by decision;
* the SLM: a three-turn greedy conversation, token counts and text;
* end to end: ``edgeroute chat --policy auto`` on aarch64 against an x86 edge
  over loopback gRPC, with KV reuse in the telemetry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEROUTE_ARM64_CACHE", Path.home() / ".cache" / "edgeroute-arm64"))
DATA = ROOT.parent / "shared" / "data" / "routellm"
#: Turns per benchmark for the router comparison (MT-Bench has fewer: all of its validation turns).
PER_BENCHMARK = 150
#: At most this share of routing decisions may differ between the architectures.
MAX_FLIP_SHARE = 0.01


def _skip_reason() -> str | None:
    if os.environ.get("EDGEROUTE_ARM64") == "0":
        return "EDGEROUTE_ARM64=0"
    if shutil.which("qemu-aarch64-static") is None:
        return "no qemu-aarch64-static: run 'bash scripts/arm64.sh setup' (as root)"
    if not (CACHE / "root" / ".edgeroute-root").is_file() or not list((CACHE / "site").glob(".edgeroute-*")):
        return f"no aarch64 build in {CACHE}: run 'bash scripts/arm64.sh setup' (as root; a cold build compiles llama.cpp: tens of minutes once)"
    return None


pytestmark = [
    pytest.mark.arm64,
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]


def arm64(*args: str, stdin: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``scripts/arm64.sh run -- ARGS`` (``edgeroute ...`` or ``python ...``) on aarch64."""
    env = {**os.environ, "EDGEROUTE_ARM64_CACHE": str(CACHE)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "arm64.sh"), "run", "--", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def x86(*args: str, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The same on this machine's python (the checkout's .venv)."""
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=cli_env())


def test_the_build_is_aarch64_with_the_device_stack():
    proc = arm64("python", "-c", "import platform, onnxruntime, llama_cpp, grpc, tokenizers; "
                 "print(platform.machine(), onnxruntime.__version__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "aarch64"


# --- the router ------------------------------------------------------------------


def validation_turns() -> list[dict]:
    """A fixed sample of validation turns: the export's split (val_fraction 0.2),
    ordered by a hash of the turn so the sample does not follow file order."""
    from export.data import load_examples

    if not DATA.is_dir():
        pytest.skip(f"no RouteLLM data at {DATA}")
    examples = [e for e in load_examples([DATA], ["mmlu", "gsm8k", "mt-bench"], val_fraction=0.2)
                if e.split == "val"]
    out: list[dict] = []
    for bench in ("mmlu", "gsm8k", "mt-bench"):
        rows = [e for e in examples if e.benchmark == bench]
        rows.sort(key=lambda e: hashlib.sha256((e.prompt + repr(e.context)).encode()).hexdigest())
        out += [{"prompt": e.prompt, "context": list(e.context)} for e in rows[:PER_BENCHMARK]]
    return out


def router_comparison(p_x86: list[float], p_arm: list[float]) -> dict:
    """Largest and mean |Δp|, and decision flips at θ = 0.5 and at the median x86 score."""
    deltas = [abs(a - b) for a, b in zip(p_x86, p_arm)]
    median = statistics.median(p_x86)

    def flips(theta: float) -> int:
        return sum((a > theta) != (b > theta) for a, b in zip(p_x86, p_arm))

    return {"n": len(deltas), "max_abs_dp": max(deltas), "mean_abs_dp": statistics.fmean(deltas),
            "median_p": median, "flips_0.5": flips(0.5), "flips_median": flips(median)}


def test_router_comparison_counts_flips_on_both_sides_of_a_threshold():
    stats = router_comparison([0.1, 0.49, 0.51, 0.9], [0.1, 0.51, 0.49, 0.9])
    assert stats["flips_0.5"] == 2 and stats["max_abs_dp"] == pytest.approx(0.02)


def test_router_scores_match_x86_on_validation_turns(tmp_path):
    turns = validation_turns()
    assert len(turns) >= 250
    stdin = "".join(json.dumps(t) + "\n" for t in turns)
    host = x86("-m", "device_runtime.cli", "router", "score", stdin=stdin)
    arm = arm64("edgeroute", "router", "score", stdin=stdin)
    assert host.returncode == 0, host.stderr[-2000:]
    assert arm.returncode == 0, arm.stderr[-2000:]
    p_x86 = [json.loads(line)["score"] for line in host.stdout.splitlines()]
    p_arm = [json.loads(line)["score"] for line in arm.stdout.splitlines()]
    assert len(p_x86) == len(p_arm) == len(turns)
    stats = router_comparison(p_x86, p_arm)
    (tmp_path / "router.json").write_text(json.dumps(stats))
    print("aarch64 vs x86 router:", json.dumps(stats))
    assert stats["flips_0.5"] <= MAX_FLIP_SHARE * len(turns), stats
    assert stats["flips_median"] <= MAX_FLIP_SHARE * len(turns), stats


# --- the SLM ---------------------------------------------------------------------

#: Run by both interpreters: three greedy turns of one conversation, one JSON
#: line each.  The assistant turns in the history are fixed (not the model's
#: own answers), so every turn's prompt is the same on both architectures even
#: where a greedy answer differs, and the KV accounting is compared turn by turn.
SLM_PROBE = """
import json
from device_runtime.llm.slm import SLM_BACKENDS, SLMSettings
slm = SLM_BACKENDS.create("llama-cpp", SLMSettings(n_ctx=1024, n_threads=1))
turns = [("Name three primary colours.", "Red, yellow and blue."),
         ("Which of them is the colour of the sky?", "Blue."),
         ("Say it in French.", "Bleu.")]
messages = []
for prompt, reply in turns:
    messages.append({"role": "user", "content": prompt})
    text = "".join(slm.stream(messages, max_tokens=24, temperature=0.0))
    s = slm.last_stats
    print(json.dumps({"text": text, "prompt_tokens": s.prompt_tokens, "prefill_tokens": s.prefill_tokens,
                      "cached_tokens": s.cached_tokens, "output_tokens": s.output_tokens}))
    messages.append({"role": "assistant", "content": reply})
slm.close()
"""


def test_slm_conversation_matches_x86_turn_by_turn():
    host = x86("-c", SLM_PROBE)
    arm = arm64("python", "-c", SLM_PROBE)
    assert host.returncode == 0, host.stderr[-2000:]
    assert arm.returncode == 0, arm.stderr[-2000:]
    turns_x86 = [json.loads(line) for line in host.stdout.splitlines()]
    turns_arm = [json.loads(line) for line in arm.stdout.splitlines()]
    print("x86:", json.dumps(turns_x86), "\naarch64:", json.dumps(turns_arm))
    assert len(turns_x86) == len(turns_arm) == 3
    # KV reuse happens on both: turns 2 and 3 prefill only what is new.
    assert all(t["cached_tokens"] > 0 for t in turns_arm[1:])
    counts = ["prompt_tokens", "prefill_tokens", "cached_tokens"]
    assert [{k: t[k] for k in counts} for t in turns_arm] == [{k: t[k] for k in counts} for t in turns_x86]
    # The texts: llama.cpp's NEON and AVX2 kernels round differently, so greedy
    # decoding agrees until two logits nearly tie and may part there (docs/device.md:
    # the first answer parts after eight words).  Each answer must agree at least
    # on its opening words.
    for arm_t, x86_t in zip(turns_arm, turns_x86):
        assert arm_t["text"].split()[:5] == x86_t["text"].split()[:5], (arm_t["text"], x86_t["text"])


# --- end to end ------------------------------------------------------------------


def test_chat_on_aarch64_against_an_x86_edge(tmp_path, edge_server):
    script = tmp_path / "turns.jsonl"
    script.write_text(json.dumps({"history": [
        {"user": "Hi! Name a fruit."},
        {"user": "Prove that there are infinitely many primes, step by step."},
        {"user": "Now name a vegetable."},
        {"user": "Compute 17 * 23 and explain each step."},
    ]}) + "\n")
    proc = arm64("edgeroute", "chat", "--edge", edge_server.target, "--policy", "auto", "--script", str(script),
                 "--json", "--max-tokens", "8", "--threads", "2", "--n-ctx", "1024", "--no-journal")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    print("aarch64 chat telemetry:", json.dumps(recs), "\nstderr:", proc.stderr[-3000:])
    assert [r["turn"] for r in recs] == [1, 2, 3, 4]
    # Emulated, the device's self-profiled latency is ~50x a board's, so the cost
    # model sends every turn to the edge (without scoring p): each must get there.
    assert all(r["policy"] == "auto" and not r["fallback"] for r in recs)
    assert any(r["target"] == "edge" for r in recs)
    # Every turn after the first reuses its side's KV cache from earlier turns.
    assert all(r["cached_tokens"] > 0 for r in recs[1:]), recs
    assert all(r["context_tokens"] > 0 for r in recs[1:])
