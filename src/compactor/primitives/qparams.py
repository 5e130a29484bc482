"""One representation for every weight grid: per-block affine or codebook quantization.

A weight row of ``in`` columns is cut into contiguous blocks of ``block`` columns; each
(row, block) has a ``scale`` and an ``offset``, and a code ``q`` stands for::

    value = scale * level(q) - offset      level(q) = q              (linear grids)
                                           level(q) = codebook[q]    (NF4, IQ4_NL)

Per-tensor, per-channel and per-group grids are the cases ``block == in`` (with one row of
parameters broadcast), ``block == in`` and ``block == group``; the GGUF block formats are
``block`` 16 or 32 with scales restricted to what the format can store. Algorithms (RTN,
GPTQ, AWQ) only ever call :meth:`QParams.quantize` / :meth:`QParams.dequantize`, so each
works on every grid, and exporters pack the codes exactly as chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def nearest_code(y: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook entry nearest to each element of ``y``. For an ascending
    codebook (IQ4_NL's, NF4's) a binary search between midpoints — no ``[..., levels]``
    temporary, about 4x faster than ``(y[..., None] - codebook).abs().argmin(-1)`` — where
    ``y`` on a midpoint takes the lower code. It can differ from that argmin only where the
    two distances are equal up to float rounding (an ulp from a midpoint). Every quantizer
    and the fake quantization use this one function, so they agree exactly."""
    cb = codebook.to(y.dtype)
    if cb.numel() > 1 and bool((cb[1:] > cb[:-1]).all()):
        return torch.bucketize(y.contiguous(), ((cb[1:] + cb[:-1]) / 2).contiguous())
    return (y[..., None] - cb).abs().argmin(-1)


@dataclass
class QParams:
    """Fixed quantization parameters for a 2-D weight ``[out, in]``.

    scale, offset: ``[out, in // block]`` float32 (offset may be None = 0).
    qmin, qmax: code range (inclusive). codebook: ``[K]`` levels or None (linear).
    extra: format-specific integers an exporter needs (e.g. fp16 super-block scales and
    6-bit sub-block scales of a K-quant), never needed to dequantize.
    """

    scale: torch.Tensor
    offset: torch.Tensor | None
    block: int
    qmin: int
    qmax: int
    codebook: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.scale.shape[0], self.scale.shape[1] * self.block

    def _expand(self, t: torch.Tensor | None, cols: slice) -> torch.Tensor | None:
        if t is None:
            return None
        # [out, nb] -> [out, in], then the requested columns.
        return t.repeat_interleave(self.block, dim=1)[:, cols]

    def quantize(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Nearest codes for ``w [out, c]`` occupying columns ``cols`` of the weight."""
        cols = cols if cols is not None else slice(0, self.shape[1])
        s = self._expand(self.scale, cols)
        x = w.float()
        if self.offset is not None:
            x = x + self._expand(self.offset, cols)
        # Dead blocks (scale 0) quantize to the code closest to value 0.
        safe = torch.where(s == 0, torch.ones_like(s), s)
        y = x / safe
        if self.codebook is None:
            q = torch.round(y).clamp(self.qmin, self.qmax)
        else:
            q = nearest_code(y, self.codebook)
        return q.to(torch.int32)

    def dequantize(self, q: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Values of codes ``q [out, c]`` at columns ``cols`` (float32)."""
        cols = cols if cols is not None else slice(0, self.shape[1])
        s = self._expand(self.scale, cols)
        level = q.float() if self.codebook is None else self.codebook[q.long()]
        v = s * level
        if self.offset is not None:
            v = v - self._expand(self.offset, cols)
        return v

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale [out], offset [out] or None) of input column ``j``."""
        b = j // self.block
        return self.scale[:, b], None if self.offset is None else self.offset[:, b]

    def quantize_column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [out], values [out]) of column ``j`` holding ``w [out]``; the fast path
        GPTQ uses one column at a time."""
        cols = self.__dict__.get("_columns")
        if cols is None:  # per-block (safe scale, scale, offset), contiguous by block, built once
            safe = torch.where(self.scale == 0, torch.ones_like(self.scale), self.scale)
            cols = (safe.T.contiguous(), self.scale.T.contiguous(),
                    None if self.offset is None else self.offset.T.contiguous())
            self.__dict__["_columns"] = cols
        b = j // self.block
        safe, s, off = cols[0][b], cols[1][b], None if cols[2] is None else cols[2][b]
        x = w.float() if off is None else w.float() + off
        y = x / safe
        if self.codebook is None:
            q = torch.round(y).clamp(self.qmin, self.qmax)
            level = q
        else:
            q = nearest_code(y, self.codebook)
            level = self.codebook[q]
        v = s * level
        if off is not None:
            v = v - off
        return q.to(torch.int32), v

    def rows(self, start: int, stop: int) -> "QParams":
        """The parameters of rows ``start:stop`` (every per-row tensor sliced, the rest shared):
        rows are quantized independently on every grid, so a large weight can be packed a
        few rows at a time."""
        def cut(t):
            return t[start:stop] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == self.shape[0] else t

        return QParams(cut(self.scale), None if self.offset is None else cut(self.offset), self.block,
                       self.qmin, self.qmax, self.codebook, {k: cut(v) for k, v in self.extra.items()})

    def fake_quantize(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """quantize -> dequantize (no gradient)."""
        return self.dequantize(self.quantize(w, cols), cols)


def blocks_view(w: torch.Tensor, block: int) -> torch.Tensor:
    """``[out, in] -> [out, in // block, block]`` (checks divisibility)."""
    out, n = w.shape
    if n % block:
        raise ValueError(f"width {n} is not a multiple of the block size {block}")
    return w.reshape(out, n // block, block)


def fit_scale_offset(w: torch.Tensor, block: int, fn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``fn(blocks [out, nb, block]) -> (scale [out, nb], offset [out, nb] | None)``."""
    return fn(blocks_view(w.float(), block))


def concat_columns(parts: list[QParams]) -> QParams:
    """Join QParams fitted on consecutive column ranges of one weight into one."""
    first = parts[0]
    if len(parts) == 1:
        return first
    cat = lambda ts: None if ts[0] is None else torch.cat(ts, dim=1)
    extra = {k: torch.cat([p.extra[k] for p in parts], dim=1) for k in first.extra
             if isinstance(first.extra[k], torch.Tensor) and first.extra[k].dim() >= 2}
    return QParams(cat([p.scale for p in parts]), cat([p.offset for p in parts]), first.block,
                   first.qmin, first.qmax, first.codebook, extra)
