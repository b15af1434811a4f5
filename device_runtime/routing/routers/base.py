"""The router interface and its name registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterable, Sequence, TypedDict

from device_runtime.core.registry import Registry
from device_runtime.routing import cost_model


class Message(TypedDict):
    role: str  # "user" | "assistant"
    content: str


class RouterError(RuntimeError):
    """A router could not be built or could not score its input."""


class Router(ABC):
    """Scores a turn: p in [0, 1], higher means the edge LLM is more likely needed."""

    #: Registry name.
    name: str = ""
    #: Router per-token time τ_r this router costs, or None to take the cost
    #: parameters' value.  The random baseline costs nothing (paper, Sec. IV-A).
    tau_r: float | None = None

    @abstractmethod
    def score(self, prompt: str, context: Sequence[Message] = ()) -> float:
        """Return p for ``prompt`` given the earlier turns ``context``."""

    def score_batch(self, items: Iterable[tuple[str, Sequence[Message]]]) -> list[float]:
        """Score many turns; routers with a batched backend override this."""
        return [self.score(prompt, context) for prompt, context in items]

    def cost_params(self, params: cost_model.CostParams) -> cost_model.CostParams:
        """The cost parameters with this router's τ_r applied."""
        return params if self.tau_r is None else params.with_(tau_r=self.tau_r)

    def decide(
        self,
        params: cost_model.CostParams,
        turn: cost_model.TurnInputs,
        threshold: float,
        prompt: str,
        context: Sequence[Message] = (),
    ) -> cost_model.Decision:
        """Score the turn, fuse with the latency gap (eq. 11) and threshold it (eq. 12)."""
        p = self.score(prompt, context)
        return cost_model.decide(self.cost_params(params), turn, p, threshold)


RouterFactory = Callable[..., Router]

#: Name -> router class (keyword arguments go to its constructor).  The
#: built-in routers' modules are imported only when asked for, so that a
#: device without the optional dependencies (onnxruntime for ``bert``) can
#: still list and use the others.
ROUTERS: Registry[RouterFactory] = Registry(
    "router",
    lazy={
        "random": "device_runtime.routing.routers.random_router",
        "oracle": "device_runtime.routing.routers.oracle",
        "bert": "device_runtime.routing.routers.bert",
    },
    error=RouterError,
)


def check_score(p: float, router: str) -> float:
    """Validate a score a router produced."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise RouterError(f"router {router!r} produced p={p!r}, outside [0, 1]")
    return p


