"""Importance-weighted scale searches for small blocks (vectorized over all blocks).

These are the searches llama.cpp's reference quantizer runs per block (``make_qx_quants``
for symmetric grids, ``make_qkx2_quants`` for scale+min grids), written as batched tensor
code: every function takes blocks ``x [N, B]`` with weights ``w [N, B]`` and returns one
scale (and min) per block.
"""

from __future__ import annotations

import functools

import torch

from compactor.primitives.qparams import nearest_code

#: blocks searched at a time: every block is independent, and a chunk whose temporaries fit
#: in cache (32k blocks of 32 weights: 4 MB each) runs faster than whole-matrix passes, with
#: memory bounded whatever the matrix (an 8B model's MLP weight has 1.8 M blocks)
ROWS = 32768


def _by_rows(fn):
    """Apply ``fn(x [N, B], w [N, B], ...)`` to :data:`ROWS` blocks at a time and concatenate
    its outputs (one tensor or a tuple): the same values as one call on everything."""

    @functools.wraps(fn)
    def run(x: torch.Tensor, w: torch.Tensor, *args, **kwargs):
        if x.shape[0] <= ROWS:
            return fn(x, w, *args, **kwargs)
        parts = [fn(x[i:i + ROWS], w[i:i + ROWS], *args, **kwargs) for i in range(0, x.shape[0], ROWS)]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(p) for p in zip(*parts))
        return torch.cat(parts)

    return run


def _ls_scale(x, w, q):
    """Weighted least-squares scale for fixed codes: argmin_s sum w (x - s q)^2."""
    num = (w * x * q).sum(-1)
    den = (w * q * q).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The signed value of largest magnitude of each block: ``[N, B] -> [N]``."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


@_by_rows
def search_symmetric(x: torch.Tensor, w: torch.Tensor, nmin: int, nmax: int,
                     steps: int = 9, delta: float = 0.1) -> torch.Tensor:
    """Best scale s for codes in [nmin, nmax] (value s*q), trying scales that map the signed
    extreme value of each block near ``nmin`` and refitting s by weighted least squares.

    ``x, w: [N, B] -> s: [N]`` (s is negative when the extreme value is positive: the extreme
    goes to the larger negative end of the code range, as in ggml).
    """
    mx = signed_extreme(x)  # [N]
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    best_s = torch.zeros_like(mx)
    best_err = torch.full_like(mx, float("inf"))
    for k in range(-steps, steps + 1):
        iscale = (nmin - delta * k) / safe  # maps mx to about nmin
        q = torch.round(iscale[:, None] * x).clamp(nmin, nmax)
        s = _ls_scale(x, w, q)
        err = (w * (x - s[:, None] * q) ** 2).sum(-1)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return torch.where(mx == 0, torch.zeros_like(best_s), best_s)


@_by_rows
def search_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20,
                     rmin: float = -1.0, rdelta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, m) for value ``scale*q - m`` with codes in [0, nmax] and m >= 0.

    Tries ``steps + 1`` scales around (max - min)/nmax; for each, fixes the codes and solves
    the 2x2 weighted least-squares problem for (scale, min), keeping min <= 0.
    ``x, w: [N, B] -> scale [N], m [N]``.
    """
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    rng = (hi - lo).clamp_min(1e-30)
    sw = w.sum(-1)
    sx = (w * x).sum(-1)
    best_s = rng / nmax
    best_min = lo
    q0 = torch.round((x - lo[:, None]) / best_s[:, None]).clamp(0, nmax)
    best_err = (w * (best_s[:, None] * q0 + lo[:, None] - x) ** 2).sum(-1)
    for k in range(steps + 1):
        iscale = (rmin + rdelta * k + nmax) / rng
        q = torch.round(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        sl = (w * q).sum(-1)
        sl2 = (w * q * q).sum(-1)
        sxl = (w * x * q).sum(-1)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det
        mn = (sl2 * sx - sl * sxl) / det
        # A positive min is not representable (m >= 0): refit the scale alone with min = 0.
        pos = mn > 0
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        mn = torch.where(pos, torch.zeros_like(mn), mn)
        err = (w * (s[:, None] * q + mn[:, None] - x) ** 2).sum(-1)
        better = ok & (err < best_err)
        best_s = torch.where(better, s, best_s)
        best_min = torch.where(better, mn, best_min)
        best_err = torch.where(better, err, best_err)
    flat = hi == lo
    best_s = torch.where(flat, torch.zeros_like(best_s), best_s)
    return best_s, -best_min


@_by_rows
def search_codebook(x: torch.Tensor, w: torch.Tensor, levels: torch.Tensor,
                    steps: int = 7) -> torch.Tensor:
    """Best scale d for value ``d * levels[q]`` (nearest level), as ggml's IQ4_NL search:
    candidate scales map the block's extreme near each end of the codebook, then d is refit
    by weighted least squares. ``x, w: [N, B] -> d [N]``."""
    mx = signed_extreme(x)
    safe = torch.where(mx == 0, torch.ones_like(mx), mx)
    lv = levels.float()
    best_d = torch.zeros_like(mx)
    best_err = torch.full_like(mx, float("inf"))
    for k in range(-steps, steps + 1):
        iscale = (lv[0] + k) / safe  # k steps away from mapping mx to the first level
        y = iscale[:, None] * x
        q = nearest_code(y, lv)
        L = lv[q]
        d = _ls_scale(x, w, L)
        err = (w * (x - d[:, None] * L) ** 2).sum(-1)
        better = err < best_err
        best_d = torch.where(better, d, best_d)
        best_err = torch.where(better, err, best_err)
    return torch.where(mx == 0, torch.zeros_like(best_d), best_d)
