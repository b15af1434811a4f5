"""The eq. (10) router as a torch module: encoder -> pooled h -> σ(Wᵀ[h; L_p] + b).

With a :class:`NeighborGain` the head reads more inputs from the turn's
nearest training turns: k(h), their mean label, and, when the bank knows
each turn's benchmark, f(h), the share of each benchmark among them, with
f(h)·L_p (so the weight of L_p can differ between kinds of prompts):
σ(Wᵀ[h; L_p; k(h); f(h); f(h)·L_p] + b).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """h of eq. (10): the [CLS] vector, or the masked mean of the token vectors."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def unit(h: torch.Tensor) -> torch.Tensor:
    """h / ‖h‖ (what all-MiniLM-L6-v2's sentence pipeline ends with)."""
    return h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class RouterHead(nn.Module):
    """σ(Wᵀ[h; L_p] + b): one linear layer over the pooled vector and the length feature
    (and ``extra`` more inputs: the neighbour features, see :class:`NeighborGain`)."""

    def __init__(self, hidden_size: int, extra: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size + 1 + extra, 1)

    def forward(self, h: torch.Tensor, lp: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Logit (before σ); ``lp`` is [batch, 1], ``extra`` [batch, extra]."""
        parts = [h, lp.to(h.dtype)] + ([extra.to(h.dtype)] if extra is not None else [])
        return self.linear(torch.cat(parts, dim=-1)).squeeze(-1)


class NeighborGain(nn.Module):
    """k(h): the mean label of the ``k`` training turns nearest to h (cosine);
    with ``groups`` ([N, G] one-hot, e.g. each turn's benchmark) also f(h), the
    share of each group among those k turns.

    The training turns' unit-length pooled vectors, labels and groups are
    buffers, so they travel inside the ONNX graph (MatMul, TopK, Gather) and
    the device needs nothing else; INT8 quantization stores the bank as int8.
    """

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, k: int, center: float = 0.0, scale: float = 1.0,
                 groups: torch.Tensor | None = None, group_names: Sequence[str] = ()) -> None:
        super().__init__()
        if bank.ndim != 2 or labels.shape != (bank.shape[0],):
            raise ValueError(f"bank [N, H] and labels [N] expected, got {tuple(bank.shape)} and {tuple(labels.shape)}")
        if not 1 <= k <= bank.shape[0]:
            raise ValueError(f"k must be in [1, {bank.shape[0]}], got {k}")
        if groups is not None and (groups.ndim != 2 or groups.shape[0] != bank.shape[0]):
            raise ValueError(f"groups [N, G] expected with N = {bank.shape[0]}, got {tuple(groups.shape)}")
        if group_names and (groups is None or len(group_names) != groups.shape[1]):
            raise ValueError("group_names needs one name per column of groups")
        self.k = int(k)
        self.register_buffer("bank_t", unit(bank.float()).T.contiguous())
        self.register_buffer("labels", labels.float())
        self.n_groups = 0 if groups is None else int(groups.shape[1])
        #: What each column of ``groups`` is (e.g. benchmark names), for the checkpoint.
        self.group_names = tuple(group_names)
        if groups is not None:
            self.register_buffer("groups", groups.float())
        # Standardized on the training turns, so the head's weight on k(h) is
        # of the same order as its other weights (a raw neighbour mean moves
        # by a few hundredths and would barely be learned).
        self.register_buffer("center", torch.tensor(float(center)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def _nearest(self, h: torch.Tensor) -> torch.Tensor:
        return torch.topk(unit(h) @ self.bank_t, self.k, dim=-1).indices

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[z(k(h)), f(h)]: the standardized neighbour mean, then the group shares, [batch, width]."""
        idx = self._nearest(h)
        k = (self.labels[idx].mean(dim=-1, keepdim=True) - self.center) / self.scale
        if not self.n_groups:
            return k
        return torch.cat([k, self.groups[idx].mean(dim=1)], dim=-1)


class RouterModel(nn.Module):
    """Encoder + pooling + head; ``forward`` returns p in [0, 1] (the ONNX graph's output)."""

    def __init__(self, encoder: nn.Module, pooling: str, uses_token_types: bool, normalize: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.uses_token_types = uses_token_types
        #: h of eq. (10) scaled to unit length before the head.
        self.normalize = normalize
        self.neighbors: NeighborGain | None = None
        self.head = RouterHead(encoder.config.hidden_size)

    def set_neighbors(self, neighbors: NeighborGain) -> None:
        """Add k(h) (and f(h), f(h)·L_p) to the head's inputs (a fresh head)."""
        self.neighbors = neighbors
        self.head = RouterHead(self.encoder.config.hidden_size, extra=1 + 2 * neighbors.n_groups)

    def head_extra(self, lp: torch.Tensor, neighbor_out: torch.Tensor) -> torch.Tensor:
        """The head's inputs after [h; L_p], from the neighbour module's output:
        [k; f; f·L_p] (just [k] without groups)."""
        if self.neighbors is None or not self.neighbors.n_groups:
            return neighbor_out
        f = neighbor_out[:, 1:]
        return torch.cat([neighbor_out, f * lp.to(f.dtype)], dim=-1)

    def head_logit(self, h: torch.Tensor, lp: torch.Tensor, neighbor_out: torch.Tensor | None = None) -> torch.Tensor:
        """The head on pooled h; the neighbour module runs unless ``neighbor_out`` gives its output."""
        extra = None
        if self.neighbors is not None:
            extra = self.head_extra(lp, self.neighbors(h) if neighbor_out is None else neighbor_out)
        return self.head(h, lp, extra)

    def features(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h of eq. (10) from the encoder's last hidden states."""
        h = pool(hidden, attention_mask, self.pooling)
        return unit(h) if self.normalize else h

    def logit(self, input_ids, attention_mask, token_type_ids=None, lp=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types and token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kw).last_hidden_state
        return self.head_logit(self.features(hidden, attention_mask), lp)

    def forward(self, input_ids, attention_mask, token_type_ids=None, lp=None) -> torch.Tensor:
        return torch.sigmoid(self.logit(input_ids, attention_mask, token_type_ids, lp))


class ClassifierProbability(nn.Module):
    """A sequence classifier as a router: p = softmax(logits)[positive_label]."""

    def __init__(self, classifier: nn.Module, positive_label: int, uses_token_types: bool) -> None:
        super().__init__()
        self.classifier = classifier
        self.positive_label = positive_label
        self.uses_token_types = uses_token_types

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types and token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        logits = self.classifier(**kw).logits
        if logits.shape[-1] == 1:
            # A single-logit classifier: σ(logit) is P(label 1).
            p1 = torch.sigmoid(logits[:, 0])
            return p1 if self.positive_label == 1 else 1.0 - p1
        return torch.softmax(logits, dim=-1)[:, self.positive_label]


def uses_token_types(config) -> bool:
    """BERT has segment embeddings; RoBERTa's type_vocab_size is 1 (ids must stay 0)."""
    return getattr(config, "type_vocab_size", 0) > 1


def save_checkpoint(model: RouterModel, directory, *, pooling: str) -> None:
    """The trained PyTorch router: ``encoder/`` (Hugging Face format) + ``head.pt`` + ``router.json``."""
    import json
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(directory / "encoder"))
    torch.save(model.head.state_dict(), directory / "head.pt")
    if model.neighbors is not None:
        torch.save(model.neighbors.state_dict(), directory / "neighbors.pt")
    (directory / "router.json").write_text(
        json.dumps({"pooling": pooling, "uses_token_types": model.uses_token_types,
                    "normalize": model.normalize,
                    "neighbors": model.neighbors.k if model.neighbors is not None else 0,
                    "neighbor_groups": list(model.neighbors.group_names) if model.neighbors is not None else []})
        + "\n"
    )


def load_checkpoint(directory) -> RouterModel:
    """Inverse of :func:`save_checkpoint` (used by the benchmark's PyTorch column)."""
    import json
    from pathlib import Path

    from transformers import AutoModel

    directory = Path(directory)
    meta = json.loads((directory / "router.json").read_text())
    encoder = AutoModel.from_pretrained(str(directory / "encoder"), local_files_only=True)
    model = RouterModel(encoder, meta["pooling"], meta["uses_token_types"], meta.get("normalize", False))
    if meta.get("neighbors"):
        state = torch.load(directory / "neighbors.pt", weights_only=True)
        model.set_neighbors(NeighborGain(state["bank_t"].T, state["labels"], meta["neighbors"],
                                         float(state["center"]), float(state["scale"]), state.get("groups"),
                                         meta.get("neighbor_groups") or ()))
    model.head.load_state_dict(torch.load(directory / "head.pt", weights_only=True))
    return model.eval()
