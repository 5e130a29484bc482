"""The importance-weighted scale searches against a naive per-block loop over the same
candidates, and against the plain absmax / min-max fits they must never lose to."""

import pytest
import torch

from compactor.primitives.scale_search import search_codebook, search_scale_min, search_symmetric


def _blocks(seed, n=40, b=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, b, generator=g) * torch.rand(n, 1, generator=g)
    x[0] = 0.0  # an all-zero block
    w = torch.rand(n, b, generator=g) + 0.1
    return x, w


def _err(x, w, v):
    return float((w * (x - v) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_symmetric_search_equals_a_naive_loop_and_beats_absmax(seed):
    x, w = _blocks(seed)
    nmin, nmax = -8, 7
    s = search_symmetric(x, w, nmin, nmax)
    for i in range(len(x)):
        xi, wi = x[i].double(), w[i].double()
        mx = float(xi[xi.abs().argmax()])
        if mx == 0:
            assert s[i] == 0
            continue
        best, best_e = None, float("inf")
        for k in range(-9, 10):  # the candidate set: the extreme mapped near nmin, then LS refit
            q = torch.round((nmin - 0.1 * k) / mx * xi).clamp(nmin, nmax)
            den = float((wi * q * q).sum())
            si = float((wi * xi * q).sum()) / den if den > 0 else 0.0
            e = _err(xi, wi, si * q)
            if e < best_e:
                best, best_e = si, e
        assert float(s[i]) == pytest.approx(best, rel=1e-4, abs=1e-7)
        # never worse than ggml's plain absmax scale (mx / nmin)
        plain = mx / nmin
        qp = torch.round(xi / plain).clamp(nmin, nmax)
        q_s = torch.round(xi / float(s[i])).clamp(nmin, nmax)
        assert _err(xi, wi, float(s[i]) * q_s) <= _err(xi, wi, plain * qp) * (1 + 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_scale_min_search_never_loses_to_min_max(seed):
    x, w = _blocks(seed)
    nmax = 15
    s, m = search_scale_min(x, w, nmax)
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    for i in range(1, len(x)):
        xi, wi = x[i], w[i]
        assert m[i] >= 0  # value = s*q - m with m >= 0
        q = torch.round((xi + m[i]) / s[i]).clamp(0, nmax) if s[i] != 0 else torch.zeros_like(xi)
        e = _err(xi, wi, s[i] * q - m[i])
        s0 = (hi[i] - lo[i]) / nmax
        q0 = torch.round((xi - lo[i]) / s0).clamp(0, nmax)
        assert e <= _err(xi, wi, s0 * q0 + lo[i]) * (1 + 1e-5)
    assert s[0] == 0  # a flat block


def test_codebook_search_beats_absmax_mapping():
    x, w = _blocks(5)
    levels = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.0])
    d = search_codebook(x, w, levels)
    for i in range(1, len(x)):
        xi, wi = x[i], w[i]
        near = lambda dd: levels[((xi / dd)[:, None] - levels).abs().argmin(-1)] * dd
        mx = float(xi[xi.abs().argmax()])
        assert _err(xi, wi, near(float(d[i]))) <= _err(xi, wi, near(mx / float(levels[0]))) * (1 + 1e-5)


def test_searches_by_chunks_of_blocks_equal_one_call(monkeypatch):
    import compactor.primitives.scale_search as ss

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1000, 32, generator=g), torch.rand(1000, 32, generator=g)
    lv = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])
    whole = (ss.search_symmetric(x, w, -8, 7), ss.search_scale_min(x, w, 15), ss.search_codebook(x, w, lv))
    monkeypatch.setattr(ss, "ROWS", 96)  # not a divisor of 1000: a short last chunk
    chunked = (ss.search_symmetric(x, w, -8, 7), ss.search_scale_min(x, w, 15), ss.search_codebook(x, w, lv))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[2], chunked[2])
    assert all(torch.equal(a, b) for a, b in zip(whole[1], chunked[1]))
