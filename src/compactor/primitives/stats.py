"""Running statistics of layer inputs: per-column mean |x|, mean x^2 and max |x|, plus a bounded
random sample of input rows (for methods that search by reconstructing outputs)."""

from __future__ import annotations

import torch


class InputSample:
    """Accumulates ``mean |x|`` per column over all tokens and keeps up to ``max_rows`` rows
    of ``x [..., in]`` in float32: a uniform sample without replacement of every row seen,
    by priority sampling (each row draws a uniform key once; the rows with the smallest
    keys are kept — exactly uniform whatever the batch sizes), seeded, in arrival order."""

    def __init__(self, in_features: int, max_rows: int = 1024, seed: int = 0):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self.abs_max = torch.zeros(in_features, dtype=torch.float32)
        self.count = 0
        self.max_rows = max_rows
        self.rows: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double()
        self.sq_sum += x.pow(2).sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        self.count += x.shape[0]
        if not self.max_rows:
            return
        keys = torch.rand(x.shape[0], generator=self._gen)
        rows = x if self.rows is None else torch.cat([self.rows, x])
        keys = keys if self.rows is None else torch.cat([self._keys, keys])
        if rows.shape[0] > self.max_rows:
            keep = torch.topk(keys, self.max_rows, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self._keys = rows, keys

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def mean_sq(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1)).float()
