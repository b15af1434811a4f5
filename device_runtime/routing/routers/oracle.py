"""The oracle: knows each query's labels.  For evaluation only (upper bound)."""

from __future__ import annotations

from typing import Mapping, Sequence

from device_runtime.routing.routers.base import ROUTERS, Message, Router, RouterError


@ROUTERS.register("oracle")
class OracleRouter(Router):
    """Scores a prompt by its true benefit from the edge.

    ``labels`` maps a prompt to the quality gain of the edge over the device
    (e.g. 1 when only the strong model is correct, 0 when both agree, -1 when
    only the weak one is), scaled into [0, 1] by ``(gain - lo) / (hi - lo)``.
    """

    name = "oracle"
    tau_r = 0.0

    def __init__(self, labels: Mapping[str, float] | None = None) -> None:
        if not labels:
            raise RouterError("the oracle router needs labels; it exists for evaluation only")
        self._gain = dict(labels)
        lo, hi = min(self._gain.values()), max(self._gain.values())
        self._lo, self._span = lo, (hi - lo) or 1.0

    def score(self, prompt: str, context: Sequence[Message] = ()) -> float:
        try:
            gain = self._gain[prompt]
        except KeyError:
            raise RouterError("the oracle has no label for this prompt") from None
        return (gain - self._lo) / self._span
