import copy

import pytest
import torch

from compactor.api import quantize_
from compactor.calibration.sequential import run_sequential
from compactor.data.windows import make_windows
from compactor.evaluate import evaluate
from compactor.models.tiny import tiny_model
from compactor.quant.activations import ActQuantLinear, quantize_per_token, w8a8_
from compactor.quant.rtn import RTNConfig
from compactor.quant.smoothquant import SmoothQuantConfig, apply_smoothquant


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    w = make_windows(torch.randint(0, 256, (8 * 64,), generator=g).tolist(), length=64)
    ref = tiny_model(hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():  # a few outlier channels, as real LLM activations have
        for layer in ref.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(128, generator=g)[:4]] *= 30
    return ref, w


def test_per_token_matches_naive():
    x = torch.randn(3, 5, 16)
    got = quantize_per_token(x)
    for t in range(3):
        for p in range(5):
            s = x[t, p].abs().max() / 127.5
            assert torch.allclose(got[t, p], torch.round(x[t, p] / s).clamp(-128, 127) * s)


def test_smoothquant_keeps_model_and_helps_w8a8(setup):
    ref, w = setup
    kl = lambda m: evaluate(m, w, reference=ref, speed=False, progress=False).kld_mean
    sm = copy.deepcopy(ref)
    rep = run_sequential(sm, w, apply_smoothquant, SmoothQuantConfig(alpha=0.5), progress=False)
    assert kl(sm) < 1e-6  # folding alone changes nothing (up to float rounding)
    assert rep.pairs[0]["after"] < rep.pairs[0]["act_max_over_median_before"]

    def w8a8(m, mode):
        w8a8_(m, w, mode)
        assert isinstance(m.model.layers[0].mlp.down_proj, ActQuantLinear)
        return m

    plain = w8a8(copy.deepcopy(ref), "dynamic")
    smooth = w8a8(copy.deepcopy(sm), "dynamic")
    assert kl(smooth) < kl(plain)
    static_plain = w8a8(copy.deepcopy(ref), "static")
    static_smooth = w8a8(copy.deepcopy(sm), "static")
    assert kl(static_smooth) < kl(static_plain)
    # Weight-only int8 is nearly lossless; activations cost more.
    wo = copy.deepcopy(ref)
    quantize_(wo, RTNConfig(grid="int", bits=8, group_size=-1))
    assert kl(wo) < kl(plain)
