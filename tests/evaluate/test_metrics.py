import math

import numpy as np
import pytest
import torch

from compactor.evaluate.metrics import StreamingStats, kl_per_token, nll_per_token


def test_worked_example_kl():
    # The seeds' worked example: KL(P || Q) for P = (0.7, 0.2, 0.1), Q = (0.5, 0.3, 0.2).
    p = torch.tensor([[0.7, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.3, 0.2]])
    by_hand = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2)
    assert by_hand == pytest.approx(0.0851, abs=1e-4)
    # Logits are log-probabilities up to a constant: shift them to check invariance too.
    got = kl_per_token(p.log() + 3.0, q.log() - 1.0)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # And the reverse direction differs (KL is not symmetric).
    rev = 0.5 * math.log(0.5 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.1)
    assert kl_per_token(q.log(), p.log()).item() == pytest.approx(rev, rel=1e-6)


def _naive(ref_logits, logits, targets):
    """float64, one position at a time, straight from the definitions."""
    kls, nlls, ref_nlls, agree = [], [], [], 0
    for t in range(logits.shape[0]):
        lp = ref_logits[t].double() - torch.logsumexp(ref_logits[t].double(), 0)
        lq = logits[t].double() - torch.logsumexp(logits[t].double(), 0)
        kls.append(float(sum(math.exp(a) * (a - b) for a, b in zip(lp.tolist(), lq.tolist()))))
        nlls.append(-float(lq[targets[t]]))
        ref_nlls.append(-float(lp[targets[t]]))
        agree += int(torch.argmax(lp) == torch.argmax(lq))
    return np.array(kls), np.array(nlls), np.array(ref_nlls), agree


def test_streaming_matches_naive_float64():
    g = torch.Generator().manual_seed(0)
    windows = [(torch.randn(20, 37, generator=g) * 3, torch.randn(20, 37, generator=g) * 3,
                torch.randint(0, 37, (20,), generator=g)) for _ in range(3)]
    masks = [torch.ones(20, dtype=torch.bool), torch.arange(20) >= 5, torch.arange(20) % 2 == 0]
    stats = StreamingStats()
    all_kl, all_nll, all_ref, agree = [], [], [], 0
    for (ref, cand, tgt), m in zip(windows, masks):
        stats.update(cand, tgt, m, ref)
        k, n, r, a = _naive(ref[m], cand[m], tgt[m])
        all_kl += list(k); all_nll += list(n); all_ref += list(r); agree += a
    s = stats.summary()
    assert s["tokens"] == len(all_kl)
    assert s["kld_mean"] == pytest.approx(np.mean(all_kl), rel=1e-5)
    assert s["kld_p99"] == pytest.approx(np.percentile(all_kl, 99), rel=1e-5)
    assert s["ppl"] == pytest.approx(math.exp(np.mean(all_nll)), rel=1e-5)
    assert s["ref_ppl"] == pytest.approx(math.exp(np.mean(all_ref)), rel=1e-5)
    assert s["top1"] == agree / len(all_kl)


def test_identical_logits_give_zero_kl_and_full_agreement():
    x = torch.randn(16, 50)
    stats = StreamingStats()
    stats.update(x, torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.bool), x.clone())
    s = stats.summary()
    assert s["kld_mean"] == 0.0 and s["top1"] == 1.0 and s["ppl"] == pytest.approx(s["ref_ppl"])


def test_nll_matches_cross_entropy():
    x, y = torch.randn(30, 11), torch.randint(0, 11, (30,))
    ce = torch.nn.functional.cross_entropy(x, y, reduction="none")
    assert torch.allclose(nll_per_token(x, y, chunk=7), ce, atol=1e-6)


def test_empty_stats_refuse_summary():
    with pytest.raises(ValueError):
        StreamingStats().summary()
