"""The latency cost model and fusion rule of Bao et al., eqs. (1)-(12).

Pure dataclasses and functions: no I/O, no clocks.  Everything that measures
(profiling, telemetry, the simulator) feeds numbers in; this module only does
arithmetic, so the live runtime and the simulator decide through one code path.

Notation (paper, Sec. II-B):

- ``prompt_tokens``    L_p, the current prompt
- ``context_tokens``   C_t, accumulated context of earlier turns
- ``delta_c``          ΔC_t, context the chosen model's KV cache has not seen
- γ_s, γ_e             per-token compute time of device SLM / edge LLM
- τ_r                  router per-token time
- B, δ                 link bandwidth (tokens/s) and fixed overhead (s)
- L̄_r^s, L̄_r^e         expected response length of SLM / LLM

Beyond the paper, each model has separate prefill and decode per-token times;
the paper's single γ is the case ``prefill_s_per_token == decode_s_per_token``,
and the edge path may carry a queueing term W_q (``CostParams.edge_queue_s``):
the expected wait for a free slot on a loaded edge, which the paper's equations,
written for an idle edge, do not have.  Its default, 0, is the paper's model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Target = Literal["device", "edge"]
UploadMode = Literal["paper", "session"]
TARGETS: tuple[Target, Target] = ("device", "edge")
UPLOAD_MODES: tuple[UploadMode, UploadMode] = ("paper", "session")


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class ModelTiming:
    """Per-token compute time of one model (γ in the paper), split by phase.

    ``call_s`` is a fixed time per call that γ·tokens does not explain (request
    handling, sampler set-up, the first token): an extension, charged once in
    eq. (1); 0, the default, is the paper's model.  Measured for the edge by
    ``edgeroute profile`` (``call_s_edge``) and kept current online.
    """

    prefill_s_per_token: float
    decode_s_per_token: float
    call_s: float = 0.0

    def __post_init__(self) -> None:
        _check_nonneg("prefill_s_per_token", self.prefill_s_per_token)
        _check_nonneg("decode_s_per_token", self.decode_s_per_token)
        _check_nonneg("call_s", self.call_s)

    @classmethod
    def uniform(cls, gamma: float) -> "ModelTiming":
        """The paper's single γ for both prefill and decode."""
        return cls(prefill_s_per_token=gamma, decode_s_per_token=gamma)


@dataclass(frozen=True)
class Link:
    """Wireless link: bandwidth B in tokens/s and fixed overhead δ in seconds."""

    bandwidth_tokens_per_s: float
    overhead_s: float

    def __post_init__(self) -> None:
        _check_nonneg("overhead_s", self.overhead_s)
        if not self.bandwidth_tokens_per_s > 0:
            raise ValueError(
                f"bandwidth_tokens_per_s must be > 0, got {self.bandwidth_tokens_per_s!r}"
            )


@dataclass(frozen=True)
class ResponseLengths:
    """Expected response lengths L̄_r^s (device) and L̄_r^e (edge), in tokens."""

    device: float
    edge: float

    def __post_init__(self) -> None:
        _check_nonneg("device response length", self.device)
        _check_nonneg("edge response length", self.edge)


@dataclass(frozen=True)
class CostParams:
    """Every number the cost model needs (Table I of the paper and its extensions)."""

    gamma_s: ModelTiming
    gamma_e: ModelTiming
    link: Link
    tau_r: float = 0.0
    alpha: float = 0.03
    response: ResponseLengths = field(default_factory=lambda: ResponseLengths(0.0, 0.0))
    upload_mode: UploadMode = "paper"
    #: W_q: expected wait for an edge slot, s (not in the paper: 0 = an idle edge).
    edge_queue_s: float = 0.0

    def __post_init__(self) -> None:
        _check_nonneg("tau_r", self.tau_r)
        _check_nonneg("alpha", self.alpha)
        _check_nonneg("edge_queue_s", self.edge_queue_s)
        if self.upload_mode not in UPLOAD_MODES:
            raise ValueError(f"upload_mode must be one of {UPLOAD_MODES}, got {self.upload_mode!r}")

    def timing(self, target: Target) -> ModelTiming:
        return self.gamma_s if target == "device" else self.gamma_e

    def with_(self, **changes) -> "CostParams":
        return replace(self, **changes)


