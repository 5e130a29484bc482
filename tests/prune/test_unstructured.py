"""Magnitude / Wanda / SparseGPT on toy layers with correlated, uneven inputs."""

import pytest
import torch

from compactor.primitives.hessian import HessianAccumulator
from compactor.primitives.stats import InputSample
from compactor.prune.magnitude import MagnitudeConfig, apply_magnitude
from compactor.prune.sparsegpt import SparseGPTConfig, apply_sparsegpt
from compactor.prune.wanda import WandaConfig, apply_wanda
from compactor.quant.rtn import RTNConfig, apply_rtn


def _toy(seed=0, n=256, d=64, out=48, held_out=False):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, d, generator=g)

    def sample():  # correlated inputs with a few loud channels (as LLM activations have)
        x = torch.randn(n, 8, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)
        x[:, :4] *= 8
        return x

    X = sample()
    lin = torch.nn.Linear(d, out, bias=False)
    lin.weight.data = torch.randn(out, d, generator=g)
    h, s = HessianAccumulator(d), InputSample(d, 0)
    h.add(X)
    s.add(X)
    return (lin, X, h, s, sample()) if held_out else (lin, X, h, s)


def _err(orig, new, X):
    return float(((X @ orig.T - X @ new.weight.detach().T) ** 2).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_wanda_and_sparsegpt_beat_magnitude(pattern, seed):
    """Scored on held-out inputs (the statistics saw other samples), over several seeds."""
    lin, X, h, s, Xh = _toy(seed, held_out=True)
    W = lin.weight.detach().clone()
    mk = lambda: _copy(lin)
    mag = apply_magnitude(mk(), MagnitudeConfig(sparsity=0.5, pattern=pattern))
    wan = apply_wanda(mk(), WandaConfig(sparsity=0.5, pattern=pattern), stats=s)
    sgp = apply_sparsegpt(mk(), SparseGPTConfig(sparsity=0.5, pattern=pattern, block_size=16), stats=h)
    e_mag, e_wan, e_sgp = _err(W, mag, Xh), _err(W, wan, Xh), _err(W, sgp, Xh)
    assert e_wan < e_mag and e_sgp < e_wan, (e_mag, e_wan, e_sgp)
    for m in (mag, wan, sgp):
        assert abs((m.weight == 0).float().mean().item() - 0.5) < 1e-9


def _copy(lin):
    new = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    new.weight.data = lin.weight.detach().clone()
    return new


def test_wanda_sparsity_exact_per_row():
    lin, X, h, s = _toy()
    m = apply_wanda(_copy(lin), WandaConfig(sparsity=0.375), stats=s)
    assert ((m.weight == 0).sum(1) == 24).all()


def test_global_magnitude_uses_one_threshold():
    from compactor.api import quantize_
    from compactor.models.tiny import tiny_model
    from compactor.prune.stats import overall, sparsity_report

    model = tiny_model("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    ws = torch.cat([model.get_submodule(n).weight.detach().abs().flatten() for n in names])
    t = ws.sort().values[int(0.4 * ws.numel()) - 1]
    quantize_(model, MagnitudeConfig(sparsity=0.4, scope="global"))
    rows = sparsity_report(model, names)
    assert overall(rows) == pytest.approx(0.4, abs=1e-5)
    assert len({round(r.sparsity, 3) for r in rows}) > 1  # layers end up uneven
    for n in names:
        w = model.get_submodule(n).weight.detach()
        assert w[w != 0].abs().min() >= t


def test_joint_sparsegpt_quantization_beats_prune_then_rtn():
    lin, X, h, s = _toy(1)
    W = lin.weight.detach().clone()
    joint = apply_sparsegpt(_copy(lin), SparseGPTConfig(sparsity=0.5, grid="int", bits=4, group_size=32,
                                                        block_size=16), stats=h)
    assert (joint.codes == 0).float().mean() >= 0.5 and ((joint.weight == 0) == (joint.codes == 0)).all()
    naive = apply_rtn(apply_magnitude(_copy(lin), MagnitudeConfig(sparsity=0.5)),
                      RTNConfig(grid="int", bits=4, group_size=32))
    assert _err(W, joint, X) < _err(W, naive, X)


def test_joint_needs_a_grid_with_zero():
    from compactor.errors import CompactorError

    lin, X, h, s = _toy()
    with pytest.raises(CompactorError, match="0 is a code"):
        apply_sparsegpt(_copy(lin), SparseGPTConfig(sparsity=0.5, grid="q4_1"), stats=h)


@pytest.mark.parametrize("cfg", [WandaConfig(sparsity=0.3), SparseGPTConfig(sparsity=0.3),
                                 MagnitudeConfig(sparsity=0.3, scope="row"), MagnitudeConfig(sparsity=0.3)])
def test_a_sparsity_that_does_not_divide_the_rows_passes_its_own_check(cfg):
    """0.3 of 64 columns is 19.2: a method that rounds per row (or per column block) holds
    fewer zeros than 0.3 of the matrix rounded once, and its check must say so, not fail."""
    from compactor.calibration.sequential import run_sequential
    from compactor.data.windows import make_windows
    from compactor.models.tiny import tiny_model
    from compactor.prune.stats import check_pruned
    from compactor.registry import lookup_config

    model = tiny_model(seed=0)
    g = torch.Generator().manual_seed(0)
    win = make_windows(torch.randint(0, 256, (8 * 32,), generator=g).tolist(), length=32)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    if cfg.needs_calibration:
        run_sequential(model, win, lookup_config(cfg).handler, cfg, progress=False)
    else:
        for n in names:
            apply_magnitude(model.get_submodule(n), cfg, n)
    rep = check_pruned(model, names, cfg)
    assert rep["measured_sparsity"] == pytest.approx(0.3, abs=0.01)
    # A matrix with its zeros filled in: the check still fails.
    w = model.get_submodule(names[0]).weight
    with torch.no_grad():
        w[w == 0] = 1e-3
    with pytest.raises(Exception, match="below the target"):
        check_pruned(model, names, cfg)
