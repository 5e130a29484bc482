import itertools

import pytest
import torch

from compactor.errors import CompactorError
from compactor.quant.mixed import MixedPrecisionConfig, allocate_bits, plan_mixed_precision


def _brute(sizes, bits, errors, budget):
    best = None
    for combo in itertools.product(*[range(len(b)) for b in bits]):
        used = sum(s * bits[m][k] for m, (s, k) in enumerate(zip(sizes, combo)))
        if used <= budget * sum(sizes) + 1e-9:
            e = sum(errors[m][k] for m, k in enumerate(combo))
            if best is None or e < best[0]:
                best = (e, combo)
    return best


def test_allocation_meets_budget_and_is_near_optimal():
    g = torch.Generator().manual_seed(0)
    bits = [[3.4375, 4.5, 5.5, 8.5]] * 6
    sizes = [100, 300, 100, 200, 50, 400]
    # Convex-ish error curves with module-specific sensitivity.
    sens = torch.rand(6, generator=g) * 10
    errors = [[float(s * 2.0 ** (-b)) for b in bits[0]] for s in sens]
    for budget in (3.5, 4.0, 4.5, 5.0, 6.0, 8.5):
        choice = allocate_bits(sizes, bits, errors, budget)
        used = sum(s * bits[m][k] for m, (s, k) in enumerate(zip(sizes, choice))) / sum(sizes)
        assert used <= budget + 1e-12
        err = sum(errors[m][k] for m, k in enumerate(choice))
        assert err <= 1.1 * _brute(sizes, bits, errors, budget)[0] + 1e-12
        # No single affordable upgrade is left.
        for m in range(6):
            for k in range(4):
                extra = sizes[m] * (bits[m][k] - bits[m][choice[m]])
                if extra > 0 and errors[m][k] < errors[m][choice[m]]:
                    assert used * sum(sizes) + extra > budget * sum(sizes) + 1e-9


def test_budget_below_cheapest_refused():
    with pytest.raises(CompactorError, match="below the cheapest"):
        allocate_bits([10], [[4.5, 8.5]], [[1.0, 0.1]], 4.0)


def test_plan_spends_bits_where_the_hessian_says():
    g = torch.Generator().manual_seed(1)
    mods, hs = {}, {}
    for i, scale in enumerate((1.0, 100.0)):  # the second module's inputs are 10x larger
        lin = torch.nn.Linear(256, 64, bias=False)
        lin.weight.data = torch.randn(64, 256, generator=g) * 0.05
        X = torch.randn(512, 256, generator=g) * scale**0.5
        mods[f"m{i}"], hs[f"m{i}"] = lin, 2 * X.T @ X / 512
    plan, rep = plan_mixed_precision(mods, hs, MixedPrecisionConfig(candidates=("q4_0", "q8_0"), target_bpw=6.5,
                                                                      sensitivity="hessian", embeddings=False))
    assert plan == {"m0": "q4_0", "m1": "q8_0"} and rep["achieved_bpw"] == pytest.approx(6.5)


def _two_layers(g):
    """Two decoder linears with identical weights and inputs (equal Hessian proxies)."""
    W = torch.randn(64, 256, generator=g) * 0.05
    X = torch.randn(512, 256, generator=g)
    mods, hs = {}, {}
    for i in range(2):
        lin = torch.nn.Linear(256, 64, bias=False)
        lin.weight.data = W.clone()
        mods[f"model.layers.{i}.mlp.down_proj"], hs[f"model.layers.{i}.mlp.down_proj"] = lin, 2 * X.T @ X / 512
    return mods, hs


