"""APGR / CPT of a router's scores on labelled turns (device_runtime.sim.metrics definitions).

The routing curve is swept at every distinct score: the turns with
p >= θ go to the edge.  Quality is the mean of each turn's routed quality.
This is the quality-only curve RouteLLM evaluates (no latency fusion).

RouteLLM's own evaluation (``routellm/evals``) samples the curve more
coarsely: thresholds at the 11 edges of 10 equal-count bins of the scores
(``pd.qcut``), turns with p >= θ to the strong model (none at the top edge).
``routing_metrics(..., bins=10)`` follows that protocol, to compare with
RouteLLM's published numbers; on a fine curve it reads a little lower.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from device_runtime.sim.metrics import apgr, cpt


def routing_curve(scores: Sequence[float], q_device: Sequence[float], q_edge: Sequence[float]):
    """(edge_share, quality) at every distinct threshold, ties routed together."""
    s = np.asarray(scores, dtype=float)
    qd = np.asarray(q_device, dtype=float)
    qe = np.asarray(q_edge, dtype=float)
    n = len(s)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    gain = (qe - qd)[order]
    base = qd.sum()
    cum = np.cumsum(gain)
    # Cut only where the score changes, so tied turns are routed together.
    cut = np.nonzero(np.diff(s_sorted) != 0)[0] + 1
    cuts = np.concatenate([cut, [n]])
    return [(k / n, (base + cum[k - 1]) / n) for k in cuts]


def binned_routing_curve(scores, q_device, q_edge, bins: int = 10):
    """(edge_share, quality) at the ``bins + 1`` quantile edges of the scores
    (RouteLLM's protocol): p >= edge routes to the edge, none at the top edge."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    s = np.asarray(scores, dtype=float)
    qd = np.asarray(q_device, dtype=float)
    qe = np.asarray(q_edge, dtype=float)
    edges = np.quantile(s, np.linspace(0.0, 1.0, bins + 1))
    points = []
    for i, t in enumerate(edges):
        edge = s > t if i == len(edges) - 1 else s >= t
        points.append((float(edge.mean()), float(np.where(edge, qe, qd).mean())))
    return sorted(points)


def routing_metrics(scores, q_device, q_edge, *, bins: int | None = None) -> dict[str, float]:
    """APGR, CPT(50%), CPT(80%) (as fractions of edge calls) and the reference
    qualities; ``bins``: on RouteLLM's quantile-binned curve instead of every
    distinct score."""
    qd = float(np.mean(q_device))
    qe = float(np.mean(q_edge))
    if bins is None:
        pts = routing_curve(scores, q_device, q_edge)
    else:
        pts = binned_routing_curve(scores, q_device, q_edge, bins)
    return {
        "apgr": apgr(pts, qd, qe),
        "cpt50": cpt(pts, qd, qe, 0.5),
        "cpt80": cpt(pts, qd, qe, 0.8),
        "q_device": qd,
        "q_edge": qe,
        "n": len(scores),
    }


def metrics_by_benchmark(examples, scores, *, bins: int | None = None) -> dict[str, dict[str, float]]:
    """routing_metrics per benchmark of ``examples`` (objects with .benchmark/.quality_*)."""
    out: dict[str, dict[str, float]] = {}
    for bench in sorted({e.benchmark for e in examples}):
        idx = [i for i, e in enumerate(examples) if e.benchmark == bench]
        try:
            out[bench] = routing_metrics(
                [scores[i] for i in idx],
                [examples[i].quality_device for i in idx],
                [examples[i].quality_edge for i in idx],
                bins=bins,
            )
        except ValueError:
            continue  # no gap between the models on this subset: nothing to recover
    return out
