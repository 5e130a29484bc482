import copy

import pytest
import torch

from compactor.calibration.sequential import run_sequential
from compactor.data.windows import make_windows
from compactor.quant.awq import AWQConfig, apply_awq, awq_scales, fold_scales
from compactor.quant.spec import WeightQuantConfig, resolve_grid


def test_awq_search_beats_rtn_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 128, generator=g) * torch.logspace(-1, 1, 128)  # uneven channels
    W = torch.randn(64, 128, generator=g) * 0.05
    fit = resolve_grid(WeightQuantConfig(grid="int", bits=4, group_size=-1), 128).fit
    s, alpha, err_rtn, err_awq = awq_scales(X, [W], X.abs().mean(0), fit)
    assert alpha > 0 and err_awq < 0.9 * err_rtn
    # The error at alpha = 0 is plain RTN's.
    rtn = fit(W, None).fake_quantize(W)
    assert err_rtn == pytest.approx(float(((X @ rtn.T) - X @ W.T).pow(2).mean()), rel=1e-5)


def test_folding_keeps_the_float_model_equivalent():
    from compactor.models.tiny import tiny_model

    g = torch.Generator().manual_seed(1)
    w = make_windows(torch.randint(0, 256, (8 * 32,), generator=g).tolist(), length=32)
    for family in ("llama", "gemma", "qwen3", "gemma2"):  # gemma's norm multiplies by (1 + w); qwen3 has q/k norms
        ref = tiny_model(family, num_key_value_heads=4)  # MHA: v -> o can be folded too
        m = copy.deepcopy(ref)
        rep = run_sequential(m, w, apply_awq, AWQConfig(grid="q4_0", then="none"), progress=False)
        assert all("skipped" not in p for p in rep.pairs) and len(rep.pairs) == 8
        with torch.no_grad():
            assert torch.allclose(m(w.input_ids).logits, ref(w.input_ids).logits, atol=1e-4), family
        assert not torch.allclose(m.model.layers[0].mlp.down_proj.weight, ref.model.layers[0].mlp.down_proj.weight)


def test_gqa_value_pair_skipped_with_reason_and_rtn_follows():
    from compactor.models.tiny import tiny_model
    from compactor.quant.qlinear import QuantizedLinear

    g = torch.Generator().manual_seed(2)
    w = make_windows(torch.randint(0, 256, (4 * 32,), generator=g).tolist(), length=32)
    m = tiny_model()  # 4 heads, 2 KV heads
    rep = run_sequential(m, w, apply_awq, AWQConfig(grid="q4_0"), progress=False)
    skipped = [p for p in rep.pairs if "skipped" in p]
    assert len(skipped) == 2 and "grouped-query attention" in skipped[0]["skipped"]
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantizedLinear) and len(rep.modules) == 14


def test_clip_search_lowers_output_error_on_heavy_tailed_weights():
    from compactor.quant.awq import clip_search

    g = torch.Generator().manual_seed(3)
    X = torch.randn(1024, 128, generator=g)
    # Student-t-like rows: a few large weights stretch each group's range.
    W = torch.randn(32, 128, generator=g) / torch.rand(32, 128, generator=g).clamp_min(0.05).sqrt()
    grid = resolve_grid(WeightQuantConfig(grid="int", bits=3, group_size=32, symmetric=False), 128)
    Wc, e0, e1 = clip_search(W, X, grid.fit, grid.unit)
    # Reference errors computed naively from outputs.
    def out_err(Wx):
        Q = grid.fit(Wx, None).fake_quantize(Wx)
        return float(((X @ Q.T) - X @ W.T).pow(2).sum() / X.shape[0])
    assert e0 == pytest.approx(out_err(W), rel=1e-4)
    assert e1 == pytest.approx(out_err(Wc), rel=1e-4)
    assert e1 < 0.9 * e0
    assert (Wc.abs() <= W.abs() + 1e-6).all()  # clipping only shrinks


def test_clip_search_never_worse_than_unclipped():
    from compactor.quant.awq import clip_search

    g = torch.Generator().manual_seed(4)
    X, W = torch.randn(256, 256, generator=g), torch.randn(8, 256, generator=g)
    for grid_name in ("q4_k", "q8_0"):  # K-quant: coupled sub-blocks; 8 bits: little to gain
        grid = resolve_grid(WeightQuantConfig(grid=grid_name), 256)
        Wc, e0, e1 = clip_search(W, X, grid.fit, grid.unit, n_grid=5)
        assert e1 <= e0


def test_awq_with_clipping_reports_gains_and_skips_query_key():
    from compactor.models.tiny import tiny_model

    g = torch.Generator().manual_seed(5)
    w = make_windows(torch.randint(0, 256, (8 * 32,), generator=g).tolist(), length=32)
    m = tiny_model()
    rep = run_sequential(m, w, apply_awq, AWQConfig(grid="int", bits=3, group_size=32, clip=True,
                                                    clip_grid=5), progress=False)
    gains = {k for p in rep.pairs for k in p.get("clip_gain", {})}
    assert gains and not any(k.endswith(("q_proj", "k_proj")) for k in gains)
    assert all(v >= 0 for p in rep.pairs for v in p.get("clip_gain", {}).values())


def test_awq_clip_needs_rtn_followup():
    from compactor.errors import CompactorError

    with pytest.raises(CompactorError, match="awq.clip needs then: rtn"):
        AWQConfig(grid="q4_0", clip=True, then="none").validate()


def _outlier_model(seed: int):
    """A tiny Llama whose normed inputs have a few loud channels (AWQ's case): the norm
    gains of 4 channels in every layer are 12x the rest."""
    from compactor.models.tiny import tiny_model

    m = tiny_model("llama", seed=seed, hidden_size=128, intermediate_size=256, head_dim=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                idx = torch.randperm(128, generator=g)[:4]
                norm.weight[idx] *= 12.0
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_model_beats_rtn_and_awq_gptq_beats_gptq_held_out(seed):
    """End to end on a model with outlier channels, scored by the evaluation harness (not
    by AWQ's own error) on windows no method calibrated on, over several seeds."""
    from compactor.api import quantize_
    from compactor.evaluate import evaluate
    from compactor.quant.gptq import GPTQConfig, apply_gptq
    from compactor.quant.rtn import RTNConfig

    g = torch.Generator().manual_seed(200 + seed)
    ids = torch.randint(0, 256, (48 * 64,), generator=g).tolist()
    calib, held = make_windows(ids[: 32 * 64], length=64), make_windows(ids[32 * 64:], length=64)
    ref = _outlier_model(seed)
    kl = lambda m: evaluate(m, held, reference=ref, speed=False, progress=False).kld_mean
    rtn, awq, gptq, both = (copy.deepcopy(ref) for _ in range(4))
    quantize_(rtn, RTNConfig(grid="q4_0"))
    run_sequential(awq, calib, apply_awq, AWQConfig(grid="q4_0"), progress=False)
    run_sequential(gptq, calib, apply_gptq, GPTQConfig(grid="q4_0"), progress=False)
    run_sequential(both, calib, apply_awq, AWQConfig(grid="q4_0", then="none"), progress=False)
    run_sequential(both, calib, apply_gptq, GPTQConfig(grid="q4_0"), progress=False)
    k_rtn, k_awq, k_gptq, k_both = kl(rtn), kl(awq), kl(gptq), kl(both)
    assert k_awq < k_rtn, (k_awq, k_rtn)
    assert k_both < k_gptq, (k_both, k_gptq)
