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
    plan, rep = plan_mixed_precision(mods, hs, MixedPrecisionConfig(candidates=("q4_0", "q8_0"), target_bpw=6.5))
    assert plan == {"m0": "q4_0", "m1": "q8_0"} and rep["achieved_bpw"] == pytest.approx(6.5)
