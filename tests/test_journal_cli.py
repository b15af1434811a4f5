"""Issue 16's journal contract, run as written, and the ``journal`` command's errors.

    edgeroute chat --journal FILE --script S --json          (then kill -9)
    edgeroute journal show FILE --json
    edgeroute chat --journal FILE --resume --script S2 --json
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from _journal_kill import kill_at
from conftest import cli_env
from device_runtime.runtime.journal import Journal
from device_runtime.runtime.telemetry import validate_record

S = ["Name a fruit.", "Name a color.", "Name an animal."]
S2 = ["Name a planet."]


def script(path, prompts) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def shown(run_cli, *args) -> list[dict]:
    proc = run_cli("journal", "show", *args, "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_the_contract_as_written(run_cli, tmp_path, slm):
    journal = tmp_path / "FILE"
    env = cli_env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    # kill -9 once the second turn's answer is complete but not yet journaled.
    killed = kill_at(["chat", "--journal", str(journal), "--script", script(tmp_path / "S", S), "--json"],
                     env, "pause-at:before-journal:2")
    assert killed.paused == "before-journal turn 2", killed.stderr
    assert killed.returncode == -9 and [r["turn"] for r in killed.records] == [1]

    messages = shown(run_cli, str(journal))
    assert all(set(m) == {"conversation", "turn", "role", "content"} for m in messages)
    assert [(m["conversation"], m["turn"], m["role"]) for m in messages] == [(1, 1, "user"), (1, 1, "assistant")]
    assert messages[0]["content"] == S[0]
    listed = json.loads(run_cli("journal", "list", str(journal), "--json", timeout=60).stdout)
    assert listed["turns"] == 1 and listed["pending"] == S[1]

    proc = run_cli("chat", "--journal", str(journal), "--resume", "--script", script(tmp_path / "S2", S2),
                   "--json", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    for r in records:
        validate_record(r)
    assert [r["turn"] for r in records] == [2]
    # C_t of the first resumed turn: the journaled history, in device-SLM tokens.
    history = sum(slm.count_tokens(m["content"]) for m in messages)
    assert records[0]["context_tokens"] == history > 0
    assert S[1] in proc.stderr and "not sent (script mode)" in proc.stderr  # offered, not re-sent
    after = shown(run_cli, str(journal))
    assert after[:2] == messages
    assert [m["content"] for m in after if m["role"] == "user"] == [S[0], *S2]
    assert not (tmp_path / "xdg").exists()  # --journal FILE: nothing in the default place


@pytest.mark.slow
def test_default_journal_and_the_interrupted_message_offered_again(run_cli, tmp_path):
    fast = ["--policy", "device", "--max-tokens", "4", "--threads", "1", "--n-ctx", "512"]
    env = cli_env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    default = tmp_path / "xdg" / "edgeroute" / "journal.sqlite3"
    killed = kill_at(["chat", *fast, "--script", script(tmp_path / "S", S[:2]), "--json"],
                     env, "pause-at:device-answer:2")
    assert killed.paused == "device-answer turn 2" and len(killed.records) == 1
    assert stat.S_IMODE(os.stat(default).st_mode) == 0o600
    # Interactively an empty line sends the interrupted message again, once.
    proc = run_cli("chat", *fast, "--resume", stdin="\n/quit\n", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "an empty line sends it again" in proc.stderr
    users = [m["content"] for m in shown(run_cli, str(default)) if m["role"] == "user"]
    assert users == S[:2]
    # --no-journal leaves the journal as it was.
    proc = run_cli("chat", *fast, "--no-journal", "--script", script(tmp_path / "S3", ["Hi."]),
                   "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with Journal(default, create=False) as j:
        assert [c.turns for c in j.conversations()] == [2]
    # A dialogue line in a resumed script starts a new conversation.
    dialogue = tmp_path / "D"
    dialogue.write_text(json.dumps({"history": [{"user": "Hello."}]}) + "\n")
    proc = run_cli("chat", *fast, "--resume", "--script", str(dialogue), "--json", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["turn"] == 1 and json.loads(proc.stdout)["context_tokens"] == 0
    listed = [json.loads(x) for x in run_cli("journal", "list", "--json", env=env, timeout=60).stdout.splitlines()]
    assert [c["turns"] for c in listed] == [2, 1]
    proc = run_cli("journal", "rm", "--conversation", str(listed[0]["conversation"]), env=env, timeout=60)
    assert proc.returncode == 0 and "removed 1" in proc.stderr
    assert [m["turn"] for m in shown(run_cli, str(default))] == [1, 1]


def test_journal_errors_are_clear_and_come_before_any_model_loads(run_cli, tmp_path):
    env = cli_env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a database" * 300)
    cases = [
        (["journal", "show", str(tmp_path / "absent")], "no journal at"),
        (["journal", "list", str(junk)], "not a readable edgeroute journal"),
        (["journal", "list"], "no journal at"),
        (["chat", "--journal", str(junk), "--script", str(junk)], ""),  # the script fails first
        (["chat", "--journal", str(junk), "--policy", "device"], "not a readable edgeroute journal"),
        (["chat", "--journal", str(tmp_path / "new"), "--resume"], "has no conversation"),
        (["chat", "--journal", str(tmp_path / "new"), "--conversation", "4"], "conversation 4 is not in"),
        (["chat", "--no-journal", "--resume"], "--resume and --conversation need the journal"),
        (["chat", "--journal-keep", "0"], "journal keep must be"),
    ]
    for args, message in cases:
        proc = run_cli(*args, env=env, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    Journal(tmp_path / "empty").close()
    proc = run_cli("journal", "rm", str(tmp_path / "empty"), env=env, timeout=60)
    assert proc.returncode == 2 and "exactly one of" in proc.stderr
    assert run_cli("journal", "show", str(tmp_path / "empty"), "--json", env=env, timeout=60).stdout == ""
