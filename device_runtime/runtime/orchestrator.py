"""The turn orchestrator: route each turn, stream the answer, keep the books.

Per turn (issue 4, item 3):

1. the policy scores the turn (``auto``: the router's p, eq. 10);
2. the cost model takes the live ΔC of each side from the conversation's
   :class:`~device_runtime.routing.cost_model.ContextLedger` (eqs. 1-7);
3. it decides (eqs. 11-12 for ``auto``);
4. the answer streams to the caller;
5. the transcript, the ledger and the edge session's bookkeeping are updated.

Token counts for the cost model (L_p, C_t, ΔC, response lengths) are device-SLM
tokens of the message texts: the device has no edge tokenizer, and one
tokenizer keeps the ledger consistent.  Template glue is not counted.  The
telemetry's ``prefill_tokens``/``cached_tokens`` are the serving model's own.

The edge path's prediction carries W_q, the edge's expected wait for a KV
slot (``CostParams.edge_queue_s``, a term the paper's idle edge does not
have): before each decision the orchestrator takes the edge client's estimate
(:meth:`~device_runtime.link.edge_client.EdgeClient.expected_queue_s`, kept
from the ``queue_s`` of this conversation's edge turns and the edge's own
reports), so under load a turn the device can answer is not queued.  Until the
client knows anything, the parameters' own ``edge_queue_s`` stands (0: idle).

Response lengths for the live prediction (eqs. 3, 5) are, with an answer-length
model (``answer_lengths``, :mod:`device_runtime.routing.answer_length`), each
side's expected capped length for this prompt; without one, the cost
parameters' averages L̄_r capped at ``max_tokens``, since no answer can be
longer.  After the
answer, the served target's latency is predicted again by the same equations
with the same parameters and the answer's actual length (``predicted_posthoc_s``
in telemetry): it checks γ, B and δ apart from the length guess.

If the edge cannot be reached, refuses the credentials, fails mid-answer or
ends with a malformed final message, the turn is answered on the device
(``fallback`` in telemetry) and the transcript stays complete: the edge is sent
the turns it missed the next time it answers.  Each edge call carries the
number of messages the edge should hold and their digest
(:func:`~device_runtime.core.messages.transcript_digest`), so the edge cuts
back a turn whose answer this side never took, and a session whose content
differs is refused (OUT_OF_RANGE) and reopened with the whole conversation.

Several edge addresses (stateless gateways, ``--edge A,B``): the edge client
picks the address of each call (the first whose circuit breaker is closed,
:mod:`device_runtime.link.breaker`).  A gateway holds only the sessions opened
on it, so when a call goes to another address the session moves: the same id,
opened there with the whole transcript (``edge_moved``).  A gateway that
fails UNAVAILABLE or past its deadline *during* a turn, before or after some
chunks, does not end the turn on the device while another address is left:
the turn is asked again on the next gateway (the partial answer is dropped,
``edge_lost``), because the user chose the edge's answer and a fleet with one
gateway down can still give it.  The transcript takes only the answer that
completed, once; the dead gateway is skipped for its cool-down, so the next
turn goes to the other one too.  The device stays the source of truth: every
gateway is sent what this side holds, never the other way round.

If the edge's answer comes without a cached-token count (an engine that
reports none), the ledger marks the edge's KV state unknown and the next
decisions charge its prefill the whole context (``cost_model.prefill_delta_c``),
saying so in the telemetry (``edge_cache_unknown``).

The policies themselves are in :mod:`device_runtime.routing.policies`.
Whatever follows the turns (online estimation, :mod:`device_runtime.runtime.online`)
is a :class:`TurnHook`: the orchestrator calls it before and after each turn,
hands it the edge's own account of an edge turn in :attr:`TurnResult.edge_result`,
and takes new cost parameters through :meth:`Orchestrator.set_params`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from device_runtime.core.flags import flag
from device_runtime.core.messages import transcript_digest
from device_runtime.routing.cost_model import ContextLedger, CostParams, ResponseLengths, Target
from device_runtime.routing.policies import Policy, PolicyDecision
from device_runtime.runtime.telemetry import TelemetryLog, TurnTelemetry

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.link.edge_client import EdgeClient, EdgeStream, EdgeTurnResult
    from device_runtime.llm.slm import SLMBackend
    from device_runtime.routing.answer_length import LiveLengths

log = logging.getLogger(__name__)


# --- settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class OrchestratorSettings:
    """Generation settings shared by both targets.

    The fields with a flag are ``chat``'s and ``demo``'s generation options.
    """

    #: Upper bound on answer tokens, on either side.
    max_tokens: int = field(default=128, metadata=flag("answer length cap, both sides"))
    temperature: float = field(default=0.0, metadata=flag(""))
    top_p: float = 1.0
    seed: int = field(default=0, metadata=flag("sampling seed and random-policy seed"))
    #: An optional system message placed before the first turn.
    system_prompt: str | None = field(default=None, metadata=flag(
        "system message before the first turn", name="--system", dest="system", metavar="TEXT",
    ))
    #: Tokens the formatted conversation plus ``max_tokens`` may fill (device
    #: SLM count) before the oldest turns are dropped; None: the SLM's window.
    context_window: int | None = field(default=None, metadata=flag(
        "tokens the conversation may fill before its oldest turns are dropped "
        "(default: the SLM's --n-ctx, or the edge's n_ctx if smaller)"
    ))

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


# --- what a turn gives back, and who hears it ---------------------------------------


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
    #: The edge's own account of an edge answer (its timings and counts, the
    #: link time measured around the call); None for a device answer and for
    #: an edge answer cancelled before its final message.
    edge_result: "EdgeTurnResult | None" = None
    #: On a fallback, the gRPC status name of the edge's failure, if it sent
    #: one (``RESOURCE_EXHAUSTED``: no slot within its queue timeout, a busy
    #: edge rather than a bad link); None otherwise.
    fallback_status: str | None = None


TextCallback = Callable[[str], None]
EventCallback = Callable[[str, str], None]


class TurnHook:
    """Follows an orchestrator's turns (e.g. online estimation of the cost
    parameters).  Every method does nothing here; a hook overrides what it needs.

    A hook changes the orchestrator only through its methods (``set_params``),
    so the turn's own logic stays in one place.
    """

    def before_turn(self, orch: "Orchestrator") -> None:
        """Before the turn is routed (``orch.turn_index == 0``: a new conversation)."""

    def before_routing(self, orch: "Orchestrator", prompt: str) -> None:
        """The prompt was accepted (it fits the window) and is about to be
        routed: e.g. a journal records it as a pending turn."""

    def on_chunk(self, orch: "Orchestrator", target: Target, chunk: str) -> None:
        """A chunk of the answer streamed from ``target``."""

    def after_turn(self, orch: "Orchestrator", result: TurnResult | None) -> None:
        """After the turn: its result, or None when the turn raised (a refused
        prompt, Ctrl-C), so that a hook can still restart what it paused."""

    def close(self, orch: "Orchestrator") -> None:
        """The orchestrator is closing: stop background work."""


# --- the edge session ---------------------------------------------------------------


@dataclass
class EdgeSession:
    """The edge session this conversation is on, as this side knows it.

    ``transcript[:seen]`` is what the edge session holds: the next edge turn
    sends only the messages after it.  ``announced``: the ``edge_session``
    event was given for ``id`` (once the edge answered on it: it exists now).
    """

    id: str | None = None
    seen: int = 0
    announced: bool = True
    #: The edge address (gateway) the session is on; None before its first call.
    address: str | None = None

    def start(self, session_id: str) -> None:
        """A new session: it holds nothing yet and is not announced."""
        self.id, self.seen, self.announced = session_id, 0, False

    def move(self, address: str) -> None:
        """The session continues on another gateway, which holds none of it:
        the same id, reopened there with the whole conversation."""
        self.address, self.seen = address, 0

    def forget(self) -> None:
        """No session (closed, or lost on the edge): the next edge turn opens one."""
        self.id, self.seen, self.address = None, 0, None

    def announce(self, on_event: EventCallback) -> None:
        """``edge_session`` once the edge has answered on a new session."""
        if not self.announced:
            self.announced = True
            on_event("edge_session", self.id)


# --- the orchestrator ---------------------------------------------------------------


@dataclass
class _TurnIO:
    """Where one turn's answer streams to, what stops it, and when it began."""

    on_text: TextCallback
    on_event: EventCallback
    cancel: threading.Event | None
    t0: float


