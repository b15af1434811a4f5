"""The conversation journal: every turn on disk before and after it runs, so a
conversation survives the app being killed (issue 16, item 5).

A phone kills apps without warning, and the runtime keeps the conversation in
memory.  The journal is one SQLite file (the standard library's ``sqlite3``)
in WAL mode:

- before a turn is routed, its user message is written as a *pending* turn
  (:meth:`Journal.begin_turn`);
- when the turn ends, one transaction writes the answer, the turn's telemetry
  and the edge session id with the number of messages that session holds, and
  marks the turn complete (:meth:`Journal.complete_turn`);
- a turn that raised (a refused prompt, Ctrl-C) is deleted: the transcript
  never had it.

So after ``kill -9`` at any point the journal holds every complete turn and at
most one pending user message per conversation, never a half-written answer.
:meth:`Journal.load` gives both; :meth:`Orchestrator.resume
<device_runtime.runtime.orchestrator.Orchestrator.resume>` continues the
conversation from them.

``synchronous=FULL`` is the default: in WAL mode NORMAL loses no committed
transaction when the *process* dies (the WAL is in the OS page cache), but may
lose the last ones when the *power* goes, and a phone's battery dies too.
FULL syncs the WAL at each commit, two per turn; ``scripts/bench_journal.py``
measures what that costs (docs/device.md), milliseconds against a turn's
seconds.

The file is private (0600 with its -wal and -shm files, a directory it
creates 0700, deleted rows overwritten: ``secure_delete``), versioned (``application_id`` and ``user_version``) and
bounded: messages up to ``max_message_chars``, the ``keep`` most recent
conversations.

Use from Python::

    journal = Journal(default_journal_path())
    recorder = record(orch, journal, resume=journal.latest())   # or resume=None
    orch.turn("Hello")          # journaled
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence
from urllib.parse import quote

from device_runtime.core.flags import flag
from device_runtime.runtime.orchestrator import TurnHook

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.runtime.orchestrator import Orchestrator, TurnResult

log = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of a journal ("ERJ1"): a SQLite file of another
#: application is refused instead of written into.
APPLICATION_ID = 0x45524A31
#: ``PRAGMA user_version``: the schema below.  A newer file is refused.
SCHEMA_VERSION = 1
JOURNAL_NAME = "journal.sqlite3"

_SCHEMA = """
CREATE TABLE conversation (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system TEXT,
    edge_session TEXT,
    edge_seen INTEGER NOT NULL DEFAULT 0 CHECK (edge_seen >= 0)
);
CREATE INDEX conversation_updated ON conversation(updated);
CREATE TABLE turn (
    conversation INTEGER NOT NULL REFERENCES conversation(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL CHECK (turn >= 1),
    user TEXT NOT NULL,
    assistant TEXT,
    telemetry TEXT,
    started REAL NOT NULL,
    completed REAL,
    PRIMARY KEY (conversation, turn),
    CHECK ((assistant IS NULL) = (completed IS NULL))
) WITHOUT ROWID;
CREATE UNIQUE INDEX one_pending_turn ON turn(conversation) WHERE completed IS NULL;
"""


class JournalError(RuntimeError):
    """The journal cannot be opened, read or written; the message says which file and why."""


def default_journal_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/edgeroute/journal.sqlite3``, default ``~/.local/state/...``
    (the XDG Base Directory spec ignores a relative ``XDG_STATE_HOME``)."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if state and os.path.isabs(state) else Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return base / "edgeroute" / JOURNAL_NAME


@dataclass(frozen=True)
class JournalSettings:
    """Where the journal is and how much it keeps."""

    #: None: :func:`default_journal_path`.
    path: Path | None = field(default=None, metadata=flag(
        "the conversation journal (default: $XDG_STATE_HOME/edgeroute/journal.sqlite3)",
        name="--journal", metavar="FILE", dest="journal",
    ))
    #: Conversations kept; the least recently used beyond it are deleted when
    #: a new one starts.
    keep: int = field(default=100, metadata=flag(
        "conversations the journal keeps; older ones are deleted when a new one starts",
        name="--journal-keep", metavar="N", dest="journal_keep",
    ))
    #: SQLite ``synchronous``: ``full`` survives power loss, ``normal`` a killed process only.
    synchronous: str = field(default="full", metadata=flag(
        "SQLite synchronous: full survives power loss, normal only a killed process",
        name="--journal-sync", choices=("full", "normal"), dest="journal_sync",
    ))
    #: Longest message stored (characters); a longer prompt is refused.
    max_message_chars: int = 1_000_000
    #: How long a write waits for another process's write (a second ``chat``).
    busy_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.path is not None and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.keep, int) or not 1 <= self.keep <= 1_000_000:
            raise ValueError(f"journal keep must be an integer in [1, 1000000], got {self.keep!r}")
        if self.synchronous not in ("full", "normal"):
            raise ValueError(f"journal synchronous must be 'full' or 'normal', got {self.synchronous!r}")
        if not isinstance(self.max_message_chars, int) or self.max_message_chars < 1:
            raise ValueError(f"max_message_chars must be a positive integer, got {self.max_message_chars!r}")
        if not 0 < self.busy_timeout_s <= 600:
            raise ValueError(f"busy_timeout_s must be in (0, 600], got {self.busy_timeout_s!r}")

    @property
    def file(self) -> Path:
        return self.path if self.path is not None else default_journal_path()


@dataclass(frozen=True)
class ConversationInfo:
    """A line of ``edgeroute journal list``."""

    id: int
    created: float
    updated: float
    turns: int
    #: The interrupted user message (a pending turn), if any.
    pending: str | None
    edge_session: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"conversation": self.id, "created": self.created, "updated": self.updated,
                "turns": self.turns, "pending": self.pending, "edge_session": self.edge_session}


@dataclass(frozen=True)
class JournaledConversation:
    """What a resume needs: the complete turns and the interrupted message."""

    id: int
    #: The system message (if any), then a user/assistant pair per complete turn.
    messages: list[dict[str, str]]
    turns: int
    pending: str | None
    edge_session: str | None
    edge_seen: int
    #: The last complete turn's telemetry record, if any.
    last_telemetry: dict | None = None


def _make_private(path: Path) -> None:
    """Create ``path`` (0600, its directory 0700) or tighten an existing
    file's mode, and that of its ``-wal`` and ``-shm`` files (the WAL holds
    transcripts too); never through a symbolic link."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        _tighten(fd, path)
    finally:
        os.close(fd)
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            fd = os.open(side, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            _tighten(fd, side)
        finally:
            os.close(fd)


def _tighten(fd: int, path: Path) -> None:
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        os.fchmod(fd, 0o600)
        log.info("journal %s was mode %o: now 0600 (conversations are private)", path, mode)


class Journal:
    """One journal file.  ``create=False`` (the ``journal`` command): a missing
    file is an error instead of a new journal."""

    def __init__(self, path: str | Path | None = None, settings: JournalSettings | None = None,
                 *, create: bool = True) -> None:
        self.settings = settings or JournalSettings()
        self._lock = threading.RLock()
        self.path = Path(path) if path is not None else self.settings.file
        if create:
            try:
                _make_private(self.path)
            except OSError as exc:
                raise JournalError(f"cannot create the journal {self.path}: {exc.strerror or exc}") from None
        elif not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        try:
            self._con = sqlite3.connect(
                f"file:{quote(str(self.path.resolve()))}?mode=rw", uri=True,
                isolation_level=None, timeout=self.settings.busy_timeout_s,
                # Any thread may run the turns; self._lock keeps one statement sequence at a time.
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._con.close()
            raise JournalError(f"{self.path} is not a readable edgeroute journal ({exc})") from None
        except JournalError:
            self._con.close()
            raise

    def _setup(self) -> None:
        con = self._con
        app = con.execute("PRAGMA application_id").fetchone()[0]
        version = con.execute("PRAGMA user_version").fetchone()[0]
        objects = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app == 0 and version == 0 and objects == 0:
            self._create_schema()
        elif app != APPLICATION_ID:
            raise JournalError(f"{self.path} is an SQLite file of another application, not an edgeroute journal")
        elif version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path} has journal schema {version}, newer than this edgeroute's {SCHEMA_VERSION}: "
                "upgrade edgeroute"
            )
        elif version < 1:
            raise JournalError(f"{self.path} has an unknown journal schema {version}")
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise JournalError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        con.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
        con.execute("PRAGMA foreign_keys=ON")
        con.execute("PRAGMA secure_delete=ON")

    def _create_schema(self) -> None:
        with self._tx() as con:
            # Another process may have created it since we looked.
            if con.execute("PRAGMA user_version").fetchone()[0] == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    con.execute(statement)
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once: no deadlock between two writers)."""
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """One operation: under the lock, an SQLite error becomes a JournalError."""
        try:
            with self._lock:
                yield
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: {doing} failed ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing turns

    def _check_size(self, what: str, text: str) -> None:
        if len(text) > self.settings.max_message_chars:
            raise JournalError(
                f"the {what} is {len(text)} characters, more than the journal's "
                f"{self.settings.max_message_chars}"
            )

    def begin_turn(self, conversation: int | None, prompt: str, system: str | None = None) -> tuple[int, int]:
        """Record ``prompt`` as the pending turn of ``conversation`` (None: a new
        one, with ``system``); replaces an earlier pending turn (one that a kill
        interrupted).  Returns (conversation, turn number)."""
        self._check_size("prompt", prompt)
        now = time.time()
        created = conversation is None
        with self._errors("recording the prompt"), self._tx() as con:
            if created:
                conversation = con.execute(
                    "INSERT INTO conversation (created, updated, system) VALUES (?, ?, ?)", (now, now, system),
                ).lastrowid
            elif con.execute("SELECT 1 FROM conversation WHERE id = ?", (conversation,)).fetchone() is None:
                raise JournalError(f"conversation {conversation} is not in the journal {self.path} (removed?)")
            con.execute("DELETE FROM turn WHERE conversation = ? AND completed IS NULL", (conversation,))
            turn = con.execute(
                "SELECT coalesce(max(turn), 0) + 1 FROM turn WHERE conversation = ?", (conversation,),
            ).fetchone()[0]
            con.execute("INSERT INTO turn (conversation, turn, user, started) VALUES (?, ?, ?, ?)",
                        (conversation, turn, prompt, now))
            con.execute("UPDATE conversation SET updated = ? WHERE id = ?", (now, conversation))
        if created:
            self.prune(self.settings.keep)
        return conversation, turn

    def complete_turn(self, conversation: int, turn: int, answer: str, telemetry: Mapping[str, Any],
                      edge_session: str | None, edge_seen: int) -> None:
        """Write the answer, its telemetry and the edge session's state, and
        mark the turn complete: one transaction."""
        self._check_size("answer", answer)
        now = time.time()
        with self._errors("recording the answer"), self._tx() as con:
            cur = con.execute(
                "UPDATE turn SET assistant = ?, telemetry = ?, completed = ? "
                "WHERE conversation = ? AND turn = ? AND completed IS NULL",
                (answer, json.dumps(dict(telemetry), separators=(",", ":")), now, conversation, turn),
            )
            if cur.rowcount != 1:
                raise JournalError(f"turn {turn} of conversation {conversation} is not pending in {self.path}")
            con.execute("UPDATE conversation SET updated = ?, edge_session = ?, edge_seen = ? WHERE id = ?",
                        (now, edge_session, int(edge_seen) if edge_session else 0, conversation))

    def forget_edge_session(self, conversation: int) -> None:
        """The edge session was closed: a resume opens a new one at once
        instead of learning from a NOT_FOUND that it is gone."""
        with self._errors("forgetting the edge session"), self._tx() as con:
            con.execute("UPDATE conversation SET edge_session = NULL, edge_seen = 0 WHERE id = ?", (conversation,))

    def drop_pending(self, conversation: int, turn: int) -> None:
        """Forget a pending turn the conversation never took (it raised)."""
        with self._errors("dropping a refused turn"), self._tx() as con:
            con.execute("DELETE FROM turn WHERE conversation = ? AND turn = ? AND completed IS NULL",
                        (conversation, turn))

    # -- reading

    def conversations(self) -> list[ConversationInfo]:
        """Every conversation, the least recently used first."""
        with self._errors("listing conversations"):
            rows = self._con.execute(
                "SELECT c.id, c.created, c.updated, c.edge_session, "
                "(SELECT count(*) FROM turn t WHERE t.conversation = c.id AND t.completed IS NOT NULL), "
                "(SELECT user FROM turn t WHERE t.conversation = c.id AND t.completed IS NULL) "
                "FROM conversation c ORDER BY c.updated, c.id"
            ).fetchall()
        return [ConversationInfo(r[0], r[1], r[2], r[4], r[5], r[3]) for r in rows]

    def latest(self) -> int | None:
        """The most recently used conversation (None: the journal is empty)."""
        with self._errors("finding the latest conversation"):
            row = self._con.execute("SELECT id FROM conversation ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return None if row is None else row[0]

    def load(self, conversation: int) -> JournaledConversation:
        """The complete turns and the pending message of ``conversation``."""
        with self._errors(f"reading conversation {conversation}"):
            # One read transaction: a consistent snapshot while another process writes.
            self._con.execute("BEGIN")
            try:
                head = self._con.execute(
                    "SELECT system, edge_session, edge_seen FROM conversation WHERE id = ?", (conversation,),
                ).fetchone()
                rows = self._con.execute(
                    "SELECT turn, user, assistant, telemetry FROM turn WHERE conversation = ? ORDER BY turn",
                    (conversation,),
                ).fetchall()
            finally:
                self._con.execute("COMMIT")
        if head is None:
            raise JournalError(f"conversation {conversation} is not in the journal {self.path}")
        system, edge_session, edge_seen = head
        messages = [{"role": "system", "content": system}] if system else []
        pending, telemetry, turns = None, None, 0
        for _turn, user, assistant, tele in rows:
            if assistant is None:
                pending = user
                continue
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            turns += 1
            telemetry = json.loads(tele) if tele else None
        return JournaledConversation(conversation, messages, turns, pending, edge_session, edge_seen, telemetry)

    def messages(self, conversations: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
        """``{conversation, turn, role, content}`` per message of the complete
        turns (the system message is turn 0), conversation by conversation."""
        ids = [c.id for c in self.conversations()] if conversations is None else list(conversations)
        for cid in ids:
            conv = self.load(cid)
            start = 1 if conv.messages and conv.messages[0]["role"] == "system" else 0
            for i, m in enumerate(conv.messages):
                turn = 0 if i < start else (i - start) // 2 + 1
                yield {"conversation": cid, "turn": turn, "role": m["role"], "content": m["content"]}

    # -- maintenance

    def remove(self, conversations: Sequence[int]) -> int:
        """Delete conversations (their turns too); returns how many there were."""
        with self._errors("removing conversations"), self._tx() as con:
            n = sum(con.execute("DELETE FROM conversation WHERE id = ?", (c,)).rowcount for c in conversations)
        self._checkpoint()
        return n

    def prune(self, keep: int) -> int:
        """Keep the ``keep`` most recently used conversations; returns how many went."""
        with self._errors("applying the retention"), self._tx() as con:
            n = con.execute(
                "DELETE FROM conversation WHERE id NOT IN "
                "(SELECT id FROM conversation ORDER BY updated DESC, id DESC LIMIT ?)", (keep,),
            ).rowcount
        if n:
            self._checkpoint()
        return n

    def _checkpoint(self) -> None:
        """Copy the WAL into the file and empty it, so removed text leaves the WAL too."""
        try:
            with self._lock:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a reader holds the WAL: it is emptied later
            log.debug("checkpoint of %s deferred: %s", self.path, exc)

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` or what is wrong."""
        with self._errors("checking integrity"):
            rows = self._con.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(r[0] for r in rows)


