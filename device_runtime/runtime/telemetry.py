"""Per-turn telemetry: one JSON object per turn (issue 4's contract).

```
{"turn": int, "target": "device"|"edge", "policy": str, "p": float|null, "p_fused": float|null,
 "predicted_s": {"device": float, "edge": float}, "measured_s": float, "ttft_s": float,
 "prompt_tokens": int, "context_tokens": int, "prefill_tokens": int, "cached_tokens": int,
 "output_tokens": int, "fallback": bool}
```

- ``prompt_tokens`` is L_p and ``context_tokens`` C_t before the turn (paper,
  Sec. II-B), both counted in device-SLM tokens of the message texts.
- ``prefill_tokens`` / ``cached_tokens`` are what the serving model actually
  computed / reused from its KV cache, as it reported them.
- ``measured_s`` runs from the start of the turn (routing included, so it is
  comparable with the paper's T_total, eq. 8) to the last token; ``ttft_s``
  from the start of the turn to the first token of the answer.
- ``target`` is where the answer was produced; a fallback says "device".
- ``p`` and ``p_fused`` are null for a policy without a router (device, edge)
  and for an ``auto`` turn whose target the latency term settled alone, so
  that the router was not run (``AutoPolicy.skip_settled``).

Optional keys beyond the contract (absent when they do not apply):

- ``estimates``: the online estimates after the turn (``--online``): γ, B, δ
  in the PROFILE.json key names, and the edge's per-call time ``call_s_edge``.
- ``predicted_posthoc_s``: the served target's T_total (eq. 6 or 7) predicted
  with the same parameters and turn inputs as ``predicted_s``, but with the
  answer's actual length (device-SLM tokens of its text) in place of L̄_r, so
  that γ, B and δ can be checked apart from the length guess.  Absent on a
  fallback turn and for a policy that makes no prediction.
- ``edge_cache_unknown``: true when the last edge answer came without a
  cached-token count (an engine behind the ``openai`` backend that reports
  none), so this turn's ``predicted_s.edge`` charged a prefill of the whole
  context (``cost_model.prefill_delta_c``).
- ``cached_tokens_unknown``: true on an edge answer without a cached-token
  count: its ``cached_tokens`` (0) is not a measurement.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

FIELDS: dict[str, tuple[type, ...]] = {
    "turn": (int,),
    "target": (str,),
    "policy": (str,),
    "p": (float, type(None)),
    "p_fused": (float, type(None)),
    "predicted_s": (dict,),
    "measured_s": (float,),
    "ttft_s": (float,),
    "prompt_tokens": (int,),
    "context_tokens": (int,),
    "prefill_tokens": (int,),
    "cached_tokens": (int,),
    "output_tokens": (int,),
    "fallback": (bool,),
}


#: Keys a record may carry beyond the contract.
OPTIONAL_FIELDS = ("estimates", "predicted_posthoc_s", "edge_cache_unknown", "cached_tokens_unknown")


class TelemetryError(ValueError):
    """A telemetry record breaks the contract."""


@dataclass
class TurnTelemetry:
    """One turn, in the contract's field order."""

    turn: int
    target: str
    policy: str
    p: float | None
    p_fused: float | None
    predicted_s: dict[str, float]
    measured_s: float
    ttft_s: float
    prompt_tokens: int
    context_tokens: int
    prefill_tokens: int
    cached_tokens: int
    output_tokens: int
    fallback: bool
    #: Online estimates of γ, B and δ after this turn (only with ``--online``);
    #: an optional key beyond the contract's fields.
    estimates: dict[str, float] | None = None
    #: The served target's latency predicted with the answer's actual length
    #: (eqs. 6-7); None on a fallback turn.  Optional, like ``estimates``.
    predicted_posthoc_s: float | None = None
    #: True when the edge's cache state was unknown for this turn's decision:
    #: ``predicted_s["edge"]`` charges a prefill of the whole context.  Optional.
    edge_cache_unknown: bool | None = None
    #: True when the edge answered without a cached-token count: ``cached_tokens``
    #: (0) is not a measurement.  Optional.
    cached_tokens_unknown: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in OPTIONAL_FIELDS:
            if d[key] is None:
                del d[key]
        if self.predicted_posthoc_s is not None:
            d["predicted_posthoc_s"] = float(self.predicted_posthoc_s)
        d["predicted_s"] = {k: float(v) for k, v in self.predicted_s.items()}
        for k in ("p", "p_fused"):
            if d[k] is not None:
                d[k] = float(d[k])
        d["measured_s"], d["ttft_s"] = float(self.measured_s), float(self.ttft_s)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise :class:`TelemetryError` unless ``record`` matches the contract exactly."""
    keys = set(record) - set(OPTIONAL_FIELDS)
    if keys != set(FIELDS):
        missing, extra = set(FIELDS) - keys, keys - set(FIELDS)
        raise TelemetryError(f"telemetry keys differ: missing {sorted(missing)}, extra {sorted(extra)}")
    for key, types in FIELDS.items():
        value = record[key]
        # bool is an int in Python; the contract keeps them apart.
        if isinstance(value, bool) and bool not in types:
            raise TelemetryError(f"{key} must be {types}, got a bool")
        if not isinstance(value, types):
            raise TelemetryError(f"{key} must be {types}, got {type(value).__name__}")
    if record["target"] not in ("device", "edge"):
        raise TelemetryError(f"target must be device or edge, got {record['target']!r}")
    pred = record["predicted_s"]
    if set(pred) != {"device", "edge"} or not all(isinstance(v, float) for v in pred.values()):
        raise TelemetryError(f"predicted_s must be {{'device': float, 'edge': float}}, got {pred!r}")
    for key in ("turn", "prompt_tokens", "context_tokens", "prefill_tokens", "cached_tokens", "output_tokens"):
        if record[key] < 0:
            raise TelemetryError(f"{key} must be >= 0")
    for key in ("measured_s", "ttft_s"):
        if not math.isfinite(record[key]) or record[key] < 0:
            raise TelemetryError(f"{key} must be a finite non-negative number")
    if record["fallback"] and record["target"] != "device":
        raise TelemetryError("a fallback turn is answered on the device")
    if "predicted_posthoc_s" in record:
        posthoc = record["predicted_posthoc_s"]
        if not isinstance(posthoc, float) or not math.isfinite(posthoc) or posthoc < 0:
            raise TelemetryError(f"predicted_posthoc_s must be a finite non-negative float, got {posthoc!r}")


@dataclass
class TelemetryLog:
    """The turns of a run, kept in memory for profiling and summaries."""

    records: list[TurnTelemetry] = field(default_factory=list)

    def append(self, record: TurnTelemetry) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def to_jsonl(self) -> str:
        return "".join(r.to_json() + "\n" for r in self.records)

    def summary(self) -> dict[str, Any]:
        """Edge share, fallbacks, latency and token totals over the run."""
        return summarize(self.records)


def summarize(records: Iterable[TurnTelemetry]) -> dict[str, Any]:
    recs = list(records)
    n = len(recs)
    if n == 0:
        return {"turns": 0}
    edge = [r for r in recs if r.target == "edge"]
    measured = [r.measured_s for r in recs]
    chosen_pred = [r.predicted_s[r.target] for r in recs]
    return {
        "turns": n,
        "edge_turns": len(edge),
        "device_turns": n - len(edge),
        "edge_share": len(edge) / n,
        "fallbacks": sum(r.fallback for r in recs),
        "mean_measured_s": statistics.fmean(measured),
        "p50_measured_s": statistics.median(measured),
        "mean_ttft_s": statistics.fmean(r.ttft_s for r in recs),
        "mean_predicted_s": statistics.fmean(chosen_pred),
        "total_s": sum(measured),
        "prefill_tokens": sum(r.prefill_tokens for r in recs),
        "cached_tokens": sum(r.cached_tokens for r in recs),
        "output_tokens": sum(r.output_tokens for r in recs),
    }
