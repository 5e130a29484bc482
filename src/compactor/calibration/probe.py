"""A KL probe: how far the model's next-token distributions move when some weights are
temporarily replaced, scored against the unchanged model on a few token windows.

Used by sensitivity analyses (mixed precision). The replaced weights are restored whatever
happens; the reference logits are computed once, up front.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from compactor.data.windows import TokenWindows
from compactor.errors import CompactorError
from compactor.evaluate.metrics import kl_per_token


@contextlib.contextmanager
def swapped_weights(model, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named modules these weights (same shapes), in place of their
    own; a weight tied to another module (a tied head) changes with it."""
    saved = []
    try:
        for name, w in weights.items():
            p = model.get_submodule(name).weight
            if p.shape != w.shape:
                raise CompactorError(f"{name}: replacement weight {tuple(w.shape)} != {tuple(p.shape)}")
            saved.append((p, p.data))
            p.data = w.to(p.dtype)
        yield
    finally:
        for p, data in reversed(saved):
            p.data = data


class KLProbe:
    """``probe({module name: weight}) -> mean KL(reference || swapped)`` in nats per scored
    token, on the first windows of ``windows`` holding at least ``tokens`` tokens."""

    def __init__(self, model, windows: TokenWindows, tokens: int = 1024, batch: int = 2):
        if len(windows) == 0:
            raise CompactorError("KL probe: calibration data is empty")
        n = min(len(windows), max(1, -(-tokens // windows.input_ids.shape[1])))
        self.model, self.batch = model, batch
        self.ids, self.mask = windows.input_ids[:n], windows.score_mask[:n]
        self.reference = self._logits()  # [n, L, V] float32
        self.calls = 0

    def _logits(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model(self.ids[s:s + self.batch], use_cache=False).logits.float()
                              for s in range(0, len(self.ids), self.batch)])

    def __call__(self, weights: dict[str, torch.Tensor]) -> float:
        with swapped_weights(self.model, weights):
            logits = self._logits()
        self.calls += 1
        m = self.mask[:, 1:]  # row t of the logits predicts token t+1
        return float(kl_per_token(self.reference[:, :-1][m], logits[:, :-1][m]).mean())