@dataclass
class _Answer:
    text: str
    ttft_s: float | None
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    #: False when the edge session did not record this turn (cancelled).
    edge_kept: bool = True
    edge_result: "EdgeTurnResult | None" = None


class _EdgeFailed(Exception):
    """The edge could not answer; ``status``: the gRPC status name, if any."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


class Orchestrator:
    """One conversation between a user, the device SLM and (optionally) an edge.

    ``edge`` may be None: turns routed to the edge then fall back to the device.
    ``on_event(kind, detail)`` hears ``"fallback"`` (the edge failed; the answer
    restarts on the device) and ``"edge_session"`` (a new edge session, once the
    edge has answered on it: the first Generate opens it, see ``open_session``).
    ``hooks`` hear every turn (:class:`TurnHook`).
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
        hooks: Sequence[TurnHook] = (),
        answer_lengths: "LiveLengths | None" = None,
    ) -> None:
        self.slm = slm
        #: Per-turn L_r of each side from the prompt (None: the params' averages).
        self.answer_lengths = answer_lengths
        self.policy = policy
        self.params = params
        self.edge = edge
        self.settings = settings or OrchestratorSettings()
        self.telemetry = telemetry if telemetry is not None else TelemetryLog()
        self.transcript: list[dict[str, str]] = []
        self.ledger = ContextLedger()
        self.turn_index = 0
        self.edge_session = EdgeSession()
        self._hooks: list[TurnHook] = list(hooks)
        #: The edge address of the edge attempt in progress (None before it connects).
        self._edge_address: str | None = None
        self._start_transcript()

    def _start_transcript(self) -> None:
        self.transcript = []
        if self.settings.system_prompt:
            self.transcript.append({"role": "system", "content": self.settings.system_prompt})

    def add_hook(self, hook: TurnHook) -> None:
        """Let ``hook`` hear every turn from now on."""
        self._hooks.append(hook)

    def set_params(self, params: CostParams) -> None:
        """The cost parameters for the next decisions (e.g. online estimates)."""
        self.params = params

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

    def resume(self, messages: Sequence[dict[str, str]], *, edge_session: str | None = None,
               edge_seen: int = 0) -> None:
        """Continue a conversation kept elsewhere (a journal, after a restart).

        ``messages``: its complete turns (an optional system message, then
        user/assistant pairs); ``edge_session``/``edge_seen``: the edge session
        it was on and how many of ``messages`` that session holds.  The edge
        may have lost the session (NOT_FOUND) or hold a turn this side never
        took (cut back by count and digest): the next edge turn then reopens
        it with the whole conversation.  The device SLM's KV cache is cold,
        so the ledger says the device has seen nothing.
        """
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        start = 1 if msgs and msgs[0]["role"] == "system" else 0
        pairs = msgs[start:]
        if len(pairs) % 2 or any(
            m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(pairs)
        ):
            raise ValueError("a resumed conversation is user/assistant pairs after an optional system message")
        if not 0 <= edge_seen <= len(msgs) or (edge_session is None and edge_seen):
            raise ValueError(f"edge_seen {edge_seen} does not fit {len(msgs)} messages")
        self._close_edge_session()
        counts = [self.slm.count_tokens(m["content"]) for m in pairs]
        edge_tokens = sum(counts[: max(0, edge_seen - start)])
        self.transcript = msgs
        self.ledger = ContextLedger(sum(counts), {"device": 0, "edge": edge_tokens})
        self.turn_index = len(pairs) // 2
        self.edge_session = EdgeSession(edge_session, edge_seen if edge_session else 0)

    def close(self) -> None:
        """Stop the hooks' background work, then close the edge session."""
        for hook in self._hooks:
            hook.close(self)
        self._close_edge_session()

    def _close_edge_session(self) -> None:
        sid = self.edge_session.id
        if sid is not None and self.edge is not None:
            try:
                self.edge.close_session(sid)
            except Exception as exc:  # best effort: the edge may be gone
                log.debug("closing edge session %s failed: %s", sid, exc)
        self.edge_session.forget()

    # -- one turn

    def turn(
        self,
        prompt: str,
        *,
        on_text: TextCallback | None = None,
        on_event: EventCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> TurnResult:
        """Route, answer and record one user turn; the hooks hear it before and after."""
        for hook in self._hooks:
            hook.before_turn(self)
        result = None
        try:
            result = self._turn(prompt, on_text, on_event, cancel)
            return result
        finally:
            for hook in self._hooks:
                hook.after_turn(self, result)

    def _turn(self, prompt, on_text, on_event, cancel) -> TurnResult:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt must be a non-empty string")
        io = _TurnIO(on_text or (lambda _t: None), on_event or (lambda _k, _d: None), cancel, time.perf_counter())
        s = self.settings
        user_msg = {"role": "user", "content": prompt}
        self._fit_window(user_msg, io.on_event)
        prompt_tokens = self.slm.count_tokens(prompt)
        context_tokens = self.ledger.context_tokens
        expected = self.expected_lengths(prompt)
        turn_inputs = self.ledger.turn_inputs(
            prompt_tokens, response_device=expected.device, response_edge=expected.edge,
        )
        # The router reads the dialogue, not the system message (its training
        # turns have none, and C_t of eq. 4 does not count it).
        history = [m for m in self.transcript if m["role"] != "system"]
        for hook in self._hooks:
            hook.before_routing(self, prompt)
        decision = self.policy.choose(self._decision_params(), turn_inputs, prompt, history)
        target, failure, answer = self._answer(decision.target, user_msg, io)
        measured_s = time.perf_counter() - io.t0
        return self._record(
            user_msg, decision, target, answer, failure,
            prompt_tokens=prompt_tokens, context_tokens=context_tokens, measured_s=measured_s,
        )

    def expected_lengths(self, prompt: str) -> ResponseLengths:
        """L_r of each side for this turn, at most ``max_tokens``: the
        answer-length model's, or else the parameters' averages."""
        cap = self.settings.max_tokens
        if self.answer_lengths is not None:
            return self.answer_lengths.predict(prompt, follow_up=self.turn_index > 0, cap=cap)
        r = self.params.response
        return ResponseLengths(min(r.device, cap), min(r.edge, cap))

    def _decision_params(self) -> CostParams:
        """The parameters of this turn's decision: ``params`` with the edge
        client's current W_q, when it has one (see the module docstring)."""
        queue_s = self.edge.expected_queue_s() if self.edge is not None else None
        return self.params if queue_s is None else self.params.with_(edge_queue_s=queue_s)

    def _answer(self, target: Target, user_msg: dict, io: _TurnIO) -> tuple[Target, _EdgeFailed | None, _Answer]:
        """(where it was answered, why not on the edge if it was chosen, the answer)."""
        failure = None
        if target == "edge":
            try:
                return "edge", None, self._answer_on_edge(user_msg, io)
            except _EdgeFailed as exc:
                failure = exc
                io.on_event("fallback", str(exc))
                log.warning("edge unavailable, answering on the device: %s", exc)
        return "device", failure, self._answer_on_device(user_msg, io)

    def _record(
        self, user_msg: dict, decision: PolicyDecision, target: Target, answer: _Answer,
        failure: _EdgeFailed | None, *, prompt_tokens: int, context_tokens: int, measured_s: float,
    ) -> TurnResult:
        """Update the transcript, the edge session's and the ledger's books; log the telemetry."""
        fallback_reason = None if failure is None else str(failure)
        self.transcript += [user_msg, {"role": "assistant", "content": answer.text}]
        if target == "edge" and answer.edge_kept:
            self.edge_session.seen = len(self.transcript)
        answer_tokens = self.slm.count_tokens(answer.text)
        delta_c_tokens = self.ledger.delta_c(target)
        cache_unknown = answer.edge_result is not None and answer.edge_result.cached_tokens_unknown
        self.ledger.commit(target, prompt_tokens, answer_tokens, held=answer.edge_kept,
                           cache_known=not cache_unknown)
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
            ttft_s=answer.ttft_s if answer.ttft_s is not None else measured_s,
            prompt_tokens=prompt_tokens,
            context_tokens=context_tokens,
            prefill_tokens=answer.prefill_tokens,
            cached_tokens=answer.cached_tokens,
            output_tokens=answer.output_tokens,
            fallback=fallback_reason is not None,
            predicted_posthoc_s=posthoc_s,
            # Optional keys: the edge prediction assumed a full re-prefill (the
            # edge's cache state unknown), and this answer's cached count is none.
            edge_cache_unknown=True if getattr(decision.inputs, "edge_cache_unknown", False) else None,
            cached_tokens_unknown=True if cache_unknown else None,
        )
        self.telemetry.append(record)
        return TurnResult(
            answer.text, record, fallback_reason, answer_tokens, delta_c_tokens, answer.edge_result,
            None if failure is None else failure.status,
        )

    def _fit_window(self, user_msg: dict, on_event: EventCallback) -> None:
        """Drop the oldest user/assistant pairs until the turn fits the window.

        A sliding window, documented in docs/live.md: the system message stays;
        the edge session is closed (an edge transcript cannot lose messages),
        and both KV caches must recompute the shortened conversation.  A prompt
        that does not fit even alone raises ContextOverflowError, with the
        conversation untouched.
        """
        from device_runtime.llm.conversation import ContextOverflowError

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

    def _answer_on_device(self, user_msg: dict, io: _TurnIO) -> _Answer:
        s = self.settings
        chunks: list[str] = []
        ttft = None
        for chunk in self.slm.stream(
            self.transcript + [user_msg], max_tokens=s.max_tokens, temperature=s.temperature,
            top_p=s.top_p, seed=s.seed, cancel=io.cancel,
        ):
            if ttft is None:
                ttft = time.perf_counter() - io.t0
            chunks.append(chunk)
            io.on_text(chunk)
            for hook in self._hooks:
                hook.on_chunk(self, "device", chunk)
        stats = self.slm.last_stats
        return _Answer("".join(chunks), ttft, stats.prefill_tokens, stats.cached_tokens, stats.output_tokens)

    # -- the edge side of a turn

    def _answer_on_edge(self, user_msg: dict, io: _TurnIO) -> _Answer:
        """Answer on the edge, or raise :class:`_EdgeFailed` (the caller falls back).

        With several edge addresses (stateless gateways), a gateway that fails
        UNAVAILABLE or past its deadline, before or during the answer, is left
        for the next one, each at most once a turn: the turn is asked again
        there (see the module docstring), and a partial answer already shown
        is replaced (``edge_lost``).  Only when none answers does the device.
        """
        from device_runtime.link.edge_client import EdgeError, EdgeUnavailable

        if self.edge is None:
            raise _EdgeFailed("no edge configured")
        reopened, tried = False, set()
        for _ in range(len(getattr(self.edge, "targets", ())) + 2):
            chunks: list[str] = []
            self._edge_address = None
            try:
                return self._edge_attempt(reopened, user_msg, chunks, io)
            except (EdgeUnavailable, EdgeError) as exc:
                if not reopened and not chunks and _must_reopen_session(exc):
                    # The edge restarted or evicted the session, or holds less
                    # of it than this side: open a new one and send the whole
                    # transcript.
                    self.edge_session.forget()
                    reopened = True
                    continue
                if chunks:
                    # The caller saw part of an answer that will be replaced.
                    io.on_event("edge_lost", str(exc))
                if isinstance(exc, EdgeUnavailable) and self._next_gateway(tried):
                    continue
                code = getattr(exc, "code", None)
                raise _EdgeFailed(f"{type(exc).__name__}: {exc}", getattr(code, "name", None)) from exc
        raise _EdgeFailed("no edge address answered")

    def _next_gateway(self, tried: set) -> bool:
        """After a failure at this attempt's address: whether another edge
        address, not yet tried this turn and not cooling down, is left."""
        if self._edge_address is None:
            return False  # no address connected: the client tried them all
        tried.add(self._edge_address)
        self.edge.mark_failed(self._edge_address)
        breaker = getattr(self.edge, "breaker", None)
        return breaker is not None and any(
            a not in tried and not breaker.cooling(a) for a in self.edge.targets
        )

    def _edge_attempt(self, reopened: bool, user_msg: dict, chunks: list[str], io: _TurnIO) -> _Answer:
        """One Generate call on the edge session (opening one if there is none);
        the chunks it streamed are left in ``chunks``."""
        from device_runtime.link.edge_client import GenerationParams, new_session_id

        session = self.edge_session
        address = self._edge_address = self.edge.connect()
        if session.id is not None and session.address not in (None, address):
            # Another gateway, which does not hold the session: the same id is
            # opened there with the whole conversation (an engine router
            # behind the gateways keeps its affinity on that id).
            io.on_event("edge_moved", f"{session.address} -> {address}")
            session.move(address)
            self.ledger.seen["edge"] = 0
        if session.id is None:
            # The first Generate opens the session itself (one round trip, not
            # two); on the retry, after an edge that did not (an older server),
            # the session is opened explicitly.
            session.start(self.edge.open_session() if reopened else new_session_id())
            # A new session holds nothing: the cost model must know.
            self.ledger.seen["edge"] = 0
        session.address = address
        s = self.settings
        stream = self.edge.generate(
            session.id, self.transcript[session.seen:] + [user_msg],
            GenerationParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed),
            # Only a call that sends the whole conversation may open it.
            open_session=session.seen == 0,
            # What this side holds: the edge drops a turn it recorded but
            # whose final message never arrived here (or was malformed), and
            # only if its own messages are these: the digest says which.
            transcript_length=session.seen,
            transcript_digest=transcript_digest(self.transcript[:session.seen]),
            address=address,
        )
        ttft, cancelled = self._read_edge_stream(stream, chunks, io)
        if cancelled:
            # The edge keeps its transcript as it was: the partial answer is
            # resent with the next edge turn.  The edge's counts are lost.
            return _Answer("".join(chunks), ttft, 0, 0, len(chunks), edge_kept=False)
        res = stream.result
        session.announce(io.on_event)
        return _Answer(
            "".join(chunks), ttft, res.prefill_tokens, res.cached_tokens, res.output_tokens, edge_result=res,
        )

    def _read_edge_stream(self, stream: "EdgeStream", chunks: list[str], io: _TurnIO) -> tuple[float | None, bool]:
        """Pass the edge's chunks on as they come; (time to the first, whether cancelled)."""
        ttft = None
        try:
            for chunk in stream:
                if ttft is None:
                    ttft = time.perf_counter() - io.t0
                    self.edge_session.announce(io.on_event)
                chunks.append(chunk)
                io.on_text(chunk)
                for hook in self._hooks:
                    hook.on_chunk(self, "edge", chunk)
                if io.cancel is not None and io.cancel.is_set():
                    stream.cancel()
                    return ttft, True
        except BaseException:
            # e.g. Ctrl-C in on_text: stop the edge's work too.
            stream.cancel()
            raise
        return ttft, False


def _must_reopen_session(exc: Exception) -> bool:
    """True when the edge does not know the session id (NOT_FOUND) or does not
    hold the messages this side says it does, by count or by digest
    (OUT_OF_RANGE): decided by the gRPC status the client error carries, never
    by its message."""
    import grpc

    return getattr(exc, "code", None) in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE)
