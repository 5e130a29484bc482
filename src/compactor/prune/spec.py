"""Settings every unstructured pruning step shares, and the in-place mask application."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.config import StepConfig, check
from compactor.primitives.masks import n_pruned, parse_pattern


@dataclass(frozen=True)
class PruneConfig(StepConfig):
    """``sparsity``: share of weights removed per matched linear (ignored with an N:M
    ``pattern``, which fixes it at N/M); ``pattern``: ``unstructured`` or ``N:M`` (N zeros in
    every M consecutive input columns)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def validate(self) -> None:
        check(0 <= self.sparsity < 1, f"{self.name}.sparsity: must be in [0, 1), got {self.sparsity}")
        parse_pattern(self.pattern)  # raises a specific error for a bad N:M

    def min_zeros(self, shape: tuple[int, int]) -> int:
        """Zeros an unstructured mask of a ``shape`` matrix holds at least: the sparsity's
        count rounded where the method rounds it (here per matrix; per row for methods that
        rank within rows, per block of columns for SparseGPT) — so 0.3 of a 64-wide row is 19
        zeros per row, not 0.3 of the matrix rounded once."""
        return n_pruned(shape[0] * shape[1], self.sparsity)

    @property
    def target_sparsity(self) -> float:
        nm = parse_pattern(self.pattern)
        return self.sparsity if nm is None else nm[0] / nm[1]


def apply_mask(module: torch.nn.Linear, keep: torch.Tensor) -> torch.nn.Linear:
    """Zero the weights ``keep`` marks False, in place; returns the module."""
    with torch.no_grad():
        module.weight.mul_(keep.to(module.weight.dtype))
    return module
