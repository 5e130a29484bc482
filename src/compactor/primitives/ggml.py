"""The GGUF (ggml) block grids as first-class grids.

Each type turns a weight ``[out, in]`` into a :class:`QParams` whose effective scales and
offsets are exactly what the format stores (fp16 block scales; for K-quants an fp16
super-block scale times 6-/4-bit integer sub-block scales), so codes chosen by any algorithm
pack into ggml blocks with no re-rounding (see :mod:`compactor.primitives.packing`).
Facts: ../shared/design/FORMATS.md and ggml-common.h.

==========  =====  ============  =================================  ===========
type        block  scale groups  value                              codes
==========  =====  ============  =================================  ===========
q8_0        32     32            d * q                              -128..127
q5_0        32     32            d * q                              -16..15
q5_1        32     32            d * q + m                          0..31
q4_0        32     32            d * q                              -8..7
q4_1        32     32            d * q + m                          0..15
iq4_nl      32     32            d * kvalues[q]                     0..15 (index)
q6_k        256    16            d * sc * q      (sc int8)          -32..31
q5_k        256    32            d*sc * q - dmin*m (6-bit sc, m)    0..31
q4_k        256    32            d*sc * q - dmin*m (6-bit sc, m)    0..15
q3_k        256    16            d * (sc - 32) * q (6-bit sc)       -4..3
q2_k        256    16            d*sc * q - dmin*m (4-bit sc, m)    0..3
==========  =====  ============  =================================  ===========
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.errors import CompactorError
from compactor.primitives.qparams import QParams, blocks_view
from compactor.primitives.scale_search import (search_codebook, search_scale_min, search_symmetric,
                                                signed_extreme)

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """A ggml block type: storage geometry, code range and its fallback for narrow rows."""

    name: str
    type_id: int
    block_weights: int  # weights per stored block (32 or 256)
    block_bytes: int
    sub: int  # columns sharing one effective scale
    qmin: int
    qmax: int
    fallback: str | None = None  # llama.cpp's substitute when a row is not a multiple of 256

    @property
    def bpw(self) -> float:
        return self.block_bytes * 8 / self.block_weights

    @property
    def is_k(self) -> bool:
        return self.block_weights == QK_K


GGML_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("q8_0", 8, 32, 34, 32, -128, 127),
    GGMLType("q5_0", 6, 32, 22, 32, -16, 15),
    GGMLType("q5_1", 7, 32, 24, 32, 0, 31),
    GGMLType("q4_0", 2, 32, 18, 32, -8, 7),
    GGMLType("q4_1", 3, 32, 20, 32, 0, 15),
    GGMLType("iq4_nl", 20, 32, 18, 32, 0, 15),
    GGMLType("q6_k", 14, 256, 210, 16, -32, 31, fallback="q8_0"),
    GGMLType("q5_k", 13, 256, 176, 32, 0, 31, fallback="q5_1"),
    GGMLType("q4_k", 12, 256, 144, 32, 0, 15, fallback="q5_0"),
    GGMLType("q3_k", 11, 256, 110, 16, -4, 3, fallback="q4_0"),
    GGMLType("q2_k", 10, 256, 84, 16, 0, 3, fallback="q4_0"),
)}


def iq4nl_levels() -> torch.Tensor:
    """IQ4_NL's fixed 16-entry signed codebook, read from ggml's table in ``gguf.quants``."""
    from gguf.quants import IQ4_NL

    return torch.tensor(IQ4_NL.kvalues, dtype=torch.float32)


def ggml_type(name: str) -> GGMLType:
    try:
        return GGML_TYPES[name.lower()]
    except KeyError:
        raise CompactorError(f"unknown GGUF grid {name!r}; known: {', '.join(GGML_TYPES)}") from None


def resolve_type(name: str, in_features: int, where: str = "") -> tuple[GGMLType, str | None]:
    """The type actually usable for rows of ``in_features``: K-quants need a multiple of 256
    and fall back as llama.cpp does. Returns (type, reason or None) so callers report it."""
    t = ggml_type(name)
    if in_features % t.block_weights == 0:
        return t, None
    if t.fallback and in_features % GGML_TYPES[t.fallback].block_weights == 0:
        fb = GGML_TYPES[t.fallback]
        return fb, (f"{where + ': ' if where else ''}{t.name} needs rows that are a multiple of "
                    f"{t.block_weights} wide, got {in_features}: using {fb.name} "
                    "(llama.cpp's fallback)")
    raise CompactorError(f"{where + ': ' if where else ''}rows of {in_features} do not fit "
                         f"{t.name} blocks of {t.block_weights}")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back: the stored scale, exactly as llama.cpp reads it."""
    return x.clamp(-65504, 65504).half().float()


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-element weights for the scale searches, ``x [out, nb, B]``.

    Without an importance vector: ggml's default ``mean|x| + |x|``-style weighting
    (``sqrt(mean x^2) + |x|``); with one (per input column, e.g. mean x^2 of the layer's
    inputs or a Hessian diagonal): ``importance * sqrt(sigma2 + x^2)`` as llama.cpp does with
    an importance matrix.
    """
    if importance is None:
        return x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    imp = importance.float().reshape(1, x.shape[1], x.shape[2])
    sigma2 = 2 * x.pow(2).mean(dim=(-1, -2), keepdim=True)
    return imp * (sigma2 + x * x).sqrt()


def ggml_qparams(w: torch.Tensor, name: str, importance: torch.Tensor | None = None,
                 search: bool | None = None) -> QParams:
    """Quantization parameters of ``w [out, in]`` on ggml type ``name``.

    ``search``: run the importance-weighted scale search (default: on for K-quants and
    IQ4_NL as llama.cpp does; off for the legacy 32-blocks, which llama.cpp fits by plain
    min/max — our RTN baseline). ``importance [in]`` weights columns in the search.
    """
    t = ggml_type(name)
    out, n = w.shape
    if n % t.block_weights:
        raise CompactorError(f"width {n} is not a multiple of {t.name}'s block of {t.block_weights}")
    search = t.is_k or t.name == "iq4_nl" if search is None else search
    x = blocks_view(w.float(), t.sub)  # [out, nb, sub]
    wt = _weights(x, importance).reshape(-1, t.sub)
    xf = x.reshape(-1, t.sub)
    nb = n // t.sub
    if t.name in ("q8_0", "q4_0", "q5_0"):
        return _legacy_symmetric(t, xf, wt, out, nb, search)
    if t.name in ("q4_1", "q5_1"):
        return _legacy_min(t, xf, wt, out, nb, search)
    if t.name == "iq4_nl":
        lv = iq4nl_levels()
        if search:
            d = search_codebook(xf, wt, lv)
        else:  # the extreme value maps to the first (most negative) level
            d = signed_extreme(xf) / lv[0]
        d16 = _fp16(d).reshape(out, nb)
        return QParams(d16, None, t.sub, 0, 15, codebook=lv, extra={"d": d16.half()})
    if t.name in ("q4_k", "q5_k", "q2_k"):
        return _kquant_min(t, xf, wt, out, nb)
    return _kquant_symmetric(t, xf, wt, out, nb)


def _legacy_symmetric(t, xf, wt, out, nb, search):
    if t.name == "q8_0":
        d = xf.abs().amax(-1) / 127  # llama.cpp: absmax / 127
    else:
        # llama.cpp: the signed value of largest magnitude maps to the most negative code.
        d = signed_extreme(xf) / t.qmin
    if search:
        d = search_symmetric(xf, wt, t.qmin, t.qmax)
    d16 = _fp16(d).reshape(out, nb)
    return QParams(d16, None, t.sub, t.qmin, t.qmax, extra={"d": d16.half()})


def _legacy_min(t, xf, wt, out, nb, search):
    if search:
        s, m = search_scale_min(xf, wt, t.qmax)
        lo = -m
    else:
        lo, hi = xf.amin(-1), xf.amax(-1)
        s = (hi - lo) / t.qmax
    d16, m16 = _fp16(s).reshape(out, nb), _fp16(lo).reshape(out, nb)
    # value = d*q + m  ==  scale*q - offset with offset = -m
    return QParams(d16, -m16, t.sub, t.qmin, t.qmax, extra={"d": d16.half(), "m": m16.half()})


def _kquant_min(t, xf, wt, out, nb):
    """Q4_K / Q5_K / Q2_K: per-sub-block (scale, min) search, then the sub-block scales and
    mins are quantized to ``bits_sc``-bit integers against fp16 super-block scales."""
    bits_sc = 4 if t.name == "q2_k" else 6
    top = 2**bits_sc - 1
    s, m = search_scale_min(xf, wt, t.qmax)
    per_super = QK_K // t.sub
    s = s.clamp_min(0).reshape(out, -1, per_super)
    m = m.reshape(out, -1, per_super)
    d = _fp16(s.amax(-1) / top)  # [out, nsuper]
    dmin = _fp16(m.amax(-1) / top)
    sc = torch.round(s / torch.where(d == 0, torch.ones_like(d), d)[..., None]).clamp(0, top)
    mi = torch.round(m / torch.where(dmin == 0, torch.ones_like(dmin), dmin)[..., None]).clamp(0, top)
    # Effective parameters, computed as ggml does: float(d) * sc, float(dmin) * m.
    scale = (d[..., None] * sc).reshape(out, nb)
    offset = (dmin[..., None] * mi).reshape(out, nb)
    extra = {"d": d.half(), "dmin": dmin.half(), "sc": sc.to(torch.uint8), "m": mi.to(torch.uint8)}
    return QParams(scale, offset, t.sub, t.qmin, t.qmax, extra=extra)


def _kquant_symmetric(t, xf, wt, out, nb):
    """Q6_K (int8 sub-block scales) / Q3_K (6-bit signed sub-block scales)."""
    s = search_symmetric(xf, wt, t.qmin, t.qmax)
    per_super = QK_K // t.sub
    s = s.reshape(out, -1, per_super)
    # The sub-block scale of largest magnitude maps to the most negative integer scale.
    big = signed_extreme(s.reshape(-1, per_super)).reshape(out, -1)  # [out, nsuper]
    lo, hi = (-128, 127) if t.name == "q6_k" else (-32, 31)
    d = _fp16(big / lo)
    d = torch.where(big == 0, torch.zeros_like(d), d)
    sd = torch.where(d == 0, torch.ones_like(d), d)
    sc = torch.round(s / sd[..., None]).clamp(lo, hi)
    scale = (d[..., None] * sc).reshape(out, nb)
    extra = {"d": d.half(), "sc": sc.to(torch.int8)}
    return QParams(scale, None, t.sub, t.qmin, t.qmax, extra=extra)
