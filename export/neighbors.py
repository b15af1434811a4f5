"""Neighbour-smoothed targets and the neighbour feature k(h), f(h), on cached features.

Why neighbours: a turn's 0/1 outcome is mostly noise around how hard its
topic is for the weak model; averaging over similar questions (largely the
same subject) gives a denoised target, and the same average over the
training turns nearest to a new turn, k(h), is an input the head can lean on
instead of 384 weights on h.  Both are built from other turns' labels, so a
CV fold must rebuild them from its own training rows (:class:`FoldDesign`),
or held-out labels leak into the penalty choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from export.features import CachedFeatures, progress_bar

if TYPE_CHECKING:
    import torch

    from export.config import TrainConfig
    from export.data import Example
    from export.model import RouterModel


def neighbor_labels(features: np.ndarray, labels: np.ndarray, groups: Sequence[str], k: int) -> np.ndarray:
    """Mean label of each turn's k nearest training neighbours (cosine, same benchmark, itself excluded).

    Why: a turn's 0/1 outcome is mostly noise around how hard its topic is
    for the weak model; averaging over similar questions (largely the same
    subject) gives the head a denoised target.
    """
    out = np.asarray(labels, dtype=float).copy()
    groups = np.asarray(groups)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        kk = min(k, len(idx) - 1)
        if kk < 1:
            continue
        out[idx] = neighbor_means(features[idx], features[idx], out[idx].copy(), kk, exclude_self=True)
    return out


def neighbor_means(
    query: np.ndarray, bank: np.ndarray, values: np.ndarray, k: int, *, exclude_self: bool = False
) -> np.ndarray:
    """Mean of ``values`` over each query's k nearest bank rows (cosine), as the
    exported graph computes k(h) for a turn that is not in the bank.
    ``exclude_self``: the query rows are the bank rows, and each leaves itself out."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    b = q if exclude_self else bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(q),) + values.shape[1:], dtype=np.float64)
    for s in range(0, len(q), 1024):
        sim = q[s : s + 1024] @ b.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, s + rows] = -np.inf
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[s : s + 1024] = values[nn].mean(axis=1)
    return out


@dataclass
class Targets:
    """What the head is fitted to: y per turn (the training turns' labels
    neighbour-smoothed) and the loss weight w per turn, with what a CV fold
    needs to smooth its own rows again."""

    y: torch.Tensor
    w: torch.Tensor
    #: The training turns' own labels and benchmarks.
    raw_train: np.ndarray
    bench_train: np.ndarray
    #: Pooled output of the pretrained encoder per training turn (None: no smoothing).
    frozen_train: np.ndarray | None
    smoothing: float
    neighbors: int

    def smoothed(self, rows: np.ndarray) -> np.ndarray:
        """The targets of training ``rows``, smoothed among those rows alone."""
        if self.frozen_train is None:
            return self.raw_train[rows].copy()
        return smooth(self.raw_train[rows], self.frozen_train[rows], self.bench_train[rows],
                      self.smoothing, self.neighbors)


def smooth(labels: np.ndarray, frozen: np.ndarray, benchmarks: np.ndarray, a: float, k: int) -> np.ndarray:
    """(1 - a) * own label + a * the mean label of the k nearest turns of the same
    benchmark among these (cosine on ``frozen``, the pretrained encoder's pooled output)."""
    return (1 - a) * labels + a * neighbor_labels(frozen, labels, benchmarks, k)


def build_targets(config: TrainConfig, features: CachedFeatures, examples: Sequence[Example],
                  n_train: int) -> Targets:
    """Targets for every cached turn: the training turns' labels smoothed by
    ``neighbor_smoothing`` (:func:`smooth`, ``neighbors`` nearest), the
    validation turns' their own."""
    import torch

    labels = [e.label for e in examples]
    raw_train = np.asarray(labels[:n_train], dtype=np.float64)
    bench_train = np.asarray([e.benchmark for e in examples[:n_train]])
    frozen_train = None
    if config.neighbor_smoothing > 0:
        with torch.no_grad():
            frozen = [
                features.frozen_pooled(i)
                for i in progress_bar(range(n_train), desc="neighbour labels", unit="turn",
                                      disable=not config.progress)
            ]
        frozen_train = np.stack(frozen)
        labels[:n_train] = list(smooth(raw_train, frozen_train, bench_train, config.neighbor_smoothing,
                                       config.neighbors))
    return Targets(
        y=torch.tensor(labels, dtype=torch.float32),
        w=torch.tensor([e.weight for e in examples], dtype=torch.float32),
        raw_train=raw_train, bench_train=bench_train, frozen_train=frozen_train,
        smoothing=config.neighbor_smoothing, neighbors=config.neighbors,
    )