@dataclass(frozen=True)
class TurnInputs:
    """What the cost model needs to know about one turn.

    ``delta_c_device`` / ``delta_c_edge`` are the context tokens each model's KV
    cache lacks (ΔC_t per target).  ``router_tokens`` is what the router reads:
    C_t + L_p with history, L_p without.  Response lengths default to the
    params' averages; a per-query prediction may override them.
    """

    prompt_tokens: int
    context_tokens: int = 0
    delta_c_device: int = 0
    delta_c_edge: int = 0
    router_tokens: int | None = None
    response_device: float | None = None
    response_edge: float | None = None
    #: The edge cannot say what its KV cache holds (its engine reports no
    #: cached-token count): eq. (1) charges it the whole context, see
    #: :func:`prefill_delta_c`.
    edge_cache_unknown: bool = False

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "context_tokens", "delta_c_device", "delta_c_edge"):
            _check_nonneg(name, getattr(self, name))
        if self.delta_c_device > self.context_tokens or self.delta_c_edge > self.context_tokens:
            raise ValueError("ΔC cannot exceed the context C_t")

    def delta_c(self, target: Target) -> int:
        return self.delta_c_device if target == "device" else self.delta_c_edge


@dataclass(frozen=True)
class LatencyBreakdown:
    """The terms of eq. (6) or (7) for one target, in seconds."""

    target: Target
    comp_s: float
    upload_s: float
    overhead_s: float
    download_s: float
    router_s: float
    gen_s: float
    #: W_q, the edge's expected slot wait (beyond the paper; 0 on the device).
    queue_s: float = 0.0

    @property
    def comm_s(self) -> float:
        return self.upload_s + self.overhead_s + self.download_s

    @property
    def total_s(self) -> float:
        return self.comp_s + self.comm_s + self.router_s + self.gen_s + self.queue_s


@dataclass(frozen=True)
class Decision:
    """The outcome of eqs. (11)-(12) for one turn."""

    target: Target
    p: float
    p_fused: float
    threshold: float
    device: LatencyBreakdown
    edge: LatencyBreakdown

    @property
    def d_t(self) -> int:
        """The paper's d_t: 1 selects the device SLM, 0 the edge LLM."""
        return 1 if self.target == "device" else 0

    def predicted_s(self, target: Target | None = None) -> float:
        return (self.device if (target or self.target) == "device" else self.edge).total_s


# --- eqs. (1)-(5) -----------------------------------------------------------


def prefill_delta_c(turn: TurnInputs, target: Target) -> int:
    """The ΔC_t that eq. (1) charges ``target``'s prefill.

    ΔC_t is the context the model's KV cache lacks.  When the edge cannot say
    how much of the prompt it reused (an engine behind the gateway that reports
    no cached-token count), nothing is assumed cached: the whole context C_t,
    a full re-prefill, the conservative case.  The upload (eq. 3, ``session``
    mode) still counts only what the edge session lacks: the gateway keeps the
    transcript whatever its engine's cache holds.
    """
    if target == "edge" and turn.edge_cache_unknown:
        return turn.context_tokens
    return turn.delta_c(target)


def comp_latency(timing: ModelTiming, delta_c: float, prompt_tokens: float) -> float:
    """Eq. (1): T_comp^k = γ_k (ΔC_t + L_p), with γ_k the prefill time
    (plus the model's fixed ``call_s``, 0 in the paper)."""
    return timing.call_s + timing.prefill_s_per_token * (delta_c + prompt_tokens)


def upload_latency(link: Link, upload_tokens: float) -> float:
    """Upload term of eq. (3)."""
    return upload_tokens / link.bandwidth_tokens_per_s


def download_latency(link: Link, response_tokens: float) -> float:
    """Download term of eq. (3): L̄_r^e / B."""
    return response_tokens / link.bandwidth_tokens_per_s


def comm_latency(link: Link, upload_tokens: float, response_tokens: float) -> float:
    """Eq. (3): T_comm^e = upload/B + δ + L̄_r^e/B.  Eq. (2): T_comm^s = 0."""
    return upload_latency(link, upload_tokens) + link.overhead_s + download_latency(
        link, response_tokens
    )


