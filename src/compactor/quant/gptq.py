"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323), on any grid including the GGUF K-quants.

Columns are quantized one at a time; each column's rounding error is spread over the
not-yet-quantized columns through the inverse Hessian of the layer's input,
``H = 2/n sum x x^T``, so the layer's *output* error is minimized rather than the weight
error. Lazy batch updates (blocks of columns), damping as a fraction of mean(diag H),
dead-column handling, optional activation order.

Grid parameters are either fitted up front on the original weight ("static", required with
activation order so groups stay contiguous and map to GGUF blocks; the K-quant super-block
scales are fixed first, then GPTQ chooses codes) or lazily as each group is reached, on the
error-compensated weights (the original GPTQ group behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from compactor.config import check
from compactor.primitives.hessian import damped_diagonal, inverse_cholesky_upper
from compactor.primitives.qparams import QParams, concat_columns
from compactor.primitives.threads import one_thread
from compactor.quant.qlinear import QuantizedLinear
from compactor.quant.spec import WeightQuantConfig, check_weight, resolve_grid
from compactor.registry import register


@dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig):
    """GPTQ settings. ``dampening``: fraction of mean(diag H) added to the diagonal.
    ``diag_mix`` (λ): solve with ``(1 - λ) H + λ diag(H)``, shrinking the input correlations
    toward the importance matrix (diagonal only), which transfers better to text unlike the
    calibration set. The default 0.1 was chosen from the cross-domain sweep in
    ``bench/results/gptq_domains.md`` (lower mean KLD on every evaluation domain, the one no
    calibration set contains included, than λ = 0, 0.25, 0.5 or larger damping)."""

    name = "gptq"
    needs_calibration = True
    block_size: int = 128
    dampening: float = 0.01
    diag_mix: float = 0.1
    act_order: bool = True
    static_groups: bool | None = None  # None: static with act_order, lazy (refit per group) otherwise
    true_sequential: bool = True
    calibration_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def validate(self) -> None:
        super().validate()
        check(0 <= self.dampening < 1, f"gptq.dampening must be in [0, 1), got {self.dampening}")
        check(0 <= self.diag_mix <= 1, f"gptq.diag_mix must be in [0, 1], got {self.diag_mix}")
        check(self.block_size >= 1, f"gptq.block_size must be >= 1, got {self.block_size}")
        check(self.static_groups is not False or not self.act_order,
              "gptq.act_order needs static_groups: true (groups must stay contiguous)")


def gptq(W: torch.Tensor, H: torch.Tensor, fit, unit: int, block_size: int = 128,
         percdamp: float = 0.01, act_order: bool = False, static_groups: bool = True,
         importance: torch.Tensor | None = None, diag_mix: float = 0.0) -> tuple[torch.Tensor, QParams]:
    """Quantize ``W [out, in]`` given the input Hessian ``H [in, in]``.

    ``fit(w [out, k], importance) -> QParams`` fits a grid on ``k`` columns (a multiple of
    ``unit``). ``diag_mix`` λ: use ``(1 - λ) H + λ diag(H)`` (λ = 1: no error propagation
    between columns beyond the diagonal, i.e. importance-weighted rounding).
    Returns (codes [out, in] int32, QParams of the whole weight).
    """
    W = W.detach().clone().float()
    out, n = W.shape
    # One owned copy of H (the caller's is shared by the modules of a group and stays
    # untouched): damping and dead columns are decided on the diagonal alone, the copy is
    # taken already permuted, and λ is applied to it in place — at n = 14,336 each n x n
    # float32 copy is 0.8 GB.
    d, dead = damped_diagonal(H, percdamp)
    W[:, dead] = 0  # inputs that are always zero: their weights never matter
    if static_groups:
        qp = fit(W, importance)
        parts = None
    else:
        qp, parts = None, []
    perm = torch.argsort(d, descending=True) if act_order else torch.arange(n)
    W = W[:, perm]
    H = H[perm[:, None], perm[None, :]].float() if act_order else H.float().clone()
    if diag_mix:
        H.mul_(1.0 - diag_mix)  # (1 - λ) H + λ diag(H): off-diagonal entries shrink
    torch.diagonal(H).copy_(d[perm])  # the damped diagonal (unchanged by λ)
    del d
    Hinv = inverse_cholesky_upper(H, consume=True)  # U with H^-1 = U^T U; row i holds column i's updates
    del H
    codes_t = torch.zeros(n, out, dtype=torch.int32)  # [in, out]: one contiguous row per column
    order = perm.tolist()  # python ints: the loop below runs once per column
    # Lazy fits need whole units inside one block of columns.
    bs = block_size if static_groups else unit * max(1, -(-block_size // unit))
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        # The block transposed ([columns, out]) so each column is a contiguous row.
        W1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.empty_like(W1)
        # Why one thread: the column loop is thousands of small vector ops, where thread
        # hand-offs cost more than the arithmetic (4-6x slower on 2 busy cores); the lazy
        # update below is one large matmul and gets every thread back.
        with one_thread():
            for i in range(i2 - i1):
                j = order[i1 + i]  # original column index (grid parameters are per original column)
                if not static_groups and j % unit == 0:
                    parts.append(fit(W1[i:i + unit].T, None if importance is None else importance[j:j + unit]))
                    qp = concat_columns(parts)
                w = W1[i]
                q, v = qp.quantize_column(w, j)
                codes_t[j] = q
                err = Err1[i]
                torch.sub(w, v, out=err).div_(Hinv[i1 + i, i1 + i])
                # Spread this column's error over the rest of the block (the OBS update).
                W1[i:].sub_(Hinv[i1 + i, i1 + i:i2][:, None] * err[None, :])
        # Lazy batch update of all later columns at once.
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    return codes_t.T.contiguous(), qp


@register(GPTQConfig)
def apply_gptq(module: torch.nn.Linear, cfg: GPTQConfig, name: str = "", stats=None) -> QuantizedLinear:
    """Replace ``module`` by its GPTQ quantization; ``stats`` is its input's HessianAccumulator."""
    if stats is None:
        raise ValueError(f"{name}: GPTQ needs calibration statistics (run it through the sequential runner)")
    check_weight(module.weight, name)
    # GGUF grids: fit scales by the importance-weighted search (weighted by the layer's mean
    # x^2, like llama.cpp's imatrix) unless told otherwise; RTN keeps llama.cpp's plain fit.
    grid = resolve_grid(replace(cfg, search=True) if cfg.search is None else cfg, module.in_features, name)
    static = cfg.act_order if cfg.static_groups is None else cfg.static_groups
    codes, qp = gptq(module.weight.detach(), stats.hessian(), grid.fit, grid.unit, cfg.block_size,
                     cfg.dampening, cfg.act_order, static, importance=stats.mean_sq(),
                     diag_mix=cfg.diag_mix)
    q = QuantizedLinear(codes, qp, grid.label, grid.bits_per_weight, module.bias, module.weight.dtype)
    q.note = grid.note
    return q
