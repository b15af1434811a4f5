"""Routing policies: where each turn runs (paper, Sec. II-C and IV-A).

A policy sees the cost parameters, the turn's inputs and the dialogue, and
returns a :class:`PolicyDecision` with both predicted latencies (eqs. 6-7):

- ``auto``: the router's p fused with the latency gap (eq. 11), thresholded
  (eq. 12);
- ``device`` / ``edge``: always that target, no router (T_router = 0);
- ``random``: the paper's baseline, p ~ U(0, 1) fused and thresholded like
  ``auto``, with no router time.

Policies are built by name from :data:`POLICIES`, whose names are the CLI's
``--policy`` choices, with :class:`PolicySettings`.  The module is in the
routing layer: it predicts and decides, and knows nothing of the SLM, the
link or the orchestrator that plays the decision.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from device_runtime.core.flags import flag
from device_runtime.core.registry import Registry
from device_runtime.routing import cost_model
from device_runtime.routing.cost_model import CostParams, Target, TurnInputs
from device_runtime.routing.routers.base import ROUTERS, Router


@dataclass(frozen=True)
class PolicyDecision:
    """Where a turn goes, with the scores and both predicted latencies (eqs. 6-7).

    ``params`` and ``inputs`` are the cost parameters and turn inputs the
    prediction used (None from a policy that predicts nothing).
    """

    target: Target
    p: float | None
    p_fused: float | None
    predicted_s: dict[str, float]
    params: CostParams | None = None
    inputs: TurnInputs | None = None

    def posthoc_s(self, target: Target, response_tokens: int) -> float | None:
        """T_total of ``target`` (eq. 6 or 7) with the answer's actual length
        ``response_tokens`` in place of L̄_r, all else as predicted; None
        without ``params`` and ``inputs``."""
        if self.params is None or self.inputs is None:
            return None
        if isinstance(response_tokens, bool) or not isinstance(response_tokens, int) or response_tokens < 0:
            raise ValueError(f"response_tokens must be a non-negative integer, got {response_tokens!r}")
        field_name = "response_device" if target == "device" else "response_edge"
        inputs = replace(self.inputs, **{field_name: response_tokens})
        return cost_model.latency(self.params, inputs, target).total_s


def _predictions(params: CostParams, turn: TurnInputs) -> dict[str, float]:
    return {t: cost_model.latency(params, turn, t).total_s for t in cost_model.TARGETS}


class Policy(ABC):
    """Chooses a target for a turn."""

    name: str = ""

    @abstractmethod
    def choose(
        self, params: CostParams, turn: TurnInputs, prompt: str, context: Sequence[dict]
    ) -> PolicyDecision:
        """Decide where the turn runs."""


class AutoPolicy(Policy):
    """The paper's rule: p̃ = p − α(T^e − T^s) (eq. 11), edge iff p̃ > θ (eq. 12).

    ``skip_settled``: when the latency term alone decides (the same target for
    every p in [0, 1], :func:`cost_model.settled_target`), the router is not
    run: the same decision without T_router (e.g. every turn on a badly
    degraded link).  The telemetry's ``p`` and ``p_fused`` are then null.
    """

    name = "auto"

    def __init__(self, router: Router, threshold: float, *, skip_settled: bool = True) -> None:
        self.router = router
        self.threshold = threshold
        self.skip_settled = skip_settled

    def choose(self, params, turn, prompt, context):
        if self.skip_settled:
            rp = self.router.cost_params(params)
            settled = cost_model.settled_target(rp, turn, self.threshold)
            if settled is not None:
                no_router = replace(turn, router_tokens=0)
                return PolicyDecision(settled, None, None, _predictions(rp, no_router), params=rp, inputs=no_router)
        d = self.router.decide(params, turn, self.threshold, prompt, context)
        return PolicyDecision(
            d.target, d.p, d.p_fused, {"device": d.device.total_s, "edge": d.edge.total_s},
            params=self.router.cost_params(params), inputs=turn,
        )


class FixedPolicy(Policy):
    """Always one target; no router runs (T_router = 0)."""

    def __init__(self, target: Target) -> None:
        self.name = target
        self.target = target

    def choose(self, params, turn, prompt, context):
        no_router = replace(turn, router_tokens=0)
        return PolicyDecision(
            self.target, None, None, _predictions(params, no_router), params=params, inputs=no_router
        )


class RandomPolicy(AutoPolicy):
    """The paper's random baseline (Sec. IV-A): the router's p is drawn from
    U(0, 1), still fused with the latency gap (eq. 11) and thresholded (eq. 12),
    with no router time."""

    name = "random"

    def __init__(self, threshold: float, seed: int | None = 0) -> None:
        # A draw every turn, as in the paper, so a seed gives the same sequence.
        super().__init__(ROUTERS.create("random", seed=seed), threshold, skip_settled=False)


def validate_threshold(threshold: float) -> float:
    """θ as a float; a NaN or infinite θ would send every turn one way silently."""
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return threshold


# --- the registry -------------------------------------------------------------------

PolicyFactory = Callable[["PolicySettings", "Router | None"], Policy]
#: Name -> factory of (settings, router or None); the names are ``--policy``'s
#: choices (sorted: auto, device, edge, random).
POLICIES: Registry[PolicyFactory] = Registry("policy", error=ValueError)


@dataclass(frozen=True)
class PolicySettings:
    """Which policy routes the turns, its router and θ (eq. 12).

    The fields with a flag are ``chat``'s and ``demo``'s routing options;
    ``seed`` is the random policy's, set by the runtime's ``--seed``.
    """

    policy: str = field(default="auto", metadata=flag(
        "auto: router + cost model (eqs. 11-12); device/edge: always there; random: p~U(0,1), "
        "fused and thresholded like auto (the paper's baseline)",
        choices=POLICIES.names,
    ))
    #: The router of ``auto`` (a :data:`~device_runtime.routing.routers.ROUTERS` name).
    router: str = field(default="bert", metadata=flag("router for --policy auto (registry name)"))
    #: Bundle directory of the ``bert`` router; None: the shipped bundle.
    bundle: str | None = field(default=None, metadata=flag(
        "router bundle directory (default: the shipped bundle)", metavar="DIR",
    ))
    threshold: float = field(default=0.5, metadata=flag("θ of eq. (12)"))
    seed: int | None = 0


def create_policy(settings: PolicySettings, router: Router | None = None) -> Policy:
    """The policy named ``settings.policy``; ``auto`` builds ``settings.router``
    (``bert`` with ``settings.bundle``) unless ``router`` is given."""
    return POLICIES.get(settings.policy)(settings, router)


@POLICIES.register("auto")
def _auto(settings: PolicySettings, router: Router | None) -> Policy:
    if router is None:
        kwargs = {"bundle": settings.bundle} if settings.router == "bert" else {}
        router = ROUTERS.create(settings.router, **kwargs)
    return AutoPolicy(router, settings.threshold)


@POLICIES.register("device")
def _device(settings: PolicySettings, router: Router | None) -> Policy:
    return FixedPolicy("device")


@POLICIES.register("edge")
def _edge(settings: PolicySettings, router: Router | None) -> Policy:
    return FixedPolicy("edge")


@POLICIES.register("random")
def _random(settings: PolicySettings, router: Router | None) -> Policy:
    return RandomPolicy(settings.threshold, settings.seed)
