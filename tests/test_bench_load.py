"""scripts/bench_load.py: its pure parts on hand-made records, and tiny runs of the whole benchmark.

The tiny run uses the fault backend (real gRPC, auth on, no model) so the
benchmark's mechanics are checked in seconds: every phase serves every turn,
the abuser runs (its answers clipped to the server's ``--max-output-tokens``),
and the well-behaved principals lose no session.  The real-model run of the
command line is ``slow``.  No timing is asserted: the figures are the
benchmark's, in docs/operations.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _edge_fakes import FaultBackend
from _scripts import load_script
from conftest import ROOT, cli_env

SCRIPT = ROOT / "scripts" / "bench_load.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_load")


def record(bench, conversation: int, turn: int, text: str = "a", *, ttft: float = 0.1, queue: float = 0.0,
           tokens: int = 10, lost: int = 0, refused: int = 0):
    return bench.TurnRecord(conversation=conversation, principal=f"user{conversation % 2}", turn=turn, text=text,
                            output_tokens=tokens, ttft_s=ttft, total_s=ttft + 1, queue_s=queue,
                            kv_restored=turn == 0, lost_sessions=lost, refused=refused)


def test_conversations_are_dealt_to_principals_and_have_their_own_topics(bench):
    owners = [bench.principal_of(i, 4) for i in range(16)]
    assert {o: owners.count(o) for o in set(owners)} == {"user0": 4, "user1": 4, "user2": 4, "user3": 4}
    firsts = [bench.conversation_prompts(i, 3)[0] for i in range(40)]
    assert len(set(firsts)) == 40  # past the 20 topics too
    assert all(len(bench.conversation_prompts(i, 5)) == 5 for i in range(3))


def test_alone_sample_is_all_or_evenly_spaced(bench):
    assert bench.alone_sample(16, None) == list(range(16))
    assert bench.alone_sample(16, 16) == list(range(16))
    assert bench.alone_sample(16, 4) == [0, 4, 8, 12]
    assert bench.alone_sample(16, 0) == []


def test_percentile_interpolates_between_order_statistics(bench):
    assert bench.percentile([], 95) is None
    assert bench.percentile([3.0], 95) == 3.0
    assert bench.percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert bench.percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert bench.percentile([1, 2], 100) == 2


def test_summarize_a_phase(bench):
    records = [record(bench, 0, 0, ttft=0.1, queue=0.0, lost=1), record(bench, 0, 1, ttft=0.3, queue=0.2),
               record(bench, 1, 0, ttft=0.2, queue=0.1, refused=2)]
    s = bench.summarize(records, wall_s=2.0, failures=1)
    assert s["conversations"] == 2 and s["turns"] == 3 and s["failed_turns"] == 1
    assert s["output_tokens"] == 30 and s["tokens_per_s"] == pytest.approx(15.0)
    assert s["ttft_p50_s"] == pytest.approx(0.2) and s["queue_max_s"] == pytest.approx(0.2)
    assert s["lost_sessions"] == 1 and s["refused"] == 2 and s["kv_restored"] == 2
    empty = bench.summarize([], wall_s=0.0)
    assert empty["tokens_per_s"] is None and empty["ttft_p95_s"] is None


def test_isolation_compares_each_conversation_turn_by_turn(bench):
    alone = [record(bench, 0, 0, "x"), record(bench, 0, 1, "y"), record(bench, 1, 0, "z")]
    loaded = [record(bench, 1, 0, "z"), record(bench, 0, 1, "Y"), record(bench, 0, 0, "x"), record(bench, 2, 0, "w")]
    iso = bench.isolation(alone, loaded)
    assert iso == {"conversations_compared": 2, "conversations_equal": 1, "turns_compared": 3,
                   "turns_equal": 2, "differ": [0],
                   "examples": [{"conversation": 0, "turn": 1, "alone": "y", "loaded": "Y"}]}


def test_tables_have_one_row_per_phase_and_the_ratio(bench):
    s = bench.summarize([record(bench, 0, 0)], wall_s=1.0)
    example = {"conversation": 8, "turn": 1, "alone": "It is.", "loaded": "Yes, it is.", "cold_prefill": "loaded"}
    results = {"phases": {"alone": s, "loaded": s, "abuse": s},
               "isolation": {"loaded": {"turns_equal": 1, "turns_compared": 1, "examples": [example]}},
               "evictions": {"loaded": {"kv": 3, "session": 0}},
               "abuser": {"long_generations": 2}, "p95_ttft_ratio": 1.5}
    lines = bench.tables(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert lines[1].count("---") == len(header)
    rows = [line for line in lines if line.startswith("| alone") or line.startswith("| loaded")
            or line.startswith("| abuse ")]
    assert len(rows) == 3 and all(len(r.strip("|").split("|")) == len(header) for r in rows)
    assert "| 1/1 turns |" in rows[1] and "| 3 | 0 |" in rows[1]
    assert "| long generations | 2 |" in lines and "**1.50x**" in lines[-1]
    assert ("loaded: conversation 8, turn 1 differs: alone 'It is.', under load 'Yes, it is.'; one cold "
            "prefill of the same conversation answers as loaded.") in lines


def test_flags_make_the_config(bench):
    cfg, as_json = bench.parse_args([])
    assert (cfg.conversations, cfg.principals, cfg.turns, cfg.max_tokens, cfg.abuse) == (16, 4, 3, 24, True)
    assert not as_json
    cfg, as_json = bench.parse_args(["--conversations", "2", "--no-abuse", "--alone", "1", "--json",
                                     "--churn-interval-ms", "5", "--edge-setting", "max_concurrent_per_principal=1",
                                     "--edge-setting", "prompt_format=plain"])
    assert cfg.conversations == 2 and not cfg.abuse and cfg.alone == 1 and as_json
    assert cfg.churn_interval_s == pytest.approx(0.005)
    assert cfg.edge_settings == {"max_concurrent_per_principal": 1, "prompt_format": "plain"}
    with pytest.raises(ValueError):
        bench.parse_edge_settings(["no-equals-sign"])
    with pytest.raises(ValueError):
        bench.Config(conversations=0)


def test_a_tiny_run_serves_every_turn_and_the_abuser_takes_no_session(bench):
    cfg = bench.Config(conversations=4, principals=2, turns=2, max_tokens=4, slots=2, abuser_head_start_s=0.2,
                       edge_settings={"max_output_tokens": 7})
    results = bench.run_benchmark(cfg, backend=FaultBackend(gate_open=True), progress=False)
    json.dumps(results, default=str)  # the --json output
    for phase in ("alone", "loaded", "abuse"):
        s = results["phases"][phase]
        assert s["turns"] == 8 and s["failed_turns"] == 0 and s["lost_sessions"] == 0, (phase, s)
        assert set(results["evictions"][phase]) == {"kv", "session", "ttl"}
    assert results["isolation"]["abuse"]["turns_equal"] == results["isolation"]["abuse"]["turns_compared"] == 8
    abuser = results["abuser"]
    assert abuser["long_generations"] >= 1 and abuser["sessions_opened"] >= 1 and abuser["stalled_streams"] >= 1
    assert results["server"]["max_output_tokens"] == 7
    assert results["p95_ttft_ratio"] > 0
    assert "| abuse |" in bench.tables(results)


@pytest.mark.slow
def test_the_command_runs_on_the_real_model_and_prints_json():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--conversations", "2", "--principals", "2", "--turns", "2",
         "--max-tokens", "4", "--abuser-streams", "1", "--abuser-max-tokens", "8", "--stalled-readers", "0",
         "--churn-interval-ms", "50", "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results["machine"]["cores"] >= 1 and results["server"]["backend"] == "llama_cpp"
    for phase in ("alone", "loaded", "abuse"):
        assert results["phases"][phase]["turns"] == 4 and results["phases"][phase]["lost_sessions"] == 0
    assert "turn" in proc.stderr  # the progress bar


def test_the_abuser_without_churn_opens_no_session_of_its_own(bench):
    cfg = bench.Config(conversations=2, principals=1, turns=1, max_tokens=4, alone=0, abuser_head_start_s=0.1,
                       churn_interval_s=0, stalled_readers=0, abuser_streams=1)
    results = bench.run_benchmark(cfg, backend=FaultBackend(gate_open=True), progress=False)
    assert results["abuser"]["sessions_opened"] == 0 and results["abuser"]["long_generations"] >= 1
    assert results["phases"]["abuse"]["turns"] == 2 and results["isolation"]["abuse"]["turns_compared"] == 0
