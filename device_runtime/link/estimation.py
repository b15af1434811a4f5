"""Estimating the cost model's γ, τ_r, B and δ from measurements.

Pure: numbers in, numbers out; no clocks, no I/O.  Three uses:

- **Profiling** (``edgeroute profile``): :func:`fit_link` fits round-trip time
  against payload size, ``RTT = δ + size / B`` (the link part of eq. 3), by
  least squares over per-size medians, and reports the fit's quality.
  :func:`bytes_per_token` converts the link's bytes/s into the paper's
  tokens/s.
- **Online estimation**: :class:`OnlineEstimator` keeps robust EWMAs of γ_s
  and of the link (eq. 3), and robust lines (:class:`LineFit`) for the edge's
  γ_e and per-call time (eqs. 1, 5), updated from every turn's telemetry, and
  turns them into :class:`~device_runtime.routing.cost_model.CostParams` for the next
  decision (eqs. 6-12).  Outliers (a GC pause, one lost packet)
  are rejected by a k·MAD rule; a run of consecutive outliers is taken as a
  change of regime (the link degraded or recovered) and adopted at once, so
  the router follows the link within a few turns.
- **The edge's queue**: :class:`QueueWaitEstimator` keeps W_q, the wait for a
  free slot on a loaded edge (``CostParams.edge_queue_s``, beyond the paper),
  from the waits of this device's own edge turns and the edge's own reports.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

import numpy as np

from device_runtime.core.flags import flag
from device_runtime.routing.cost_model import CostParams, Link, ModelTiming

#: MAD -> standard deviation for normally distributed samples.
_MAD_TO_SIGMA = 1.4826
#: Smallest spread of δ samples taken as noise, seconds.
LINK_ABS_FLOOR_S = 0.005


# --- offline fit ---------------------------------------------------------------


@dataclass(frozen=True)
class LinkFit:
    """``RTT = overhead_s + size_bytes / bandwidth_bytes_per_s`` (eq. 3, in bytes).

    ``dropped_sizes``: at most one size left out as an outlier (see
    :func:`fit_link`).  ``r_squared`` is over the per-size medians that were fitted;
    ``r_squared_all`` over every sample; ``residuals_s`` are per size
    (median − fit), ``mad_s`` the typical spread of the raw samples.
    """

    overhead_s: float
    bandwidth_bytes_per_s: float
    r_squared: float
    r_squared_all: float
    sizes_bytes: tuple[int, ...]
    median_rtt_s: tuple[float, ...]
    residuals_s: tuple[float, ...]
    mad_s: float
    n_samples: int
    dropped_sizes: tuple[int, ...] = ()

    def predict_s(self, size_bytes: float) -> float:
        return self.overhead_s + size_bytes / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict:
        return {
            "overhead_s": self.overhead_s,
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "r_squared": self.r_squared,
            "r_squared_all": self.r_squared_all,
            "sizes_bytes": list(self.sizes_bytes),
            "median_rtt_s": list(self.median_rtt_s),
            "residuals_s": list(self.residuals_s),
            "mad_s": self.mad_s,
            "n_samples": self.n_samples,
            "dropped_sizes": list(self.dropped_sizes),
        }


class FitError(ValueError):
    """The samples cannot determine the fit (too few sizes, no slope)."""


def _ols(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise FitError("need at least two distinct payload sizes")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def _r_squared(xs, ys, intercept: float, slope: float) -> float:
    my = sum(ys) / len(ys)
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def _mad(values: Sequence[float]) -> float:
    med = statistics.median(values)
    return statistics.median(abs(v - med) for v in values)


def fit_link(sizes_bytes: Sequence[int], rtts_s: Sequence[float]) -> LinkFit:
    """Least-squares fit of RTT against payload size over per-size medians.

    Medians per size make the fit robust to the occasional slow round trip
    (scheduler hiccup, retransmission) without choosing a cut-off.
    """
    if len(sizes_bytes) != len(rtts_s):
        raise FitError("sizes and RTTs differ in length")
    if any(not (r > 0 and math.isfinite(r)) for r in rtts_s) or any(s < 0 for s in sizes_bytes):
        raise FitError("RTTs must be positive and finite, sizes non-negative")
    by_size: dict[int, list[float]] = {}
    for size, rtt in zip(sizes_bytes, rtts_s):
        by_size.setdefault(int(size), []).append(float(rtt))
    if len(by_size) < 2:
        raise FitError("need at least two distinct payload sizes")
    xs = sorted(by_size)
    ys = [statistics.median(by_size[x]) for x in xs]
    intercept, slope = _ols(xs, ys)
    dropped: list[int] = []
    if len(xs) >= 4:
        # One size whose every round trip was slow (a burst of drops and a
        # retransmission timeout) would tilt the line: drop it if it sits far
        # off a line that fits the others well.
        best = None
        for i in range(len(xs)):
            rx, ry = xs[:i] + xs[i + 1 :], ys[:i] + ys[i + 1 :]
            b0, b1 = _ols(rx, ry)
            off = abs(ys[i] - b0 - b1 * xs[i])
            typical = statistics.median(abs(y - b0 - b1 * x) for x, y in zip(rx, ry))
            if off > max(4 * typical, 0.005) and (best is None or off > best[0]):
                best = (off, i)
        if best is not None:
            worst = best[1]
            dropped.append(xs[worst])
            xs, ys = xs[:worst] + xs[worst + 1 :], ys[:worst] + ys[worst + 1 :]
            intercept, slope = _ols(xs, ys)
    if not slope > 0:
        raise FitError(
            f"RTT does not grow with payload size (slope {slope:.3g} s/byte): "
            "use larger payloads so transfer time dominates the noise"
        )
    residuals = tuple(y - (intercept + slope * x) for x, y in zip(xs, ys))
    spread = [r - statistics.median(by_size[int(s)]) for s, r in zip(sizes_bytes, rtts_s)]
    return LinkFit(
        overhead_s=max(0.0, intercept),
        bandwidth_bytes_per_s=1.0 / slope,
        r_squared=_r_squared(xs, ys, intercept, slope),
        r_squared_all=_r_squared(list(sizes_bytes), list(rtts_s), intercept, slope),
        sizes_bytes=tuple(xs),
        median_rtt_s=tuple(ys),
        residuals_s=residuals,
        mad_s=statistics.median(abs(d) for d in spread),
        n_samples=len(rtts_s),
        dropped_sizes=tuple(dropped),
    )


def bytes_per_token(texts: Iterable[str], count_tokens: Callable[[str], int]) -> float:
    """UTF-8 bytes per token over real text: bytes/s ÷ this = tokens/s (Table I's unit)."""
    n_bytes = n_tokens = 0
    for text in texts:
        if not text:
            continue
        n_bytes += len(text.encode("utf-8"))
        n_tokens += count_tokens(text)
    if n_tokens == 0:
        raise ValueError("no tokens in the sample text")
    return n_bytes / n_tokens


def per_token_time(seconds: Sequence[float], tokens: Sequence[int]) -> float:
    """γ as the least-squares slope of time against tokens (eqs. 1, 5).

    A slope, not seconds/tokens of one run, so a fixed per-call cost (sampling
    setup, the first token's graph build) does not inflate γ.  With a single
    token count it falls back to the ratio of medians.
    """
    if len(seconds) != len(tokens) or not seconds:
        raise ValueError("need matching, non-empty seconds and token counts")
    if len(set(tokens)) < 2:
        return statistics.median(seconds) / max(1, statistics.median(tokens))
    _, slope = _ols([float(t) for t in tokens], list(seconds))
    if slope <= 0:
        return statistics.median(s / max(1, t) for s, t in zip(seconds, tokens))
    return slope


# --- online estimation ------------------------------------------------------------


@dataclass(frozen=True)
class EwmaSettings:
    """Robust EWMA: weight of a new sample, outlier rule, regime change rule."""

    weight: float = 0.3
    """EWMA weight of each accepted sample (0 < weight <= 1)."""
    k_mad: float = 4.0
    """A sample farther than k·σ̂ (σ̂ = 1.4826·MAD of recent samples) is an outlier."""
    rel_floor: float = 0.1
    """σ̂ is at least this fraction of the estimate: equal samples (MAD 0) must
    not turn ordinary noise into outliers."""
    abs_floor: float = 0.0
    """σ̂ is at least this, in the sample's unit (ms-level jitter on a small δ
    is not an outlier)."""
    window: int = 16
    """Recent accepted samples kept for the MAD."""
    min_samples: int = 4
    """No rejection until this many samples: the MAD of 1-3 samples means nothing."""
    regime_after: int = 2
    """This many consecutive outliers on the same side are a regime change:
    the estimate jumps to their median and the window restarts."""

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")
        if not self.k_mad > 0 or not self.rel_floor >= 0 or not self.abs_floor >= 0:
            raise ValueError("k_mad must be > 0, rel_floor and abs_floor >= 0")
        if self.window < 2 or self.min_samples < 1 or self.regime_after < 1:
            raise ValueError("window >= 2, min_samples >= 1, regime_after >= 1")


@dataclass
class RobustEwma:
    """An EWMA that rejects isolated outliers but follows a persistent change.

    A prior ``value`` (a profiled γ or δ) fills the window as if it had been
    seen ``min_samples`` times: the first sample that contradicts the profile
    is held back, the second adopted, like any later change of regime.
    """

    settings: EwmaSettings = field(default_factory=EwmaSettings)
    value: float | None = None
    n_accepted: int = 0
    n_rejected: int = 0
    n_regime_changes: int = 0
    _recent: deque = field(default_factory=deque, repr=False)
    _pending: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._recent = deque(self._recent, maxlen=self.settings.window)
        if self.value is not None and not self._recent:
            self._recent.extend([self.value] * self.settings.min_samples)

    @property
    def pending_outliers(self) -> int:
        """Outliers held back that a further one on the same side would confirm."""
        return len(self._pending)

    def is_outlier(self, x: float) -> bool:
        s = self.settings
        if self.value is None or len(self._recent) < s.min_samples:
            return False
        sigma = max(_MAD_TO_SIGMA * _mad(self._recent), s.rel_floor * abs(self.value), s.abs_floor, 1e-12)
        return abs(x - self.value) > s.k_mad * sigma

    def update(self, x: float) -> bool:
        """Feed one sample; returns whether it changed the estimate."""
        if not math.isfinite(x):
            raise ValueError(f"sample must be finite, got {x!r}")
        s = self.settings
        if self.is_outlier(x):
            side = x > self.value
            if self._pending and (self._pending[-1] > self.value) != side:
                self._pending.clear()
            self._pending.append(x)
            if len(self._pending) < s.regime_after:
                self.n_rejected += 1
                return False
            # A regime change: adopt the new level now rather than creeping.
            self.value = statistics.median(self._pending)
            self._recent.clear()
            self._recent.extend(self._pending)
            # As with a prior: the new level must be contradicted twice, too.
            while len(self._recent) < s.min_samples:
                self._recent.append(self.value)
            self._pending.clear()
            self.n_accepted += 1
            self.n_regime_changes += 1
            return True
        self._pending.clear()
        self.value = x if self.value is None else (1 - s.weight) * self.value + s.weight * x
        self._recent.append(x)
        self.n_accepted += 1
        return True


@dataclass
class LineFit:
    """``y ≈ intercept + slope · x`` over the recent samples, pulled towards a prior.

    For the edge's compute per call: the time to the first token against the
    tokens prefilled (eq. 1 plus a fixed cost), and the decode time against the
    tokens generated (eq. 5).  A ratio y/x, as for γ_s, would charge the fixed
    cost of a short turn to γ; a least-squares line over a few turns of similar
    size cannot tell slope from intercept.  So the fit is the posterior mean
    under a Gaussian prior centred on the profiled values (ridge regression):
    the slope stays near the profile's unless the turns show otherwise, and the
    intercept takes up the rest.  Outliers and changes of regime as in
    :class:`RobustEwma`, on the residuals; a new regime shifts the prior's
    intercept by the outliers' median residual and restarts the window.
    """

    intercept: float
    slope: float
    settings: EwmaSettings = field(default_factory=EwmaSettings)
    intercept_sd_s: float = 0.05
    """Prior standard deviation of the intercept, seconds."""
    slope_rel_sd: float = 0.1
    """Prior standard deviation of the slope, as a fraction of the prior slope."""
    noise_sd_s: float = 0.02
    """Assumed spread of one sample about the line, seconds."""
    n_regime_changes: int = 0
    _prior: tuple = field(init=False, repr=False)
    _samples: deque = field(init=False, repr=False)
    _pending: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not (self.intercept_sd_s > 0 and self.slope_rel_sd > 0 and self.noise_sd_s > 0):
            raise ValueError("intercept_sd_s, slope_rel_sd and noise_sd_s must be > 0")
        self._prior = (float(self.intercept), float(self.slope))
        self._samples = deque(maxlen=self.settings.window)

    def predict(self, x: float) -> float:
        return self.intercept + self.slope * x

    def _fit(self) -> None:
        a0, b0 = self._prior
        prior_prec = np.diag([self.intercept_sd_s ** -2, max(self.slope_rel_sd * abs(b0), 1e-6) ** -2])
        lhs, rhs = prior_prec.copy(), prior_prec @ np.array([a0, b0])
        if self._samples:
            xs = np.array([[1.0, x] for x, _ in self._samples])
            ys = np.array([y for _, y in self._samples])
            lhs += xs.T @ xs / self.noise_sd_s ** 2
            rhs += xs.T @ ys / self.noise_sd_s ** 2
        a, b = np.linalg.solve(lhs, rhs)
        self.intercept, self.slope = float(a), max(0.0, float(b))

    def _is_outlier(self, x: float, y: float) -> bool:
        s = self.settings
        if len(self._samples) < s.min_samples:
            return False
        residuals = [yy - self.predict(xx) for xx, yy in self._samples]
        sigma = max(_MAD_TO_SIGMA * _mad(residuals), s.rel_floor * abs(self.predict(x)), s.abs_floor, 1e-12)
        return abs(y - self.predict(x)) > s.k_mad * sigma

    def update(self, x: float, y: float) -> bool:
        """Feed one sample; returns whether it entered the fit."""
        if not (math.isfinite(x) and math.isfinite(y)) or x < 0:
            raise ValueError(f"samples must be finite with x >= 0, got ({x!r}, {y!r})")
        if self._is_outlier(x, y):
            residual = y - self.predict(x)
            if self._pending and (self._pending[-1][2] > 0) != (residual > 0):
                self._pending.clear()
            self._pending.append((x, y, residual))
            if len(self._pending) < self.settings.regime_after:
                return False
            # A new regime (e.g. the edge got busier): the same line, shifted.
            self._prior = (self.intercept + statistics.median(r for _, _, r in self._pending), self._prior[1])
            self._samples.clear()
            self._samples.extend((px, py) for px, py, _ in self._pending)
            self._pending.clear()
            self.n_regime_changes += 1
            self._fit()
            return True
        self._pending.clear()
        self._samples.append((float(x), float(y)))
        self._fit()
        return True


@dataclass
class LinkEstimator:
    """Online δ and B (eq. 3) from per-turn communication times and pings.

    A sample is ``(transfer_tokens, comm_s)``: the tokens that crossed the
    link and the seconds the turn spent on the link (wall time minus the
    server's compute and the router).  δ is a robust EWMA of
    ``comm_s − transfer_tokens / B``.  B is re-estimated (Theil-Sen slope of
    the recent samples) only when their sizes differ enough to show a slope
    above timing noise; on a link where transfers are small next to δ (the
    usual case: streamed replies overlap decode), B keeps its profiled value
    and δ absorbs the change.
    """

    link: Link
    settings: EwmaSettings = field(default_factory=EwmaSettings)
    min_size_ratio: float = 4.0
    """max/min transfer size in the window needed to re-fit B."""
    overhead: RobustEwma = field(init=False)
    _samples: deque = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # A few ms of jitter on a 20 ms δ is noise, not a new regime.
        overhead_settings = replace(self.settings, abs_floor=max(self.settings.abs_floor, LINK_ABS_FLOOR_S))
        self.overhead = RobustEwma(overhead_settings, value=self.link.overhead_s)
        self._samples = deque(maxlen=self.settings.window)

    def update(self, transfer_tokens: float, comm_s: float, *, probe: bool = False) -> bool:
        """Feed one sample; returns whether δ accepted it.

        A ``probe`` (an Echo round trip) updates δ but not B: one small message
        each way is not comparable with a turn's streamed answer, which on a
        jittery link waits for the latest of its chunks, so probes next to
        turns would line up into a slope that is not the bandwidth (measured:
        B read 4-15x low on the emulated poor link).
        """
        if transfer_tokens < 0 or not math.isfinite(comm_s):
            raise ValueError("transfer_tokens must be >= 0 and comm_s finite")
        # Clock noise can make comm_s slightly negative on a fast link.
        comm_s = max(0.0, comm_s)
        x = float(transfer_tokens)
        regimes = self.overhead.n_regime_changes
        accepted = self.overhead.update(comm_s - x / self.link.bandwidth_tokens_per_s)
        if self.overhead.n_regime_changes != regimes:
            # A new regime: only the samples that announced it still count.
            n = self.settings.regime_after
            keep = [(px, py, True, pp) for px, py, _, pp in list(self._samples)[-(n - 1):]] if n > 1 else []
            self._samples.clear()
            self._samples.extend(keep)
        self._samples.append((x, comm_s, accepted, probe))
        self._refit_bandwidth()
        self.link = Link(self.link.bandwidth_tokens_per_s, max(0.0, self.overhead.value))
        return accepted

    @property
    def pending_outliers(self) -> int:
        """Samples held back as outliers that a further one on the same side would confirm."""
        return self.overhead.pending_outliers

    def _refit_bandwidth(self) -> None:
        if len(self._samples) < self.settings.min_samples:
            return
        # The sizes must differ among *accepted* samples: a size-0 ping that
        # first shows a new δ, next to old turns of one size, has no slope to tell.
        xs = [x for x, _, ok, probe in self._samples if ok and not probe]
        if not xs or max(xs) / max(min(xs), 1.0) < self.min_size_ratio:
            return
        # Theil-Sen over the accepted samples of this regime: the median of
        # pairwise slopes shrugs off the odd bad sample.
        pts = [(x, y) for x, y, ok, probe in self._samples if ok and not probe]
        slopes = [
            (y2 - y1) / (x2 - x1)
            for i, (x1, y1) in enumerate(pts)
            for x2, y2 in pts[i + 1 :]
            if x2 != x1
        ]
        if not slopes:
            return
        slope = statistics.median(slopes)
        lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
        # Only a slope that the sizes make visible above timing noise says
        # anything about B; otherwise transfers are negligible and B stays.
        # The noise is the spread of the turns about the fitted line: with
        # jitter, a few turns can line up into a slope that says nothing about B.
        intercept = statistics.median(y - slope * x for x, y in pts)
        noise = _MAD_TO_SIGMA * _mad([y - intercept - slope * x for x, y in pts])
        if slope > 0 and slope * (hi - lo) >= max(2 * LINK_ABS_FLOOR_S, 4 * noise):
            self.link = Link(1.0 / slope, self.link.overhead_s)


@dataclass
class OnlineEstimator:
    """γ_s, γ_e (prefill and decode) and the link, kept current turn by turn.

    Feed it every turn's measurements; :meth:`params` gives the cost model's
    parameters for the next decision, :meth:`snapshot` the values to put in
    telemetry.  Samples with too few tokens to time reliably are skipped.
    """

    base: CostParams
    settings: EwmaSettings = field(default_factory=EwmaSettings)
    min_prefill_tokens: int = 16
    """Device prefill samples shorter than this are skipped: γ_s is a ratio, so
    a 4-token prefill would charge its fixed cost to γ_s."""
    min_decode_tokens: int = 4
    gamma: dict[str, RobustEwma] = field(init=False)
    """γ_s (prefill, decode): robust EWMAs of the device's time per token."""
    edge_prefill: LineFit = field(init=False)
    """The edge's time to the first token against the tokens prefilled: slope
    γ_e (prefill), intercept the prefill's share of ``call_s``."""
    edge_decode: LineFit = field(init=False)
    """The edge's decode time against the tokens generated: slope γ_e (decode)."""
    link: LinkEstimator = field(init=False)

    def __post_init__(self) -> None:
        b = self.base
        self.gamma = {
            "gamma_s_prefill": RobustEwma(self.settings, value=b.gamma_s.prefill_s_per_token),
            "gamma_s_decode": RobustEwma(self.settings, value=b.gamma_s.decode_s_per_token),
        }
        # A few ms of scheduling noise on a 50 ms call is not an outlier.
        fit_settings = replace(self.settings, abs_floor=max(self.settings.abs_floor, LINK_ABS_FLOOR_S))
        self.edge_prefill = LineFit(b.gamma_e.call_s, b.gamma_e.prefill_s_per_token, fit_settings)
        self.edge_decode = LineFit(0.0, b.gamma_e.decode_s_per_token, fit_settings)
        self.link = LinkEstimator(b.link, self.settings)

    def observe_device_turn(self, prefill_tokens: int, prefill_s: float, output_tokens: int, decode_s: float) -> None:
        """A turn the device SLM answered: updates γ_s (eqs. 1, 5).

        The device's per-call time (``call_s``, from a profile or the
        self-profile) is taken out of the prefill first, as eq. (1) charges it
        apart; otherwise it would be charged twice."""
        if prefill_tokens >= self.min_prefill_tokens and prefill_s > 0:
            per_token = max(0.0, prefill_s - self.base.gamma_s.call_s) / prefill_tokens
            self.gamma["gamma_s_prefill"].update(per_token)
        if output_tokens >= self.min_decode_tokens and decode_s > 0:
            self.gamma["gamma_s_decode"].update(decode_s / output_tokens)

    def observe_edge_turn(
        self,
        *,
        measured_s: float,
        server_s: float,
        router_s: float,
        upload_tokens: int,
        output_tokens: int,
        first_token_s: float | None = None,
        decode_s: float | None = None,
    ) -> float:
        """A turn the edge answered: γ_e from the server's timings, the link from the rest.

        ``server_s`` is the server's own time for the call (queue + prefill +
        decode); ``measured_s − server_s − router_s`` is what the link cost
        (eq. 3's upload + δ + download).  Returns that communication time.
        With the server's split of ``server_s`` into ``first_token_s`` (request
        to first token) and ``decode_s``, the edge's timing lines are updated:
        the first token against ``upload_tokens`` (the ΔC + L_p that eq. 1
        charges) and decode against ``output_tokens`` (eq. 5's L_r).
        """
        comm_s = measured_s - server_s - router_s
        self.link.update(upload_tokens + output_tokens, comm_s)
        if first_token_s is not None and decode_s is not None and first_token_s > 0 and decode_s >= 0:
            self.edge_prefill.update(upload_tokens, first_token_s)
            if output_tokens > 0:
                self.edge_decode.update(output_tokens, decode_s)
        return comm_s

    def observe_ping(self, rtt_s: float, transfer_tokens: float = 0.0) -> None:
        """A link probe (an Echo round trip), e.g. while turns run on the device,
        so that a recovered link is noticed without sending it real turns."""
        self.link.update(transfer_tokens, rtt_s, probe=True)

    def edge_timing(self) -> ModelTiming:
        """γ_e and the edge's per-call time (the two lines' intercepts) for eqs. (1), (5)."""
        return ModelTiming(
            self.edge_prefill.slope,
            self.edge_decode.slope,
            max(0.0, self.edge_prefill.intercept + self.edge_decode.intercept),
        )

    def params(self) -> CostParams:
        g = {k: v.value for k, v in self.gamma.items()}
        return self.base.with_(
            gamma_s=ModelTiming(g["gamma_s_prefill"], g["gamma_s_decode"], self.base.gamma_s.call_s),
            gamma_e=self.edge_timing(),
            link=self.link.link,
        )

    def snapshot(self) -> dict[str, float]:
        """Current estimates, in the PROFILE.json key names (for telemetry)."""
        out = {k: float(v.value) for k, v in self.gamma.items()}
        edge = self.edge_timing()
        out["gamma_e_prefill"] = float(edge.prefill_s_per_token)
        out["gamma_e_decode"] = float(edge.decode_s_per_token)
        out["call_s_edge"] = float(edge.call_s)
        out["bandwidth_tokens_per_s"] = float(self.link.link.bandwidth_tokens_per_s)
        out["overhead_s"] = float(self.link.link.overhead_s)
        return out


# --- the edge's queue (W_q) -------------------------------------------------------


@dataclass(frozen=True)
class QueueWaitSettings:
    """How the device estimates W_q, the edge's expected wait for a KV slot
    (``CostParams.edge_queue_s``: beyond the paper, whose edge is idle)."""

    edge_queue: bool = field(default=True, metadata=flag(
        "add the edge's expected wait for a KV slot (W_q: what the edge reports and the waits of "
        "this device's recent edge turns) to the edge path's predicted latency; "
        "--no-edge-queue predicts an idle edge, as the paper does"
    ))
    edge_queue_half_life: float = field(default=30.0, metadata=flag(
        "seconds after which a W_q estimate that nothing has refreshed counts half (it decays "
        "towards 0, so a device that stopped sending turns to a busy edge tries it again)",
        metavar="SECONDS",
    ))
    weight: float = 0.5
    """EWMA weight of one observed wait (``done.queue_s`` of this device's own turn)."""
    max_wait_s: float = 3600.0
    """Observations and reports are clipped to this: a broken report cannot
    push the edge out of reach for longer than the decay takes from here."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.edge_queue_half_life) and self.edge_queue_half_life > 0):
            raise ValueError(f"edge_queue_half_life must be > 0 s, got {self.edge_queue_half_life!r}")
        if not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s > 0):
            raise ValueError(f"max_wait_s must be > 0, got {self.max_wait_s!r}")


@dataclass
class QueueWaitEstimator:
    """W_q: how long the next edge turn is expected to wait for a slot.

    Three kinds of news, each at a time ``now_s`` (any monotonic clock; the
    caller reads it, so this stays pure):

    - :meth:`observe_wait`: the wait one of this device's own edge turns
      reported (``done.queue_s``), folded in as an EWMA, so a turn that did
      not wait pulls the estimate towards 0;
    - :meth:`observe_report`: the wait the edge itself expects for a call
      arriving now (``GetServerInfo``); the freshest view of the whole queue,
      so it replaces the estimate;
    - :meth:`observe_floor`: a call refused after waiting ``s`` seconds
      (RESOURCE_EXHAUSTED once the edge's queue timeout passed): the wait is
      at least that.

    Between news the estimate halves every ``edge_queue_half_life`` seconds:
    a device that moved its turns off a busy edge sees no more waits, and
    without the decay it would never try the edge again.
    """

    settings: QueueWaitSettings = field(default_factory=QueueWaitSettings)
    value_s: float = 0.0
    #: When the last news came (None: none yet, the estimate is unknown).
    at_s: float | None = None
    n_waits: int = 0
    n_reports: int = 0

    def estimate(self, now_s: float) -> float | None:
        """W_q at ``now_s``, decayed since the last news; None before any news."""
        if self.at_s is None:
            return None
        age = max(0.0, now_s - self.at_s)
        return self.value_s * 0.5 ** (age / self.settings.edge_queue_half_life)

    def _clip(self, seconds: float) -> float | None:
        if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            return None
        return min(float(seconds), self.settings.max_wait_s)

    def observe_wait(self, queue_s: float, now_s: float) -> None:
        """This device's edge turn waited ``queue_s`` for its slot."""
        wait = self._clip(queue_s)
        if wait is None:
            return
        prev = self.estimate(now_s)
        w = self.settings.weight
        self.value_s = wait if prev is None else (1 - w) * prev + w * wait
        self.at_s = now_s
        self.n_waits += 1

    def observe_report(self, expected_wait_s: float, now_s: float) -> None:
        """The edge expects a call arriving now to wait ``expected_wait_s``."""
        wait = self._clip(expected_wait_s)
        if wait is None:
            return
        self.value_s, self.at_s = wait, now_s
        self.n_reports += 1

    def observe_floor(self, waited_s: float, now_s: float) -> None:
        """A call was refused for want of a slot after ``waited_s``: W_q is at least that."""
        wait = self._clip(waited_s)
        if wait is None:
            return
        prev = self.estimate(now_s)
        if prev is None or wait > prev:
            self.value_s, self.at_s = wait, now_s
