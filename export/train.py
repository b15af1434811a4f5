"""Train the eq. (10) router on the RouteLLM labels.

The encoder is cut to its bottom ``encoder_layers`` layers.  Its frozen
layers run once over the data (:class:`export.features.CachedFeatures`, why:
see there); each epoch then runs only the top ``train_layers`` layers (none
by default) and the head.  With a neighbour feature, the frozen pooled
outputs of the training turns become the bank of k(h)
(export/neighbors.py).  The head is fitted by one of the two optimisers of
export/optimizers.py.  The exported model is the cut encoder with its head
(and bank), so the device runs one ordinary graph.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_runtime.routing.bundle import LpFeature, load_tokenizer
from export.config import TrainConfig
from export.data import Example, load_examples
from export.evaluate import metrics_by_benchmark
from export.features import CachedFeatures, EncoderSplit
from export.neighbors import add_neighbor_feature, build_targets
from export.optimizers import fit_adamw, fit_head_lbfgs

if TYPE_CHECKING:
    from export.model import RouterModel

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


def _split(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """The training and validation turns (the recorded hash split)."""
    examples = load_examples(
        config.data_dirs, config.benchmarks,
        val_fraction=config.val_fraction, weights=config.benchmark_weights,
    )
    train_ex = [e for e in examples if e.split == "train"]
    val_ex = [e for e in examples if e.split == "val"]
    if not train_ex or not val_ex:
        raise TrainError(f"need both train and val turns, got {len(train_ex)} / {len(val_ex)}")
    log.info("router data: %d train / %d val turns", len(train_ex), len(val_ex))
    return train_ex, val_ex


def _router_model(config: TrainConfig) -> tuple[RouterModel, EncoderSplit]:
    """The cut encoder with its head, and its split: only the top ``train_layers``
    (and the head) require gradients."""
    from export.model import RouterModel, uses_token_types

    encoder = truncate_encoder(load_encoder(config.base), config.encoder_layers)
    types = uses_token_types(encoder.config)
    model = RouterModel(encoder, config.pooling, types, normalize=config.normalize)
    depth = len(encoder.encoder.layer)
    if config.train_layers > depth:
        raise TrainError(f"train_layers={config.train_layers} but the encoder has {depth} layers")
    split = EncoderSplit(encoder, config.train_layers, types)
    for p in encoder.parameters():
        p.requires_grad_(False)
    for layer in split.top:
        for p in layer.parameters():
            p.requires_grad_(True)
    return model, split


def train(config: TrainConfig) -> TrainResult:
    """Cache the frozen layers, train the top layers + head, score the validation split."""
    import torch

    t0 = time.time()
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    train_ex, val_ex = _split(config)
    tokenizer = base_tokenizer(config.base)
    model, split = _router_model(config)
    lp_feature = LpFeature(scale=config.lp_scale)
    everything = train_ex + val_ex
    features = CachedFeatures.compute(
        split, tokenizer, everything, max_length=config.max_length, pooling=config.pooling,
        normalize=config.normalize, lp_feature=lp_feature, progress=config.progress,
    )
    targets = build_targets(config, features, everything, len(train_ex))
    bank = None
    if config.neighbor_feature:
        bank = add_neighbor_feature(model, features, train_ex, config)
        features.extra = bank.extra
    if config.head_l2_grid and not split.top:
        history = fit_head_lbfgs(config, model, features, targets, bank, train_ex, val_ex)
    else:
        history = fit_adamw(config, model, features, targets, train_ex, val_ex)
    model.eval()
    val_scores = features.score(model, range(len(train_ex), len(everything)))
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
