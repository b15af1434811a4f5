"""Threshold calibration: eq. (9) solved for θ on recorded data.

Eq. (9) asks for the policy of least mean latency E[T_total] whose mean
quality E[Q] is at least Q_target.  Within the paper's policy family, edge
iff p̃ = p − α(Tᵉ − Tˢ) > θ (eqs. 11-12) with α fixed, the only free choice is
θ, so on a trace eq. (9) is a one-dimensional search: evaluate every θ that
changes a decision (the midpoints between consecutive observed p̃), keep the
ones that meet the target, take the fastest.  Operators also budget LLM calls
instead ("at most S of the turns on the edge"); that target picks the θ with
the most edge turns within S, the fastest among equals.

What the chosen θ achieves on the same data is reported with a bootstrap
interval over dialogues (θ held fixed): how much that operating point moves
with the sample, not how it will do on other traffic; ``simulate --threshold``
checks that on another split.

On telemetry (``chat``/``demo --json``) there is no quality, only p, p̃ and
both latency predictions per turn, so only an edge-share target can be met.
A turn that the runtime settled without the router (``p`` null,
``AutoPolicy.skip_settled``) still depends on θ: its p̃ lies in [−g, 1 − g]
with g = α(Tᵉ − Tˢ) from its predictions, and it is counted with the chance,
under the scored turns' p, that p − g > θ.

The calibration file (:class:`Calibration`) carries θ and α for
``chat``/``demo --calibration FILE``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from device_runtime.core.flags import flag
from device_runtime.routing import cost_model
from device_runtime.sim.experiment import (
    SPLITS, SimulateSettings, finite_float, fraction, nonneg_float, positive_int, router_factories, select_dialogues,
)
from device_runtime.sim.metrics import CurvePoint
from device_runtime.sim.simulate import LengthPlan, _turn_costs, play_dialogue, score_turns
from device_runtime.sim.traces import BENCHMARKS, Dialogue, word_count

#: Calibration file format (``kind`` and ``version`` keys).
FILE_KIND = "edgeroute.calibration"
FILE_VERSION = 1
#: Bounds on what is read: a calibration file, a telemetry file, its records.
MAX_FILE_BYTES = 1 << 20
MAX_TELEMETRY_BYTES = 256 << 20
MAX_TELEMETRY_RECORDS = 1_000_000
MAX_BOOTSTRAP = 100_000
_EPS = 1e-12


class CalibrationError(ValueError):
    """A target that cannot be met, or input that cannot be calibrated on."""


# --- traces ------------------------------------------------------------------------


class TraceOutcomes:
    """One router's turns on a trace, evaluable at any θ.

    Single-turn dialogues have a fixed p̃ and fixed charges, so they are sorted
    once and any θ is a binary search plus cumulative sums.  Multi-turn
    dialogues are replayed per θ (their p̃ depends on the earlier decisions).
    """

    def __init__(
        self,
        params: cost_model.CostParams,
        dialogues: Sequence[Dialogue],
        scores: Sequence[Sequence[float]],
        *,
        with_context: bool = True,
        count: Callable[[str], int] = word_count,
        lengths: LengthPlan = LengthPlan(),
    ) -> None:
        if len(dialogues) != len(scores):
            raise ValueError(f"{len(dialogues)} dialogues but {len(scores)} score lists")
        self.params, self.with_context, self.count, self.lengths = params, with_context, count, lengths
        self.dialogues, self.scores = list(dialogues), [list(s) for s in scores]
        self.n_turns = sum(len(d.turns) for d in self.dialogues)
        if self.n_turns == 0:
            raise CalibrationError("no turns to calibrate on")
        self.single = [i for i, d in enumerate(self.dialogues) if len(d.turns) == 1]
        self.multi = [i for i, d in enumerate(self.dialogues) if len(d.turns) > 1]
        rows = [self._single_row(i) for i in self.single]
        # columns: p̃, Tˢ, Tᵉ, Q device, Q edge
        self._rows = np.asarray(rows, dtype=float).reshape(len(rows), 5)
        order = np.argsort(-self._rows[:, 0], kind="stable")  # by p̃, highest first
        self._fused_desc = self._rows[order, 0]
        self._gain_q = np.concatenate([[0.0], np.cumsum(self._rows[order, 4] - self._rows[order, 3])])
        self._gain_t = np.concatenate([[0.0], np.cumsum(self._rows[order, 2] - self._rows[order, 1])])

    def _single_row(self, i: int) -> tuple[float, float, float, float, float]:
        turn = self.dialogues[i].turns[0]
        decided = self.lengths.decide(turn) if self.lengths.decide else None
        charged = self.lengths.charge(turn) if self.lengths.charge else None
        fused, dev, edge = _turn_costs(
            self.params, cost_model.ContextLedger(), self.count(turn.prompt), self.scores[i][0],
            self.with_context, decided, charged,
        )
        return fused, dev, edge, turn.quality_device, turn.quality_edge

    def _play(self, i: int, theta: float) -> tuple[float, int, float]:
        q, e, t, _ = play_dialogue(
            self.params, self.dialogues[i], self.scores[i], self.with_context, self.count,
            threshold=theta, lengths=self.lengths,
        )
        return q, e, t

    def candidates(self) -> list[float]:
        """Every θ that can change a decision: midpoints between consecutive distinct p̃,
        one below and one above them all.  Multi-turn p̃ are pooled from the all-device
        and all-edge histories (as ``simulate``'s sweep does)."""
        pooled = list(self._rows[:, 0])
        for i in self.multi:
            for forced in cost_model.TARGETS:
                pooled += play_dialogue(
                    self.params, self.dialogues[i], self.scores[i], self.with_context, self.count,
                    forced=forced, lengths=self.lengths,
                )[3]
        values = np.unique(np.asarray(pooled, dtype=float))
        inner = (values[:-1] + values[1:]) / 2.0
        return [float(values[0] - 1.0), *map(float, inner), float(values[-1] + 1.0)]

    def point(self, theta: float) -> CurvePoint:
        """The operating point at θ (eq. 12: edge iff p̃ > θ)."""
        k = int(np.sum(self._fused_desc > theta))  # the k highest p̃ go to the edge
        quality = float(self._rows[:, 3].sum() + self._gain_q[k])
        latency = float(self._rows[:, 1].sum() + self._gain_t[k])
        edge_calls = k
        for i in self.multi:
            q, e, t = self._play(i, theta)
            quality, edge_calls, latency = quality + q, edge_calls + e, latency + t
        n = self.n_turns
        return CurvePoint(float(theta), quality / n, edge_calls / n, latency / n)

    def curve(self) -> list[CurvePoint]:
        """The operating point at every candidate θ."""
        return [self.point(theta) for theta in self.candidates()]

    def per_dialogue(self, theta: float) -> np.ndarray:
        """Rows (quality sum, edge calls, latency sum, turns) per dialogue at θ, for the bootstrap."""
        out = np.empty((len(self.dialogues), 4))
        for k, i in enumerate(self.single):
            fused, dev, edge, qd, qe = self._rows[k]
            to_edge = fused > theta
            out[i] = (qe if to_edge else qd, float(to_edge), edge if to_edge else dev, 1.0)
        for i in self.multi:
            q, e, t = self._play(i, theta)
            out[i] = (q, e, t, len(self.dialogues[i].turns))
        return out


# --- choosing θ ----------------------------------------------------------------------


def check_targets(target_quality: float | None, target_edge_share: float | None) -> None:
    """Exactly one target, finite; an edge share in [0, 1]."""
    if (target_quality is None) == (target_edge_share is None):
        raise CalibrationError("give exactly one of a target quality and a target edge share")
    value = target_quality if target_quality is not None else target_edge_share
    if not math.isfinite(value):
        raise CalibrationError(f"the target must be a finite number, got {value!r}")
    if target_edge_share is not None and not 0.0 <= target_edge_share <= 1.0:
        raise CalibrationError(f"the target edge share must be in [0, 1], got {target_edge_share}")


def choose_threshold(
    points: Iterable[CurvePoint], *, target_quality: float | None = None, target_edge_share: float | None = None
) -> CurvePoint:
    """The operating point that solves eq. (9) among ``points``.

    Target quality: the least mean latency with quality ≥ Q (ties: fewer edge
    calls, then the higher θ).  Target edge share: the most edge calls with
    edge share ≤ S (ties: the lower latency, then the higher θ).  Raises
    :class:`CalibrationError` when no point meets the target.
    """
    check_targets(target_quality, target_edge_share)
    points = list(points)
    if not points:
        raise CalibrationError("no operating points to choose from")
    if target_quality is not None:
        ok = [p for p in points if p.quality >= target_quality - _EPS]
        if not ok:
            best = max(points, key=lambda p: p.quality)
            raise CalibrationError(
                f"target quality {target_quality:g} is unreachable on these data: the best is "
                f"{best.quality:.4g} (edge share {best.edge_share:.3f})"
            )
        return min(ok, key=lambda p: (p.mean_latency_s, p.edge_share, -p.threshold))
    ok = [p for p in points if p.edge_share <= target_edge_share + _EPS]
    if not ok:  # cannot happen with a θ above every p̃ among the points, but points are the caller's
        raise CalibrationError(f"no θ keeps the edge share at or below {target_edge_share:g}")
    return min(ok, key=lambda p: (-p.edge_share, p.mean_latency_s, -p.threshold))


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high}


