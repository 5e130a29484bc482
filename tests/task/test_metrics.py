"""Classification metrics against a naive per-example reference."""

import pytest
import torch

from compactor.task.metrics import accuracy, confusion, macro_f1, scores


def _naive_f1(pred, gold, n):
    out = []
    for c in range(n):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        out.append(0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(out) / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    gold = torch.randint(0, 4, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.6, gold, torch.randint(0, 4, (200,), generator=g))
    c = confusion(pred, gold, 4)
    for i in range(4):
        for j in range(4):
            assert c[i, j] == int(((gold == i) & (pred == j)).sum())
    assert accuracy(pred, gold) == pytest.approx(sum(int(p == q) for p, q in zip(pred, gold)) / 200)
    assert macro_f1(pred, gold, 4) == pytest.approx(_naive_f1(pred.tolist(), gold.tolist(), 4))


def test_a_label_never_seen_scores_zero_and_scores_are_plain_json():
    gold, pred = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    s = scores(pred, gold, ("a", "b", "c"))
    assert s["f1"]["c"] == 0.0 and s["f1"]["a"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3) and s["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
