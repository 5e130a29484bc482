"""Round-to-nearest: fit the grid's parameters, round every weight. The baseline every
calibrated method must beat; on GGUF legacy grids it is llama.cpp's own rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.quant.qlinear import QuantizedEmbedding, QuantizedLinear
from compactor.quant.spec import WeightQuantConfig, check_weight, resolve_grid
from compactor.registry import register


@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest weight quantization (data-free)."""

    name = "rtn"
    needs_calibration = False


def rtn(w: torch.Tensor, fit, importance: torch.Tensor | None = None):
    """``w [out, in]`` -> (codes [out, in], QParams): nearest codes on the fitted grid."""
    qp = fit(w, importance)
    return qp.quantize(w), qp


@register(RTNConfig)
def apply_rtn(module: torch.nn.Linear, cfg: RTNConfig, name: str = "", stats=None) -> QuantizedLinear:
    """Replace ``module`` by its round-to-nearest quantization. ``stats`` (if a calibration
    pass observed one) supplies per-column importance for the ggml scale search."""
    check_weight(module.weight, name)
    grid = resolve_grid(cfg, module.in_features, name)
    importance = stats.mean_sq() if stats is not None else None
    codes, qp = rtn(module.weight.detach(), grid.fit, importance)
    q = QuantizedLinear(codes, qp, grid.label, grid.bits_per_weight, module.bias, module.weight.dtype)
    q.note = grid.note
    return q


def rtn_embedding(weight: torch.Tensor, cfg: WeightQuantConfig, name: str = "") -> QuantizedEmbedding:
    """Round a token-embedding table ``[vocab, hidden]`` to ``cfg``'s grid (blocks along the
    hidden dimension, as GGUF stores ``token_embd``)."""
    check_weight(weight, name)
    grid = resolve_grid(cfg, weight.shape[1], name)
    codes, qp = rtn(weight.detach().float(), grid.fit)
    q = QuantizedEmbedding(codes, qp, grid.label, grid.bits_per_weight, weight.dtype)
    q.note = grid.note
    return q
