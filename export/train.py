"""Train the eq. (10) router on the RouteLLM labels.

The encoder is cut to its bottom ``encoder_layers`` layers.  Why the caching:
a full fine-tune of even MiniLM-L6 costs ~0.3 s per turn per epoch on a shared
2-core CPU (an hour for the public sets).  The kept layers below the top
``train_layers`` are frozen, so their output is computed once (one forward
pass over the data) and cached; each epoch then runs only the top
``train_layers`` layers (none by default) and the head.  With a neighbour
feature, the frozen pooled outputs of the training turns become the bank of
k(h).  The exported model is the cut encoder with its head (and bank), so the
device runs one ordinary graph.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from device_runtime.bundle import LpFeature, encode_turn, load_tokenizer, pad_id_of
from export.config import TrainConfig
from export.data import Example, load_examples
from export.evaluate import metrics_by_benchmark

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """Training could not run (no data, bad base model, ...)."""


@dataclass
class TrainResult:
    model: object  # export.model.RouterModel
    tokenizer: object  # tokenizers.Tokenizer
    lp_feature: LpFeature
    train_examples: list[Example]
    val_examples: list[Example]
    #: PyTorch validation scores, aligned with val_examples.
    val_scores: list[float]
    val_metrics: dict[str, dict[str, float]]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _progress(iterable=None, **kw):
    from tqdm import tqdm

    return tqdm(iterable, leave=False, **kw)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_tokenizer(base: Path):
    """The base model's ``tokenizers`` tokenizer: its tokenizer.json, else converted by transformers."""
    path = Path(base) / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path)
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(base), use_fast=True, local_files_only=True)
    except Exception as exc:
        raise TrainError(f"{base}: no tokenizer.json and transformers cannot build one: {exc}") from exc
    tok = fast.backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_encoder(base: Path):
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(base), local_files_only=True)
    except Exception as exc:
        raise TrainError(f"cannot load an encoder from {str(base)!r}: {exc}") from exc


def truncate_encoder(encoder, layers: int | None):
    """Keep the bottom ``layers`` transformer layers (in place); None keeps all."""
    stack = encoder.encoder.layer
    if layers is None or layers == len(stack):
        return encoder
    if layers > len(stack):
        raise TrainError(f"encoder_layers={layers} but the encoder has {len(stack)} layers")
    encoder.encoder.layer = stack[:layers]
    encoder.config.num_hidden_layers = layers
    return encoder


def _pad(batch_ids: Sequence[Sequence[int]], pad_id: int, types: Sequence[Sequence[int]]):
    import torch

    width = max(len(x) for x in batch_ids)
    ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    tt = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, (x, t) in enumerate(zip(batch_ids, types)):
        ids[i, : len(x)] = torch.tensor(x)
        tt[i, : len(t)] = torch.tensor(t)
        mask[i, : len(x)] = 1
    return ids, tt, mask


class _Stack:
    """The encoder split in two: frozen bottom (run once, cached) and trained top."""

    def __init__(self, encoder, train_layers: int, uses_types: bool) -> None:
        self.encoder = encoder
        layers = encoder.encoder.layer
        if train_layers > len(layers):
            raise TrainError(f"train_layers={train_layers} but the encoder has {len(layers)} layers")
        self.split = len(layers) - train_layers
        self.top = list(layers[self.split :])
        self.uses_types = uses_types

    def bottom(self, ids, tt, mask):
        """Hidden states after the frozen layers (the cache)."""
        kw = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
        if self.uses_types:
            kw["token_type_ids"] = tt
        return self.encoder(**kw).hidden_states[self.split]

    def run_top(self, hidden, mask):
        if not self.top:
            return hidden
        from transformers.masking_utils import create_bidirectional_mask

        attn = create_bidirectional_mask(
            config=self.encoder.config, inputs_embeds=hidden, attention_mask=mask
        )
        for layer in self.top:
            out = layer(hidden, attention_mask=attn)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _frozen_pooled(stack: "_Stack", cache, i: int, pooling: str):
    """Pooled output of the pretrained (not yet trained) top layers for cached turn ``i``."""
    import torch

    from export.model import pool

    if not stack.top:
        return cache[i].numpy()
    hidden = cache[i].float().unsqueeze(0)
    mask = torch.ones(1, hidden.shape[1], dtype=torch.long)
    return pool(stack.run_top(hidden, mask), mask, pooling)[0].numpy()


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


