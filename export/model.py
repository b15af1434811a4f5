"""The eq. (10) router as a torch module: encoder -> pooled h -> σ(Wᵀ[h; L_p] + b)."""

from __future__ import annotations

import torch
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """h of eq. (10): the [CLS] vector, or the masked mean of the token vectors."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class RouterHead(nn.Module):
    """σ(Wᵀ[h; L_p] + b): one linear layer over the pooled vector and the length feature."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size + 1, 1)

    def forward(self, h: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        """Logit (before σ); ``lp`` is [batch, 1]."""
        return self.linear(torch.cat([h, lp.to(h.dtype)], dim=-1)).squeeze(-1)


class RouterModel(nn.Module):
    """Encoder + pooling + head; ``forward`` returns p in [0, 1] (the ONNX graph's output)."""

    def __init__(self, encoder: nn.Module, pooling: str, uses_token_types: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.uses_token_types = uses_token_types
        self.head = RouterHead(encoder.config.hidden_size)

    def logit(self, input_ids, attention_mask, token_type_ids=None, lp=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_types and token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kw).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling), lp)

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
    (directory / "router.json").write_text(
        json.dumps({"pooling": pooling, "uses_token_types": model.uses_token_types}) + "\n"
    )


def load_checkpoint(directory) -> RouterModel:
    """Inverse of :func:`save_checkpoint` (used by the benchmark's PyTorch column)."""
    import json
    from pathlib import Path

    from transformers import AutoModel

    directory = Path(directory)
    meta = json.loads((directory / "router.json").read_text())
    encoder = AutoModel.from_pretrained(str(directory / "encoder"), local_files_only=True)
    model = RouterModel(encoder, meta["pooling"], meta["uses_token_types"])
    model.head.load_state_dict(torch.load(directory / "head.pt", weights_only=True))
    return model.eval()
