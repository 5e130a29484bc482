"""Pruning masks from importance scores — the part every unstructured method shares.

A method computes a score per weight (magnitude ``|W|``, Wanda ``|W|·‖x‖``, ...); these
functions turn scores into a keep-mask (True = kept) at an exact sparsity:

* ``scope="row"``: every output row loses the same number of weights (Wanda compares
  weights within a row);
* ``scope="layer"``: one threshold over the whole matrix;
* an N:M pattern: in every group of M consecutive input columns of a row, exactly N weights
  are removed (the SparseGPT / Wanda convention, so 2:4 keeps 2 of every 4).

Ties are broken by position (stable), so a sparsity is always met exactly.
"""

from __future__ import annotations

import re

import torch

from compactor.errors import CompactorError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``None`` / ``"unstructured"`` -> None. N zeros in every M."""
    if pattern in (None, "unstructured"):
        return None
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not m:
        raise CompactorError(f"pattern {pattern!r}: expected 'unstructured' or N:M such as '2:4'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise CompactorError(f"pattern {pattern}: N must be in 1..M-1 (N zeros in every group of M)")
    return n, mm


def check_sparsity(sparsity: float, where: str = "sparsity") -> None:
    if not 0 <= sparsity < 1:
        raise CompactorError(f"{where}: must be in [0, 1), got {sparsity}")


def n_pruned(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity removes (rounded to nearest)."""
    return int(round(total * sparsity))


def topk_keep_mask(scores: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Keep-mask removing the lowest-scoring ``sparsity`` share (per row or per layer)."""
    check_sparsity(sparsity)
    if scope == "row":
        k = n_pruned(scores.shape[1], sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if k:
            idx = torch.argsort(scores, dim=1, stable=True)[:, :k]
            mask.scatter_(1, idx, False)
        return mask
    if scope != "layer":
        raise CompactorError(f"mask scope {scope!r}: expected 'row' or 'layer'")
    k = n_pruned(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        mask[torch.argsort(scores.flatten(), stable=True)[:k]] = False
    return mask.reshape(scores.shape)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` zeros in every group of ``m`` consecutive columns."""
    out, cols = scores.shape
    if cols % m:
        raise CompactorError(f"N:M pattern {n}:{m}: the group size {m} does not divide the width {cols}")
    g = scores.reshape(out, cols // m, m)
    idx = torch.argsort(g, dim=-1, stable=True)[..., :n]
    mask = torch.ones_like(g, dtype=torch.bool)
    mask.scatter_(-1, idx, False)
    return mask.reshape(out, cols)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: str | None = None,
              scope: str = "layer") -> torch.Tensor:
    """The mask a config asks for: N:M when ``pattern`` is set, else top-k at ``sparsity``."""
    nm = parse_pattern(pattern)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    return topk_keep_mask(scores, sparsity, scope)


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> float:
    """The score below which ``sparsity`` of all weights (across tensors) fall."""
    check_sparsity(sparsity)
    flat = torch.cat([s.flatten().float() for s in scores])
    k = n_pruned(flat.numel(), sparsity)
    if k == 0:
        return float("-inf")
    return float(torch.kthvalue(flat, k).values)
