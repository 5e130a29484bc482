"""Byte layouts: ggml blocks (bit-exact, checked against ``gguf.quants.dequantize``).

``pack_ggml(codes, qp, type)`` writes codes chosen on a :func:`ggml_qparams` grid into the
format's blocks without re-rounding; ``unpack_codes`` reads codes back (for tests and for
verifying exports). Layouts from ggml-common.h; shapes in comments are per row-block.
"""

from __future__ import annotations

import numpy as np
import torch

from compactor.primitives.ggml import QK_K, GGMLType, ggml_type
from compactor.primitives.qparams import QParams


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int64).numpy().astype(np.uint8)


def _f16_bytes(t: torch.Tensor, nblocks: int) -> np.ndarray:
    return t.reshape(nblocks).numpy().astype(np.float16).view(np.uint8).reshape(nblocks, 2)


def _nibbles_32(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes: element j low nibble, j+16 high nibble."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _k_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and mins -> 12 bytes (get_scale_min_k4's inverse)."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _crumbs_128(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: [n, 256] 2-bit values -> [n, 64]: per 128-half, byte l holds elements
    l, l+32, l+64, l+96 at bit offsets 0, 2, 4, 6."""
    n = L.shape[0]
    h = L.reshape(n, 2, 4, 32) & 3
    b = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    return b.reshape(n, 64).astype(np.uint8)


#: Weights packed at once. Packing works in int64 with several numpy temporaries per code, so a
#: whole 49,152 x 4,096 embedding at once took ~4 GB above the float weight (measured on the
#: 8B-width synthetic model); rows are independent, so a few rows at a time give the same bytes.
CHUNK_WEIGHTS = 1 << 22


def row_chunks(rows: int, cols: int, chunk_weights: int = CHUNK_WEIGHTS) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``chunk_weights`` weights each (at least one row)."""
    step = max(1, chunk_weights // max(1, cols))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def packed_by_rows(rows: int, cols: int, part, chunk_weights: int = CHUNK_WEIGHTS) -> np.ndarray:
    """``part(a, b)`` (the packed ``uint8 [b - a, row_bytes]`` of rows ``a:b``) over row chunks
    of ``rows x cols``, filled into one ``uint8 [rows, row_bytes]``."""
    chunks = row_chunks(rows, cols, chunk_weights)
    if len(chunks) == 1:
        return part(0, rows)
    packed = None
    for a, b in chunks:
        piece = part(a, b)
        if packed is None:
            packed = np.empty((rows, piece.shape[1]), dtype=np.uint8)
        packed[a:b] = piece
    return packed


def pack_ggml(codes: torch.Tensor, qp: QParams, type_name: str,
              chunk_weights: int = CHUNK_WEIGHTS) -> np.ndarray:
    """Pack ``codes [out, in]`` on grid ``qp`` into ggml blocks: ``uint8 [out, row_bytes]``,
    a few rows at a time (see :data:`CHUNK_WEIGHTS`)."""
    return packed_by_rows(*codes.shape, lambda a, b: _pack_rows(codes[a:b], qp.rows(a, b), type_name),
                          chunk_weights)


def _pack_rows(codes: torch.Tensor, qp: QParams, type_name: str) -> np.ndarray:
    t: GGMLType = ggml_type(type_name)
    out, n = codes.shape
    nblk = out * (n // t.block_weights)
    q = codes.to(torch.int64).numpy().reshape(nblk, t.block_weights)
    e = qp.extra
    name = t.name
    if name in ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "iq4_nl"):
        d = _f16_bytes(e["d"], nblk)
        if name == "q8_0":
            body = [d, q.astype(np.int8).view(np.uint8)]
        elif name in ("q4_0", "iq4_nl", "q4_1"):
            u = q + (8 if name == "q4_0" else 0)
            body = [d] + ([_f16_bytes(e["m"], nblk)] if name == "q4_1" else []) + [_nibbles_32(u).astype(np.uint8)]
        else:  # q5_0 / q5_1: 5th bits in a little-endian uint32
            u = q + (16 if name == "q5_0" else 0)
            qh = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
            qh = qh.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(nblk, 4)
            body = [d] + ([_f16_bytes(e["m"], nblk)] if name == "q5_1" else []) + [qh, _nibbles_32(u).astype(np.uint8)]
        return np.concatenate(body, axis=1).reshape(out, -1)
    d = _f16_bytes(e["d"], nblk)
    if name in ("q4_k", "q5_k"):
        dmin = _f16_bytes(e["dmin"], nblk)
        scales = _k_scales_6bit(_u8(e["sc"]).reshape(nblk, 8), _u8(e["m"]).reshape(nblk, 8))
        u = q.reshape(nblk, 4, 2, 32)  # chunk c: sub-blocks 2c (low nibble), 2c+1 (high)
        qs = ((u[:, :, 0] & 0xF) | ((u[:, :, 1] & 0xF) << 4)).reshape(nblk, 128).astype(np.uint8)
        if name == "q4_k":
            return np.concatenate([d, dmin, scales, qs], axis=1).reshape(out, -1)
        hb = (u >> 4) & 1  # [nblk, 4, 2, 32]; chunk c uses bits 2c (low half), 2c+1 (high)
        shifts = (2 * np.arange(4)[None, :, None, None] + np.arange(2)[None, None, :, None])
        qh = (hb << shifts).sum(axis=(1, 2)).astype(np.uint8)  # [nblk, 32]
        return np.concatenate([d, dmin, scales, qh, qs], axis=1).reshape(out, -1)
    if name == "q6_k":
        L = (q + 32).reshape(nblk, 2, 4, 32)  # two halves of 128: four runs of 32
        ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                             (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        sc = e["sc"].reshape(nblk, 16).numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([ql.reshape(nblk, 128).astype(np.uint8), qh.reshape(nblk, 64).astype(np.uint8),
                               sc, d], axis=1).reshape(out, -1)
    if name == "q3_k":
        L = q + 4  # 0..7
        hmask = np.zeros((nblk, 32), dtype=np.uint8)
        hb = (L >> 2) & 1  # element j: byte j % 32, bit j // 32
        for bit in range(8):
            hmask |= (hb[:, bit * 32:(bit + 1) * 32] << bit).astype(np.uint8)
        qs = _crumbs_128(L & 3)
        Ls = (e["sc"].reshape(nblk, 16).numpy().astype(np.int64) + 32).astype(np.uint8)
        sc = np.zeros((nblk, 12), dtype=np.uint8)
        sc[:, :8] = (Ls[:, :8] & 0xF) | ((Ls[:, 8:] & 0xF) << 4)
        hi = Ls >> 4  # 2 bits each; byte 8 + j%4 at bit offset 2*(j//4)
        for j in range(16):
            sc[:, 8 + j % 4] |= (hi[:, j] << (2 * (j // 4))).astype(np.uint8)
        return np.concatenate([hmask, qs, sc, d], axis=1).reshape(out, -1)
    if name == "q2_k":
        dmin = _f16_bytes(e["dmin"], nblk)
        scales = (_u8(e["sc"]).reshape(nblk, 16) | (_u8(e["m"]).reshape(nblk, 16) << 4)).astype(np.uint8)
        return np.concatenate([scales, _crumbs_128(q), d, dmin], axis=1).reshape(out, -1)
    raise ValueError(f"no packer for {name}")


def ggml_row_bytes(type_name: str, in_features: int) -> int:
    t = ggml_type(type_name)
    return in_features // t.block_weights * t.block_bytes


def dequantize_ggml_bytes(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """Reference dequantization of packed bytes through ``gguf.quants`` (the reader llama.cpp
    users rely on)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType(ggml_type(type_name).type_id)
    return torch.from_numpy(np.ascontiguousarray(dequantize(data, qt))).reshape(shape)


__all__ = ["pack_ggml", "ggml_row_bytes", "dequantize_ggml_bytes", "QK_K"]
