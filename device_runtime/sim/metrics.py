"""Routing metrics as RouteLLM defines them (lm-sys/RouteLLM, ``routellm/evals/evaluate.py``).

The definitions are RouteLLM's; the curve they are taken over is whatever the
caller gives (``export.evaluate`` samples it at every distinct score, or, with
``bins=10``, at RouteLLM's 10 quantile bins).

A routing curve is a set of operating points (edge_share, quality), where
``edge_share`` is the fraction of queries sent to the strong (edge) model.

- PGR (performance gap recovered) of a quality q:
  ``(q - q_device) / (q_edge - q_device)``: 0 at the all-device quality,
  1 at the all-edge quality.
- APGR: the area under the PGR curve over edge_share in [0, 1] (trapezoids).
  The curve is closed with its endpoints, all-device (0, q_device) and
  all-edge (1, q_edge), so a router that does no better than chance scores
  about 0.5.
- CPT(x): call-performance threshold, the smallest edge_share at which the
  piecewise-linear curve reaches PGR x.  RouteLLM interpolates with
  ``np.interp`` on a monotone curve; walking the segments gives the same number
  there and stays defined when a noisy curve is not monotone.

Shares are fractions in [0, 1] (RouteLLM prints percentages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence


class MetricError(ValueError):
    """The curve or its reference qualities cannot give a metric."""


@dataclass(frozen=True)
class CurvePoint:
    """One operating point of a router at threshold θ (eq. 12)."""

    threshold: float
    quality: float
    edge_share: float
    mean_latency_s: float

    def to_dict(self) -> dict[str, float]:
        return {
            "threshold": self.threshold,
            "quality": self.quality,
            "edge_share": self.edge_share,
            "mean_latency_s": self.mean_latency_s,
        }


def _finite(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise MetricError(f"{name} must be finite, got {value!r}")
    return value


def pgr(quality: float, q_device: float, q_edge: float) -> float:
    """Performance gap recovered by ``quality`` between the all-device and all-edge qualities."""
    q_device, q_edge = _finite("q_device", q_device), _finite("q_edge", q_edge)
    gap = q_edge - q_device
    if abs(gap) <= 1e-12 * max(1.0, abs(q_edge), abs(q_device)):
        raise MetricError(
            f"the edge and device qualities are equal ({q_edge!r}): there is no gap to recover"
        )
    return (_finite("quality", quality) - q_device) / gap


def _closed_curve(
    points: Iterable[tuple[float, float]], q_device: float, q_edge: float
) -> list[tuple[float, float]]:
    """(edge_share, PGR) sorted by share, with the all-device and all-edge endpoints added."""
    pts = [(0.0, 0.0), (1.0, 1.0)]
    for share, quality in points:
        share = _finite("edge_share", share)
        if not 0.0 <= share <= 1.0:
            raise MetricError(f"edge_share must be in [0, 1], got {share!r}")
        pts.append((share, pgr(quality, q_device, q_edge)))
    # Ties in share sort by PGR so that CPT takes the better point first.
    return sorted(pts, key=lambda sp: (sp[0], -sp[1]))


def apgr(points: Iterable[tuple[float, float]], q_device: float, q_edge: float) -> float:
    """Average PGR: trapezoidal area under PGR(edge_share) on [0, 1].

    ``points`` are (edge_share, quality) pairs; the endpoints are added here.
    """
    curve = _closed_curve(points, q_device, q_edge)
    area = 0.0
    for (s0, g0), (s1, g1) in zip(curve, curve[1:]):
        area += (s1 - s0) * (g0 + g1) / 2.0
    return area


def cpt(
    points: Iterable[tuple[float, float]], q_device: float, q_edge: float, target_pgr: float
) -> float:
    """CPT(x): the smallest edge_share where the curve reaches PGR ``target_pgr`` (x in [0, 1])."""
    target = _finite("target_pgr", target_pgr)
    if not 0.0 <= target <= 1.0:
        raise MetricError(f"target_pgr must be in [0, 1] (e.g. 0.5 for CPT(50%)), got {target!r}")
    curve = _closed_curve(points, q_device, q_edge)
    if curve[0][1] >= target:
        return curve[0][0]
    for (s0, g0), (s1, g1) in zip(curve, curve[1:]):
        if g1 >= target:
            if g0 >= target or g1 == g0:
                return s0
            return s0 + (s1 - s0) * (target - g0) / (g1 - g0)
    # Unreachable: the closed curve ends at PGR 1 >= target.
    return 1.0  # pragma: no cover


@dataclass(frozen=True)
class RouterMetrics:
    apgr: float
    cpt50: float
    cpt80: float


def router_metrics(
    curve: Sequence[CurvePoint], q_device: float, q_edge: float
) -> RouterMetrics:
    """APGR, CPT(50%) and CPT(80%) of a swept curve."""
    if not curve:
        raise MetricError("empty curve: sweep at least one threshold")
    pts = [(p.edge_share, p.quality) for p in curve]
    return RouterMetrics(
        apgr=apgr(pts, q_device, q_edge),
        cpt50=cpt(pts, q_device, q_edge, 0.5),
        cpt80=cpt(pts, q_device, q_edge, 0.8),
    )
