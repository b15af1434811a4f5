"""Trace-driven evaluation of a routing policy (paper, Sec. IV).

For each router: score every turn once, then sweep the threshold θ of eq. (12)
over the fused scores p̃ = p − α(Tᵉ − Tˢ) (eq. 11).  Each turn is charged the
latency of eqs. (1)-(8) for the model the policy picked, and earns that
model's recorded quality.

Why θ is swept in p̃ units over the observed range: with Table I numbers the
latency gap Tᵉ − Tˢ is tens of seconds, so α(Tᵉ − Tˢ) is often larger than 1
and p̃ lies far below 0; a θ restricted to [0, 1] would send everything to
one side.  The sweep takes quantiles of the observed p̃, plus one θ below and
one above all of them, so the curve runs from all-edge to all-device.

Multi-turn (Fig. 6).  A :class:`~device_runtime.routing.cost_model.ContextLedger`
follows the actual decisions of each dialogue, so the charged latency always
uses the true ΔC and C_t:

- ``with_context=True`` ("w/ context"): the router scores (prompt, history),
  and the decision sees ΔC and C_t; the router reads C_t + L_p tokens (eq. 4).
- ``with_context=False`` ("w/o context"): the router scores the prompt alone,
  the decision takes ΔC = C_t = 0 and the router reads L_p tokens.  The charge
  still uses the ledger's true ΔC.

Token counts are words (``traces.word_count``), as in the paper.  Response
lengths are the preset's averages L̄_r (Tables II/III) for both the prediction
and the charge, as the paper does; the ledger commits them rounded to whole
tokens.  A :class:`LengthPlan` may replace them per turn, separately for the
decision (eq. 11) and for the charge (eqs. 5-7); see "Per-query response
lengths" in docs/simulation.md.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from device_runtime.routing import cost_model
from device_runtime.sim.metrics import CurvePoint, RouterMetrics, router_metrics
from device_runtime.routing.routers.base import Message, Router, RouterError, check_score
from device_runtime.sim.traces import BENCHMARKS, Dialogue, TraceTurn, word_count

log = logging.getLogger(__name__)

#: Suffix of the "w/o context" policy's entry in the results (MT-Bench).
NO_CONTEXT_SUFFIX = "/no-context"
_SCORE_CHUNK = 256


class SimulationError(RuntimeError):
    """The simulation cannot run with the given inputs."""


#: Per-turn response lengths L̄_r (words) from a trace turn.
LengthSource = Callable[[TraceTurn], cost_model.ResponseLengths]


@dataclass(frozen=True)
class LengthPlan:
    """Where L̄_r comes from, per turn: for the decision (eq. 11) and for the charge (eqs. 5-7).

    ``None`` means the params' per-benchmark averages, the paper's choice.
    Keeping the two apart lets several decision rules be compared under one
    charge (the recorded lengths, when the trace has them).
    """

    decide: LengthSource | None = None
    charge: LengthSource | None = None


def recorded_lengths(turn: TraceTurn) -> cost_model.ResponseLengths:
    """The turn's recorded response lengths (GSM8K); raises if the trace has none."""
    if turn.response_words_device is None or turn.response_words_edge is None:
        raise SimulationError(
            "this trace has no per-query response lengths (only GSM8K's responses file has them)"
        )
    return cost_model.ResponseLengths(float(turn.response_words_device), float(turn.response_words_edge))


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulation run."""

    benchmark: str
    params: cost_model.CostParams
    #: Number of thresholds θ in the sweep, the two all-or-nothing ones included.
    points: int = 41
    #: Token counter for prompts (the paper counts words).
    count_tokens: Callable[[str], int] = field(default=word_count, compare=False)
    #: Per-turn L̄_r for the decision and the charge; the default is the paper's averages.
    lengths: LengthPlan = field(default_factory=LengthPlan, compare=False)
    #: θ at which each router's operating point is also reported (``simulate --threshold``).
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        if not isinstance(self.points, int) or self.points < 3:
            raise ValueError(f"points must be an integer >= 3, got {self.points!r}")


@dataclass(frozen=True)
class Baseline:
    quality: float
    mean_latency_s: float

    def to_dict(self) -> dict[str, float]:
        return {"quality": self.quality, "mean_latency_s": self.mean_latency_s}


@dataclass(frozen=True)
class PolicyResult:
    """One router under one policy: its swept curve and metrics."""

    name: str
    curve: tuple[CurvePoint, ...]
    metrics: RouterMetrics
    #: The operating point at ``SimConfig.threshold``; None without one.
    at_threshold: CurvePoint | None = None

    def to_dict(self) -> dict:
        out = {
            "apgr": self.metrics.apgr,
            "cpt50": self.metrics.cpt50,
            "cpt80": self.metrics.cpt80,
            "curve": [p.to_dict() for p in self.curve],
        }
        if self.at_threshold is not None:  # absent by default: the summary is unchanged
            out["at_threshold"] = self.at_threshold.to_dict()
        return out


@dataclass(frozen=True)
class SimResult:
    benchmark: str
    n: int
    n_dialogues: int
    all_device: Baseline
    all_edge: Baseline
    routers: Mapping[str, PolicyResult]
    params: cost_model.CostParams

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "n": self.n,
            "n_dialogues": self.n_dialogues,
            "all_device": self.all_device.to_dict(),
            "all_edge": self.all_edge.to_dict(),
            "routers": {name: r.to_dict() for name, r in self.routers.items()},
            "params": dataclasses.asdict(self.params),
        }


def _progress(iterable=None, *, total=None, desc: str = "", enabled: bool = True):
    from tqdm import tqdm  # stderr by default

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, unit="it")


def _response_tokens(
    params: cost_model.CostParams,
    target: cost_model.Target,
    charged: cost_model.ResponseLengths | None = None,
) -> int:
    """L_r of ``target`` as whole tokens, for the ledger: the charged length, else L̄_r."""
    response = params.response if charged is None else charged
    return int(round(response.device if target == "device" else response.edge))


def _with_lengths(
    turn: cost_model.TurnInputs, lengths: cost_model.ResponseLengths | None
) -> cost_model.TurnInputs:
    if lengths is None:
        return turn
    return dataclasses.replace(turn, response_device=lengths.device, response_edge=lengths.edge)


# --- scoring ------------------------------------------------------------------


def score_turns(
    router: Router,
    dialogues: Sequence[Dialogue],
    *,
    with_context: bool = True,
    progress: bool = False,
    desc: str = "scoring",
) -> list[list[float]]:
    """p for every turn, once (``router.score_batch`` in chunks); shaped like the dialogues."""
    items: list[tuple[str, Sequence[Message]]] = [
        (t.prompt, t.context if with_context else ()) for d in dialogues for t in d.turns
    ]
    flat: list[float] = []
    with _progress(total=len(items), desc=desc, enabled=progress) as bar:
        for start in range(0, len(items), _SCORE_CHUNK):
            chunk = items[start : start + _SCORE_CHUNK]
            scores = router.score_batch(chunk)
            if len(scores) != len(chunk):
                raise RouterError(
                    f"router {router.name!r} returned {len(scores)} scores for {len(chunk)} turns"
                )
            flat.extend(check_score(p, router.name or type(router).__name__) for p in scores)
            bar.update(len(chunk))
    out, i = [], 0
    for d in dialogues:
        out.append(flat[i : i + len(d.turns)])
        i += len(d.turns)
    return out


# --- one turn ---------------------------------------------------------------


def _turn_costs(
    params: cost_model.CostParams,
    ledger: cost_model.ContextLedger,
    prompt_tokens: int,
    p: float,
    with_context: bool,
    decide_lengths: cost_model.ResponseLengths | None = None,
    charge_lengths: cost_model.ResponseLengths | None = None,
) -> tuple[float, float, float]:
    """(p̃, charged Tˢ, charged Tᵉ) for one turn given the ledger's state.

    The policy's view (what p̃ is computed from) and the charge differ for
    "w/o context", which predicts with ΔC = C_t = 0 but pays the true ΔC, and
    when a :class:`LengthPlan` gives them different response lengths.
    """
    true_inputs = ledger.turn_inputs(prompt_tokens)
    if with_context:
        seen = charge = true_inputs
    else:
        seen = cost_model.TurnInputs(prompt_tokens=prompt_tokens, router_tokens=prompt_tokens)
        charge = dataclasses.replace(true_inputs, router_tokens=prompt_tokens)
    seen, charge = _with_lengths(seen, decide_lengths), _with_lengths(charge, charge_lengths)
    # θ does not change p̃; decide() is called once and eq. (12) reapplied per θ.
    p_fused = cost_model.decide(params, seen, p, threshold=0.0).p_fused
    dev = cost_model.latency(params, charge, "device").total_s
    edge = cost_model.latency(params, charge, "edge").total_s
    return p_fused, dev, edge


def play_dialogue(
    params: cost_model.CostParams,
    dialogue: Dialogue,
    scores: Sequence[float] | None,
    with_context: bool,
    count: Callable[[str], int],
    threshold: float | None = None,
    forced: cost_model.Target | None = None,
    lengths: LengthPlan = LengthPlan(),
) -> tuple[float, int, float, list[float]]:
    """Play one dialogue: (quality sum, edge calls, latency sum, p̃ of each turn).

    Each turn goes where eq. (12) sends it at ``threshold``, or to ``forced``.
    """
    if (threshold is None) == (forced is None):
        raise ValueError("give exactly one of threshold and forced")
    ledger = cost_model.ContextLedger()
    quality = latency = 0.0
    edge_calls = 0
    fused: list[float] = []
    for t, turn in enumerate(dialogue.turns):
        lp = count(turn.prompt)
        p = 0.5 if scores is None else scores[t]
        decided = lengths.decide(turn) if lengths.decide else None
        charged = lengths.charge(turn) if lengths.charge else None
        p_fused, dev_s, edge_s = _turn_costs(params, ledger, lp, p, with_context, decided, charged)
        fused.append(p_fused)
        target = forced or cost_model.decide_target(p_fused, threshold)
        if target == "edge":
            quality += turn.quality_edge
            latency += edge_s
            edge_calls += 1
        else:
            quality += turn.quality_device
            latency += dev_s
        ledger.commit(target, lp, _response_tokens(params, target, charged))
    return quality, edge_calls, latency, fused


# --- baselines, thresholds, sweep ---------------------------------------------


def baseline(
    params: cost_model.CostParams,
    dialogues: Sequence[Dialogue],
    target: cost_model.Target,
    count: Callable[[str], int] = word_count,
    lengths: LengthPlan = LengthPlan(),
) -> Baseline:
    """Everything on one model, no router (T_router = 0)."""
    params = params.with_(tau_r=0.0)
    q = lat = 0.0
    n = 0
    for d in dialogues:
        dq, _, dl, _ = play_dialogue(params, d, None, True, count, forced=target, lengths=lengths)
        q, lat, n = q + dq, lat + dl, n + len(d.turns)
    return Baseline(quality=q / n, mean_latency_s=lat / n)


def sweep_thresholds(fused: Sequence[float], points: int) -> list[float]:
    """θ values: quantiles of the observed p̃, plus one below and one above them all."""
    values = np.asarray(fused, dtype=float)
    if values.size == 0:
        raise SimulationError("no turns to sweep")
    lo, hi = float(values.min()), float(values.max())
    margin = max(1.0, hi - lo)
    inner = np.quantile(values, np.linspace(0.0, 1.0, points - 2))
    thetas = np.unique(np.concatenate([[lo - margin], inner, [hi + margin]]))
    return [float(t) for t in thetas]


def sweep(
    params: cost_model.CostParams,
    dialogues: Sequence[Dialogue],
    scores: Sequence[Sequence[float]],
    *,
    with_context: bool,
    points: int = 41,
    count: Callable[[str], int] = word_count,
    progress: bool = False,
    desc: str = "sweep",
    lengths: LengthPlan = LengthPlan(),
) -> list[CurvePoint]:
    """The curve (θ, quality, edge_share, mean latency) of one router under one policy."""
    n_turns = sum(len(d.turns) for d in dialogues)
    if n_turns == 0:
        raise SimulationError("no turns to simulate")
    single = [i for i, d in enumerate(dialogues) if len(d.turns) == 1]
    multi = [i for i, d in enumerate(dialogues) if len(d.turns) > 1]

    # Single-turn dialogues start from an empty ledger, so p̃ and both charges
    # are fixed per turn: compute them once and threshold with numpy.
    s_fused = np.empty(len(single))
    s_dev = np.empty(len(single))
    s_edge = np.empty(len(single))
    s_qd = np.empty(len(single))
    s_qe = np.empty(len(single))
    empty = cost_model.ContextLedger()
    for k, i in enumerate(single):
        turn: TraceTurn = dialogues[i].turns[0]
        s_fused[k], s_dev[k], s_edge[k] = _turn_costs(
            params,
            empty,
            count(turn.prompt),
            scores[i][0],
            with_context,
            lengths.decide(turn) if lengths.decide else None,
            lengths.charge(turn) if lengths.charge else None,
        )
        s_qd[k], s_qe[k] = turn.quality_device, turn.quality_edge

    # Multi-turn p̃ depends on the history; pool what the all-device and the
    # all-edge histories give, to place the thresholds.
    pooled = list(s_fused)
    for i in multi:
        for forced in cost_model.TARGETS:
            pooled += play_dialogue(
                params, dialogues[i], scores[i], with_context, count, forced=forced, lengths=lengths
            )[3]
    thresholds = sweep_thresholds(pooled, points)

    curve: list[CurvePoint] = []
    for theta in _progress(thresholds, desc=desc, enabled=progress):
        to_edge = s_fused > theta  # eq. (12)
        quality = float(np.where(to_edge, s_qe, s_qd).sum())
        latency = float(np.where(to_edge, s_edge, s_dev).sum())
        edge_calls = int(to_edge.sum())
        for i in multi:
            dq, de, dl, _ = play_dialogue(
                params, dialogues[i], scores[i], with_context, count, threshold=theta, lengths=lengths
            )
            quality, edge_calls, latency = quality + dq, edge_calls + de, latency + dl
        curve.append(CurvePoint(theta, quality / n_turns, edge_calls / n_turns, latency / n_turns))
    curve.sort(key=lambda c: (c.edge_share, -c.threshold))
    return curve


def operating_point(
    params: cost_model.CostParams,
    dialogues: Sequence[Dialogue],
    scores: Sequence[Sequence[float]],
    threshold: float,
    *,
    with_context: bool,
    count: Callable[[str], int] = word_count,
    lengths: LengthPlan = LengthPlan(),
) -> CurvePoint:
    """(θ, quality, edge_share, mean latency) of one router at one θ: every dialogue played."""
    quality = latency = 0.0
    edge_calls = n_turns = 0
    for d, s in zip(dialogues, scores):
        dq, de, dl, _ = play_dialogue(params, d, s, with_context, count, threshold=threshold, lengths=lengths)
        quality, edge_calls, latency, n_turns = quality + dq, edge_calls + de, latency + dl, n_turns + len(d.turns)
    if n_turns == 0:
        raise SimulationError("no turns to simulate")
    return CurvePoint(float(threshold), quality / n_turns, edge_calls / n_turns, latency / n_turns)


# --- routers --------------------------------------------------------------------


def oracle_labels(dialogues: Sequence[Dialogue]) -> dict[str, float]:
    """Prompt -> quality gain of the edge over the device (the oracle's labels).

    A prompt that occurs more than once with different labels gets the mean
    gain: the oracle is keyed by prompt, as any router is.
    """
    gains: dict[str, list[float]] = {}
    for d in dialogues:
        for t in d.turns:
            gains.setdefault(t.prompt, []).append(t.quality_edge - t.quality_device)
    return {prompt: sum(g) / len(g) for prompt, g in gains.items()}


def build_router(
    name: str,
    dialogues: Sequence[Dialogue],
    *,
    seed: int = 0,
    bundle: str | None = None,
) -> Router:
    """Construct a router by registry name with what the simulator knows."""
    from device_runtime.routing.routers import ROUTERS

    try:
        if name == "random":
            return ROUTERS.create("random", seed=seed)
        if name == "oracle":
            return ROUTERS.create("oracle", labels=oracle_labels(dialogues))
        if name == "bert":
            return ROUTERS.create("bert", bundle=bundle) if bundle else ROUTERS.create("bert")
        return ROUTERS.create(name)
    except (RouterError, OSError, ImportError, ValueError) as exc:
        hint = " (pass --bundle DIR with a trained router bundle)" if name == "bert" else ""
        raise SimulationError(f"cannot build router {name!r}: {exc}{hint}") from exc


def simulate(
    config: SimConfig,
    dialogues: Sequence[Dialogue],
    routers: Mapping[str, Callable[[], Router]],
    *,
    progress: bool = False,
) -> SimResult:
    """Run every router over the dialogues and sweep θ.

    ``routers`` maps a name to a factory, called once per policy so that a
    stateful router (random) gives both policies the same draws.  Multi-turn
    traces get a ``NAME/no-context`` entry for the "w/o context" policy.
    """
    if not dialogues:
        raise SimulationError("the trace has no dialogues (check --split/--limit)")
    if not routers:
        raise SimulationError("no routers to simulate")
    params = config.params
    dev = baseline(params, dialogues, "device", config.count_tokens, config.lengths)
    edge = baseline(params, dialogues, "edge", config.count_tokens, config.lengths)
    multi_turn = any(len(d.turns) > 1 for d in dialogues)
    policies = [(True, "")] + ([(False, NO_CONTEXT_SUFFIX)] if multi_turn else [])
    results: dict[str, PolicyResult] = {}
    for name, factory in routers.items():
        for with_context, suffix in policies:
            label = name + suffix
            router = factory()
            router_params = router.cost_params(params)
            scores = score_turns(
                router, dialogues, with_context=with_context, progress=progress, desc=f"{label}: scoring"
            )
            curve = sweep(
                router_params,
                dialogues,
                scores,
                with_context=with_context,
                points=config.points,
                count=config.count_tokens,
                progress=progress,
                desc=f"{label}: sweeping θ",
                lengths=config.lengths,
            )
            at = None
            if config.threshold is not None:
                at = operating_point(router_params, dialogues, scores, config.threshold, with_context=with_context,
                                     count=config.count_tokens, lengths=config.lengths)
            results[label] = PolicyResult(
                label, tuple(curve), router_metrics(curve, dev.quality, edge.quality), at
            )
            log.info("%s: APGR %.3f", label, results[label].metrics.apgr)
    return SimResult(
        benchmark=config.benchmark,
        n=sum(len(d.turns) for d in dialogues),
        n_dialogues=len(dialogues),
        all_device=dev,
        all_edge=edge,
        routers=results,
        params=params,
    )

