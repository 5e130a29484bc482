"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot", arXiv:2301.00774): OBS-style pruning with the GPTQ machinery.

Columns are visited left to right; in each block of ``block_size`` columns the mask is
chosen adaptively by the OBS saliency ``w^2 / [H^-1]_jj^2`` (every M columns for N:M), the
pruned weights' error is spread over the later columns through the inverse Hessian, exactly
as GPTQ spreads rounding error. With a ``grid`` the kept weights are quantized in the same
pass (joint sparsification + quantization, the paper's section 4.3); the grid must represent
0 exactly (symmetric linear grids), so pruned weights stay zero after quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.config import check
from compactor.errors import CompactorError
from compactor.primitives.hessian import inverse_cholesky_upper, prepare_hessian
from compactor.primitives.threads import one_thread
from compactor.primitives.masks import n_pruned, nm_keep_mask, parse_pattern, topk_keep_mask
from compactor.prune.spec import PruneConfig
from compactor.quant.qlinear import QuantizedLinear
from compactor.registry import register


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT settings; ``grid`` (+ ``bits``/``group_size``) quantizes jointly when set."""

    name = "sparsegpt"
    needs_calibration = True
    block_size: int = 128
    dampening: float = 0.01
    grid: str | None = None
    bits: int = 4
    group_size: int = 128
    true_sequential: bool = True
    calibration_dtype: str = "auto"

    def min_zeros(self, shape: tuple[int, int]) -> int:
        # Ranked within each block of block_size columns (the lazy-update block).
        out, n = shape
        return sum(n_pruned(out * min(self.block_size, n - i), self.sparsity) for i in range(0, n, self.block_size))

    def validate(self) -> None:
        super().validate()
        check(0 <= self.dampening < 1, f"sparsegpt.dampening must be in [0, 1), got {self.dampening}")
        check(self.block_size >= 1, f"sparsegpt.block_size must be >= 1, got {self.block_size}")
        check(self.calibration_dtype in ("auto", "float32", "bfloat16"),
              f"sparsegpt.calibration_dtype: got {self.calibration_dtype!r}")


def sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              block_size: int = 128, percdamp: float = 0.01, qp=None):
    """Prune ``W [out, in]`` given the input Hessian ``H``. Returns (pruned weight, keep mask,
    codes or None); with ``qp`` (a fitted grid) kept weights are quantized as they go."""
    W = W.detach().clone().float()
    out, n = W.shape
    H, dead = prepare_hessian(H, percdamp)
    W[:, dead] = 0
    Hinv = inverse_cholesky_upper(H, consume=True)
    del H
    keep = torch.ones(out, n, dtype=torch.bool)
    codes = torch.zeros(out, n, dtype=torch.int32) if qp is not None else None
    if nm is not None and block_size % nm[1]:
        block_size = nm[1] * max(1, block_size // nm[1])  # groups of M never straddle blocks
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        d1 = torch.diagonal(Hinv[i1:i2, i1:i2])
        if nm is None:
            # OBS saliency of removing w_j alone: w_j^2 / [H^-1]_jj^2 (U's diagonal squared)
            keep[:, i1:i2] = topk_keep_mask(W1 ** 2 / d1[None, :] ** 2, sparsity, "layer")
        with one_thread():  # many small vector ops: see compactor.primitives.threads
            for i in range(i2 - i1):
                if nm is not None and i % nm[1] == 0:
                    g = slice(i, i + nm[1])
                    keep[:, i1 + i:i1 + i + nm[1]] = nm_keep_mask(W1[:, g] ** 2 / d1[None, g] ** 2, *nm)
                w = W1[:, i]
                k = keep[:, i1 + i]
                if qp is not None:
                    c, vq = qp.quantize_column(w, i1 + i)
                    codes[:, i1 + i] = c * k
                    v = vq * k  # code 0 is value 0 on the grids allowed here
                else:
                    v = w * k
                err = (w - v) / d1[i]
                W1[:, i:] -= err[:, None] * Hinv[i1 + i, i1 + i:i2][None, :]
                W1[:, i] = v
                Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep, codes


@register(SparseGPTConfig)
def apply_sparsegpt(module: torch.nn.Linear, cfg: SparseGPTConfig, name: str = "", stats=None):
    """Prune ``module`` (and quantize jointly if ``cfg.grid``); ``stats``: HessianAccumulator."""
    from compactor.quant.spec import WeightQuantConfig, check_weight, resolve_grid

    if stats is None:
        raise ValueError(f"{name}: SparseGPT needs calibration statistics (run it through the sequential runner)")
    check_weight(module.weight, name)
    qp = grid = None
    if cfg.grid is not None:
        wq = WeightQuantConfig(grid=cfg.grid, bits=cfg.bits, group_size=cfg.group_size, symmetric=True)
        grid = resolve_grid(wq, module.in_features, name)
        qp = grid.fit(module.weight.detach().float(), stats.mean_sq())
        if qp.offset is not None or qp.codebook is not None or not qp.qmin <= 0 <= qp.qmax:
            raise CompactorError(f"{name}: joint SparseGPT needs a grid where 0 is a code "
                                 f"(symmetric linear); {grid.label} is not")
    W, keep, codes = sparsegpt(module.weight, stats.hessian(), cfg.sparsity, parse_pattern(cfg.pattern),
                               cfg.block_size, cfg.dampening, qp)
    if qp is not None:
        q = QuantizedLinear(codes, qp, grid.label, grid.bits_per_weight, module.bias, module.weight.dtype)
        q.note = grid.note
        return q
    with torch.no_grad():
        module.weight.copy_(W.to(module.weight.dtype))
    return module
