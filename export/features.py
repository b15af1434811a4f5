"""The frozen encoder's features, computed once and reused by every optimiser.

Why a cache: a full fine-tune of even MiniLM-L6 costs ~0.3 s per turn per
epoch on a shared 2-core CPU (an hour for the public sets).  The kept layers
below the top ``train_layers`` are frozen, so their output is computed in one
forward pass over the data and kept; every later step (neighbour-smoothed
targets, the neighbour feature, the L-BFGS head fit with its CV folds, each
AdamW epoch, validation scoring) reads :class:`CachedFeatures` instead of
running the encoder again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

#: Turns per forward pass when caching and scoring.
BATCH = 64


def progress_bar(iterable=None, **kw):
    """A tqdm bar that disappears when done (tqdm imported only when a bar is drawn)."""
    from tqdm import tqdm

    return tqdm(iterable, leave=False, **kw)


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


class EncoderSplit:
    """The encoder split in two: frozen bottom (run once, cached) and trained top.

    The caller checks ``train_layers`` against the encoder's depth.
    """

    def __init__(self, encoder, train_layers: int, uses_types: bool) -> None:
        self.encoder = encoder
        layers = encoder.encoder.layer
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


@dataclass
class CachedFeatures:
    """Every turn's frozen-layer output (training turns first, then validation).

    ``rows[i]`` is turn i's fp16 hidden states [tokens, H] when top layers are
    trained (fp16 halves the cache; the top layers run in fp32), else its
    pooled h [H] (``pooling``, before ``normalize``).  ``lp`` is L_p per turn [turns, 1];
    ``extra`` the head's neighbour inputs [k; f; f·L_p] per turn, set once the
    neighbour feature is built (None: the plain eq. (10) head).
    """

    split: EncoderSplit
    rows: list[torch.Tensor]
    lp: torch.Tensor
    pooling: str
    normalize: bool
    extra: torch.Tensor | None = None

    @classmethod
    def compute(cls, split: EncoderSplit, tokenizer, examples, *, max_length: int, pooling: str,
                normalize: bool, lp_feature, progress: bool) -> "CachedFeatures":
        """One forward pass of the frozen layers over ``examples``, in length-sorted
        batches (far less padding)."""
        import torch

        from device_runtime.routing.bundle import encode_turn, pad_id_of
        from export.model import pool

        pad_id = pad_id_of(tokenizer)
        encs = [encode_turn(tokenizer, e.prompt, e.context, max_length) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: len(encs[i].ids))
        rows: list = [None] * len(examples)
        split.encoder.eval()
        with torch.no_grad():
            for s in progress_bar(range(0, len(order), BATCH), desc="caching frozen layers", unit="batch",
                                  disable=not progress):
                idx = order[s : s + BATCH]
                ids, tt, mask = _pad([encs[i].ids for i in idx], pad_id, [encs[i].type_ids for i in idx])
                hidden = split.bottom(ids, tt, mask)
                for j, i in enumerate(idx):
                    n = len(encs[i].ids)
                    rows[i] = hidden[j, :n].to(torch.float16) if split.top else pool(
                        hidden[j : j + 1, :n], mask[j : j + 1, :n], pooling
                    )[0]
        lp = torch.tensor([[lp_feature.value(e.prompt)] for e in examples], dtype=torch.float32)
        return cls(split=split, rows=rows, lp=lp, pooling=pooling, normalize=normalize)

    def __len__(self) -> int:
        return len(self.rows)

    def length(self, i: int) -> int:
        """Cached tokens of turn ``i`` (0 when h is cached): the key of length-sorted batches."""
        return int(self.rows[i].shape[0]) if self.split.top else 0

    def pooled(self, indices: Sequence[int]) -> torch.Tensor:
        """The cached pooled h of ``indices`` [n, H], float32 (frozen encoder only)."""
        import torch

        return torch.stack([self.rows[i] for i in indices]).float()

    def frozen_pooled(self, i: int) -> np.ndarray:
        """Pooled output of the pretrained (not yet trained) top layers for turn ``i``."""
        import torch

        from export.model import pool

        if not self.split.top:
            return self.rows[i].numpy()
        hidden = self.rows[i].float().unsqueeze(0)
        mask = torch.ones(1, hidden.shape[1], dtype=torch.long)
        return pool(self.split.run_top(hidden, mask), mask, self.pooling)[0].numpy()

    def h_lp(self, indices: Sequence[int]) -> np.ndarray:
        """[h; L_p] of ``indices`` in float64 (h scaled to unit length if ``normalize``),
        the columns of the full-batch head fit that no fold changes."""
        from export.model import unit

        h = self.pooled(indices)
        if self.normalize:
            h = unit(h)
        return np.hstack([h.numpy(), self.lp[list(indices)].numpy()]).astype(np.float64)

    def logits(self, model, idx: Sequence[int]) -> torch.Tensor:
        """The head's logits for turns ``idx``: the trained top layers (if any) on the
        cached hidden states, else the head on the cached h (and neighbour inputs)."""
        import torch

        from export.model import unit

        if self.split.top:
            width = max(self.rows[i].shape[0] for i in idx)
            hidden = torch.zeros(len(idx), width, self.rows[idx[0]].shape[1])
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for j, i in enumerate(idx):
                n = self.rows[i].shape[0]
                hidden[j, :n] = self.rows[i].float()
                mask[j, :n] = 1
            return model.head(model.features(self.split.run_top(hidden, mask), mask), self.lp[list(idx)])
        h = torch.stack([self.rows[i] for i in idx])
        if self.normalize:
            h = unit(h)
        return model.head(h, self.lp[list(idx)], self.extra[list(idx)] if self.extra is not None else None)

    def score(self, model, indices: Sequence[int]) -> list[float]:
        """p of turns ``indices``, in their order (top layers in eval mode)."""
        import torch

        for layer in self.split.top:
            layer.eval()
        got: dict[int, float] = {}
        with torch.no_grad():
            srt = sorted(indices, key=self.length)
            for s in range(0, len(srt), BATCH):
                idx = srt[s : s + BATCH]
                for i, v in zip(idx, torch.sigmoid(self.logits(model, idx)).tolist()):
                    got[i] = v
        return [got[i] for i in indices]
