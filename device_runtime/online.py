"""Online estimation in the live runtime: every turn updates γ, B and δ.

:class:`OnlineRouting` wraps an :class:`~device_runtime.orchestrator.Orchestrator`.
After each turn it feeds the turn's measurements to an
:class:`~device_runtime.estimation.OnlineEstimator` and gives the orchestrator
the updated :class:`~device_runtime.cost_model.CostParams` for the next
decision (eqs. 6-12), so that a degraded link moves turns to the device within
a few turns.

- An edge turn gives γ_e from the edge's own timings and the link's cost as
  the client's wall time of the call minus the server's time (eq. 3).
- A device turn gives γ_s.  It says nothing about the link, so after it the
  device sends one small Echo: a link that recovered is noticed while turns
  still run on the device.  An Echo that fails counts as a very slow link.
- Token counts are the cost model's own (ΔC + L_p from the ledger, the
  answer's device-SLM tokens), so the estimates are in the unit that the
  predictions multiply.

The current estimates are in :attr:`OnlineRouting.estimates` after each turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from device_runtime.estimation import EwmaSettings, OnlineEstimator

if TYPE_CHECKING:  # pragma: no cover
    from device_runtime.orchestrator import Orchestrator, TurnResult

log = logging.getLogger(__name__)


class _RecordingEdge:
    """The orchestrator's edge client, remembering the last Generate stream."""

    def __init__(self, client) -> None:
        self._client = client
        self.last_stream = None

    def generate(self, *args, **kwargs):
        self.last_stream = self._client.generate(*args, **kwargs)
        return self.last_stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@dataclass(frozen=True)
class OnlineSettings:
    """How the live estimates are kept."""

    ewma: EwmaSettings = EwmaSettings()
    probe_after_device_turn: bool = True
    """Echo the edge after each device turn, so recovery is seen."""
    probe_timeout_s: float = 2.0
    """An Echo slower than this (or failing) counts as a link this slow."""
    track_gamma: bool = True
    """Update γ_s and γ_e too; False keeps the profiled γ and follows only the link
    (for experiments on a machine whose CPU is shared with other jobs)."""
    track_response: bool = True
    """Keep running means of each side's answer length for L̄_r (eqs. 3, 5)."""

    def __post_init__(self) -> None:
        if not self.probe_timeout_s > 0:
            raise ValueError("probe_timeout_s must be > 0")


class OnlineRouting:
    """``orch`` with its cost parameters kept current from every turn's telemetry."""

    def __init__(self, orch: "Orchestrator", settings: OnlineSettings | None = None) -> None:
        self.orch = orch
        self.settings = settings or OnlineSettings()
        self.estimator = OnlineEstimator(orch.params, self.settings.ewma)
        self._response = {"device": None, "edge": None}
        if orch.edge is not None and not isinstance(orch.edge, _RecordingEdge):
            orch.edge = _RecordingEdge(orch.edge)
        self.estimates: dict[str, float] = self.estimator.snapshot()
        self.last_comm_s: float | None = None

    def turn(self, prompt: str, **kwargs) -> "TurnResult":
        orch = self.orch
        ledger = orch.ledger.copy()
        edge = orch.edge if isinstance(orch.edge, _RecordingEdge) else None
        if edge is not None:
            edge.last_stream = None
        result = orch.turn(prompt, **kwargs)
        rec = result.telemetry
        answer_tokens = orch.ledger.context_tokens - ledger.context_tokens - rec.prompt_tokens
        self.last_comm_s = None
        if rec.target == "edge" and edge is not None and edge.last_stream is not None:
            self._observe_edge(edge.last_stream, ledger, rec.prompt_tokens, answer_tokens, rec.output_tokens)
        elif rec.target == "device":
            stats = orch.slm.last_stats
            if stats is not None and self.settings.track_gamma:
                # Eq. (1) charges ΔC_s + L_p: a new edge session is irrelevant here.
                self.estimator.observe_device_turn(
                    prefill_tokens=ledger.delta_c("device") + rec.prompt_tokens,
                    prefill_s=stats.prefill_s,
                    output_tokens=max(0, answer_tokens - 1),
                    decode_s=stats.decode_s,
                )
            self._track("device", answer_tokens)
            if rec.fallback:
                # The edge was chosen and failed: the link is, for now, unusable.
                self.estimator.observe_ping(self.settings.probe_timeout_s)
            elif self.settings.probe_after_device_turn and orch.edge is not None:
                self._probe()
        orch.params = self.estimator.params()
        if self.settings.track_response:
            resp = orch.params.response
            orch.params = orch.params.with_(response=type(resp)(
                self._response["device"] if self._response["device"] is not None else resp.device,
                self._response["edge"] if self._response["edge"] is not None else resp.edge,
            ))
        self.estimates = self.estimator.snapshot()
        return result

    def _observe_edge(self, stream, ledger, prompt_tokens: int, answer_tokens: int, _edge_tokens: int) -> None:
        try:
            res = stream.result
        except RuntimeError:  # cancelled: no server timings
            return
        # Server time from the model call to the last token; queueing shows as link.
        server_s = (res.server_ttft_s or res.prefill_s) + res.decode_s
        gamma = self.settings.track_gamma
        self.last_comm_s = self.estimator.observe_edge_turn(
            measured_s=res.total_s,
            server_s=server_s,
            router_s=0.0,  # total_s starts at the Generate call, after routing
            upload_tokens=ledger.delta_c("edge") + prompt_tokens,
            output_tokens=answer_tokens,
            prefill_tokens=ledger.delta_c("edge") + prompt_tokens if gamma else 0,
            prefill_s=res.prefill_s,
            decode_s=res.decode_s if gamma else 0.0,
        )
        self._track("edge", answer_tokens)

    def _track(self, target: str, answer_tokens: int) -> None:
        if not self.settings.track_response or answer_tokens <= 0:
            return
        prev = self._response[target]
        w = self.settings.ewma.weight
        self._response[target] = answer_tokens if prev is None else (1 - w) * prev + w * answer_tokens

    def _probe(self) -> None:
        from device_runtime.edge_client import EdgeError, EdgeUnavailable

        try:
            rtt = self.orch.edge.ping(0, 0, timeout_s=self.settings.probe_timeout_s)
        except (EdgeUnavailable, EdgeError) as exc:
            log.debug("link probe failed: %s", exc)
            rtt = self.settings.probe_timeout_s
        self.estimator.observe_ping(min(rtt, self.settings.probe_timeout_s))
        self.last_comm_s = rtt

    def __getattr__(self, name: str) -> Any:
        return getattr(self.orch, name)
