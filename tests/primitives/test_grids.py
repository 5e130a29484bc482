import pytest
import torch

from compactor.errors import CompactorError
from compactor.primitives.grids import (NF4_LEVELS, choose_qparams, fake_quantize,
                                        fp8_fake_quantize, nf4_qparams)


def _naive_int(w, bits, sym, group):
    """Element by element, straight from the compressed-tensors formulas."""
    out, n = w.shape
    g = n if group in (0, -1) else group
    res = torch.empty_like(w)
    for r in range(out):
        for b in range(n // g):
            blk = w if group == 0 else w[r:r + 1, b * g:(b + 1) * g]
            seg = w[r, b * g:(b + 1) * g]
            # float32 scalars throughout, as the grid computes.
            if sym:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                s = blk.abs().max() / ((qmax - qmin) / 2)
                for j, x in enumerate(seg):
                    q = torch.round(x / s).clamp(qmin, qmax) if s else 0
                    res[r, b * g + j] = q * s
            else:
                qmax = 2**bits - 1
                lo, hi = blk.min().clamp(max=0), blk.max().clamp(min=0)
                s = (hi - lo) / qmax
                z = torch.round(-lo / s).clamp(0, qmax) if s else 0
                for j, x in enumerate(seg):
                    q = (torch.round(x / s) + z).clamp(0, qmax) if s else z
                    res[r, b * g + j] = (q - z) * s
    return res


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [0, -1, 8])
def test_int_grid_matches_naive(bits, sym, group):
    torch.manual_seed(bits)
    w = torch.randn(3, 32)
    qp = choose_qparams(w, bits, sym, group)
    q = qp.quantize(w)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    assert torch.allclose(qp.dequantize(q), _naive_int(w, bits, sym, group), atol=1e-5)


def test_group_size_and_bits_checked():
    with pytest.raises(CompactorError, match="group size 48 does not divide the input width 64"):
        choose_qparams(torch.randn(2, 64), 4, True, 48)
    with pytest.raises(CompactorError, match="bits must be in 2..8"):
        choose_qparams(torch.randn(2, 64), 9, True, 32)


def test_error_shrinks_with_bits_and_groups():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.logspace(-1, 1, 256)  # uneven columns: groups help
    err = lambda qp: (qp.fake_quantize(w) - w).pow(2).mean().item()
    assert err(choose_qparams(w, 3, True, 32)) > err(choose_qparams(w, 4, True, 32)) > err(choose_qparams(w, 8, True, 32))
    assert err(choose_qparams(w, 4, True, -1)) > err(choose_qparams(w, 4, True, 32))


def test_fake_quantize_straight_through():
    w = torch.randn(4, 32, requires_grad=True)
    qp = choose_qparams(w.detach(), 4, True, 16)
    y = fake_quantize(w, qp)
    assert torch.equal(y.detach(), qp.fake_quantize(w.detach()))
    (y * torch.arange(32.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).expand(4, 32))


def test_nf4_nearest_level_and_double_quant():
    torch.manual_seed(1)
    w = torch.randn(8, 128)
    qp = nf4_qparams(w, 64)
    q = qp.quantize(w)
    s = w.reshape(8, 2, 64).abs().amax(-1).repeat_interleave(64, 1)
    naive = NF4_LEVELS[((w / s)[..., None] - NF4_LEVELS).abs().argmin(-1)] * s
    assert torch.allclose(qp.dequantize(q), naive)
    dq = nf4_qparams(w, 64, double_quant=True, dq_block=4)
    assert (dq.scale - qp.scale).abs().max() < 0.01 * qp.scale.max()
    assert dq.extra["scale_codes"].dtype == torch.int8


def test_fp8_matches_cast():
    torch.manual_seed(2)
    w = torch.randn(4, 64)
    got = fp8_fake_quantize(w, -1)
    s = w.abs().amax(1, keepdim=True) / 448.0
    assert torch.equal(got, (w / s).to(torch.float8_e4m3fn).float() * s)
    assert (got - w).abs().max() < 0.07 * w.abs().max()
