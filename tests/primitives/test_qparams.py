"""QParams against naive per-element references."""

import pytest
import torch

from compactor.primitives.qparams import QParams, concat_columns


def _qp(seed, offset=True, codebook=False):
    g = torch.Generator().manual_seed(seed)
    out, nb, block = 5, 3, 4
    scale = torch.rand(out, nb, generator=g) * 0.2 + 0.01
    scale[0, 1] = 0.0  # a dead block
    off = torch.rand(out, nb, generator=g) * 0.5 if offset else None
    cb = torch.tensor([-1.0, -0.3, 0.0, 0.4, 1.0]) * 7 if codebook else None
    return QParams(scale, off, block, -8 if not offset else 0, 7 if not offset else 15, cb)


def _naive_quantize(qp, w):
    out, n = w.shape
    q = torch.zeros(out, n, dtype=torch.int32)
    for r in range(out):
        for c in range(n):
            s = float(qp.scale[r, c // qp.block])
            x = float(w[r, c]) + (0.0 if qp.offset is None else float(qp.offset[r, c // qp.block]))
            y = x / (s if s != 0 else 1.0)
            if qp.codebook is None:
                q[r, c] = int(min(max(round(y), qp.qmin), qp.qmax))
            else:
                q[r, c] = int(min(range(len(qp.codebook)), key=lambda k: abs(y - float(qp.codebook[k]))))
    return q


@pytest.mark.parametrize("offset,codebook", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_dequantize_and_columns_equal_naive(seed, offset, codebook):
    qp = _qp(seed, offset, codebook)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(10 + seed)) * 0.5
    q = qp.quantize(w)
    assert torch.equal(q, _naive_quantize(qp, w))
    v = qp.dequantize(q)
    for r in range(5):
        for c in range(12):
            s = float(qp.scale[r, c // 4])
            lvl = float(q[r, c]) if codebook is False else float(qp.codebook[q[r, c]])
            expect = s * lvl - (0.0 if qp.offset is None else float(qp.offset[r, c // 4]))
            assert float(v[r, c]) == pytest.approx(expect, abs=1e-6)
    # GPTQ's one-column fast path is the same map.
    for j in range(12):
        qj, vj = qp.quantize_column(w[:, j], j)
        assert torch.equal(qj, q[:, j]) and torch.allclose(vj, v[:, j], atol=1e-6)
    # Column slices address the same blocks.
    assert torch.equal(qp.quantize(w[:, 4:8], slice(4, 8)), q[:, 4:8])


def test_concat_columns_is_the_fit_of_the_whole():
    a, b = _qp(0), _qp(1)
    both = concat_columns([a, b])
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(3))
    assert both.shape == (5, 24)
    assert torch.equal(both.quantize(w)[:, :12], a.quantize(w[:, :12]))
    assert torch.equal(both.quantize(w)[:, 12:], b.quantize(w[:, 12:]))


def test_nearest_code_equals_the_naive_argmin_up_to_rounded_ties():
    import torch

    from compactor.primitives.ggml import iq4nl_levels
    from compactor.primitives.qparams import nearest_code

    g = torch.Generator().manual_seed(0)
    for cb in (iq4nl_levels().float(), torch.linspace(-1, 1, 16), torch.tensor([3.0, -1.0, 0.5])):
        y = torch.randn(4000, generator=g) * float(cb.abs().max()) * 1.3
        s = cb.sort().values
        y[:len(s) - 1] = (s[1:] + s[:-1]) / 2  # exactly on the midpoints: the lower code wins
        naive = (y[..., None] - cb).abs().argmin(-1)
        got = nearest_code(y, cb)
        differ = got != naive
        # Only where both codes are equally near up to float rounding (a rounded midpoint).
        dist = (y[..., None] - cb).abs()
        gap = (dist.gather(-1, got[:, None]) - dist.gather(-1, naive[:, None])).abs().squeeze(-1)
        assert bool((gap[differ] <= 1e-6 * cb.abs().max()).all())
        assert int(differ.sum()) <= 3 and torch.equal(nearest_code(y.reshape(40, 100), cb), got.reshape(40, 100))
        assert torch.equal(cb[got[:len(s) - 1]], s[:-1]) or cb.numel() < 16  # midpoints: the lower code
