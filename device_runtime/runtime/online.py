"""Online estimation in the live runtime: every turn updates γ, B and δ.

:class:`OnlineRouting` is a :class:`~device_runtime.runtime.orchestrator.TurnHook`
of an :class:`~device_runtime.runtime.orchestrator.Orchestrator`:

    online = OnlineRouting(orch.params)
    orch.add_hook(online)        # or Orchestrator(..., hooks=[online])

After each turn it feeds the turn's measurements to an
:class:`~device_runtime.link.estimation.OnlineEstimator` and gives the orchestrator
the updated :class:`~device_runtime.routing.cost_model.CostParams` for the next
decision (eqs. 6-12, through ``Orchestrator.set_params``), so that a degraded
link moves turns to the device within a few turns.

- An edge turn gives γ_e from the edge's own timings and the link's cost as
  the client's wall time of the call minus the server's time (eq. 3).
- A device turn gives γ_s.  It says nothing about the link, so after it the
  device sends one small Echo: a link that recovered is noticed while turns
  still run on the device.  An Echo that fails counts as a very slow link.
- Between turns, once per pause (``idle_probe_s`` after a turn ends), two
  Echos measure the link, so a change while the user types is known before
  the next turn is decided.
- A turn whose link sample looks like a new regime (held back as an outlier)
  is followed at once by an Echo that confirms or clears it, so the next turn
  is decided on the new link.
- The edge's queue W_q (``CostParams.edge_queue_s``): the orchestrator takes
  it from the edge client before each decision; an edge turn's ``queue_s``
  feeds it, and here, after each Echo that follows a device turn or ends an
  idle pause, one ``GetServerInfo`` asks the edge for its current expected
  wait, so a queue that emptied is seen while turns run on the device.  A
  turn's wait for a slot is the server's, not the link's: it is taken out of
  the link's sample.  A fallback because no slot came free in time
  (RESOURCE_EXHAUSTED) is a busy edge, not a bad link.
- Answer lengths L̄_r: this conversation's answers on each side, shrunk
  towards the running mean over all answers.
- Token counts are the cost model's own (ΔC + L_p from the ledger, the
  answer's device-SLM tokens), so the estimates are in the unit that the
  predictions multiply.

The current estimates are in :attr:`OnlineRouting.estimates` after each turn.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device_runtime.link.estimation import EwmaSettings, OnlineEstimator
from device_runtime.routing.cost_model import CostParams
from device_runtime.runtime.orchestrator import TurnHook

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.link.edge_client import EdgeClient, EdgeTurnResult
    from device_runtime.runtime.orchestrator import Orchestrator, TurnResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineSettings:
    """How the live estimates are kept."""

    ewma: EwmaSettings = EwmaSettings()
    probe_after_device_turn: bool = True
    """Echo the edge after each device turn, so recovery is seen."""
    probe_timeout_s: float = 2.0
    """An Echo slower than this (or failing) counts as a link this slow."""
    outage_probe_timeout_s: float = 0.5
    """While the link is down (the last Echo or edge turn failed), an Echo
    after a device turn waits at most this long (a failure still counts as
    ``probe_timeout_s``): a device turn during an outage is not held up for
    the full ``probe_timeout_s``, and a link that is back is still seen."""
    track_gamma: bool = True
    """Update γ_s and γ_e too; False keeps the profiled γ and follows only the link
    (for experiments on a machine whose CPU is shared with other jobs)."""
    track_response: bool = True
    """Keep running means of each side's answer length for L̄_r (eqs. 3, 5)."""
    length_prior_answers: float = 1.0
    """L̄_r for a turn is the mean of this conversation's answers on that side,
    with the running mean over all conversations counted as this many answers
    (answers within a dialogue are alike in length: for the edge's second turns,
    median relative length error 0.26 this way, 0.38 with the running mean alone;
    ``scripts/bench_answer_length.py``)."""
    idle_probe_s: float | None = 0.5
    """Once per pause between turns, this many seconds after a turn ends, send
    two Echos (the second confirms the first), so that a link that changed
    while the user was typing is known before the next turn is decided.  The
    results are fed to the estimator when the next turn starts; a turn that
    starts first cancels the probe.  None disables it."""
    queue_report: bool = True
    """After the Echo that follows a device turn and after an idle probe, ask
    the edge for its queue (one GetServerInfo, as small as an Echo; not while
    the link is down, nor with ``--no-edge-queue``), so that W_q follows the
    edge while no turn goes there."""
    report_estimates: bool = True
    """Write the estimates after each turn into its telemetry (the optional
    ``estimates`` key).  ``chat`` and ``demo`` estimate online by default but
    write the key only with ``--online``, so that the default telemetry keeps
    the keys it had before online estimation became the default."""
    confirm_probe: bool = True
    """When a turn's link sample is held back as an outlier, Echo at once: a
    second outlier on the same side is a new regime (see ``EwmaSettings.regime_after``),
    so a changed link is adopted before the next turn rather than after it."""

    def __post_init__(self) -> None:
        if not self.probe_timeout_s > 0:
            raise ValueError("probe_timeout_s must be > 0")
        if not 0 < self.outage_probe_timeout_s <= self.probe_timeout_s:
            raise ValueError("outage_probe_timeout_s must be in (0, probe_timeout_s]")
        if not self.length_prior_answers > 0:
            raise ValueError("length_prior_answers must be > 0")
        if self.idle_probe_s is not None and not self.idle_probe_s > 0:
            raise ValueError("idle_probe_s must be > 0 or None")