def router_latency(tau_r: float, router_tokens: float) -> float:
    """Eq. (4): T_router = τ_r (C_t + L_p)."""
    return tau_r * router_tokens


def gen_latency(timing: ModelTiming, response_tokens: float) -> float:
    """Eq. (5): T_gen^k = γ_k L̄_r^k, with γ_k the decode time."""
    return timing.decode_s_per_token * response_tokens


def upload_tokens(params: CostParams, turn: TurnInputs) -> int:
    """Tokens sent to the edge.

    ``paper``: C_t + L_p, as eq. (3).  ``session``: the edge keeps the session,
    so only the context it has not seen and the new prompt travel.
    """
    if params.upload_mode == "paper":
        return turn.context_tokens + turn.prompt_tokens
    return turn.delta_c_edge + turn.prompt_tokens


# --- eqs. (6)-(8) -----------------------------------------------------------


def latency(params: CostParams, turn: TurnInputs, target: Target) -> LatencyBreakdown:
    """Eq. (6) for the device, eq. (7) for the edge (plus W_q, see the module
    docstring), as a breakdown."""
    router_tokens = (
        turn.router_tokens
        if turn.router_tokens is not None
        else turn.context_tokens + turn.prompt_tokens
    )
    router_s = router_latency(params.tau_r, router_tokens)
    timing = params.timing(target)
    comp_s = comp_latency(timing, prefill_delta_c(turn, target), turn.prompt_tokens)
    if target == "device":
        response = params.response.device if turn.response_device is None else turn.response_device
        return LatencyBreakdown("device", comp_s, 0.0, 0.0, 0.0, router_s, gen_latency(timing, response))
    response = params.response.edge if turn.response_edge is None else turn.response_edge
    return LatencyBreakdown(
        "edge",
        comp_s,
        upload_latency(params.link, upload_tokens(params, turn)),
        params.link.overhead_s,
        download_latency(params.link, response),
        router_s,
        gen_latency(timing, response),
        params.edge_queue_s,
    )


def total_latency(d_t: int, t_total_s: float, t_total_e: float) -> float:
    """Eq. (8): T_total = d_t T^s + (1 - d_t) T^e."""
    if d_t not in (0, 1):
        raise ValueError(f"d_t must be 0 or 1, got {d_t!r}")
    return d_t * t_total_s + (1 - d_t) * t_total_e


# --- eqs. (11)-(12) ---------------------------------------------------------


def fused_score(p: float, alpha: float, t_total_e: float, t_total_s: float) -> float:
    """Eq. (11): p̃ = p − α (T^e − T^s)."""
    return p - alpha * (t_total_e - t_total_s)


def decide_target(p_fused: float, threshold: float) -> Target:
    """Eq. (12): the edge when p̃ > θ (d_t = 0), otherwise the device (d_t = 1)."""
    return "edge" if p_fused > threshold else "device"


def settled_target(params: CostParams, turn: TurnInputs, threshold: float) -> Target | None:
    """The target eq. (12) picks for every router score p in [0, 1], or None.

    With g = α(T^e − T^s), eq. (11) puts p̃ in [−g, 1 − g]: the device whatever
    p is when 1 − g ≤ θ, the edge when −g > θ.  T_router (eq. 4) is in both
    T^e and T^s and cancels.  A runtime can then skip the router: same
    decision, without the router's time.
    """
    no_router = replace(turn, router_tokens=0)
    gap = params.alpha * (latency(params, no_router, "edge").total_s - latency(params, no_router, "device").total_s)
    if 1.0 - gap <= threshold:
        return "device"
    if -gap > threshold:
        return "edge"
    return None


def decide(params: CostParams, turn: TurnInputs, p: float, threshold: float) -> Decision:
    """Run eqs. (1)-(12) for one turn and return the decision with both predictions."""
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"router score p must be in [0, 1], got {p!r}")
    dev = latency(params, turn, "device")
    edge = latency(params, turn, "edge")
    p_fused = fused_score(p, params.alpha, edge.total_s, dev.total_s)
    return Decision(decide_target(p_fused, threshold), p, p_fused, threshold, dev, edge)


# --- multi-turn context bookkeeping ----------------------------------------


