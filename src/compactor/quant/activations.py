"""Activation quantization for W8A8: int8 inputs to linear layers, either dynamic (one
absmax scale per token, computed at run time) or static (one scale per tensor, calibrated
as the maximum |x| seen on calibration data). Scales follow the symmetric weight grid and
compressed-tensors: ``s = absmax / ((2^b - 1) / 2)``, codes clamped to ``[-2^(b-1),
2^(b-1) - 1]``, so an exported checkpoint reproduces these values exactly. Simulated: inputs are quantized and
dequantized before the (possibly weight-quantized) linear runs, which is what an int8 GEMM
computes up to its accumulator precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from compactor.config import StepConfig, check
from compactor.registry import register


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Fake-quantize ``x [..., in]`` with one symmetric absmax scale per token."""
    qmax = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2)).clamp_min(1e-8)
    return torch.round(x / s).clamp(-qmax - 1, qmax) * s


def quantize_static(x: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Fake-quantize ``x`` with a fixed (calibrated) scale; values beyond the range clip."""
    qmax = 2 ** (bits - 1) - 1
    return torch.round(x / scale).clamp(-qmax - 1, qmax) * scale


class ActQuantLinear(nn.Module):
    """Wraps a linear (float or QuantizedLinear) and quantizes its input."""

    def __init__(self, inner: nn.Module, mode: str, bits: int = 8, scale: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.mode = mode
        self.bits = bits
        self.register_buffer("act_scale", scale if scale is not None else torch.tensor(0.0))
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x):
        xq = quantize_per_token(x, self.bits) if self.mode == "dynamic" else \
            quantize_static(x, self.act_scale.to(x.dtype), self.bits)
        return self.inner(xq)

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return self.inner.bias

    def extra_repr(self) -> str:
        return f"act=int{self.bits}_{self.mode}"


@dataclass(frozen=True)
class ActivationQuantConfig(StepConfig):
    """Quantize the inputs of matched linears to ``bits`` (int8) dynamically or statically."""

    name = "activations"
    mode: Literal["dynamic", "static"] = "dynamic"
    bits: int = 8
    targets: tuple[str, ...] = ("Linear", "QuantizedLinear")
    ignore: tuple[str, ...] = ("lm_head",)

    @property
    def needs_calibration(self) -> bool:
        return self.mode == "static"

    statistic = "inputs"
    sample_tokens = 16

    def validate(self) -> None:
        check(4 <= self.bits <= 8, f"activations.bits must be in 4..8, got {self.bits}")


@register(ActivationQuantConfig)
def apply_activation_quant(module: nn.Module, cfg: ActivationQuantConfig, name: str = "",
                           stats=None) -> nn.Module:
    if cfg.mode == "static":
        if stats is None:
            raise ValueError(f"{name}: static activation ranges need calibration statistics")
        scale = stats.abs_max.max() / ((2 ** cfg.bits - 1) / 2)
        return ActQuantLinear(module, "static", cfg.bits, scale.clamp_min(1e-8))
    return ActQuantLinear(module, "dynamic", cfg.bits)


def w8a8_(model, windows, mode: str = "dynamic", bits: int = 8) -> None:
    """int8 per-channel weights (RTN) + int8 input activations on every linear, in place;
    ``windows`` calibrate the static scales (unused when dynamic)."""
    from compactor.api import quantize_
    from compactor.calibration.sequential import run_sequential
    from compactor.quant.rtn import RTNConfig

    quantize_(model, RTNConfig(grid="int", bits=bits, group_size=-1))
    act = ActivationQuantConfig(mode=mode, bits=bits)
    if mode == "static":
        run_sequential(model, windows, apply_activation_quant, act, progress=False)
    else:
        quantize_(model, act)
