"""Tokenized batches of labeled texts: padded per batch, never to a fixed length.

For inference the texts are sorted by length first so a batch pads little; for training the
order is the epoch's seeded permutation (padding is the price of an unbiased order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """Token ids of every text (without padding) and the labels."""

    ids: list[list[int]]
    labels: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids [B, T], attention_mask [B, T], labels [B]) of the examples ``index``."""
        rows = [self.ids[int(i)] for i in index]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        return ids, mask, self.labels[torch.as_tensor([int(i) for i in index])]

    def by_length(self, size: int):
        """Index batches of ``size`` in order of length (for inference)."""
        order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        for s in range(0, len(order), size):
            yield order[s:s + size]

    def tokens(self) -> int:
        return sum(len(r) for r in self.ids)


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int = 128) -> Encoded:
    """Tokenize ``texts`` ([CLS] ... [SEP], truncated to ``max_length``)."""
    from compactor.errors import CompactorError

    if not texts:
        raise CompactorError("no labeled examples to encode (an empty split?)")
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(ids, torch.tensor(labels, dtype=torch.long), pad)
