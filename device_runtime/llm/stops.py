"""Cutting a streamed answer at its stop strings.

Text is streamed a token at a time, and a stop string can span tokens, so the
filter holds back any tail that could still become one; the caller never sees
a piece of a stop string it later has to take back.
"""

from __future__ import annotations

from typing import Sequence


class StopFilter:
    """Holds back text that could be the start of a stop string.

    Stop strings are matched in the text as generated; ``lstrip`` strips the
    answer's leading whitespace from what is emitted only (a stop string that
    starts with a newline, such as the plain format's ``"\\nUser:"``, must
    still match at the very start of an answer).
    """

    def __init__(self, stop: Sequence[str], lstrip: bool) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""
        self.lstrip = lstrip
        self.stopped = False

    def _emit(self, out: str) -> str:
        if self.lstrip:
            out = out.lstrip()
            if not out:
                return ""
            self.lstrip = False
        return out

    def feed(self, text: str) -> str:
        """The part of ``pending + text`` that can no longer be (part of) a stop string."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return self._emit(out)
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return self._emit(out)

    def flush(self) -> str:
        """What was held back, at the end of the answer (nothing once stopped)."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return self._emit(out)
