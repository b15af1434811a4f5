"""``edgeroute journal``: list, show and remove journaled conversations.

    edgeroute journal list [FILE] [--json]
    edgeroute journal show [FILE] [--conversation ID]... [--json]
    edgeroute journal rm [FILE] (--conversation ID... | --all | --keep N)

FILE defaults to the journal ``edgeroute chat`` writes
($XDG_STATE_HOME/edgeroute/journal.sqlite3).  ``show --json`` prints one
object per message of the complete turns: ``{"conversation", "turn", "role",
"content"}`` (a system message is turn 0); an interrupted user message is not
a message of the conversation (``list`` shows it as ``pending``).  The
journal may be read while a ``chat`` writes it.

Also here: the journal flags of ``chat`` (:class:`ChatJournalSettings`) and
how ``chat`` opens and resumes a journal (:func:`open_for_chat`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

from device_runtime.core.flags import add_flags, flag, from_args
from device_runtime.runtime.journal import Journal, JournalError, JournalSettings, default_journal_path


@dataclass(frozen=True)
class ChatJournalSettings:
    """``chat``'s journal options beyond :class:`JournalSettings`."""

    no_journal: bool = field(default=False, metadata=flag("do not journal this chat"))
    resume: bool = field(default=False, metadata=flag(
        "continue the most recently used conversation of the journal"
    ))
    conversation: int | None = field(default=None, metadata=flag(
        "continue this journaled conversation (an id from `edgeroute journal list`)", metavar="ID",
    ))

    def __post_init__(self) -> None:
        if self.no_journal and (self.resume or self.conversation is not None):
            raise ValueError("--resume and --conversation need the journal (not --no-journal)")
        if self.resume and self.conversation is not None:
            raise ValueError("give --resume or --conversation ID, not both")


def add_chat_journal_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversation journal (docs/device.md)")
    add_flags(g, JournalSettings)
    add_flags(g, ChatJournalSettings)


def open_for_chat(args: argparse.Namespace):
    """(the journal or None, the conversation id to resume or None) from
    ``chat``'s flags; raises ValueError/JournalError before any model loads."""
    chat = from_args(ChatJournalSettings, args)
    if chat.no_journal:
        return None, None
    settings = from_args(JournalSettings, args)
    try:
        journal = Journal(settings.file, settings)
    except JournalError as exc:
        raise JournalError(f"{exc} (--journal FILE for another file, --no-journal for none)") from None
    resume = chat.conversation
    if chat.resume:
        resume = journal.latest()
        if resume is None:
            journal.close()
            raise JournalError(f"--resume: the journal {journal.path} has no conversation")
    if resume is not None:
        journal.load(resume)  # not there: the error now
    return journal, resume


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "journal", help="list, show or remove journaled conversations",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="journal_command", metavar="ACTION", required=True)
    for name, help_text in (("list", "the conversations"), ("show", "the messages of complete turns"),
                            ("rm", "remove conversations")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("file", nargs="?", metavar="FILE", help=f"the journal (default: {default_journal_path()})")
        if name != "list":
            q.add_argument("--conversation", type=int, action="append", metavar="ID",
                           help="this conversation (repeat for more)")
        if name == "rm":
            q.add_argument("--all", action="store_true", help="every conversation")
            q.add_argument("--keep", type=int, metavar="N", help="all but the N most recently used")
        else:
            q.add_argument("--json", action="store_true", help="one JSON object per line")
        q.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        with Journal(args.file or default_journal_path(), create=False) as journal:
            return {"list": _list, "show": _show, "rm": _rm}[args.journal_command](journal, args)
    except (JournalError, ValueError) as exc:
        print(f"edgeroute journal {args.journal_command}: {exc}", file=sys.stderr)
        return 2


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _list(journal: Journal, args: argparse.Namespace) -> int:
    for c in journal.conversations():
        if args.json:
            print(json.dumps(c.to_dict(), ensure_ascii=False))
            continue
        pending = "" if c.pending is None else f"  interrupted: {c.pending[:60]!r}"
        print(f"{c.id:>6}  {_when(c.updated)}  {c.turns:>4} turns{pending}")
    return 0


def _show(journal: Journal, args: argparse.Namespace) -> int:
    for m in journal.messages(args.conversation):
        if args.json:
            print(json.dumps(m, ensure_ascii=False))
        else:
            print(f"[{m['conversation']}.{m['turn']} {m['role']}] {m['content']}")
    return 0


def _rm(journal: Journal, args: argparse.Namespace) -> int:
    given = [args.conversation is not None, args.all, args.keep is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of --conversation ID (repeatable), --all or --keep N")
    if args.keep is not None:
        if args.keep < 0:
            raise ValueError(f"--keep must be >= 0, got {args.keep}")
        n = journal.prune(args.keep)
    else:
        ids = args.conversation if args.conversation is not None else [c.id for c in journal.conversations()]
        n = journal.remove(ids)
        missing = len(ids) - n
        if missing and args.conversation is not None:
            print(f"edgeroute journal rm: {missing} of the given conversations were not in the journal",
                  file=sys.stderr)
    print(f"removed {n} conversation(s)", file=sys.stderr)
    return 0


def attach_for_chat(orch, journal: Journal | None, resume: int | None, environ) -> str | None:
    """Resume and journal ``orch`` as ``chat`` does, with the crash tests'
    fault hook (see :mod:`device_runtime.cli.faults`) when ``environ`` asks
    for one; returns the interrupted user message of a resumed conversation."""
    from device_runtime.cli.faults import PauseHook, fault_from_env
    from device_runtime.runtime.journal import record

    fault = fault_from_env(environ)
    pause = PauseHook(fault) if fault is not None else None
    if pause is not None and fault.point == "before-journal":
        orch.add_hook(pause)  # its after_turn runs before the journal's
        pause = None
    resumed = None
    if journal is not None:
        _, resumed = record(orch, journal, resume=resume)
    if pause is not None:
        orch.add_hook(pause)
    if resumed is None:
        return None
    print(f"[resumed conversation {resumed.id} of {journal.path}: {resumed.turns} turn(s)]",
          file=sys.stderr, flush=True)
    return resumed.pending
