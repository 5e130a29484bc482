"""Property tests of the distillation losses against naive references."""

import math

import pytest
import torch

from compactor.distill import losses as L


def _naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_worked_example_p_vs_q():
    # The classic worked example: P = Binomial(2, 0.4) = (9/25, 12/25, 4/25), Q uniform.
    # KL(P||Q) = 0.0852996 nats and KL(Q||P) = 0.0974552 nats.
    p = torch.tensor([9 / 25, 12 / 25, 4 / 25])
    q = torch.full((3,), 1 / 3)
    t, s = p.log(), q.log()  # log-probs are valid logits
    assert float(L.forward_kl(s, t)) == pytest.approx(0.0852996, abs=1e-6)
    assert float(L.reverse_kl(s, t)) == pytest.approx(0.0974552, abs=1e-6)
    assert float(L.forward_kl(s, t)) == pytest.approx(_naive_kl(p.tolist(), q.tolist()), abs=1e-6)
    assert float(L.total_variation(s, t)) == pytest.approx(0.5 * float((p - q).abs().sum()), abs=1e-6)


@pytest.mark.parametrize("fn", [L.forward_kl, L.reverse_kl, L.total_variation,
                                lambda s, t: L.generalized_jsd(s, t, 0.3)])
def test_zero_on_identical_inputs_positive_otherwise(fn):
    a, b = _rand(2, 5, 11, seed=1), _rand(2, 5, 11, seed=2)
    assert torch.allclose(fn(a, a), torch.zeros(2, 5), atol=1e-6)
    assert bool((fn(a, b) > 0).all())


def test_kl_matches_naive_reference_per_token():
    s, t = _rand(4, 7, seed=3), _rand(4, 7, seed=4)
    got = L.forward_kl(s, t)
    for i in range(4):
        p, q = torch.softmax(t[i], -1).tolist(), torch.softmax(s[i], -1).tolist()
        assert float(got[i]) == pytest.approx(_naive_kl(p, q), rel=1e-5)
        assert float(L.reverse_kl(s, t)[i]) == pytest.approx(_naive_kl(q, p), rel=1e-5)


def test_gjsd_endpoints_and_limits_are_the_two_kls():
    s, t = _rand(3, 9, seed=5), _rand(3, 9, seed=6)
    assert torch.equal(L.generalized_jsd(s, t, 0.0), L.forward_kl(s, t))
    assert torch.equal(L.generalized_jsd(s, t, 1.0), L.reverse_kl(s, t))
    # The normalized limits: JSD_β/β -> KL(P||Q) as β -> 0, JSD_β/(1-β) -> KL(Q||P) as β -> 1.
    eps = 1e-6
    s64, t64 = s.double(), t.double()
    assert torch.allclose(L.generalized_jsd(s64, t64, eps) / eps, L.forward_kl(s64, t64), rtol=1e-2)
    assert torch.allclose(L.generalized_jsd(s64, t64, 1 - eps) / eps, L.reverse_kl(s64, t64), rtol=1e-2)
    # β = ½ is the ordinary Jensen-Shannon divergence, bounded by ln 2.
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(L.generalized_jsd(s, t, 0.5), jsd, atol=1e-6)
    assert bool((jsd <= math.log(2)).all())
    with pytest.raises(ValueError, match="beta"):
        L.generalized_jsd(s, t, 1.5)


def test_temperature_flattens_and_t2_scaling():
    s, t = _rand(6, 13, seed=7), _rand(6, 13, seed=8)
    kl1, kl4 = L.forward_kl(s, t, 1.0), L.forward_kl(s, t, 4.0)
    assert float(kl4.mean()) < float(kl1.mean())  # softer targets are closer
    # Large T: KL_T ≈ Σ_v (z_t − z_s − mean)² / (2 V T²), so T²·KL_T tends to a constant.
    big = [float((L.forward_kl(s, t, T) * T * T).mean()) for T in (50.0, 100.0)]
    assert big[0] == pytest.approx(big[1], rel=1e-2)
    d = (t - s) - (t - s).mean(-1, keepdim=True)
    assert big[1] == pytest.approx(float((d.pow(2).mean(-1) / 2).mean()), rel=2e-2)


def test_topk_kl_lower_bound_exact_at_full_k():
    s, t = _rand(2, 3, 20, seed=9), _rand(2, 3, 20, seed=10)
    lp = torch.log_softmax(t, -1)
    full = L.forward_kl(s, t)
    v, i = lp.topk(20, -1)
    assert torch.allclose(L.topk_forward_kl(s, i, v), full, atol=1e-5)
    prev = torch.zeros_like(full)
    for k in (1, 4, 10, 19):
        v, i = lp.topk(k, -1)
        cur = L.topk_forward_kl(s, i, v)
        assert bool((cur <= full + 1e-5).all()) and bool((cur >= prev - 1e-5).all())
        prev = cur


def test_hidden_losses_and_projection():
    h = _rand(2, 5, 8, seed=11)
    assert torch.allclose(L.hidden_mse(h, h), torch.zeros(2, 5))
    assert torch.allclose(L.hidden_cosine(h, 3 * h), torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(L.hidden_cosine(h, -h), torch.full((2, 5), 2.0), atol=1e-6)
    proj = torch.nn.Linear(8, 12, bias=False)
    t = proj(h).detach()
    assert torch.allclose(L.hidden_mse(h, t, proj), torch.zeros(2, 5), atol=1e-10)
    rel = L.hidden_mse(h, t + 1, proj).detach()
    assert torch.allclose(rel, 12 / (t + 1).pow(2).sum(-1), rtol=1e-4)  # ‖1‖² / ‖t+1‖²
    assert torch.allclose(L.hidden_mse(h, 100 * h), L.hidden_mse(0.01 * h, h), rtol=1e-5)  # scale-free


def test_attention_kl_head_average_and_causal_zeros():
    def causal(seed, h):
        a = _rand(1, h, 6, 6, seed=seed).masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        return torch.softmax(a, -1)

    a4, b2 = causal(12, 4), causal(13, 2)
    assert torch.allclose(L.attention_kl(a4, a4), torch.zeros(1, 6), atol=1e-6)
    out = L.attention_kl(b2, a4)  # 2 student heads vs 4 teacher heads
    assert out.shape == (1, 6) and float(out[0, 0]) == pytest.approx(0.0, abs=1e-6)  # 1 key: identical
    p, q = a4.mean(1)[0, 3, :4], b2.mean(1)[0, 3, :4]
    assert float(out[0, 3]) == pytest.approx(_naive_kl(p.tolist(), q.tolist()), rel=1e-4)


def test_kd_loss_is_the_seeds_formula_and_accumulation_correct():
    s, t = _rand(2, 6, 10, seed=14), _rand(2, 6, 10, seed=15)
    y = torch.randint(0, 10, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    a, T = 0.3, 2.0
    per = a * T * T * L.forward_kl(s, t, T) + (1 - a) * L.cross_entropy(s, y)
    assert float(L.kd_loss(s, t, y, mask, a, T)) == pytest.approx(float(per[mask].mean()), rel=1e-6)
    # Sums over micro-batches divided by the total real-token count = the big-batch mean.
    parts = [L.masked_sum(per[i:i + 1], mask[i:i + 1]) for i in range(2)]
    assert float(sum(parts) / mask.sum()) == pytest.approx(float(per[mask].mean()), rel=1e-6)
    assert float(L.kd_loss(s, t, y, None, 1.0, 1.0)) == pytest.approx(float(L.forward_kl(s, t).mean()), rel=1e-6)
