"""The two ways the router's trained part is fitted on :class:`CachedFeatures`.

* :func:`fit_head_lbfgs`: with a frozen encoder the head is a logistic
  regression on cached features, fitted full batch by L-BFGS with its
  penalty on W_h chosen by cross-validation (export/head_fit.py).
* :func:`fit_adamw`: when top encoder layers are trained (or no penalty grid
  is given) the top layers and the head are trained by AdamW for ``epochs``.

Both write into ``model`` and return the history record for the manifest.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import TYPE_CHECKING, Sequence

import numpy as np

from export.evaluate import metrics_by_benchmark
from export.features import CachedFeatures, progress_bar
from export.neighbors import FoldDesign, NeighborBank, Targets

if TYPE_CHECKING:
    from export.config import TrainConfig
    from export.data import Example
    from export.model import RouterModel

# The training log keeps the name it had when this code was part of export/train.py.
log = logging.getLogger("export.train")


def _apgr_text(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{b} {m['apgr']:.3f}" for b, m in metrics.items())


def _fold_metrics(train_ex: Sequence[Example], rows: np.ndarray, scores: np.ndarray):
    """``select_and_fit``'s ``evaluate``: metrics of held-out training ``rows``."""
    return metrics_by_benchmark([train_ex[i] for i in rows], list(scores))


def fit_head_lbfgs(config: TrainConfig, model: RouterModel, features: CachedFeatures, targets: Targets,
                   bank: NeighborBank | None, train_ex: Sequence[Example],
                   val_ex: Sequence[Example]) -> list[dict]:
    """The head on the cached training features by L-BFGS, its penalty on W_h chosen by CV.

    Writes the fitted weights into ``model.head``; returns the history record
    (the CV table and the chosen penalty).
    """
    import torch

    from export.head_fit import select_and_fit

    n = len(train_ex)
    h_lp = features.h_lp(range(n))
    x = h_lp if features.extra is None else np.hstack([h_lp, features.extra[:n].numpy().astype(np.float64)])
    fit = select_and_fit(
        x, targets.y[:n].numpy(), targets.w[:n].numpy(), n_h=h_lp.shape[1] - 1,
        keys=[e.context[0]["content"] if e.context else e.prompt for e in train_ex],
        evaluate=partial(_fold_metrics, train_ex), grid=config.head_l2_grid, folds=config.head_cv_folds,
        seed=config.seed, progress=progress_bar if config.progress else None,
        fold_design=FoldDesign(h_lp=h_lp, targets=targets, model=model, lp=features.lp, bank=bank),
    )
    for row in fit.cv:
        log.info("head CV: L2 on W_h %g -> APGR %s", row["l2_h"],
                 ", ".join(f"{b} {v:.3f}" for b, v in row["apgr"].items()))
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.from_numpy(fit.weight).float().unsqueeze(0))
        model.head.linear.bias.fill_(fit.bias)
    metrics = metrics_by_benchmark(val_ex, features.score(model, range(n, len(features))))
    log.info("head fitted (L2 on W_h %g), val APGR %s", fit.l2_h, _apgr_text(metrics))
    return [{"head_fit": "lbfgs", "l2_h": fit.l2_h, "cv": fit.cv}]


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first tenth of the steps, then linear decay to 0."""
    return min(1.0, (step + 1) / max(1, total // 10)) * max(0.0, (total - step) / total)


def _adamw(config: TrainConfig, model: RouterModel, features: CachedFeatures, targets: Targets, n_train: int):
    """AdamW over the top layers and the head, the head started at the base rate
    (so early steps do not just learn the bias); returns (optimizer, scheduler)."""
    import torch

    mean_y = float((targets.y[:n_train] * targets.w[:n_train]).sum() / targets.w[:n_train].sum())
    mean_y = min(max(mean_y, 1e-3), 1 - 1e-3)
    with torch.no_grad():
        model.head.linear.weight.zero_()
        model.head.linear.bias.fill_(math.log(mean_y / (1 - mean_y)))
    params = [
        {"params": [p for layer in features.split.top for p in layer.parameters()], "lr": config.lr_encoder},
        {"params": list(model.head.parameters()), "lr": config.lr_head},
    ]
    opt = torch.optim.AdamW([g for g in params if g["params"]], weight_decay=config.weight_decay)
    total = math.ceil(n_train / config.batch_size) * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_lr_factor, total=total))
    return opt, sched


def _epoch_batches(rng: np.random.Generator, features: CachedFeatures, n_train: int,
                   batch_size: int) -> list[list[int]]:
    """Batches of similar length (shuffled buckets of 32 batches): less padding, still random."""
    perm = rng.permutation(n_train).tolist()
    bucket = batch_size * 32
    buckets = [sorted(perm[s : s + bucket], key=features.length) for s in range(0, n_train, bucket)]
    batches = [b[s : s + batch_size] for b in buckets for s in range(0, len(b), batch_size)]
    rng.shuffle(batches)
    return batches


def _adamw_epoch(config: TrainConfig, model: RouterModel, features: CachedFeatures, targets: Targets,
                 batches: list[list[int]], opt, sched, desc: str) -> float:
    """One pass over ``batches``; returns the running (smoothed) loss."""
    import torch

    for layer in features.split.top:
        layer.train()
    y, w = targets.y, targets.w
    running = 0.0
    bar = progress_bar(batches, desc=desc, unit="batch", disable=not config.progress)
    for k, idx in enumerate(bar):
        logit = features.logits(model, idx)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logit, y[idx], weight=w[idx], reduction="sum"
        ) / w[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if k else lv
        bar.set_postfix(loss=f"{running:.4f}")
    return running


def fit_adamw(config: TrainConfig, model: RouterModel, features: CachedFeatures, targets: Targets,
              train_ex: Sequence[Example], val_ex: Sequence[Example]) -> list[dict]:
    """The top layers and the head by AdamW for ``config.epochs``, scoring the
    validation turns after each epoch; returns one history record per epoch."""
    n_train = len(train_ex)
    opt, sched = _adamw(config, model, features, targets, n_train)
    rng = np.random.default_rng(config.seed)
    val_idx = list(range(n_train, len(features)))
    history = []
    for epoch in range(config.epochs):
        batches = _epoch_batches(rng, features, n_train, config.batch_size)
        running = _adamw_epoch(config, model, features, targets, batches, opt, sched,
                               desc=f"epoch {epoch + 1}/{config.epochs}")
        metrics = metrics_by_benchmark(val_ex, features.score(model, val_idx))
        history.append({"epoch": epoch + 1, "loss": running, **{b: m["apgr"] for b, m in metrics.items()}})
        log.info("epoch %d: loss %.4f, val APGR %s", epoch + 1, running, _apgr_text(metrics))
    return history