class JournalRecorder(TurnHook):
    """Journals an orchestrator's turns (see the module docstring).

    ``conversation``: the journaled conversation the orchestrator continues
    (after :meth:`Orchestrator.resume`), None for a new one.  A new
    conversation in the orchestrator (``turn_index`` back to 0) starts a new
    one in the journal.
    """

    def __init__(self, journal: Journal, conversation: int | None = None, turns: int = 0) -> None:
        self.journal = journal
        self.conversation = conversation
        self._turns = turns
        self._pending: int | None = None

    def before_turn(self, orch: "Orchestrator") -> None:
        self._pending = None
        if orch.turn_index == 0 and self._turns:
            self.conversation, self._turns = None, 0

    def before_routing(self, orch: "Orchestrator", prompt: str) -> None:
        system = None
        if orch.transcript and orch.transcript[0]["role"] == "system":
            system = orch.transcript[0]["content"]
        self.conversation, self._pending = self.journal.begin_turn(self.conversation, prompt, system)

    def after_turn(self, orch: "Orchestrator", result: "TurnResult | None") -> None:
        turn, self._pending = self._pending, None
        if turn is None or self.conversation is None:
            return
        if result is None:
            try:
                self.journal.drop_pending(self.conversation, turn)
            except JournalError as exc:  # it is replaced by the next turn anyway
                log.warning("%s", exc)
            return
        session = orch.edge_session
        try:
            self.journal.complete_turn(self.conversation, turn, result.text, result.telemetry.to_dict(),
                                       session.id, session.seen)
        except JournalError as exc:
            # The answer was shown and the runtime holds the turn: a journal
            # that cannot take it (disk full, the conversation pruned by
            # another process) must not end the conversation.  Only a resume
            # would miss this turn (it offers the message again).
            log.error("turn %d answered but not journaled: %s", result.telemetry.turn, exc)
            return
        self._turns += 1

    def close(self, orch: "Orchestrator") -> None:
        # The orchestrator closes its edge session next (a clean exit).
        if self.conversation is not None and orch.edge_session.id is not None:
            try:
                self.journal.forget_edge_session(self.conversation)
            except JournalError as exc:  # a resume then reopens it after a NOT_FOUND
                log.warning("%s", exc)


def record(orch: "Orchestrator", journal: Journal, *, resume: int | None = None) -> tuple[JournalRecorder, JournaledConversation | None]:
    """Journal ``orch``'s turns from now on; with ``resume``, first continue
    that journaled conversation (its complete turns; its pending message is
    returned in ``.pending`` for the caller to offer again)."""
    resumed = None
    if resume is not None:
        resumed = journal.load(resume)
        orch.resume(resumed.messages, edge_session=resumed.edge_session, edge_seen=resumed.edge_seen)
    recorder = JournalRecorder(journal, resume, resumed.turns if resumed else 0)
    orch.add_hook(recorder)
    return recorder, resumed
