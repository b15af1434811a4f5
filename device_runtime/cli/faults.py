"""Fault injection for crash tests: ``EDGEROUTE_FAULT=pause-at:POINT[:TURN]``.

The journal's kill harness (tests/test_journal_crash.py) needs the process
stopped at a known point of a turn so that it can ``kill -9`` it there.  With
this variable set, ``edgeroute chat`` prints ``edgeroute-fault: paused at
POINT turn N`` on stderr when the TURN-th turn of this process (default 1)
reaches POINT, then sleeps (at most ``PAUSE_S``, then carries on):

- ``before-routing``: the prompt is journaled as pending, nothing routed yet;
- ``device-answer`` / ``edge-answer``: the first chunk of the answer on that
  side was streamed;
- ``before-journal``: the answer is complete, the journal not yet written.

Faults only stop the process; nothing is replaced.  The variable is read by
the command (here), never by the library.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from device_runtime.runtime.orchestrator import TurnHook

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.runtime.orchestrator import Orchestrator, TurnResult

ENV_FAULT = "EDGEROUTE_FAULT"
POINTS = ("before-routing", "device-answer", "edge-answer", "before-journal")
#: The longest pause: a harness that never kills does not hang CI.
PAUSE_S = 300.0


@dataclass(frozen=True)
class Fault:
    point: str
    turn: int = 1

    @classmethod
    def parse(cls, value: str) -> "Fault":
        parts = value.split(":")
        if len(parts) not in (2, 3) or parts[0] != "pause-at" or parts[1] not in POINTS:
            raise ValueError(f"{ENV_FAULT} must be pause-at:POINT[:TURN], POINT one of {', '.join(POINTS)}; "
                             f"got {value!r}")
        try:
            turn = int(parts[2]) if len(parts) == 3 else 1
        except ValueError:
            turn = 0
        if turn < 1:
            raise ValueError(f"{ENV_FAULT}: TURN must be a positive integer, got {value!r}")
        return cls(parts[1], turn)


def fault_from_env(environ: Mapping[str, str]) -> Fault | None:
    value = environ.get(ENV_FAULT)
    return Fault.parse(value) if value else None


class PauseHook(TurnHook):
    """Pauses the process at ``fault.point`` of the ``fault.turn``-th turn.

    ``before-journal`` must be added before the journal's hook (its
    ``after_turn`` runs first), the others after it."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self._turn = 0
        self._paused = False

    def _at(self, point: str) -> None:
        if self._paused or point != self.fault.point or self._turn != self.fault.turn:
            return
        self._paused = True
        sys.stdout.flush()
        # On a line of its own: streamed answer text may be on stderr without its newline yet.
        print(f"\nedgeroute-fault: paused at {point} turn {self._turn}", file=sys.stderr, flush=True)
        time.sleep(PAUSE_S)

    def before_turn(self, orch: "Orchestrator") -> None:
        self._turn += 1

    def before_routing(self, orch: "Orchestrator", prompt: str) -> None:
        self._at("before-routing")

    def on_chunk(self, orch: "Orchestrator", target: str, chunk: str) -> None:
        self._at(f"{target}-answer")

    def after_turn(self, orch: "Orchestrator", result: "TurnResult | None") -> None:
        if result is not None:
            self._at("before-journal")
