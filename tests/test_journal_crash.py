"""The journal's kill harness: ``edgeroute chat --journal F --script S --json``
SIGKILLed at seeded random points of a turn, 20 times in a row on one
conversation, each run resuming the one before.

The points (``EDGEROUTE_FAULT=pause-at:POINT:TURN``, device_runtime/cli/faults.py):
before routing, in the middle of a device answer, in the middle of an edge
answer (a real edge service on loopback), and between the last token and the
journal write.  After each kill: ``PRAGMA integrity_check`` is ok, ``journal
show`` has exactly the turns completed so far (each once, never the
interrupted one), ``journal list`` names the interrupted message, and the
next ``--resume`` run says it was interrupted, numbers its turns on from the
journal and counts the journaled history in its first turn's
``context_tokens``.  Half of the runs start their script with the interrupted
message: it is then journaled once.  Last, the Python API resumes the
conversation and answers on the edge, whose session must then hold exactly
the journaled conversation.

Each run is one process with one SLM load (the smallest settings: 4 answer
tokens, n_ctx 512, no self-profile).
"""

from __future__ import annotations

import json
import random

import pytest

from _journal_kill import kill_at
from conftest import cli_env
from device_runtime.runtime.journal import Journal

ITERATIONS = 20
POINTS = ("before-routing", "device-answer", "edge-answer", "before-journal")
FAST = ["--max-tokens", "4", "--threads", "1", "--n-ctx", "512", "--no-self-profile", "--json", "--no-text"]


def _script(path, prompts) -> str:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def _journal_state(run_cli, path, env) -> tuple[list[dict], list[dict]]:
    """(``journal show --json`` through the CLI, the conversations as ``journal list --json`` has them)."""
    show = run_cli("journal", "show", str(path), "--json", env=env, timeout=60)
    assert show.returncode == 0, show.stderr
    with Journal(path, create=False) as j:
        listed = [c.to_dict() for c in j.conversations()]
    return [json.loads(x) for x in show.stdout.splitlines()], listed


def _check_resumed(records, stderr, expected, pending, slm) -> None:
    """A resumed run: told about the interrupted message, turns numbered on,
    the first turn's C_t is the journaled history."""
    if pending is not None:
        assert repr(pending) in stderr, stderr
    if records:
        assert records[0]["turn"] == len(expected) // 2 + 1
        assert records[0]["context_tokens"] == sum(slm.count_tokens(m) for m in expected)


@pytest.mark.slow
def test_kill_at_random_points_then_resume(run_cli, edge_server, slm, tmp_path):
    rng = random.Random(16)
    journal = tmp_path / "journal.sqlite3"
    env = cli_env(XDG_STATE_HOME=str(tmp_path / "xdg"))
    expected: list[str] = []  # the journaled messages' contents, in order
    pending = None
    for i in range(ITERATIONS):
        point = POINTS[i % len(POINTS)] if i < len(POINTS) else rng.choice(POINTS)
        prompts = [f"Say {i}-{k}." for k in range(2)]
        if pending is not None and rng.random() < 0.5:
            prompts = [pending, prompts[1]]  # the user sends the interrupted message again
        turn = rng.randint(1, 2)
        side = point == "edge-answer" or (point != "device-answer" and rng.random() < 0.5)
        policy = ["--policy", "edge", "--edge", edge_server.target] if side else ["--policy", "device"]
        args = ["chat", "--journal", str(journal), *(["--resume"] if i else []), *policy, *FAST,
                "--script", _script(tmp_path / f"s{i}.jsonl", prompts)]
        killed = kill_at(args, env, f"pause-at:{point}:{turn}")
        assert killed.paused == f"{point} turn {turn}", (i, killed.stderr)
        assert killed.returncode == -9
        if i:
            _check_resumed(killed.records, killed.stderr, expected, pending, slm)
        assert all(not r["fallback"] for r in killed.records)
        for prompt, _record in zip(prompts, killed.records):
            expected.append(prompt)
            expected.append(None)  # the answer: read back from the journal below
        with Journal(journal, create=False) as j:
            assert j.integrity_check() == "ok"
        shown, listed = _journal_state(run_cli, journal, env)
        assert len(listed) == 1 and listed[0]["turns"] == len(expected) // 2
        assert [m["role"] for m in shown] == ["user", "assistant"] * (len(expected) // 2)
        assert [m["turn"] for m in shown] == [k // 2 + 1 for k in range(len(expected))]
        for k, m in enumerate(shown):
            if expected[k] is None:
                expected[k] = m["content"]
            assert m["content"] == expected[k], (i, k)
        pending = prompts[turn - 1]
        assert listed[0]["pending"] == pending

    # Last, the Python API resumes it in this process and answers on the edge,
    # whose session then holds exactly the journaled conversation.
    from device_runtime.link.edge_client import EdgeClient
    from device_runtime.link.profile import live_cost_params
    from device_runtime.routing.policies import FixedPolicy
    from device_runtime.runtime.journal import record
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    edge = EdgeClient(edge_server.target, timeout_s=60)
    orch = Orchestrator(slm, FixedPolicy("edge"), live_cost_params(), edge=edge,
                        settings=OrchestratorSettings(max_tokens=4))
    with Journal(journal, create=False) as j:
        _, resumed = record(orch, j, resume=j.latest())
        assert resumed.pending == pending and resumed.messages == [
            {"role": ("user", "assistant")[k % 2], "content": c} for k, c in enumerate(expected)]
        result = orch.turn("Say done.")
        assert result.telemetry.target == "edge" and not result.telemetry.fallback
        assert result.telemetry.context_tokens == sum(slm.count_tokens(m) for m in expected)
        conv = j.load(resumed.id)
        held = [{"role": m.role, "content": m.content}
                for m in edge_server.servicer.pool.transcript(conv.edge_session)]
        assert held == conv.messages == orch.transcript and conv.pending is None
        users = [m["content"] for m in conv.messages if m["role"] == "user"]
        assert len(users) == len(set(users)) == conv.turns == len(expected) // 2 + 1
        orch.close()
        assert j.load(resumed.id).edge_session is None  # closed on the way out
    edge.close()
