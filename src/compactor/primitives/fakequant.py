"""Differentiable fake quantization whose forward is, bit for bit, the stored grid.

Quantization-aware training pays only in the grid that is deployed (../shared/design/QAT.md),
so the forward here repeats :meth:`QParams.quantize` / :meth:`QParams.dequantize` operation for
operation — the exported file's dequantized values equal the trained forward with max error 0.
Only the backward differs:

* ``round_to_level`` — straight-through estimator (Bengio et al. 2013, arXiv:1308.3432),
  clipped: the gradient is the identity where the scaled weight lies inside the grid's range
  and zero outside (codes that clamp do not move the loss).
* With the scale a leaf, autograd through ``v = s · level(w / s)`` gives LSQ's step-size
  gradient (Esser et al. 2020, arXiv:1902.08153): ``∂v/∂s = level − w/s`` inside the range and
  ``level`` (the clamped code) outside.
* ``round_fp16`` — GGUF stores block scales in fp16; the forward rounds to it, the backward
  passes through, so a learned scale is always one the file can hold.
"""

from __future__ import annotations

import torch

from compactor.primitives.grids import FP8_E4M3_MAX
from compactor.primitives.qparams import nearest_code


class _RoundToLevel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, qmin, qmax, codebook):  # noqa: D401
        if codebook is None:
            level = torch.round(y).clamp(qmin, qmax)  # the same ops as QParams.quantize
            lo, hi = float(qmin), float(qmax)
        else:
            level = codebook[nearest_code(y, codebook)]
            lo, hi = float(codebook.min()), float(codebook.max())
        ctx.save_for_backward((y >= lo) & (y <= hi))
        return level

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def round_to_level(y: torch.Tensor, qmin: int, qmax: int, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """The grid level nearest to ``y`` (scaled weights): ``clamp(round(y), qmin, qmax)`` on a
    linear grid, the nearest codebook entry otherwise; clipped straight-through backward."""
    return _RoundToLevel.apply(y, qmin, qmax, codebook)


class _RoundFP16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return x.clamp(-65504, 65504).half().float()  # as primitives.ggml._fp16

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the value a GGUF block scale holds); identity gradient."""
    return _RoundFP16.apply(x)


def fake_quant_values(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, block: int,
                      qmin: int, qmax: int, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` on the grid ``(scale, offset [out, in/block])``, differentiable
    in ``w``, ``scale`` and ``offset``. Operation for operation the same as
    :meth:`QParams.fake_quantize`, so the values are identical (tested)."""
    s = scale.repeat_interleave(block, dim=1)  # [out, nb] -> [out, in]
    x = w.float()
    off = None if offset is None else offset.repeat_interleave(block, dim=1)
    if off is not None:
        x = x + off
    safe = torch.where(s == 0, torch.ones_like(s), s)  # dead blocks: code nearest 0
    v = s * round_to_level(x / safe, qmin, qmax, codebook)
    return v if off is None else v - off


def dequant_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, block: int,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Values of fixed ``codes`` (frozen codes: gradients reach only the scale and offset);
    the same ops as :meth:`QParams.dequantize`."""
    s = scale.repeat_interleave(block, dim=1)
    level = codes.float() if codebook is None else codebook[codes.long()]
    v = s * level
    return v if offset is None else v - offset.repeat_interleave(block, dim=1)


class _FP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):  # noqa: D401
        y = x / s
        # inside: what rounds to a finite value (up to half a step, 16, above the max 448)
        ctx.save_for_backward(y.abs() <= FP8_E4M3_MAX + 16)
        return y.to(torch.float8_e4m3fn).float() * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def fp8_fake_quant(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 rounding of ``w [out, in]`` with a per-row ``scale [out, 1]`` (absmax / 448),
    straight-through inside the representable range."""
    return _FP8.apply(w.float(), scale)
