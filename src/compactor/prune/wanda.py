"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv:2306.11695): score ``|W_ij| * ||X_j||_2`` and compare weights within each
output row; no weight update. Needs one calibration pass (the per-column input norms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.primitives.masks import keep_mask, n_pruned
from compactor.prune.spec import PruneConfig, apply_mask
from compactor.registry import register


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda pruning; statistics are the running per-column mean of x^2 of each input."""

    name = "wanda"
    needs_calibration = True
    statistic = "inputs"  # the sequential runner keeps per-column moments, no Hessian
    sample_tokens = 0

    def min_zeros(self, shape: tuple[int, int]) -> int:
        return shape[0] * n_pruned(shape[1], self.sparsity)  # ranked within each output row


def wanda_scores(W: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """``|W| * ||x_j||``; the norm over n tokens is sqrt(n * mean x_j^2), and the constant
    sqrt(n) does not change any comparison, so sqrt(mean x^2) is used."""
    return W.abs().float() * mean_sq.float().sqrt()[None, :]


@register(WandaConfig)
def apply_wanda(module: torch.nn.Linear, cfg: WandaConfig, name: str = "", stats=None):
    if stats is None:
        raise ValueError(f"{name}: Wanda needs calibration statistics (run it through the sequential runner)")
    score = wanda_scores(module.weight.detach(), stats.mean_sq())
    return apply_mask(module, keep_mask(score, cfg.sparsity, cfg.pattern, scope="row"))
