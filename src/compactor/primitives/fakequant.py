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


def _levels(y: torch.Tensor, qmin: int, qmax: int, codebook: torch.Tensor | None):
    """(level, lo, hi): the grid level nearest to ``y`` and the grid's range."""
    if codebook is None:
        return torch.round(y).clamp(qmin, qmax), float(qmin), float(qmax)
    return codebook[nearest_code(y, codebook)], float(codebook.min()), float(codebook.max())


def _forward_parts(w, scale, offset, block, qmin, qmax, codebook):
    """Blocked views and the rounding, the same ops as :meth:`QParams.quantize` (broadcast
    over ``[out, nb, block]`` instead of an expanded ``[out, in]`` scale: same values)."""
    out, n = w.shape
    x = w.float().reshape(out, n // block, block)
    s = scale[..., None]
    off = None if offset is None else offset[..., None]
    if off is not None:
        x = x + off
    safe = torch.where(s == 0, torch.ones_like(s), s)  # dead blocks: code nearest 0
    y = x / safe
    level, lo, hi = _levels(y, qmin, qmax, codebook)
    return s, off, y, level, lo, hi


class _FakeQuant(torch.autograd.Function):
    """``v = s·level((w + o)/s) − o`` blockwise, one node instead of a dozen elementwise ones
    whose intermediates autograd would keep: the backward recomputes ``y = (w + o)/s`` from
    the saved leaves (no weight-sized tensor is stored beyond them), which is what made QAD's
    fake quantization cost about a third of the linear layers' own time."""

    @staticmethod
    def forward(ctx, w, scale, offset, block, qmin, qmax, codebook):  # noqa: D401
        s, off, _, level, _, _ = _forward_parts(w, scale, offset, block, qmin, qmax, codebook)
        v = s * level
        if off is not None:
            v = v - off
        ctx.save_for_backward(w, scale, offset, codebook)
        ctx.grid = (block, qmin, qmax)
        return v.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        w, scale, offset, codebook = ctx.saved_tensors
        block, qmin, qmax = ctx.grid
        s, _, y, level, lo, hi = _forward_parts(w, scale, offset, block, qmin, qmax, codebook)
        g = grad.reshape(y.shape)
        # pass: inside the grid's range (clipped STE) and not a dead block (v = 0·level there)
        passes = (y >= lo) & (y <= hi) & (s != 0)
        gw = gs = go = None
        if ctx.needs_input_grad[0]:
            gw = torch.where(passes, g, 0.0).reshape(w.shape).to(w.dtype)
        if ctx.needs_input_grad[1]:  # LSQ: ∂v/∂s = level − y inside, level outside
            gs = (g * torch.where(passes, level - y, level)).sum(-1)
        if offset is not None and ctx.needs_input_grad[2]:  # ∂v/∂o = 0 inside, −1 outside
            go = -torch.where(passes, 0.0, g).sum(-1)
        return gw, gs, go, None, None, None, None


def fake_quant_values(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, block: int,
                      qmin: int, qmax: int, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize(quantize(w))`` on the grid ``(scale, offset [out, in/block])``, differentiable
    in ``w`` (clipped straight-through), ``scale`` (LSQ) and ``offset``. Operation for operation
    the same as :meth:`QParams.fake_quantize`, so the values are identical (tested); the
    gradients equal autograd through :func:`round_to_level` (tested)."""
    return _FakeQuant.apply(w, scale, offset, block, qmin, qmax, codebook)


def fake_quant_reference(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, block: int,
                         qmin: int, qmax: int, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """The same values and gradients by plain autograd through :func:`round_to_level` on
    expanded ``[out, in]`` tensors: the naive reference :func:`fake_quant_values` is tested
    against."""
    s = scale.repeat_interleave(block, dim=1)  # [out, nb] -> [out, in]
    x = w.float()
    off = None if offset is None else offset.repeat_interleave(block, dim=1)
    if off is not None:
        x = x + off
    safe = torch.where(s == 0, torch.ones_like(s), s)
    v = s * round_to_level(x / safe, qmin, qmax, codebook)
    return v if off is None else v - off


def dequant_codes(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, block: int,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Values of fixed ``codes`` (frozen codes: gradients reach only the scale and offset);
    the same ops as :meth:`QParams.dequantize`."""
    out, n = codes.shape
    level = codes.float() if codebook is None else codebook[codes.long()]
    v = scale[..., None] * level.reshape(out, n // block, block)  # [out, nb, block]
    if offset is not None:
        v = v - offset[..., None]
    return v.reshape(out, n)


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
