"""``QuantizedLinear``: a linear layer stored as integer codes + quantization parameters.

The codes are what exporters pack (no re-rounding); the forward pass uses the dequantized
weight (cached), so evaluation measures exactly the quantized model.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.primitives.qparams import QParams


class QuantizedLinear(nn.Module):
    """Codes ``[out, in]`` (int8) on grid ``label`` with their :class:`QParams`."""

    def __init__(self, codes: torch.Tensor, qp: QParams, label: str, bits_per_weight: float,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.label = label
        self.bits_per_weight = float(bits_per_weight)
        self.qparams = qp
        self.register_buffer("codes", codes.to(torch.int8), persistent=False)
        self.register_buffer("weight", qp.dequantize(codes).to(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def storage_nbytes(self) -> int:
        """Bytes the weight takes in its deployment format (+ bias in fp32)."""
        n = int(round(self.out_features * self.in_features * self.bits_per_weight / 8))
        return n + (0 if self.bias is None else self.bias.numel() * 4)

    def logical_numel(self) -> int:
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, grid={self.label}, bias={self.bias is not None}"

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.weight)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        return lin
