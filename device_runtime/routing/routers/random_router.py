"""The paper's baseline: p ~ U(0, 1), router time zero (Sec. IV-A)."""

from __future__ import annotations

import random
from typing import Sequence

from device_runtime.routing.routers.base import ROUTERS, Message, Router


@ROUTERS.register("random")
class RandomRouter(Router):
    name = "random"
    tau_r = 0.0

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    def score(self, prompt: str, context: Sequence[Message] = ()) -> float:
        return self._rng.random()
