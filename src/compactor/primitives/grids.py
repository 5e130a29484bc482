"""Integer grids (2-8 bit, symmetric or asymmetric), NF4 and simulated FP8.

Granularity is one ``block_size`` notion: ``-1`` per output channel, ``0`` per tensor, ``g > 0``
groups of ``g`` contiguous input columns. Every function returns a :class:`QParams`, so
RTN, GPTQ and AWQ work on all of them.

Conventions follow compressed-tensors (so codes export without re-rounding):
symmetric ``q = clamp(round(x / s), -2^(b-1), 2^(b-1)-1)`` with ``s = absmax / ((2^b - 1) / 2)``;
asymmetric ``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``s = (max - min) / (2^b - 1)`` over a
range that includes 0, value ``(q - z) * s`` (an offset of ``z * s``).
"""

from __future__ import annotations

import torch

from compactor.errors import CompactorError
from compactor.primitives.qparams import QParams, blocks_view


def resolve_block(in_features: int, block_size: int, where: str = "") -> int:
    """The number of columns per block for a granularity (see module docstring)."""
    if block_size in (0, -1):
        return in_features
    if block_size < 0 or in_features % block_size:
        raise CompactorError(
            f"{where + ': ' if where else ''}group size {block_size} does not divide the "
            f"input width {in_features}"
        )
    return block_size


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise CompactorError(f"bits must be in 2..8, got {bits}")


def choose_qparams(w: torch.Tensor, bits: int = 4, symmetric: bool = True,
                   block_size: int = 128, weight: torch.Tensor | None = None) -> QParams:
    """Min/max (absmax) quantization parameters for ``w [out, in]``.

    ``weight`` is unused for plain min/max grids (kept so all fitters share a signature).
    """
    check_bits(bits)
    out, n = w.shape
    block = resolve_block(n, block_size)
    x = blocks_view(w.float(), block)
    if block_size == 0:  # per tensor: one set of parameters for every row
        x = x.reshape(1, 1, -1).expand(out, 1, -1) if out else x
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = x.abs().amax(-1)
        scale = amax / ((qmax - qmin) / 2)
        return QParams(scale, None, block, qmin, qmax)
    qmin, qmax = 0, 2**bits - 1
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    scale = (hi - lo) / (qmax - qmin)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / safe).clamp(qmin, qmax)
    return QParams(scale, zero * scale, block, qmin, qmax, extra={"zero_point": zero.to(torch.int32)})


def quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Codes of ``w`` on ``qp`` (int32, same shape)."""
    return qp.quantize(w)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float32 values of codes ``q``."""
    return qp.dequantize(q)


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, qp):  # noqa: D401
        return qp.fake_quantize(w).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # straight-through: d(fake_quant)/dw := 1


def fake_quantize(w: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (for QAT)."""
    return _STE.apply(w, qp)


# --- NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314) ---------------------------------

#: The 16 NormalFloat-4 levels (quantiles of N(0, 1) rescaled to [-1, 1], exact zero).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230850219727, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


def nf4_qparams(w: torch.Tensor, block_size: int = 64, double_quant: bool = False,
                dq_block: int = 256) -> QParams:
    """NF4: per-block absmax scale, 16 normal-float levels.

    With ``double_quant`` the fp32 block scales are themselves quantized (QLoRA): the mean
    is subtracted, then int8 absmax per ``dq_block`` scales, costing 8 + 32/dq_block bits
    per scale instead of 32.
    """
    block = resolve_block(w.shape[1], block_size)
    scale = blocks_view(w.float(), block).abs().amax(-1)  # [out, nb]
    extra = {}
    if double_quant:
        flat = scale.flatten()
        mean = flat.mean()
        c = flat - mean
        pad = (-len(c)) % dq_block
        cb = torch.cat([c, c.new_zeros(pad)]).reshape(-1, dq_block)
        s2 = cb.abs().amax(-1, keepdim=True) / 127
        s2 = torch.where(s2 == 0, torch.ones_like(s2), s2)
        q8 = torch.round(cb / s2).clamp(-127, 127)
        scale = ((q8 * s2).flatten()[: len(c)] + mean).reshape(scale.shape)
        extra = {"scale_codes": q8.to(torch.int8), "scale_scales": s2.squeeze(-1), "scale_mean": mean}
    return QParams(scale, None, block, 0, 15, codebook=NF4_LEVELS.clone(), extra=extra)


# --- FP8 e4m3 (simulated) ------------------------------------------------------------------

FP8_E4M3_MAX = 448.0


def fp8_fake_quantize(w: torch.Tensor, block_size: int = -1) -> torch.Tensor:
    """Round ``w`` to float8 e4m3 with an absmax scale per channel/group/tensor; returns
    float32 values (the simulated effect of storing FP8 weights)."""
    out, n = w.shape
    block = resolve_block(n, block_size)
    x = blocks_view(w.float(), block)
    amax = x.abs().amax(-1, keepdim=True) if block_size != 0 else x.abs().amax().expand(out, n // block, 1)
    s = (amax / FP8_E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    y = (x / s).to(torch.float8_e4m3fn).float() * s
    return y.reshape(out, n)