@dataclass
class NeighborBank:
    """The training turns k(h) and f(h) average over: their frozen pooled h and
    the values averaged (the label, then one column per benchmark with groups)."""

    h: np.ndarray
    values: np.ndarray
    #: k of k(h) as configured (a fold with fewer rows uses fewer).
    k: int
    #: The head's neighbour inputs [k; f; f·L_p] for every cached turn: training
    #: turns see their k nearest *other* training turns (leave-one-out),
    #: validation turns the bank itself, exactly as the exported graph computes it.
    extra: torch.Tensor

    def fold_columns(self, model: RouterModel, lp: torch.Tensor, tr: np.ndarray,
                     te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The neighbour inputs of a CV fold with its training rows ``tr`` as the bank
        (leave-one-out for them) and the held-out rows ``te`` as new turns."""
        import torch

        kk = min(self.k, len(tr) - 1)
        vals = self.values[tr]
        out_tr = neighbor_labels(self.h[tr], vals, ["all"] * len(tr), kk).reshape(len(tr), -1)
        out_te = neighbor_means(self.h[te], self.h[tr], vals, kk).reshape(len(te), -1)
        center, scale = out_tr[:, 0].mean(), max(out_tr[:, 0].std(), 1e-6)
        cols = []
        for out, rows in ((out_tr, tr), (out_te, te)):
            out[:, 0] = (out[:, 0] - center) / scale
            extra = model.head_extra(lp[rows], torch.from_numpy(out).float())
            cols.append(extra.numpy().astype(np.float64))
        return cols[0], cols[1]


def add_neighbor_feature(model: RouterModel, features: CachedFeatures, train_ex: Sequence[Example],
                         config: TrainConfig) -> NeighborBank:
    """Give ``model`` the k(h) (and f(h)) module over the training turns (a fresh
    head) and return the bank, with the head's neighbour inputs for every turn."""
    import torch

    from export.model import NeighborGain

    n_train = len(train_ex)
    pooled = features.pooled(range(len(features)))
    raw = np.asarray([e.label for e in train_ex], dtype=np.float32)
    k = min(config.neighbor_feature, n_train - 1)
    names = sorted({e.benchmark for e in train_ex}) if config.neighbor_groups else []
    groups = np.asarray([[e.benchmark == b for b in names] for e in train_ex], dtype=np.float32)
    bank_values = np.hstack([raw[:, None], groups]) if names else raw
    loo = neighbor_labels(pooled[:n_train].numpy(), bank_values, ["all"] * n_train, k).reshape(n_train, -1)
    model.set_neighbors(NeighborGain(
        pooled[:n_train], torch.from_numpy(raw), k, float(loo[:, 0].mean()), max(float(loo[:, 0].std()), 1e-6),
        groups=torch.from_numpy(groups) if names else None, group_names=names,
    ))
    with torch.no_grad():
        out_val = model.neighbors(pooled[n_train:])
    out_train = torch.tensor(loo, dtype=torch.float32)
    out_train[:, 0] = (out_train[:, 0] - model.neighbors.center) / model.neighbors.scale
    extra = model.head_extra(features.lp, torch.cat([out_train, out_val]))
    return NeighborBank(h=pooled[:n_train].numpy(), values=bank_values, k=config.neighbor_feature, extra=extra)


@dataclass
class FoldDesign:
    """``select_and_fit``'s ``fold_design``: one CV fold's design from its training
    rows alone (their own neighbour-smoothed targets, and k(h), f(h) with the
    fold's training rows as the bank), as the export would build them had the
    held-out rows never been seen."""

    #: [h; L_p] of the training turns: the same in every fold.
    h_lp: np.ndarray
    targets: Targets
    model: RouterModel
    lp: torch.Tensor
    bank: NeighborBank | None

    def __call__(self, tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = self.targets.smoothed(tr)
        x_tr, x_te = [self.h_lp[tr]], [self.h_lp[te]]
        if self.bank is not None:
            extra_tr, extra_te = self.bank.fold_columns(self.model, self.lp, tr, te)
            x_tr.append(extra_tr)
            x_te.append(extra_te)
        return np.hstack(x_tr), y, np.hstack(x_te)