@dataclass
class ContextLedger:
    """How much of the dialogue each model's KV cache already holds.

    ``context_tokens`` is C_t.  ``seen[target]`` counts the leading context
    tokens that target has prefilled or generated.  After a turn on one model,
    that model holds the whole context; the other keeps what it had, so a later
    switch back re-prefills only the turns it missed (Fig. 2, turn 3).
    """

    context_tokens: int = 0
    seen: dict[str, int] = field(default_factory=lambda: {"device": 0, "edge": 0})
    #: Targets whose last answer came with no cached-token count: what their
    #: KV cache holds is unknown (see :func:`prefill_delta_c`).
    cache_unknown: set[str] = field(default_factory=set)

    def delta_c(self, target: Target) -> int:
        return self.context_tokens - self.seen[target]

    def turn_inputs(self, prompt_tokens: int, **overrides) -> TurnInputs:
        return TurnInputs(
            prompt_tokens=prompt_tokens,
            context_tokens=self.context_tokens,
            delta_c_device=self.delta_c("device"),
            delta_c_edge=self.delta_c("edge"),
            edge_cache_unknown="edge" in self.cache_unknown,
            **overrides,
        )

    def commit(
        self, target: Target, prompt_tokens: int, response_tokens: int, *, held: bool = True,
        cache_known: bool = True,
    ) -> None:
        """Record that ``target`` answered a turn: the context grows by L_p + L_r.

        ``held=False``: the turn is in the dialogue but not in ``target``'s
        cache (an edge answer cancelled before its final message: the edge
        session did not keep it), so that side still lacks it.
        ``cache_known=False``: ``target`` holds the turn in its transcript but
        did not say what its KV cache reused, so its next prefill is predicted
        in full until an answer says otherwise.
        """
        _check_nonneg("prompt_tokens", prompt_tokens)
        _check_nonneg("response_tokens", response_tokens)
        self.context_tokens += prompt_tokens + response_tokens
        if held:
            self.seen[target] = self.context_tokens
            if cache_known:
                self.cache_unknown.discard(target)
            else:
                self.cache_unknown.add(target)

    def copy(self) -> "ContextLedger":
        return ContextLedger(self.context_tokens, dict(self.seen), set(self.cache_unknown))


# --- presets (Tables I-III) --------------------------------------------------

#: Table II/III average response lengths in tokens (words), per benchmark;
#: its order is the live CLI's ``--benchmark`` choices (the multi-turn default first).
PAPER_RESPONSE_LENGTHS: dict[str, ResponseLengths] = {
    "mt-bench": ResponseLengths(device=226.37, edge=879.16),
    "gsm8k": ResponseLengths(device=136.3, edge=460.1),
    "mmlu": ResponseLengths(device=1254.4, edge=4567.9),
}

#: Table I latency weight α per benchmark.  The paper gives none for
#: MT-Bench-101; we use GSM8K's 0.05 there and say so in the docs.
PAPER_ALPHA: dict[str, float] = {"mmlu": 0.03, "gsm8k": 0.05, "mt-bench": 0.05}


def paper_params(benchmark: str = "mmlu", upload_mode: UploadMode = "paper") -> CostParams:
    """Table I parameters with the benchmark's Table II/III response lengths.

    The paper's router is RouteLLM's BERT, whose τ_r it does not report; the
    random baseline has T_router = 0.  The preset leaves τ_r = 0 and profiling
    fills it in.
    """
    if benchmark not in PAPER_RESPONSE_LENGTHS:
        raise ValueError(
            f"unknown benchmark {benchmark!r}; expected one of {sorted(PAPER_RESPONSE_LENGTHS)}"
        )
    return CostParams(
        gamma_s=ModelTiming.uniform(0.04),
        gamma_e=ModelTiming.uniform(0.02),
        link=Link(bandwidth_tokens_per_s=2e7, overhead_s=0.02),
        tau_r=0.0,
        alpha=PAPER_ALPHA[benchmark],
        response=PAPER_RESPONSE_LENGTHS[benchmark],
        upload_mode=upload_mode,
    )


PRESETS = {"paper": paper_params}


def preset(name: str, benchmark: str, upload_mode: UploadMode = "paper") -> CostParams:
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
    return factory(benchmark, upload_mode)
