"""Pure per-token metrics on logits, and a streaming accumulator.

All functions take logits ``[T, V]`` (one window, positions already aligned so that row t
predicts the next token) and compute in float32 unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from compactor.distill.losses import cross_entropy, forward_kl


def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """KL(P_ref || Q) for each position: ``[T, V], [T, V] -> [T]`` (nats), chunked over T to
    bound memory (the divergence itself is :func:`compactor.distill.losses.forward_kl`)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    # Clamp: exact-zero KL can come out as -1e-9 from rounding.
    return torch.cat([forward_kl(logits[s : s + chunk], ref_logits[s : s + chunk]).clamp_min(0.0)
                      for s in range(0, ref_logits.shape[0], chunk)])


def nll_per_token(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Negative log-likelihood of ``targets [T]`` under ``logits [T, V]`` -> ``[T]`` (nats)."""
    return torch.cat([cross_entropy(logits[s : s + chunk], targets[s : s + chunk])
                      for s in range(0, logits.shape[0], chunk)])


@dataclass
class StreamingStats:
    """Accumulates NLL, KL and top-1 agreement window by window, never holding logits.

    Per-token KL values are kept (one float per scored token) for the percentile.
    """

    nll_sum: float = 0.0
    ref_nll_sum: float = 0.0
    count: int = 0
    top1_match: int = 0
    kl_values: list = field(default_factory=list)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
               ref_logits: torch.Tensor | None = None, chunk: int = 128) -> None:
        """Add one window: ``logits [T, V]`` predicting ``targets [T]``; ``mask [T]`` selects
        the scored positions; ``ref_logits [T, V]`` for the reference, if any.

        Each chunk of positions takes one log-softmax per model, shared by NLL, KL and top-1.
        """
        logits, targets = logits[mask], targets[mask]
        if ref_logits is not None:
            ref_logits = ref_logits[mask]
        self.count += int(mask.sum())
        for s in range(0, logits.shape[0], chunk):
            tgt = targets[s : s + chunk, None]
            lq = torch.log_softmax(logits[s : s + chunk].float(), dim=-1)
            self.nll_sum -= float(lq.gather(-1, tgt).double().sum())
            if ref_logits is None:
                continue
            lp = torch.log_softmax(ref_logits[s : s + chunk].float(), dim=-1)
            self.ref_nll_sum -= float(lp.gather(-1, tgt).double().sum())
            self.kl_values.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0))
            self.top1_match += int((lp.argmax(-1) == lq.argmax(-1)).sum())

    def summary(self) -> dict:
        """ppl; with a reference also ref_ppl, kld_mean, kld_p99, top1."""
        if self.count == 0:
            raise ValueError("no scored tokens")
        out = {"ppl": math.exp(self.nll_sum / self.count), "tokens": self.count}
        if self.kl_values:
            kl = torch.cat(self.kl_values).double()
            out.update(
                ref_ppl=math.exp(self.ref_nll_sum / self.count),
                kld_mean=float(kl.mean()),
                kld_p99=float(torch.quantile(kl, 0.99)),
                top1=self.top1_match / self.count,
            )
        return out