def _fit_head_full_batch(config, model, cache, lp_all, extra_all, y_all, w_all, train_ex, fold_design=None) -> list[dict]:
    """The head on the cached training features by L-BFGS, its penalty on W_h chosen by CV.

    Writes the fitted weights into ``model.head``; returns the history record
    (the CV table and the chosen penalty).
    """
    import torch

    from export.head_fit import select_and_fit
    from export.model import unit

    n = len(train_ex)
    h = torch.stack([cache[i] for i in range(n)]).float()
    if config.normalize:
        h = unit(h)
    cols = [h.numpy(), lp_all[:n].numpy()] + ([extra_all[:n].numpy()] if extra_all is not None else [])
    x = np.hstack(cols).astype(np.float64)

    def evaluate(rows, scores):
        return metrics_by_benchmark([train_ex[i] for i in rows], list(scores))

    fit = select_and_fit(
        x, y_all[:n].numpy(), w_all[:n].numpy(), n_h=h.shape[1],
        keys=[e.context[0]["content"] if e.context else e.prompt for e in train_ex],
        evaluate=evaluate, grid=config.head_l2_grid, folds=config.head_cv_folds, seed=config.seed,
        progress=(lambda **kw: _progress(**kw)) if config.progress else None,
        fold_design=fold_design,
    )
    for row in fit.cv:
        log.info("head CV: L2 on W_h %g -> APGR %s", row["l2_h"],
                 ", ".join(f"{b} {v:.3f}" for b, v in row["apgr"].items()))
    with torch.no_grad():
        model.head.linear.weight.copy_(torch.from_numpy(fit.weight).float().unsqueeze(0))
        model.head.linear.bias.fill_(fit.bias)
    return [{"head_fit": "lbfgs", "l2_h": fit.l2_h, "cv": fit.cv}]