class OnlineRouting(TurnHook):
    """Keeps an orchestrator's cost parameters current from every turn's telemetry.

    ``params``: the starting parameters (the orchestrator's, from the preset or
    a profile).  The estimates after each turn are also written into the
    turn's telemetry (its optional ``estimates`` key).
    """

    def __init__(self, params: CostParams, settings: OnlineSettings | None = None) -> None:
        self.settings = settings or OnlineSettings()
        self.estimator = OnlineEstimator(params, self.settings.ewma)
        self._response = {"device": None, "edge": None}
        self._conversation: dict[str, list[int]] = {"device": [], "edge": []}
        #: The turn being answered: (prompt, follow-up?), for the answer-length model's correction.
        self._prompt: tuple[str, bool] | None = None
        self.estimates: dict[str, float] = self.estimator.snapshot()
        self.last_comm_s: float | None = None
        #: Echo round trips taken while idle and fed to the estimator so far.
        self.idle_probes = 0
        self._idle_lock = threading.Lock()
        self._idle_gap = 0
        self._idle_rtts: list[float] = []
        self._idle_timer: threading.Timer | None = None
        #: The last link sample was a failure: probes then wait less.
        self._link_down = False

    # -- the hook

    def before_turn(self, orch: "Orchestrator") -> None:
        self._take_idle_probes(orch)
        if orch.turn_index == 0:
            # A new conversation: its answers' lengths are not known yet.
            self._conversation = {"device": [], "edge": []}
            if orch.answer_lengths is not None:
                orch.answer_lengths.new_conversation()
            self._apply_params(orch)

    def before_routing(self, orch: "Orchestrator", prompt: str) -> None:
        self._prompt = (prompt, orch.turn_index > 0)

    def after_turn(self, orch: "Orchestrator", result: "TurnResult | None") -> None:
        try:
            if result is not None:
                self._after_answer(orch, result)
        finally:
            self._schedule_idle_probe(orch)

    def close(self, orch: "Orchestrator") -> None:
        self._take_idle_probes(orch)

    # -- probes while idle

    def _schedule_idle_probe(self, orch: "Orchestrator") -> None:
        if self.settings.idle_probe_s is None or orch.edge is None:
            return
        with self._idle_lock:
            gap = self._idle_gap
        timer = threading.Timer(self.settings.idle_probe_s, self._idle_probe, args=(gap, orch))
        timer.daemon = True
        self._idle_timer = timer
        timer.start()

    def _idle_probe(self, gap: int, orch: "Orchestrator") -> None:
        """Runs on the timer's thread: two Echos, kept only if no turn started
        (and nothing was closed) since, then the edge's queue report."""
        for _ in range(2):
            with self._idle_lock:
                if gap != self._idle_gap:
                    return
            try:
                rtt = self._echo(orch.edge)
            except RuntimeError as exc:  # the client was closed while this Echo was out
                log.debug("idle link probe dropped: %s", exc)
                return
            with self._idle_lock:
                if gap != self._idle_gap:
                    return
                self._idle_rtts.append(rtt)
        with self._idle_lock:
            still_idle = gap == self._idle_gap
        if still_idle and rtt < self.settings.probe_timeout_s:
            self._refresh_queue(orch.edge)

    def _take_idle_probes(self, orch: "Orchestrator") -> None:
        """Stop the pending probe; feed what it measured (one thread touches the estimator)."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        with self._idle_lock:
            self._idle_gap += 1
            rtts, self._idle_rtts = self._idle_rtts, []
        for rtt in rtts:
            self.estimator.observe_ping(rtt)
        if rtts:
            self._link_down = rtts[-1] >= self.settings.probe_timeout_s
            self.idle_probes += len(rtts)
            self._apply_params(orch)
            self.estimates = self.estimator.snapshot()

    # -- one turn

    def _after_answer(self, orch: "Orchestrator", result: "TurnResult") -> None:
        try:
            self._observe(orch, result)
        except ValueError as exc:
            # The turn is answered and recorded; a sample the estimator
            # refuses must not lose it.  The estimates stay as they were.
            log.warning("turn %d: measurements not used for the estimates: %s", result.telemetry.turn, exc)
        self._correct_lengths(orch, result)
        self._apply_params(orch)
        self.estimates = self.estimator.snapshot()
        # The telemetry contract's optional key: the estimates after this turn.
        if self.settings.report_estimates:
            result.telemetry.estimates = dict(self.estimates)

    def _observe(self, orch: "Orchestrator", result: "TurnResult") -> None:
        """Feed one turn's measurements to the estimator (and probe the link)."""
        rec = result.telemetry
        # The cost model's own counts of what the turn sent and produced (after
        # a sliding-window cut or a new edge session, not as first predicted).
        answer_tokens = result.answer_tokens
        prefill_tokens = result.delta_c_tokens + rec.prompt_tokens
        self.last_comm_s = None
        if rec.target == "edge":
            self._link_down = False
            if result.edge_result is not None:  # None: cancelled, no server timings
                self._observe_edge(result.edge_result, prefill_tokens, answer_tokens)
        elif rec.target == "device":
            # No slot in time: the edge is busy (its queue), the link is fine.
            busy = result.fallback_status == "RESOURCE_EXHAUSTED"
            self._observe_device(orch, prefill_tokens, answer_tokens, fallback=rec.fallback and not busy)
        if (
            self.settings.confirm_probe
            and self.estimator.link.pending_outliers
            and orch.edge is not None
            and not rec.fallback
        ):
            self._probe(orch.edge)

    def _observe_device(
        self, orch: "Orchestrator", prefill_tokens: int, answer_tokens: int, *, fallback: bool
    ) -> None:
        stats = orch.slm.last_stats
        if stats is not None and self.settings.track_gamma:
            # Eq. (1) charges ΔC_s + L_p: a new edge session is irrelevant here.
            self.estimator.observe_device_turn(
                prefill_tokens=prefill_tokens,
                prefill_s=stats.prefill_s,
                output_tokens=max(0, answer_tokens - 1),
                decode_s=stats.decode_s,
            )
        self._track("device", answer_tokens)
        if fallback:
            # The edge was chosen and failed: the link is, for now, unusable.
            self._link_down = True
            self.estimator.observe_ping(self.settings.probe_timeout_s)
        elif self.settings.probe_after_device_turn and orch.edge is not None:
            self._probe(orch.edge)
            if not self._link_down:
                self._refresh_queue(orch.edge)

    def _correct_lengths(self, orch: "Orchestrator", result: "TurnResult") -> None:
        """The answer's length corrects the answer-length model's next
        predictions for that side (not a cancelled answer: cut short)."""
        rec, prompt = result.telemetry, self._prompt
        self._prompt = None
        lengths = orch.answer_lengths
        if lengths is None or prompt is None or not self.settings.track_response:
            return
        if rec.target == "edge" and result.edge_result is None:
            return
        if rec.target == "device" and getattr(orch.slm.last_stats, "finish_reason", None) == "cancelled":
            return  # cut short by the user
        lengths.observe(rec.target, prompt[0], follow_up=prompt[1], cap=orch.settings.max_tokens,
                        answer_tokens=result.answer_tokens)

    def response_length(self, target: str) -> float | None:
        """L̄_r for the next turn on ``target``: this conversation's mean answer
        length, shrunk towards the running mean over all answers; None before
        any answer on that side."""
        overall = self._response[target]
        if overall is None:
            return None
        own = self._conversation[target]
        k = self.settings.length_prior_answers
        return (sum(own) + k * overall) / (len(own) + k)

    def _apply_params(self, orch: "Orchestrator") -> None:
        """The orchestrator's parameters for the next turn: the estimates, with
        this conversation's answer lengths."""
        params = self.estimator.params()
        if self.settings.track_response:
            resp = params.response
            device, edge = self.response_length("device"), self.response_length("edge")
            params = params.with_(response=type(resp)(
                device if device is not None else resp.device,
                edge if edge is not None else resp.edge,
            ))
        orch.set_params(params)

    def _observe_edge(self, res: "EdgeTurnResult", upload_tokens: int, answer_tokens: int) -> None:
        # Server time from the request to the last token, its wait for a slot
        # included: that is W_q's (the edge's queue), not the link's.
        first_token_s = res.server_ttft_s or res.prefill_s
        server_s = res.queue_s + first_token_s + res.decode_s
        # With the edge's cache count unknown its prefill covered an unknown
        # part of the context: not a sample of γ_e prefill against ΔC + L_p.
        gamma = self.settings.track_gamma and not getattr(res, "cached_tokens_unknown", False)
        self.last_comm_s = self.estimator.observe_edge_turn(
            measured_s=res.total_s,
            server_s=server_s,
            router_s=0.0,  # total_s starts at the Generate call, after routing
            upload_tokens=upload_tokens,
            output_tokens=answer_tokens,
            first_token_s=first_token_s if gamma else None,
            decode_s=res.decode_s if gamma else None,
        )
        self._track("edge", answer_tokens)

    def _track(self, target: str, answer_tokens: int) -> None:
        if not self.settings.track_response or answer_tokens <= 0:
            return
        prev = self._response[target]
        w = self.settings.ewma.weight
        self._response[target] = answer_tokens if prev is None else (1 - w) * prev + w * answer_tokens
        self._conversation[target].append(answer_tokens)

    def _echo(self, edge: "EdgeClient", timeout_s: float | None = None) -> float:
        """One empty Echo's round trip, waiting at most ``timeout_s`` (default
        ``probe_timeout_s``); a failed or slower one counts as ``probe_timeout_s``."""
        from device_runtime.link.edge_client import EdgeError, EdgeUnavailable

        limit = self.settings.probe_timeout_s
        try:
            rtt = edge.ping(0, 0, timeout_s=timeout_s or limit)
        except (EdgeUnavailable, EdgeError) as exc:
            log.debug("link probe failed: %s", exc)
            return limit
        return min(rtt, limit)

    def _refresh_queue(self, edge: "EdgeClient") -> None:
        """One GetServerInfo: the edge's expected wait goes to the client's W_q."""
        from device_runtime.link.edge_client import EdgeError, EdgeUnavailable

        if not self.settings.queue_report or not edge.queue.settings.edge_queue:
            return
        try:
            edge.server_info(timeout_s=self.settings.probe_timeout_s)
        except (EdgeUnavailable, EdgeError, RuntimeError) as exc:  # RuntimeError: closed meanwhile
            log.debug("queue report failed: %s", exc)

    def _probe(self, edge: "EdgeClient") -> None:
        s = self.settings
        rtt = self._echo(edge, s.outage_probe_timeout_s if self._link_down else None)
        self._link_down = rtt >= s.probe_timeout_s
        self.estimator.observe_ping(rtt)
        self.last_comm_s = rtt