def bootstrap(
    per_dialogue: np.ndarray, *, resamples: int, seed: int = 0, confidence: float = 0.95
) -> dict[str, Interval]:
    """Percentile intervals of quality, edge share and mean latency over dialogues
    resampled with replacement (θ fixed): ``per_dialogue`` rows are
    (quality sum, edge calls, latency sum, turns), as :meth:`TraceOutcomes.per_dialogue`."""
    if not 1 <= resamples <= MAX_BOOTSTRAP:
        raise CalibrationError(f"bootstrap resamples must be in [1, {MAX_BOOTSTRAP}], got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
    rows = np.asarray(per_dialogue, dtype=float)
    n = rows.shape[0]
    if n == 0:
        raise CalibrationError("no dialogues to resample")
    rng = np.random.default_rng(seed)
    sums = np.empty((resamples, 4))
    chunk = max(1, 2_000_000 // n)  # bounds the count matrix to ~16 MB
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size)
        sums[start : start + size] = counts @ rows
    turns = sums[:, 3]
    tail = (1.0 - confidence) / 2.0 * 100.0
    out = {}
    for name, col in (("quality", 0), ("edge_share", 1), ("mean_latency_s", 2)):
        low, high = np.percentile(sums[:, col] / turns, [tail, 100.0 - tail])
        out[name] = Interval(float(low), float(high))
    return out


# --- telemetry -----------------------------------------------------------------------


@dataclass(frozen=True)
class TelemetryTurn:
    """What calibration reads of one telemetry record."""

    p: float | None
    p_fused: float | None
    predicted_device_s: float
    predicted_edge_s: float
    target: str
    policy: str

    @property
    def latency_gap_s(self) -> float:
        """Tᵉ − Tˢ as the decision predicted it (T_router is in both and cancels)."""
        return self.predicted_edge_s - self.predicted_device_s


def _num(record: dict, key: str, where: str, *, nullable: bool = False) -> float | None:
    value = record.get(key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def parse_telemetry_line(line: str, where: str) -> TelemetryTurn:
    """One record of the ``chat``/``demo --json`` telemetry (docs/live.md's keys)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: a telemetry record is a JSON object")
    predicted = record.get("predicted_s")
    if not isinstance(predicted, dict):
        raise CalibrationError(f"{where}: predicted_s must be {{'device': s, 'edge': s}}, got {predicted!r}")
    target, policy = record.get("target"), record.get("policy")
    if target not in cost_model.TARGETS:
        raise CalibrationError(f"{where}: target must be device or edge, got {target!r}")
    if not isinstance(policy, str):
        raise CalibrationError(f"{where}: policy must be a string, got {policy!r}")
    p = _num(record, "p", where, nullable=True)
    if p is not None and not 0.0 <= p <= 1.0:
        raise CalibrationError(f"{where}: p must be in [0, 1], got {p}")
    return TelemetryTurn(
        p=p,
        p_fused=_num(record, "p_fused", where, nullable=True),
        predicted_device_s=_num(predicted, "device", where + " predicted_s"),
        predicted_edge_s=_num(predicted, "edge", where + " predicted_s"),
        target=target,
        policy=policy,
    )


def read_telemetry(path: str | Path) -> list[TelemetryTurn]:
    """Every record of a telemetry JSONL file (blank lines skipped); bounded in size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_TELEMETRY_BYTES:
            raise CalibrationError(f"{path}: {size} bytes, more than the {MAX_TELEMETRY_BYTES} read")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CalibrationError(f"cannot read telemetry {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{path}: not UTF-8 text") from None
    turns = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            turns.append(parse_telemetry_line(line, f"{path}:{number}"))
            if len(turns) > MAX_TELEMETRY_RECORDS:
                raise CalibrationError(f"{path}: more than {MAX_TELEMETRY_RECORDS} records")
    if not turns:
        raise CalibrationError(f"{path}: no telemetry records")
    return turns


def infer_alpha(turns: Sequence[TelemetryTurn]) -> float:
    """α the run used, from p − p̃ = α(Tᵉ − Tˢ) (eq. 11) of its scored turns.

    Raises when no scored turn has a latency gap, or when the turns disagree
    (a file that joins runs with different α): then α must be given."""
    values = [
        (t.p - t.p_fused) / t.latency_gap_s
        for t in turns
        if t.p is not None and t.p_fused is not None and abs(t.latency_gap_s) > 1e-9
    ]
    if not values:
        raise CalibrationError("cannot infer α from this telemetry (no scored turn with a latency gap): give --alpha")
    alpha = float(np.median(values))
    if max(abs(v - alpha) for v in values) > 1e-6 * max(1.0, abs(alpha)) + 1e-6:
        raise CalibrationError(
            f"the turns of this telemetry used different α ({min(values):.4g} to {max(values):.4g}): give --alpha"
        )
    return alpha


@dataclass(frozen=True)
class TelemetryCalibration:
    """θ for a target edge share on telemetry, and what it gives there."""

    threshold: float
    alpha: float
    edge_share: float
    n_turns: int
    n_scored: int
    n_settled: int
    recorded_edge_share: float


def _edge_share(theta: float, fused: np.ndarray, gaps: np.ndarray, p_sorted: np.ndarray) -> float:
    """Expected edge share at θ: scored turns by their p̃, settled ones by the scored p's distribution."""
    scored = float(np.sum(fused > theta))
    # P(p > θ + g) under the empirical distribution of the scored turns' p.
    above = p_sorted.size - np.searchsorted(p_sorted, theta + gaps, side="right")
    settled = float(np.sum(above / p_sorted.size)) if gaps.size else 0.0
    return (scored + settled) / (fused.size + gaps.size)


def _telemetry_candidates(fused: np.ndarray, gaps: np.ndarray, p_sorted: np.ndarray) -> list[float]:
    """Sorted θ values between every p̃ where the expected edge share can change: the scored
    p̃, and p − g for each scored p and settled gap g (gaps thinned to 2,000 quantiles when
    the pairs would be too many: then the choice is that close, not exact)."""
    pool = [fused]
    if gaps.size:
        g = gaps if gaps.size * p_sorted.size <= 4_000_000 else np.quantile(gaps, np.linspace(0, 1, 2000))
        pool.append((p_sorted[:, None] - g[None, :]).ravel())
    values = np.unique(np.concatenate(pool))
    return [float(values[0] - 1.0), *map(float, (values[:-1] + values[1:]) / 2.0), float(values[-1] + 1.0)]


def calibrate_telemetry(
    turns: Sequence[TelemetryTurn], target_edge_share: float, *, alpha: float | None = None
) -> TelemetryCalibration:
    """θ for at most ``target_edge_share`` of the turns on the edge (the most within it).

    p̃ is recomputed with ``alpha`` when given (p − α(Tᵉ − Tˢ)), else taken as
    recorded and α inferred (:func:`infer_alpha`).  Turns of policies without a
    router score (device, edge) are not routed by θ and are refused.
    """
    check_targets(None, target_edge_share)
    if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
        raise CalibrationError(f"α must be a finite number >= 0, got {alpha}")
    routed = [t for t in turns if t.p is not None or t.policy in ("auto", "random")]
    if len(routed) != len(turns):
        raise CalibrationError(
            f"{len(turns) - len(routed)} of {len(turns)} turns come from a policy without a router "
            "(device/edge): calibrate on telemetry of --policy auto"
        )
    scored = [t for t in turns if t.p is not None]
    if not scored:
        raise CalibrationError("no turn of this telemetry has a router score p: nothing to calibrate on")
    alpha = infer_alpha(turns) if alpha is None else alpha
    fused = np.asarray([t.p - alpha * t.latency_gap_s for t in scored])
    gaps = np.asarray([alpha * t.latency_gap_s for t in turns if t.p is None])
    p_sorted = np.sort(np.asarray([t.p for t in scored]))
    thetas = _telemetry_candidates(fused, gaps, p_sorted)
    # The edge share falls as θ rises: the first θ within the budget gives the most edge turns.
    lo, hi = 0, len(thetas) - 1  # share(thetas[-1]) == 0 <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if _edge_share(thetas[mid], fused, gaps, p_sorted) <= target_edge_share + _EPS:
            hi = mid
        else:
            lo = mid + 1
    best = CurvePoint(thetas[lo], 0.0, _edge_share(thetas[lo], fused, gaps, p_sorted), 0.0)
    return TelemetryCalibration(
        threshold=best.threshold, alpha=float(alpha), edge_share=best.edge_share, n_turns=len(turns),
        n_scored=len(scored), n_settled=len(turns) - len(scored),
        recorded_edge_share=sum(t.target == "edge" for t in turns) / len(turns),
    )


# --- the calibration file -------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """θ and α for eqs. (11)-(12), with what they were calibrated on."""

    threshold: float
    alpha: float
    router: str
    calibrated_on: dict[str, Any]
    target: dict[str, float]
    achieved: dict[str, Any]
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise CalibrationError(f"threshold must be a finite number, got {self.threshold!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise CalibrationError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        for name in ("calibrated_on", "target", "achieved"):
            if not isinstance(getattr(self, name), dict):
                raise CalibrationError(f"{name} must be a JSON object")
        if not isinstance(self.router, str) or not isinstance(self.date, str):
            raise CalibrationError("router and date must be strings")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": FILE_KIND, "version": FILE_VERSION, **asdict(self)}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CalibrationError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def read(cls, path: str | Path) -> "Calibration":
        """A calibration file, checked; :class:`CalibrationError` says what is wrong."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise CalibrationError(f"{path}: larger than {MAX_FILE_BYTES} bytes: not a calibration file")
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CalibrationError(f"cannot read calibration {path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{path}: not a JSON calibration file ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != FILE_KIND:
            raise CalibrationError(f"{path}: not an edgeroute calibration file (kind {FILE_KIND!r} missing)")
        if data.get("version") != FILE_VERSION:
            raise CalibrationError(f"{path}: calibration version {data.get('version')!r}, this reads {FILE_VERSION}")
        names = {"threshold", "alpha", "router", "calibrated_on", "target", "achieved", "date"}
        missing = names - set(data)
        if missing:
            raise CalibrationError(f"{path}: missing keys {sorted(missing)}")
        return cls(**{k: data[k] for k in names})


# --- `edgeroute calibrate`: settings and the trace run ------------------------------------


@dataclass(frozen=True)
class CalibrateSettings:
    """What one calibration uses and aims at; each field is a ``calibrate`` flag."""

    benchmark: str | None = field(default=None, metadata=flag(
        "trace to calibrate on (with --data-dir and --router)", choices=BENCHMARKS))
    data_dir: str | None = field(default=None, metadata=flag(
        "directory laid out like RouteLLM's routellm/evals/ (as `simulate`)"))
    router: str = field(default="bert", metadata=flag("router name (random, oracle, bert)"))
    bundle: str | None = field(default=None, metadata=flag("router bundle directory for --router bert"))
    telemetry: str | None = field(default=None, metadata=flag(
        "JSONL telemetry of `chat`/`demo --json` to calibrate on instead of a trace "
        "(--target-edge-share only)", metavar="FILE"))
    target_quality: float | None = field(default=None, metadata=flag(
        "eq. (9): the fastest θ whose mean quality (accuracy, or MT-Bench score) is at least Q",
        metavar="Q", type=finite_float))
    target_edge_share: float | None = field(default=None, metadata=flag(
        "the θ with the most edge turns whose edge share is at most S (a budget on LLM calls)",
        metavar="S", type=finite_float))
    preset: str = field(default="paper", metadata=flag(
        "cost parameters (Table I-III)", choices=lambda: sorted(cost_model.PRESETS)))
    alpha: float | None = field(default=None, metadata=flag(
        "α of eq. (11): default the preset's (traces) or the one the telemetry was recorded with",
        type=nonneg_float))
    split: str = field(default="all", metadata=flag("calibrate on this hash split (as `simulate`)", choices=SPLITS))
    val_fraction: float = field(default=0.2, metadata=flag("fraction in the val split", type=fraction))
    limit: int | None = field(default=None, metadata=flag("first N dialogues only", type=positive_int))
    seed: int = field(default=0, metadata=flag("seed of the random router and of the bootstrap"))
    bootstrap: int = field(default=1000, metadata=flag(
        "bootstrap resamples of the dialogues for the achieved point's 95%% interval", type=positive_int))
    no_context: bool = field(default=False, metadata=flag(
        "multi-turn traces: the \"w/o context\" policy (router and decision see no history)"))

    def __post_init__(self) -> None:
        check_targets(self.target_quality, self.target_edge_share)
        if self.telemetry is not None:
            if self.benchmark is not None or self.data_dir is not None:
                raise CalibrationError("give either --telemetry or --benchmark/--data-dir, not both")
            if self.target_quality is not None:
                raise CalibrationError("telemetry has no quality: calibrate it with --target-edge-share")
        elif self.benchmark is None or self.data_dir is None:
            raise CalibrationError("give --benchmark and --data-dir (a trace) or --telemetry FILE")
        if self.bootstrap > MAX_BOOTSTRAP:
            raise CalibrationError(f"--bootstrap is at most {MAX_BOOTSTRAP}, got {self.bootstrap}")

    @property
    def target(self) -> dict[str, float]:
        if self.target_quality is not None:
            return {"quality": self.target_quality}
        return {"edge_share": self.target_edge_share}

    def simulate_settings(self) -> SimulateSettings:
        """The same trace selection and router as ``simulate`` would use."""
        return SimulateSettings(
            benchmark=self.benchmark, data_dir=self.data_dir, routers=[self.router], preset=self.preset,
            alpha=self.alpha, bundle=self.bundle, split=self.split, val_fraction=self.val_fraction,
            seed=self.seed, limit=self.limit,
        )


def calibrate_trace(settings: CalibrateSettings, *, progress: bool = True) -> tuple[dict, Calibration]:
    """θ on a trace for the settings' target: (the ``calibrate --json`` summary, the file).

    Raises CalibrationError, and the sim layer's TraceError/SimulationError for the caller.
    """
    sim = settings.simulate_settings()
    _, dialogues = select_dialogues(sim)
    params = cost_model.preset(sim.preset, sim.benchmark, sim.upload_mode)
    if settings.alpha is not None:
        params = params.with_(alpha=settings.alpha)
    router = router_factories(sim, dialogues)[settings.router]()
    router_params = router.cost_params(params)
    with_context = not settings.no_context
    scores = score_turns(router, dialogues, with_context=with_context, progress=progress,
                         desc=f"{settings.router}: scoring")
    outcomes = TraceOutcomes(router_params, dialogues, scores, with_context=with_context)
    best = choose_threshold(outcomes.curve(), target_quality=settings.target_quality,
                            target_edge_share=settings.target_edge_share)
    intervals = bootstrap(outcomes.per_dialogue(best.threshold), resamples=settings.bootstrap, seed=settings.seed)
    achieved = {**best.to_dict(), "interval_95": {k: v.to_dict() for k, v in intervals.items()},
                "bootstrap": settings.bootstrap}
    del achieved["threshold"]
    on = {"source": "trace", "benchmark": sim.benchmark, "data_dir": str(sim.data_dir), "split": sim.split,
          "preset": sim.preset, "n": outcomes.n_turns, "n_dialogues": len(dialogues),
          "context": "without" if settings.no_context else "with"}
    calibration = Calibration(threshold=best.threshold, alpha=params.alpha, router=settings.router,
                              calibrated_on=on, target=settings.target, achieved=achieved)
    summary = {"threshold": best.threshold, "alpha": params.alpha, "router": settings.router,
               "quality": best.quality, "edge_share": best.edge_share, "mean_latency_s": best.mean_latency_s,
               "interval_95": achieved["interval_95"], "target": settings.target, "calibrated_on": on}
    return summary, calibration


def calibrate_telemetry_file(settings: CalibrateSettings) -> tuple[dict, Calibration]:
    """θ on a telemetry file for the settings' edge-share target: (summary, file)."""
    turns = read_telemetry(settings.telemetry)
    result = calibrate_telemetry(turns, settings.target_edge_share, alpha=settings.alpha)
    policies = sorted({t.policy for t in turns})
    on = {"source": "telemetry", "file": str(settings.telemetry), "n": result.n_turns,
          "n_scored": result.n_scored, "n_settled": result.n_settled, "policies": policies,
          "recorded_edge_share": result.recorded_edge_share}
    achieved = {"edge_share": result.edge_share}
    router = policies[0] if len(policies) == 1 else ",".join(policies)
    calibration = Calibration(threshold=result.threshold, alpha=result.alpha, router=router,
                              calibrated_on=on, target=settings.target, achieved=achieved)
    summary = {"threshold": result.threshold, "alpha": result.alpha, "edge_share": result.edge_share,
               "target": settings.target, "calibrated_on": on}
    return summary, calibration