def test_measured_kl_overrides_the_proxy():
    """Equal proxies, but layer 1 matters 10x more to the logits: it gets the bits."""
    mods, hs = _two_layers(torch.Generator().manual_seed(2))
    calls = []

    def measure(weights):
        calls.append(sorted(weights))
        (name,) = weights
        err = float((weights[name] - mods[name].weight.detach()).pow(2).sum())
        return err * (10.0 if ".1." in name else 1.0)

    cfg = MixedPrecisionConfig(candidates=("q4_0", "q8_0"), target_bpw=6.5, embeddings=False)
    plan, rep = plan_mixed_precision(mods, hs, cfg, measure=measure)
    assert plan == {"model.layers.0.mlp.down_proj": "q4_0", "model.layers.1.mlp.down_proj": "q8_0"}
    assert len(calls) == 2 and rep["probe"] == "q4_0"  # one probe per layer, at the cheapest grid
    assert rep["measured_kl"]["model.layers.1"] == pytest.approx(10 * rep["measured_kl"]["model.layers.0"])


def test_kl_split_within_a_layer_follows_the_proxy():
    from compactor.quant.mixed import sensitivity
    from compactor.quant.spec import WeightQuantConfig, resolve_grid

    mods, hs = _two_layers(torch.Generator().manual_seed(3))
    a, b = list(mods)
    hs[b] = hs[b] * 3  # same layer (renamed below), 3x the proxy
    mods = {"model.layers.0.mlp.up_proj": mods[a], "model.layers.0.mlp.down_proj": mods[b]}
    hs = {"model.layers.0.mlp.up_proj": hs[a], "model.layers.0.mlp.down_proj": hs[b]}
    cfg = MixedPrecisionConfig(candidates=("q4_0", "q8_0"), target_bpw=8.5, embeddings=False)
    plan, rep = plan_mixed_precision(mods, hs, cfg, measure=lambda w: 0.5)
    assert rep["measured_kl"] == {"model.layers.0": 0.5}
    # At the probe grid the two modules' errors sum to the measured KL, split 1 : 3.
    q4 = resolve_grid(WeightQuantConfig(grid="q4_0"), 256)
    p = [sensitivity(m.weight, hs[n], q4.fit) for n, m in mods.items()]
    assert p[1] == pytest.approx(3 * p[0], rel=1e-5)
    assert rep["predicted_error"] == pytest.approx(0.5 * sum(
        sensitivity(m.weight, hs[n], resolve_grid(WeightQuantConfig(grid="q8_0"), 256).fit)
        for n, m in mods.items()) / sum(p), rel=1e-5)


def test_embedding_is_a_choice_measured_at_each_distinct_grid():
    mods, hs = _two_layers(torch.Generator().manual_seed(4))
    emb = torch.randn(1000, 64) * 0.1  # 64 wide: q4_k falls back to q5_0, a duplicate
    seen = []

    def measure(weights):
        seen.append(tuple(sorted(weights)))
        return 0.01 if "embed" in next(iter(weights)) else 1.0

    cfg = MixedPrecisionConfig(candidates=("q4_0", "q4_k", "q5_0", "q8_0"), target_bpw=5.0)
    plan, rep = plan_mixed_precision(mods, hs, cfg, measure=measure, tensors={"model.embed_tokens": emb})
    assert seen.count(("model.embed_tokens",)) == 3  # q4_0, q5_0 (= q4_k's fallback), q8_0
    assert set(rep["measured_kl"]["model.embed_tokens"]) == {"q4_0", "q5_0", "q8_0"}
    assert "model.embed_tokens" in plan and rep["weights"] == 2 * 64 * 256 + emb.numel()
    assert rep["achieved_bpw"] <= 5.0


def test_config_rules():
    from compactor.config import ConfigError

    with pytest.raises(ConfigError, match="embeddings needs sensitivity: kl"):
        MixedPrecisionConfig(sensitivity="hessian").validate()
    with pytest.raises(ConfigError, match="probe"):
        MixedPrecisionConfig(probe="q2_k", candidates=("q4_0",)).validate()
    assert MixedPrecisionConfig(candidates=("q8_0", "q4_0", "q3_k")).probe_grid() == "q3_k"
    with pytest.raises(CompactorError, match="needs a KL probe"):
        plan_mixed_precision({}, {}, MixedPrecisionConfig(embeddings=False))