def train(config: TrainConfig) -> TrainResult:
    """Cache the frozen layers, train the top layers + head, score the validation split."""
    import torch

    from export.model import NeighborGain, RouterModel, pool, unit, uses_token_types

    t0 = time.time()
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    examples = load_examples(
        config.data_dirs, config.benchmarks,
        val_fraction=config.val_fraction, weights=config.benchmark_weights,
    )
    train_ex = [e for e in examples if e.split == "train"]
    val_ex = [e for e in examples if e.split == "val"]
    if not train_ex or not val_ex:
        raise TrainError(f"need both train and val turns, got {len(train_ex)} / {len(val_ex)}")
    log.info("router data: %d train / %d val turns", len(train_ex), len(val_ex))

    tokenizer = base_tokenizer(config.base)
    pad_id = pad_id_of(tokenizer)
    encoder = truncate_encoder(load_encoder(config.base), config.encoder_layers)
    types = uses_token_types(encoder.config)
    model = RouterModel(encoder, config.pooling, types, normalize=config.normalize)
    lp_feature = LpFeature(scale=config.lp_scale)
    stack = _Stack(encoder, config.train_layers, types)
    for p in encoder.parameters():
        p.requires_grad_(False)
    for layer in stack.top:
        for p in layer.parameters():
            p.requires_grad_(True)

    everything = train_ex + val_ex
    encs = [encode_turn(tokenizer, e.prompt, e.context, config.max_length) for e in everything]
    # Length-sorted batches: far less padding in the cached forward pass.
    order = sorted(range(len(everything)), key=lambda i: len(encs[i].ids))
    cache: list = [None] * len(everything)
    encoder.eval()
    with torch.no_grad():
        for s in _progress(range(0, len(order), 64), desc="caching frozen layers", unit="batch", disable=not config.progress):
            idx = order[s : s + 64]
            ids, tt, mask = _pad([encs[i].ids for i in idx], pad_id, [encs[i].type_ids for i in idx])
            hidden = stack.bottom(ids, tt, mask)
            for j, i in enumerate(idx):
                n = len(encs[i].ids)
                # fp16 halves the cache; the top layers run in fp32.
                cache[i] = hidden[j, :n].to(torch.float16) if stack.top else pool(
                    hidden[j : j + 1, :n], mask[j : j + 1, :n], config.pooling
                )[0]
    n_train = len(train_ex)
    labels = [e.label for e in everything]
    raw_train = np.asarray(labels[:n_train], dtype=np.float64)
    bench_train = np.asarray([e.benchmark for e in train_ex])
    frozen_train = None
    if config.neighbor_smoothing > 0:
        with torch.no_grad():
            frozen = [
                _frozen_pooled(stack, cache, i, config.pooling)
                for i in _progress(range(n_train), desc="neighbour labels", unit="turn", disable=not config.progress)
            ]
        frozen_train = np.stack(frozen)
        smoothed = neighbor_labels(frozen_train, raw_train, bench_train, config.neighbors)
        a = config.neighbor_smoothing
        labels[:n_train] = [(1 - a) * y + a * s for y, s in zip(labels[:n_train], smoothed)]
    lp_all = torch.tensor([[lp_feature.value(e.prompt)] for e in everything], dtype=torch.float32)
    y_all = torch.tensor(labels, dtype=torch.float32)
    w_all = torch.tensor([e.weight for e in everything], dtype=torch.float32)

    def forward_cached(idx: Sequence[int]):
        if stack.top:
            width = max(cache[i].shape[0] for i in idx)
            hidden = torch.zeros(len(idx), width, cache[idx[0]].shape[1])
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for j, i in enumerate(idx):
                n = cache[i].shape[0]
                hidden[j, :n] = cache[i].float()
                mask[j, :n] = 1
            return model.head(model.features(stack.run_top(hidden, mask), mask), lp_all[list(idx)])
        h = torch.stack([cache[i] for i in idx])
        if config.normalize:
            h = unit(h)
        return model.head(h, lp_all[list(idx)], extra_all[list(idx)] if extra_all is not None else None)

    def score(indices: Sequence[int]) -> list[float]:
        for layer in stack.top:
            layer.eval()
        out: list[float] = []
        with torch.no_grad():
            srt = sorted(indices, key=lambda i: cache_len(i))
            got = {}
            for s in range(0, len(srt), 64):
                idx = srt[s : s + 64]
                for i, v in zip(idx, torch.sigmoid(forward_cached(idx)).tolist()):
                    got[i] = v
            out = [got[i] for i in indices]
        return out

    def cache_len(i: int) -> int:
        return int(cache[i].shape[0]) if stack.top else 0

    extra_all = None
    if config.neighbor_feature:
        # k(h) (and f(h)): train turns see their k nearest *other* training turns
        # (leave-one-out), validation turns the bank itself, exactly as the
        # exported graph computes it.
        pooled = torch.stack([cache[i] for i in range(len(everything))]).float()
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
        # The head's extra inputs [k; f; f·L_p], ready for every cached turn.
        extra_all = model.head_extra(lp_all, torch.cat([out_train, out_val]))

    def fold_design(tr: np.ndarray, te: np.ndarray):
        """One CV fold's design, from its training rows alone: their own
        neighbour-smoothed targets, and k(h), f(h) with the fold's training
        rows as the bank (leave-one-out for them), as the export would build
        them had the held-out rows never been seen."""
        y = raw_train[tr].copy()
        if frozen_train is not None:
            a = config.neighbor_smoothing
            y = (1 - a) * y + a * neighbor_labels(frozen_train[tr], raw_train[tr], bench_train[tr], config.neighbors)
        x_tr, x_te = [h_lp[tr]], [h_lp[te]]
        if extra_all is not None:
            bank = pooled[:n_train].numpy()
            kk = min(config.neighbor_feature, len(tr) - 1)
            vals = bank_values[tr]
            out_tr = neighbor_labels(bank[tr], vals, ["all"] * len(tr), kk).reshape(len(tr), -1)
            out_te = neighbor_means(bank[te], bank[tr], vals, kk).reshape(len(te), -1)
            center, scale = out_tr[:, 0].mean(), max(out_tr[:, 0].std(), 1e-6)
            for out, rows, cols in ((out_tr, tr, x_tr), (out_te, te, x_te)):
                out[:, 0] = (out[:, 0] - center) / scale
                extra = model.head_extra(lp_all[rows], torch.from_numpy(out).float())
                cols.append(extra.numpy().astype(np.float64))
        return np.hstack(x_tr), y, np.hstack(x_te)

    val_idx = list(range(n_train, len(everything)))
    if config.head_l2_grid and not stack.top:
        # [h; L_p] of the training turns: the same in every fold.
        h = torch.stack([cache[i] for i in range(n_train)]).float()
        if config.normalize:
            h = unit(h)
        h_lp = np.hstack([h.numpy(), lp_all[:n_train].numpy()]).astype(np.float64)
        history = _fit_head_full_batch(
            config, model, cache, lp_all, extra_all, y_all, w_all, train_ex, fold_design=fold_design
        )
        val_scores = score(val_idx)
        metrics = metrics_by_benchmark(val_ex, val_scores)
        log.info("head fitted (L2 on W_h %g), val APGR %s", history[-1]["l2_h"],
                 ", ".join(f"{b} {m['apgr']:.3f}" for b, m in metrics.items()))
    else:
        # Start the head at the base rate, so early steps do not just learn the bias.
        mean_y = float((y_all[:n_train] * w_all[:n_train]).sum() / w_all[:n_train].sum())
        mean_y = min(max(mean_y, 1e-3), 1 - 1e-3)
        with torch.no_grad():
            model.head.linear.weight.zero_()
            model.head.linear.bias.fill_(math.log(mean_y / (1 - mean_y)))
        params = [
            {"params": [p for l in stack.top for p in l.parameters()], "lr": config.lr_encoder},
            {"params": list(model.head.parameters()), "lr": config.lr_head},
        ]
        opt = torch.optim.AdamW([g for g in params if g["params"]], weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(n_train / config.batch_size)
        total = steps_per_epoch * config.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * max(0.0, (total - step) / total)
        )
        rng = np.random.default_rng(config.seed)
        history = []
        for epoch in range(config.epochs):
            for layer in stack.top:
                layer.train()
            # Batches of similar length (shuffled buckets): less padding, still random.
            perm = rng.permutation(n_train).tolist()
            buckets = [sorted(perm[s : s + config.batch_size * 32], key=cache_len) for s in range(0, n_train, config.batch_size * 32)]
            batches = [b[s : s + config.batch_size] for b in buckets for s in range(0, len(b), config.batch_size)]
            rng.shuffle(batches)
            running = 0.0
            bar = _progress(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not config.progress)
            for k, idx in enumerate(bar):
                logit = forward_cached(idx)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, y_all[idx], weight=w_all[idx], reduction="sum"
                ) / w_all[idx].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                lv = float(loss.detach())
                running = 0.98 * running + 0.02 * lv if k else lv
                bar.set_postfix(loss=f"{running:.4f}")
            val_scores = score(val_idx)
            metrics = metrics_by_benchmark(val_ex, val_scores)
            history.append({"epoch": epoch + 1, "loss": running, **{b: m["apgr"] for b, m in metrics.items()}})
            log.info("epoch %d: loss %.4f, val APGR %s", epoch + 1, running,
                     ", ".join(f"{b} {m['apgr']:.3f}" for b, m in metrics.items()))
    model.eval()
    val_scores = score(val_idx)
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        lp_feature=lp_feature,
        train_examples=train_ex,
        val_examples=val_ex,
        val_scores=val_scores,
        val_metrics=metrics_by_benchmark(val_ex, val_scores),
        history=history,
        seconds=time.time() - t0,
    )
