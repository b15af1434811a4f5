"""The turn orchestrator: route each turn, stream the answer, keep the books.

Per turn (issue 4, item 3):

1. the policy scores the turn (``auto``: the router's p, eq. 10);
2. the cost model takes the live ΔC of each side from the conversation's
   :class:`~device_runtime.cost_model.ContextLedger` (eqs. 1-7);
3. it decides (eqs. 11-12 for ``auto``);
4. the answer streams to the caller;
5. the transcript, the ledger and the edge session's bookkeeping are updated.

Token counts for the cost model (L_p, C_t, ΔC, response lengths) are device-SLM
tokens of the message texts: the device has no edge tokenizer, and one
tokenizer keeps the ledger consistent.  Template glue is not counted.  The
telemetry's ``prefill_tokens``/``cached_tokens`` are the serving model's own.

Response lengths for the live prediction (eqs. 3, 5) are the cost parameters'
averages L̄_r capped at ``max_tokens``, since no answer can be longer.  After the
answer, the served target's latency is predicted again by the same equations
with the same parameters and the answer's actual length (``predicted_posthoc_s``
in telemetry): it checks γ, B and δ apart from the length guess.

If the edge cannot be reached, or fails mid-answer, the turn is answered on the
device (``fallback`` in telemetry) and the transcript stays complete: the edge
is sent the turns it missed the next time it answers.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from device_runtime import cost_model
from device_runtime.cost_model import ContextLedger, CostParams, Target, TurnInputs
from device_runtime.profile import ProfileError
from device_runtime.telemetry import TelemetryLog, TurnTelemetry

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.edge_client import EdgeClient
    from device_runtime.routers.base import Router
    from device_runtime.slm import SLMBackend

log = logging.getLogger(__name__)

POLICIES = ("auto", "device", "edge", "random")

# --- cost parameters for the live system ------------------------------------------

def live_cost_params(
    profile: str | Path | Mapping[str, Any] | None = None,
    *,
    benchmark: str = "mt-bench",
) -> CostParams:
    """Cost parameters for live routing.

    Starts from the paper's Table I preset (``benchmark`` picks L̄_r and α) in
    ``session`` upload mode, since the edge keeps the session and only unseen
    turns travel.  A profile (a PROFILE.json path from ``edgeroute profile``,
    or a mapping with its keys, see :mod:`device_runtime.profile`) replaces
    the measured γ_s, γ_e, τ_r, B, δ, per-call times and answer lengths L̄_r;
    missing keys keep the preset's.
    """
    from device_runtime.profile import apply_profile, load_profile

    params = cost_model.paper_params(benchmark, upload_mode="session")
    if profile is None:
        return params
    data = dict(profile) if isinstance(profile, Mapping) else load_profile(profile, require_all=False)
    try:
        return apply_profile(data, params, response_lengths=True)
    except ProfileError:
        raise
    except ValueError as exc:  # e.g. a zero bandwidth rejected by cost_model.Link
        raise ProfileError(f"bad profile: {exc}") from None


# --- policies ----------------------------------------------------------------------


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

    def __init__(self, router: "Router", threshold: float, *, skip_settled: bool = True) -> None:
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
        from device_runtime.routers.base import create_router

        # A draw every turn, as in the paper, so a seed gives the same sequence.
        super().__init__(create_router("random", seed=seed), threshold, skip_settled=False)


def create_policy(
    name: str,
    *,
    threshold: float = 0.5,
    router: "Router | None" = None,
    router_name: str = "bert",
    router_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = 0,
) -> Policy:
    """Build a policy by name; ``auto`` builds ``router_name`` unless ``router`` is given."""
    if name == "auto":
        if router is None:
            from device_runtime.routers.base import create_router

            router = create_router(router_name, **dict(router_kwargs or {}))
        return AutoPolicy(router, threshold)
    if name in ("device", "edge"):
        return FixedPolicy(name)  # type: ignore[arg-type]
    if name == "random":
        return RandomPolicy(threshold, seed)
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")


# --- settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class OrchestratorSettings:
    """Generation settings shared by both targets."""

    #: Upper bound on answer tokens, on either side.
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    #: An optional system message placed before the first turn.
    system_prompt: str | None = None
    #: Tokens the formatted conversation plus ``max_tokens`` may fill (device
    #: SLM count) before the oldest turns are dropped; None: the SLM's window.
    context_window: int | None = None

    def __post_init__(self) -> None:
        # Both sides must accept them: the edge API carries max_tokens as int32
        # and the seed as uint32.
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < 2**31:
            raise ValueError(f"max_tokens must be an integer in [1, 2**31), got {self.max_tokens!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.context_window is not None and (
            not isinstance(self.context_window, int) or self.context_window < 16
            or self.context_window <= self.max_tokens
        ):
            raise ValueError(
                f"context_window must be an integer >= 16 and > max_tokens ({self.max_tokens}), "
                f"got {self.context_window!r}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def validate_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return threshold


# --- the orchestrator ---------------------------------------------------------------


@dataclass
class TurnResult:
    text: str
    telemetry: TurnTelemetry
    #: Why the edge was not used although chosen (None when it was not chosen or it answered).
    fallback_reason: str | None = None
    #: The answer's length in the cost model's unit (device-SLM tokens).
    answer_tokens: int = 0
    #: ΔC of the side that answered, as it was sent or prefilled: after a
    #: sliding-window cut or a new edge session, not as first predicted.
    delta_c_tokens: int = 0


TextCallback = Callable[[str], None]
EventCallback = Callable[[str, str], None]


class Orchestrator:
    """One conversation between a user, the device SLM and (optionally) an edge.

    ``edge`` may be None: turns routed to the edge then fall back to the device.
    ``on_event(kind, detail)`` hears ``"fallback"`` (the edge failed; the answer
    restarts on the device) and ``"edge_session"`` (a new edge session, once the
    edge has answered on it: the first Generate opens it, see ``open_session``).
    """

    def __init__(
        self,
        slm: "SLMBackend",
        policy: Policy,
        params: CostParams,
        *,
        edge: "EdgeClient | None" = None,
        settings: OrchestratorSettings | None = None,
        telemetry: TelemetryLog | None = None,
    ) -> None:
        self.slm = slm
        self.policy = policy
        self.params = params
        self.edge = edge
        self.settings = settings or OrchestratorSettings()
        self.telemetry = telemetry if telemetry is not None else TelemetryLog()
        self.transcript: list[dict[str, str]] = []
        self.ledger = ContextLedger()
        self.turn_index = 0
        self._edge_session: str | None = None
        # transcript[:_edge_seen] is what the edge session holds.
        self._edge_seen = 0
        self._edge_announced = True
        self._start_transcript()

    def _start_transcript(self) -> None:
        self.transcript = []
        if self.settings.system_prompt:
            self.transcript.append({"role": "system", "content": self.settings.system_prompt})

    # -- conversation lifecycle

    def new_conversation(self) -> None:
        """Start over: empty transcript and ledger, the edge session closed.

        The device KV cache is kept: the next conversation's prefix match
        reuses whatever it shares (e.g. a system prompt) and recomputes the rest.
        """
        self._close_edge_session()
        self._start_transcript()
        self.ledger = ContextLedger()
        self.turn_index = 0

    def close(self) -> None:
        self._close_edge_session()

    def _close_edge_session(self) -> None:
        if self._edge_session is not None and self.edge is not None:
            try:
                self.edge.close_session(self._edge_session)
            except Exception as exc:  # best effort: the edge may be gone
                log.debug("closing edge session %s failed: %s", self._edge_session, exc)
        self._edge_session = None
        self._edge_seen = 0

    # -- one turn

    def turn(
        self,
        prompt: str,
        *,
        on_text: TextCallback | None = None,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Route, answer and record one user turn."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt must be a non-empty string")
        on_text = on_text or (lambda _t: None)
        on_event = on_event or (lambda _k, _d: None)
        t0 = time.perf_counter()
        s = self.settings
        user_msg = {"role": "user", "content": prompt}
        self._fit_window(user_msg, on_event)
        prompt_tokens = self.slm.count_tokens(prompt)
        context_tokens = self.ledger.context_tokens
        turn_inputs = self.ledger.turn_inputs(
            prompt_tokens,
            response_device=min(self.params.response.device, s.max_tokens),
            response_edge=min(self.params.response.edge, s.max_tokens),
        )
        # The router reads the dialogue, not the system message (its training
        # turns have none, and C_t of eq. 4 does not count it).
        history = [m for m in self.transcript if m["role"] != "system"]
        decision = self.policy.choose(self.params, turn_inputs, prompt, history)

        target: Target = decision.target
        fallback_reason = None
        result = None
        if target == "edge":
            try:
                result = self._answer_on_edge(user_msg, on_text, on_event, cancel, t0)
            except _EdgeFailed as exc:
                fallback_reason = str(exc)
                target = "device"
                on_event("fallback", fallback_reason)
                log.warning("edge unavailable, answering on the device: %s", fallback_reason)
        if result is None:
            result = self._answer_on_device(user_msg, on_text, cancel, t0)
        text, ttft_s = result.text, result.ttft_s
        prefill, cached, output = result.prefill_tokens, result.cached_tokens, result.output_tokens
        measured_s = time.perf_counter() - t0

        self.transcript += [user_msg, {"role": "assistant", "content": text}]
        if target == "edge" and result.edge_kept:
            self._edge_seen = len(self.transcript)
        answer_tokens = self.slm.count_tokens(text)
        delta_c_tokens = self.ledger.delta_c(target)
        self.ledger.commit(target, prompt_tokens, answer_tokens, held=result.edge_kept)
        self.turn_index += 1
        posthoc_s = None if fallback_reason is not None else decision.posthoc_s(target, answer_tokens)
        record = TurnTelemetry(
            turn=self.turn_index,
            target=target,
            policy=self.policy.name,
            p=decision.p,
            p_fused=decision.p_fused,
            predicted_s=dict(decision.predicted_s),
            measured_s=measured_s,
            ttft_s=ttft_s if ttft_s is not None else measured_s,
            prompt_tokens=prompt_tokens,
            context_tokens=context_tokens,
            prefill_tokens=prefill,
            cached_tokens=cached,
            output_tokens=output,
            fallback=fallback_reason is not None,
            predicted_posthoc_s=posthoc_s,
        )
        self.telemetry.append(record)
        return TurnResult(text, record, fallback_reason, answer_tokens, delta_c_tokens)

    def _fit_window(self, user_msg: dict, on_event: EventCallback) -> None:
        """Drop the oldest user/assistant pairs until the turn fits the window.

        A sliding window, documented in docs/live.md: the system message stays;
        the edge session is closed (an edge transcript cannot lose messages),
        and both KV caches must recompute the shortened conversation.  A prompt
        that does not fit even alone raises ContextOverflowError, with the
        conversation untouched.
        """
        from device_runtime.llama_session import ContextOverflowError

        window = self.settings.context_window or self.slm.context_window
        budget = window - self.settings.max_tokens
        start = 1 if self.transcript and self.transcript[0]["role"] == "system" else 0
        alone = self.slm.prompt_tokens(self.transcript[:start] + [user_msg])
        if alone > budget:
            raise ContextOverflowError(
                f"the prompt needs {alone} tokens and the context window leaves {budget} "
                f"({window} minus max_tokens {self.settings.max_tokens}); shorten it"
            )
        dropped = 0
        while (
            len(self.transcript) - start >= 2
            and self.slm.prompt_tokens(self.transcript + [user_msg]) > budget
        ):
            del self.transcript[start : start + 2]
            dropped += 2
        if not dropped:
            return
        self._close_edge_session()
        kept = sum(self.slm.count_tokens(m["content"]) for m in self.transcript[start:])
        self.ledger = ContextLedger(context_tokens=kept, seen={"device": 0, "edge": 0})
        log.info("context window: dropped the %d oldest messages", dropped)
        on_event("truncated", f"dropped the {dropped} oldest messages to fit {window} tokens")

    def _answer_on_device(self, user_msg, on_text, cancel, t0):
        s = self.settings
        chunks: list[str] = []
        ttft = None
        for chunk in self.slm.stream(
            self.transcript + [user_msg], max_tokens=s.max_tokens, temperature=s.temperature,
            top_p=s.top_p, seed=s.seed, cancel=cancel,
        ):
            if ttft is None:
                ttft = time.perf_counter() - t0
            chunks.append(chunk)
            on_text(chunk)
        stats = self.slm.last_stats
        return _Answer("".join(chunks), ttft, stats.prefill_tokens, stats.cached_tokens, stats.output_tokens)

    def _answer_on_edge(self, user_msg, on_text, on_event, cancel, t0):
        """Answer on the edge, or raise :class:`_EdgeFailed` (the caller falls back)."""
        from device_runtime.edge_client import EdgeError, EdgeUnavailable, GenerationParams, new_session_id

        if self.edge is None:
            raise _EdgeFailed("no edge configured")
        s = self.settings
        params = GenerationParams(
            max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed
        )
        for attempt in (1, 2):
            chunks: list[str] = []
            ttft = None
            try:
                if self._edge_session is None:
                    # The first Generate opens the session itself (one round
                    # trip, not two); on the retry, after an edge that did not
                    # (an older server), the session is opened explicitly.
                    self._edge_session = (
                        new_session_id() if attempt == 1 else self.edge.open_session()
                    )
                    self._edge_seen = 0
                    # A new session holds nothing: the cost model must know.
                    self.ledger.seen["edge"] = 0
                    self._edge_announced = False
                stream = self.edge.generate(
                    self._edge_session, self.transcript[self._edge_seen:] + [user_msg], params,
                    # Only a call that sends the whole conversation may open it.
                    open_session=self._edge_seen == 0,
                    # What this side holds: the edge drops a turn it recorded
                    # but whose final message never arrived here.
                    transcript_length=self._edge_seen,
                )
                try:
                    for chunk in stream:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                            self._announce_edge_session(on_event)
                        chunks.append(chunk)
                        on_text(chunk)
                        if cancel is not None and cancel.is_set():
                            stream.cancel()
                            # The edge keeps its transcript as it was: the
                            # partial answer is resent with the next edge
                            # turn.  The edge's counts are lost.
                            return _Answer("".join(chunks), ttft, 0, 0, len(chunks), edge_kept=False)
                except BaseException:
                    # e.g. Ctrl-C in on_text: stop the edge's work too.
                    stream.cancel()
                    raise
                res = stream.result
                self._announce_edge_session(on_event)
                return _Answer(
                    "".join(chunks), ttft, res.prefill_tokens, res.cached_tokens, res.output_tokens
                )
            except (EdgeUnavailable, EdgeError) as exc:
                if attempt == 1 and not chunks and _must_reopen_session(exc):
                    # The edge restarted or evicted the session, or holds less
                    # of it than this side: open a new one and send the whole
                    # transcript.
                    self._edge_session = None
                    continue
                if chunks:
                    # The caller saw part of an answer that will be replaced.
                    on_event("edge_lost", str(exc))
                raise _EdgeFailed(f"{type(exc).__name__}: {exc}") from exc
        raise _EdgeFailed("unreachable")  # pragma: no cover

    def _announce_edge_session(self, on_event: EventCallback) -> None:
        """``edge_session`` once the edge has answered on a new session (it exists now)."""
        if not self._edge_announced:
            self._edge_announced = True
            on_event("edge_session", self._edge_session)


class _EdgeFailed(Exception):
    pass


@dataclass
class _Answer:
    text: str
    ttft_s: float | None
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    #: False when the edge session did not record this turn (cancelled).
    edge_kept: bool = True


def _must_reopen_session(exc: Exception) -> bool:
    """True when the edge does not know the session id (gRPC NOT_FOUND) or
    holds fewer of its messages than this side sent (OUT_OF_RANGE)."""
    code = getattr(exc, "code", None)
    code = getattr(code, "name", code)
    return str(code).upper().removeprefix("STATUSCODE.") in ("NOT_FOUND", "OUT_OF_RANGE")
