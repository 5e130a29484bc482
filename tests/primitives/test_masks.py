import pytest
import torch

from compactor.errors import CompactorError
from compactor.primitives.masks import global_threshold, keep_mask, nm_keep_mask, parse_pattern, topk_keep_mask


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_has_exactly_n_zeros_per_group(n, m):
    s = torch.randn(16, 64)
    keep = nm_keep_mask(s, n, m)
    assert ((~keep).reshape(16, -1, m).sum(-1) == n).all()
    # naive reference: the n smallest scores of each group are the removed ones
    g = s.reshape(16, -1, m)
    kth = g.sort(-1).values[..., n - 1:n]
    assert torch.equal(~keep.reshape(16, -1, m), g <= kth)


def test_row_and_layer_sparsity_exact_even_with_ties():
    s = torch.zeros(8, 40)  # all tied: the count must still be exact
    assert ((~topk_keep_mask(s, 0.3, "row")).sum(1) == 12).all()
    assert (~topk_keep_mask(s, 0.3, "layer")).sum() == 96
    r = torch.randn(8, 40)
    keep = topk_keep_mask(r, 0.5, "layer")
    assert r[~keep].max() <= r[keep].min()


def test_global_threshold_matches_naive_sort():
    a, b = torch.rand(10, 10), torch.rand(5, 20) * 2
    t = global_threshold([a, b], 0.25)
    flat = torch.cat([a.flatten(), b.flatten()]).sort().values
    assert t == pytest.approx(float(flat[49]))
    assert int((a <= t).sum() + (b <= t).sum()) == 50


@pytest.mark.parametrize("pattern,match", [("4:4", "N must be in 1..M-1"), ("5:4", "N must be"),
                                           ("2-4", "expected 'unstructured' or N:M")])
def test_bad_patterns(pattern, match):
    with pytest.raises(CompactorError, match=match):
        parse_pattern(pattern)


def test_group_must_divide_width_and_sparsity_range():
    with pytest.raises(CompactorError, match="group size 8 does not divide the width 20"):
        keep_mask(torch.randn(2, 20), 0.5, "4:8")
    with pytest.raises(CompactorError, match=r"must be in \[0, 1\), got 1.0"):
        topk_keep_mask(torch.randn(2, 20), 1.0)
