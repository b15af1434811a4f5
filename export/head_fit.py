"""Fit the head σ(Wᵀ[h; L_p; k(h); f(h); f(h)·L_p] + b) on cached features, full batch.

Why a separate fit: with a frozen encoder the head is a logistic regression
on a few hundred features, and how hard its weights on h are shrunk decides
most of its quality.  Measured on the public rows (docs/router.md): the
neighbour feature k(h) alone ranks turns better than a head that also leans
on h, because a turn's 0/1 outcome is mostly noise and 384 weights on h fit
that noise.  So the penalty on W_h is not a constant: it is chosen by
cross-validation on the training turns (never the validation split), from
``grid``, by the mean APGR over the benchmarks, with the one-standard-error
rule: the largest penalty whose mean is within one standard error (over the
folds) of the best.  Differences smaller than that are noise, and a head
that leans less on h also moves less when INT8 quantization perturbs h.

Features are standardized for the fit (so one penalty means the same for
every column) and the standardization is folded back into W and b, so the
exported head is still one linear layer on the raw features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

#: Penalties on W_h tried by the cross-validation (per unit of the mean
#: cross-entropy, on standardized features).  On the default export the
#: largest leaves ‖W_h‖ a tenth of its size at 0.03 (the head then rests on
#: L_p and the neighbour inputs); the smallest is close to an unpenalized fit.
DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 0.1, 0.03, 0.01, 0.001)
#: Penalty on the other weights (L_p and the neighbour inputs): just enough to keep the fit well posed.
L2_REST = 1e-4
#: Benchmarks with fewer held-out turns per fold than this do not vote
#: (MT-Bench has a few dozen turns: its APGR swings by tenths).
MIN_TURNS_TO_VOTE = 100


@dataclass(frozen=True)
class HeadFit:
    #: Weights on the raw features [h; L_p; neighbour inputs] and the bias (standardization folded in).
    weight: np.ndarray
    bias: float
    l2_h: float
    #: Per grid value: mean APGR per benchmark over the folds, the vote and its standard error.
    cv: list[dict] = field(default_factory=list)


def fold_of(key: str, folds: int, seed: int = 0) -> int:
    """A fixed fold per dialogue (hash of its first prompt, salted by ``seed``)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % folds


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    return mu, np.where(sd > 1e-12, sd, 1.0)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, penalty: np.ndarray, *, max_iter: int = 200
) -> tuple[np.ndarray, float]:
    """argmin Σ w·BCE(σ(xᵀβ + b), y) / Σ w + Σ penalty·β² (soft labels allowed), by L-BFGS.

    ``x`` is used as given (standardize it first); returns (β, b).
    """
    import torch

    X = torch.as_tensor(x, dtype=torch.float64)
    Y = torch.as_tensor(y, dtype=torch.float64)
    W = torch.as_tensor(w, dtype=torch.float64)
    W = W / W.sum()
    P = torch.as_tensor(penalty, dtype=torch.float64)
    beta = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    mean_y = float(min(max((Y * W).sum().item(), 1e-3), 1 - 1e-3))
    bias = torch.tensor(np.log(mean_y / (1 - mean_y)), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logit = X @ beta + bias
        loss = (W * torch.nn.functional.binary_cross_entropy_with_logits(logit, Y, reduction="none")).sum()
        loss = loss + (P * beta * beta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach().numpy(), float(bias.detach())


def _fit_raw(x, y, w, n_h: int, l2_h: float) -> tuple[np.ndarray, float]:
    """Fit on standardized columns, return weights for the raw columns."""
    mu, sd = _standardize(x)
    penalty = np.full(x.shape[1], L2_REST)
    penalty[:n_h] = l2_h
    beta, b = fit_logistic((x - mu) / sd, y, w, penalty)
    weight = beta / sd
    return weight, float(b - (weight * mu).sum())


def _vote(grid, results) -> list[dict]:
    """Mean APGR per benchmark and grid value; the vote is their mean over the benchmarks
    with at least MIN_TURNS_TO_VOTE held-out turns per fold (all of them if none has),
    with its standard error over the folds (``vote_se``)."""
    size = {}
    for per_bench in results:
        for bench, rows in per_bench.items():
            size[bench] = max(size.get(bench, 0.0), float(np.mean([n for _, n, _ in rows])))
    voters = {b for b, n in size.items() if n >= MIN_TURNS_TO_VOTE} or set(size)
    table = []
    for l2, per_bench in zip(grid, results):
        apgr = {b: float(np.mean([a for a, _, _ in rows])) for b, rows in sorted(per_bench.items())}
        by_fold: dict[int, list[float]] = {}
        for b, rows in per_bench.items():
            if b in voters:
                for a, _, f in rows:
                    by_fold.setdefault(f, []).append(a)
        folds = [float(np.mean(v)) for v in by_fold.values()]
        votes = [a for b, a in apgr.items() if b in voters]
        table.append({
            "l2_h": float(l2), "apgr": apgr,
            "vote": float(np.mean(votes)) if votes else float("nan"),
            "vote_se": float(np.std(folds, ddof=1) / np.sqrt(len(folds))) if len(folds) > 1 else 0.0,
        })
    return table


def choose(table: Sequence[dict]) -> float:
    """The one-standard-error rule: the largest penalty (the simplest head) whose mean
    vote is within one standard error of the best; the largest penalty if none voted."""
    finite = [v for v in table if np.isfinite(v["vote"])]
    if not finite:  # no benchmark had a quality gap to rank by
        return max(v["l2_h"] for v in table)
    top = max(finite, key=lambda v: v["vote"])
    return max(v["l2_h"] for v in finite if v["vote"] >= top["vote"] - top["vote_se"])


def select_and_fit(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    *,
    n_h: int,
    keys: Sequence[str],
    evaluate: Callable[[np.ndarray, np.ndarray], dict[str, dict[str, float]]],
    grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 5,
    seed: int = 0,
    progress: Callable | None = None,
    fold_design: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> HeadFit:
    """Choose the penalty on the first ``n_h`` columns (h) by ``folds``-fold CV, then fit on all rows.

    ``keys`` (one per row, e.g. the dialogue's first prompt) keep a dialogue
    in one fold; ``evaluate(rows, scores)`` returns per-benchmark metrics with
    an ``apgr`` and ``n`` for the held-out ``rows``.

    ``fold_design(train_rows, test_rows)`` -> ``(x_train, y_train, x_test)``:
    the fold's features and targets computed from its training rows alone,
    for columns and targets that are built from other rows' labels (the
    neighbour feature, neighbour-smoothed targets); without it, ``x`` and
    ``y`` are sliced, which leaks held-out labels into such columns.
    """
    if not grid:
        raise ValueError("the penalty grid is empty")
    x = np.asarray(x, dtype=np.float64)
    if len(grid) == 1:
        weight, b = _fit_raw(x, y, w, n_h, float(grid[0]))
        return HeadFit(weight=weight, bias=b, l2_h=float(grid[0]))
    fold = np.array([fold_of(k, folds, seed) for k in keys])
    bar = progress(total=len(grid) * folds, desc="head penalty (CV)", unit="fit") if progress else None
    designs = {}
    for f in range(folds):
        tr, te = np.nonzero(fold != f)[0], np.nonzero(fold == f)[0]
        if len(tr) and len(te):
            designs[f] = (tr, te, *(fold_design(tr, te) if fold_design else (x[tr], y[tr], x[te])))
    results: list[dict[str, list[tuple[float, int, int]]]] = []
    for l2 in grid:
        per_bench: dict[str, list[tuple[float, int, int]]] = {}
        for f in range(folds):
            if f in designs:
                tr, te, x_tr, y_tr, x_te = designs[f]
                weight, b = _fit_raw(np.asarray(x_tr, dtype=np.float64), y_tr, w[tr], n_h, l2)
                for bench, m in evaluate(te, np.asarray(x_te, dtype=np.float64) @ weight + b).items():
                    per_bench.setdefault(bench, []).append((m["apgr"], m["n"], f))
            if bar is not None:
                bar.update(1)
        results.append(per_bench)
    if bar is not None:
        bar.close()
    table = _vote(grid, results)
    chosen = choose(table)
    weight, b = _fit_raw(x, y, w, n_h, chosen)
    return HeadFit(weight=weight, bias=b, l2_h=chosen, cv=table)
