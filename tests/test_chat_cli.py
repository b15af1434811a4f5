"""``edgeroute chat`` and ``edgeroute demo`` end to end, as subprocesses (so stdout is what a user sees)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from device_runtime.runtime.dialogues import ScriptError, default_dialogues_path, load_dialogues, parse_script
from device_runtime.runtime.telemetry import validate_record

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-tokens", "6", "--threads", "1", "--n-ctx", "1024"]


def json_lines(stdout: str) -> list[dict]:
    records = [json.loads(line) for line in stdout.splitlines()]  # every line must be JSON
    for r in records:
        validate_record(r)
    return records


# --- script parsing (no models) ----------------------------------------------------


def test_script_lines_prompts_and_dialogues():
    items = parse_script([
        '{"prompt": "Hi"}',
        "",
        '{"task": "GR", "id": 7, "history": [{"user": "a", "bot": "x"}, {"user": "b"}]}',
    ], "s.jsonl")
    assert [(i.prompts, i.new_conversation) for i in items] == [(("Hi",), False), (("a", "b"), True)]
    assert items[1].source == "s.jsonl:3 (GR #7)"


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r"s.jsonl:2: not valid JSON"),
        ("[1, 2]", r"s.jsonl:2: expected a JSON object"),
        ('{"prompt": ""}', r"s.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": 3}', r"s.jsonl:2: 'prompt' must be"),
        ('{"prompt": "a", "history": []}', r"s.jsonl:2: expected exactly one"),
        ('{"text": "a"}', r"s.jsonl:2: expected exactly one"),
        ('{"history": []}', r"s.jsonl:2: 'history' must be a non-empty list"),
        ('{"history": [{"bot": "x"}]}', r"s.jsonl:2: history\[0\] needs"),
    ],
)
def test_malformed_script_lines_name_their_line(line, match):
    with pytest.raises(ScriptError, match=match):
        parse_script(['{"prompt": "ok"}', line], "s.jsonl")


def test_shipped_dialogues_are_mtbench101_format():
    items = load_dialogues()
    assert default_dialogues_path().is_file()
    assert len(items) >= 3 and all(i.new_conversation and len(i.prompts) >= 2 for i in items)
    for line in default_dialogues_path().read_text().splitlines():
        obj = json.loads(line)
        assert set(obj) == {"task", "id", "history"}
        assert all(set(t) == {"user", "bot"} for t in obj["history"])
    assert [len(i.prompts) for i in load_dialogues(limit=2, max_turns=1)] == [1, 1]
    with pytest.raises(ScriptError, match="MT-Bench-101 dialogue"):
        parse_script(['{"prompt": "x"}'], "d.jsonl", dialogues_only=True)


def test_chat_rejects_a_malformed_script_before_loading_models(run_cli, tmp_path):
    script = tmp_path / "bad.jsonl"
    script.write_text('{"prompt": "fine"}\n{"prompt": ""}\n')
    proc = run_cli("chat", "--script", str(script), "--json", timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{script}:2" in proc.stderr


def test_demo_rejects_a_missing_dialogues_file(run_cli, tmp_path):
    proc = run_cli("demo", "--dialogues", str(tmp_path / "none.jsonl"), timeout=60)
    assert proc.returncode == 2 and "cannot read" in proc.stderr and proc.stdout == ""


# --- end to end -------------------------------------------------------------------


@pytest.mark.slow
def test_chat_replays_a_script_with_json_only_on_stdout(run_cli, tmp_path, edge_server):
    script = tmp_path / "turns.jsonl"
    script.write_text(
        '{"history": [{"user": "Hi there.", "bot": ""}, {"user": "Name a colour.", "bot": ""}]}\n'
        '{"prompt": "And a fruit?"}\n'
        '{"history": [{"user": "New topic: a city?"}]}\n'
    )
    proc = run_cli("chat", "--edge", edge_server.target, "--policy", "random", "--seed", "1",
                     "--script", str(script), "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json_lines(proc.stdout)
    # The prompt line continues the dialogue; the second dialogue starts over.
    assert [r["turn"] for r in recs] == [1, 2, 3, 1]
    assert recs[3]["context_tokens"] == 0 and recs[2]["context_tokens"] > recs[1]["context_tokens"]
    assert all(r["policy"] == "random" and r["p"] is not None and not r["fallback"] for r in recs)
    assert "turns: 4" in proc.stderr


@pytest.mark.slow
def test_chat_with_the_edge_down_falls_back_and_exits_zero(free_port, run_cli, tmp_path):
    script = tmp_path / "turns.jsonl"
    script.write_text('{"prompt": "Hello."}\n{"prompt": "Name a colour."}\n')
    proc = run_cli("chat", "--edge", f"127.0.0.1:{free_port()}", "--policy", "edge",
                     "--script", str(script), "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json_lines(proc.stdout)
    assert [(r["target"], r["fallback"]) for r in recs] == [("device", True), ("device", True)]
    assert recs[1]["context_tokens"] > 0  # the conversation went on


@pytest.mark.slow
def test_interactive_chat_streams_and_starts_over_on_new(run_cli, edge_server):
    proc = run_cli("chat", "--edge", edge_server.target, "--policy", "device", *FAST,
                     stdin="Hello!\n\n/new\nHi again.\n/quit\nnever read\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Without --json the answers stream to stdout; status lines go to stderr.
    assert proc.stdout.strip()
    assert proc.stderr.count("[device p=-") == 2 and "[new conversation]" in proc.stderr
    proc = run_cli("chat", "--edge", edge_server.target, "--policy", "device", "--json", *FAST,
                     stdin="Hello!\n/new\nHi again.\n")
    assert [r["turn"] for r in json_lines(proc.stdout)] == [1, 1]


@pytest.mark.slow
def test_interactive_chat_keeps_going_after_a_line_it_cannot_send(edge_server):
    """Undecodable bytes and a prompt too long for the window are reported and
    skipped; the turns after them are answered (with --online, each record
    carries the estimates, as in script mode)."""
    long_prompt = "word " * 400
    proc = subprocess.run(
        [sys.executable, "-m", "device_runtime.cli.main", "chat", "--edge", edge_server.target, "--policy", "device",
         "--json", "--online", "--context-window", "200", *FAST],
        input=b"Hello!\n\xff\xfe oops\n" + long_prompt.encode() + b"\nName a colour.\n",
        capture_output=True, timeout=300, cwd=ROOT,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-2000:]
    recs = json_lines(proc.stdout.decode())
    assert [r["turn"] for r in recs] == [1, 2, 3]  # "\ufffd\ufffd oops" was sent as text
    assert all("overhead_s" in r["estimates"] for r in recs)
    assert err.count("[not sent:") == 1 and "context window leaves" in err


def test_chat_refuses_a_window_larger_than_the_model_s(run_cli, tmp_path):
    proc = run_cli("chat", "--policy", "device", "--n-ctx", "512", "--context-window", "1024",
                     "--max-tokens", "6", stdin="")
    assert proc.returncode == 2 and "cannot exceed the SLM's --n-ctx" in proc.stderr
    proc = run_cli("chat", "--policy", "device", "--n-ctx", "64", "--max-tokens", "64", stdin="")
    assert proc.returncode == 2 and "must be larger than --max-tokens" in proc.stderr


def test_script_files_with_a_bom_or_raw_line_separators_in_strings(tmp_path):
    from device_runtime.runtime.dialogues import load_script

    path = tmp_path / "s.jsonl"
    path.write_bytes("\ufeff".encode() + '{"prompt": "one\u2028two"}\r\n{"prompt": "three"}\n'.encode())
    items = load_script(path)
    assert [i.prompts for i in items] == [("one\u2028two",), ("three",)]


@pytest.mark.slow
def test_demo_json_plays_the_shipped_dialogues(run_cli, edge_server):
    # --edge reuses the module's server; the demo's own server start is covered below.
    proc = run_cli("demo", "--edge", edge_server.target, "--policy", "random", "--limit", "2",
                     "--max-turns", "2", "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json_lines(proc.stdout)
    assert [r["turn"] for r in recs] == [1, 2, 1, 2]
    assert "dlg turn target" in proc.stderr and "turns: 4" in proc.stderr


@pytest.mark.slow
def test_online_estimates_appear_in_the_telemetry(run_cli, edge_server):
    proc = run_cli("demo", "--edge", edge_server.target, "--policy", "random", "--limit", "1",
                     "--max-turns", "3", "--online", "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json_lines(proc.stdout)  # validates each record, the optional key included
    assert len(recs) == 3
    for rec in recs:
        est = rec["estimates"]
        assert {"bandwidth_tokens_per_s", "overhead_s"} <= set(est)
        assert est["bandwidth_tokens_per_s"] > 0 and est["overhead_s"] >= 0


@pytest.mark.slow
def test_demo_starts_its_own_edge_and_prints_a_table(run_cli, tmp_path):
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text('{"task": "T", "id": 1, "history": [{"user": "Hello.", "bot": ""}, {"user": "Bye.", "bot": ""}]}\n')
    proc = run_cli("demo", "--dialogues", str(dialogues), "--policy", "edge", "--edge-threads", "1",
                     "--edge-n-ctx", "1024", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["dlg", "turn", "target"]
    rows = [line.split() for line in lines[1:3]]
    assert [r[2] for r in rows] == ["edge", "edge"]  # no fallback: the edge was up
    assert any(line.startswith("turns: 2") for line in lines)


@pytest.mark.slow
def test_demo_with_the_default_router_bundle(run_cli, edge_server):
    from device_runtime.routing.bundle import default_bundle_dir

    if not (default_bundle_dir() / "manifest.json").is_file():
        pytest.skip("the default router bundle is not built yet")
    proc = run_cli("demo", "--edge", edge_server.target, "--limit", "1", "--max-turns", "2", "--json", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = json_lines(proc.stdout)
    assert len(recs) == 2 and all(r["policy"] == "auto" and r["p_fused"] is not None for r in recs)
