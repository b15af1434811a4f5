"""The conversation journal (device_runtime/runtime/journal.py): a real SQLite
file in WAL mode; the last tests run it under the real orchestrator and SLM."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading

import pytest

from device_runtime.runtime.journal import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    Journal,
    JournalError,
    JournalSettings,
    default_journal_path,
    record,
)

TELE = {"turn": 1, "target": "device"}


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "state" / "j.sqlite3")
    yield j
    j.close()


def test_schema_is_versioned_in_wal_mode_with_the_chosen_sync(journal):
    con = journal._con
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversation", "turn"} <= tables
    with Journal(journal.path, JournalSettings(synchronous="normal")) as again:  # reopens, no new schema
        assert again._con.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert again.integrity_check() == "ok"


def test_a_turn_is_pending_then_complete_in_one_step(journal):
    cid, turn = journal.begin_turn(None, "first?", system="be brief")
    assert turn == 1
    conv = journal.load(cid)
    assert (conv.turns, conv.pending, conv.messages) == (0, "first?", [{"role": "system", "content": "be brief"}])
    assert list(journal.messages()) == [{"conversation": cid, "turn": 0, "role": "system", "content": "be brief"}]
    journal.complete_turn(cid, turn, "answer one", TELE, "sess-1", 3)
    conv = journal.load(cid)
    assert conv.pending is None and conv.turns == 1
    assert conv.messages[1:] == [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "answer one"}]
    assert (conv.edge_session, conv.edge_seen, conv.last_telemetry) == ("sess-1", 3, TELE)
    with pytest.raises(JournalError, match="not pending"):
        journal.complete_turn(cid, turn, "again", TELE, None, 0)
    # A kill leaves a pending turn; the next turn replaces it under the same number.
    assert journal.begin_turn(cid, "interrupted") == (cid, 2)
    assert journal.begin_turn(cid, "asked instead") == (cid, 2)
    assert journal.load(cid).pending == "asked instead"
    journal.drop_pending(cid, 2)  # the turn raised: the transcript never had it
    assert journal.load(cid).pending is None
    assert [m["content"] for m in journal.messages([cid])] == ["be brief", "first?", "answer one"]
    # The database itself refuses a half-written turn and a second pending one.
    with pytest.raises(sqlite3.IntegrityError):
        journal._con.execute("INSERT INTO turn (conversation, turn, user, assistant, started) "
                             "VALUES (?, 9, 'u', 'a', 0)", (cid,))
    journal.begin_turn(cid, "p")
    with pytest.raises(sqlite3.IntegrityError):
        journal._con.execute("INSERT INTO turn (conversation, turn, user, started) VALUES (?, 9, 'u', 0)", (cid,))


def test_unknown_conversation_and_oversized_messages_are_refused(tmp_path):
    with Journal(tmp_path / "j", JournalSettings(max_message_chars=10)) as j:
        with pytest.raises(JournalError, match="conversation 7 is not in the journal"):
            j.begin_turn(7, "hi")
        with pytest.raises(JournalError, match="11 characters"):
            j.begin_turn(None, "x" * 11)
        assert j.conversations() == []
        cid, turn = j.begin_turn(None, "ok")
        with pytest.raises(JournalError, match="answer is 12"):
            j.complete_turn(cid, turn, "y" * 12, TELE, None, 0)
        assert j.load(cid).pending == "ok"  # offered again on resume, never half-written
        with pytest.raises(JournalError, match="is not in the journal"):
            j.load(99)


def test_retention_keeps_the_most_recently_used_conversations(tmp_path):
    with Journal(tmp_path / "j", JournalSettings(keep=3)) as j:
        ids = []
        for k in range(5):
            cid, turn = j.begin_turn(None, f"conversation {k}")
            j.complete_turn(cid, turn, "a", TELE, None, 0)
            ids.append(cid)
            if k == 2:
                j.begin_turn(ids[0], "the first one again")  # used again: kept
        assert [c.id for c in j.conversations()] == [ids[0], ids[3], ids[4]]
        assert j.latest() == ids[4]
        assert j.prune(1) == 2 and [c.id for c in j.conversations()] == [ids[4]]
        assert j.remove([ids[4], 12345]) == 1 and j.latest() is None
        # Ids are never reused: a removed conversation cannot be resumed by mistake.
        assert j.begin_turn(None, "new")[0] > ids[4]
    with pytest.raises(ValueError, match="keep"):
        JournalSettings(keep=0)


def test_a_reader_sees_committed_turns_while_a_writer_works(tmp_path):
    path = tmp_path / "j"
    writer, reader = Journal(path), Journal(path, create=False)
    cid, turn = writer.begin_turn(None, "q0")
    writer.complete_turn(cid, turn, "a0", TELE, None, 0)
    with writer._tx() as con:  # a write transaction left open: the reader is not blocked
        con.execute("INSERT INTO turn (conversation, turn, user, started) VALUES (?, 2, 'uncommitted', 0)", (cid,))
        assert reader.load(cid).pending is None and reader.load(cid).turns == 1

    errors, seen = [], []

    def write() -> None:
        try:
            for k in range(1, 120):
                _, t = writer.begin_turn(cid, f"q{k}")
                writer.complete_turn(cid, t, f"a{k}", TELE, None, 0)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    while thread.is_alive():
        conv = reader.load(cid)
        pairs = conv.messages
        assert len(pairs) == 2 * conv.turns
        assert [m["content"] for m in pairs] == [x for k in range(conv.turns) for x in (f"q{k}", f"a{k}")]
        seen.append(conv.turns)
    thread.join()
    assert not errors and seen == sorted(seen) and reader.load(cid).turns == 120
    writer.close(), reader.close()


def test_corrupt_foreign_newer_and_missing_files_give_a_clear_error(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(JournalError, match="junk is not a readable edgeroute journal"):
        Journal(junk)
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (x)")
    con.commit(), con.close()
    with pytest.raises(JournalError, match="another application"):
        Journal(foreign)
    newer = tmp_path / "newer"
    Journal(newer).close()
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit(), con.close()
    with pytest.raises(JournalError, match="newer than this edgeroute"):
        Journal(newer)
    with pytest.raises(JournalError, match="no journal at"):
        Journal(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    # A file whose pages were damaged: the error names the file, or the check finds it.
    damaged = tmp_path / "damaged"
    with Journal(damaged) as j:
        for k in range(50):
            j.complete_turn(*j.begin_turn(None, f"q{k}" * 100), "a" * 500, TELE, None, 0)
    data = bytearray(damaged.read_bytes())
    data[4096:8192] = os.urandom(4096)
    damaged.write_bytes(bytes(data))
    try:
        with Journal(damaged) as j:
            report = j.integrity_check()
            list(j.messages())
    except JournalError as exc:
        assert str(damaged) in str(exc)
    else:
        assert report != "ok"


def test_files_are_private(tmp_path):
    path = tmp_path / "new" / "edgeroute" / "j.sqlite3"
    with Journal(path) as j:
        j.begin_turn(None, "secret")
        assert mode(path) == 0o600 and mode(path.parent) == 0o700
        for suffix in ("-wal", "-shm"):
            assert mode(f"{path}{suffix}") == 0o600
    loose = tmp_path / "loose"
    Journal(loose).close()
    os.chmod(loose, 0o644)
    Journal(loose).close()
    assert mode(loose) == 0o600


def test_default_path_follows_xdg_state_home(tmp_path):
    assert default_journal_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == \
        default_journal_path({"XDG_STATE_HOME": "/s"}).parent / "journal.sqlite3"
    assert str(default_journal_path({"XDG_STATE_HOME": "/s"})) == "/s/edgeroute/journal.sqlite3"
    # A relative XDG_STATE_HOME is ignored (XDG Base Directory spec).
    assert str(default_journal_path({"XDG_STATE_HOME": "rel", "HOME": "/h"})) == \
        "/h/.local/state/edgeroute/journal.sqlite3"


# --- under the real orchestrator and SLM -----------------------------------------------


def _orchestrator(slm, **settings):
    from device_runtime.link.profile import live_cost_params
    from device_runtime.routing.policies import FixedPolicy
    from device_runtime.runtime.orchestrator import Orchestrator, OrchestratorSettings

    settings.setdefault("max_tokens", 6)
    return Orchestrator(slm, FixedPolicy("device"), live_cost_params(), settings=OrchestratorSettings(**settings))


@pytest.mark.slow
def test_recorder_journals_turns_and_a_resumed_orchestrator_continues(slm, journal):
    from device_runtime.llm.conversation import ContextOverflowError

    orch = _orchestrator(slm, system_prompt="Answer briefly.", context_window=200)
    recorder, resumed = record(orch, journal)
    assert resumed is None
    first = orch.turn("What is 2+2?")
    orch.turn("And 3+3?")
    with pytest.raises(ContextOverflowError):
        orch.turn("word " * 400)  # refused before routing: nothing journaled
    cid = recorder.conversation
    conv = journal.load(cid)
    assert conv.pending is None and conv.turns == 2 and conv.messages == orch.transcript
    assert conv.last_telemetry["turn"] == 2
    context = orch.ledger.context_tokens

    orch.new_conversation()
    orch.turn("Hello")
    assert recorder.conversation != cid and journal.load(recorder.conversation).turns == 1

    # A new process: a new orchestrator continues the first conversation.
    again = _orchestrator(slm)
    _, resumed = record(again, journal, resume=cid)
    assert again.transcript == conv.messages and again.turn_index == 2
    result = again.turn("And 4+4?")
    assert result.telemetry.turn == 3 and result.telemetry.context_tokens == context
    assert [m["content"] for m in journal.load(cid).messages][-2:] == ["And 4+4?", result.text]
    assert first.text == journal.load(cid).messages[2]["content"]


@pytest.mark.slow
def test_resume_refuses_a_transcript_that_is_not_user_assistant_pairs(slm):
    orch = _orchestrator(slm)
    with pytest.raises(ValueError, match="user/assistant pairs"):
        orch.resume([{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="edge_seen"):
        orch.resume([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], edge_seen=2)
    assert orch.transcript == [] and orch.turn_index == 0
