"""Magnitude pruning: remove the smallest |W|, per layer, per row, or with one threshold
across all targeted layers (global). The data-free baseline Wanda and SparseGPT must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compactor.primitives.masks import global_threshold, keep_mask, n_pruned
from compactor.prune.spec import PruneConfig, apply_mask
from compactor.registry import register


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """``scope``: ``layer`` (each matrix at ``sparsity``), ``row`` (each output row), or
    ``global`` (one |W| threshold over all matched matrices; layers end up uneven)."""

    name = "magnitude"
    needs_calibration = False
    scope: Literal["layer", "row", "global"] = "layer"

    def min_zeros(self, shape: tuple[int, int]) -> int:
        return shape[0] * n_pruned(shape[1], self.sparsity) if self.scope == "row" else super().min_zeros(shape)

    def prepare(self, model, names: list[str]):
        """Global scope: the |W| threshold over every matched weight (others: nothing)."""
        if self.scope != "global" or self.pattern != "unstructured":
            return None
        return global_threshold([model.get_submodule(n).weight.detach().abs() for n in names], self.sparsity)


@register(MagnitudeConfig)
def apply_magnitude(module: torch.nn.Linear, cfg: MagnitudeConfig, name: str = "", stats=None):
    """Zero ``module``'s smallest weights; ``stats`` is the global threshold when global."""
    score = module.weight.detach().abs().float()
    if cfg.scope == "global" and cfg.pattern == "unstructured":
        return apply_mask(module, score > stats)
    return apply_mask(module, keep_mask(score, cfg.sparsity, cfg.pattern, "layer" if cfg.scope == "global" else cfg.scope))
