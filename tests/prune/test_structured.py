"""Structured cuts: a smaller plain transformers model; zero-importance units cost nothing."""

import pytest
import torch

from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.models.tiny import tiny_model
from compactor.prune.cuts import choose_layers, lowest_removed
from compactor.prune.importance import layer_importance, unit_importance
from compactor.prune.structured import drop_layers, prune_kv_groups, prune_mlp_channels


@pytest.fixture
def windows():
    torch.manual_seed(0)
    return make_windows(torch.randint(0, 258, (4 * 32,)), 32)


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_zero_importance_channels_and_heads_removed_without_change(windows, tmp_path):
    m = tiny_model("llama", seed=1)
    ids = windows.input_ids[:2]
    dead_ch = [3, 70, 100, 127]
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.down_proj.weight[:, dead_ch] = 0  # these channels never reach the output
        # KV group 1 of layer 0: its query heads (2, 3 of 4; 2 per group) write nothing
        m.model.layers[0].self_attn.o_proj.weight[:, 32:64] = 0
    before = _logits(m, ids)
    imp = unit_importance(m, windows, progress=False)
    assert all(float(c[dead_ch].abs().max()) == 0 for c in imp.channels)
    assert float(imp.kv_groups[0][1]) == 0 and float(imp.kv_groups[0][0]) > 0
    prune_mlp_channels(m, lowest_removed(imp.channels, 4))
    prune_kv_groups(m, lowest_removed(imp.kv_groups, 1))
    assert m.config.intermediate_size == 124 and m.config.num_key_value_heads == 1
    assert m.config.num_attention_heads == 2 and m.model.layers[0].self_attn.q_proj.out_features == 32
    m.save_pretrained(tmp_path / "small")
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "small")  # loads without compactor
    assert torch.allclose(_logits(again, ids), _logits(m, ids), atol=1e-5)
    assert before.shape == _logits(m, ids).shape


def test_removing_dead_units_only_is_exact(windows):
    m = tiny_model("llama", seed=2, num_key_value_heads=2)
    ids = windows.input_ids[:2]
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.down_proj.weight[:, 64:] = 0
            layer.self_attn.o_proj.weight[:, 32:64] = 0  # group 1 (query heads 2, 3)
    before = _logits(m, ids)
    imp = unit_importance(m, windows, progress=False)
    prune_mlp_channels(m, lowest_removed(imp.channels, 64))
    prune_kv_groups(m, lowest_removed(imp.kv_groups, 1))
    assert torch.allclose(_logits(m, ids), before, atol=1e-5)


def test_identity_layer_has_zero_influence_and_dropping_it_is_exact(windows):
    m = tiny_model("llama", seed=3, num_hidden_layers=3)
    with torch.no_grad():
        m.model.layers[1].self_attn.o_proj.weight.zero_()
        m.model.layers[1].mlp.down_proj.weight.zero_()  # layer 1 adds nothing to the residual
    ids = windows.input_ids[:2]
    before = _logits(m, ids)
    bi = layer_importance(m, windows, progress=False)
    assert float(bi[1]) == pytest.approx(0, abs=1e-6) and float(bi.min()) == float(bi[1])
    assert choose_layers(m, windows, 1, "block_influence", progress=False) == [1]
    assert choose_layers(m, windows, 1, "angular", progress=False) == [1]
    drop_layers(m, [1])
    assert m.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in m.model.layers] == [0, 1]
    assert torch.allclose(_logits(m, ids), before, atol=1e-5)
    out = m.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)  # KV cache still indexed right
    assert out.shape[1] == 7


def test_bad_cuts():
    m = tiny_model("llama")
    with pytest.raises(CompactorError, match="would leave none"):
        drop_layers(m, [0, 1])
    with pytest.raises(CompactorError, match="layer 5 does not exist"):
        drop_layers(m, [5])
    with pytest.raises(CompactorError, match="2 key/value heads exist; cannot keep 3"):
        prune_kv_groups(m, [torch.arange(3)] * 2)


def test_fused_projections_are_cut_by_their_split_geometry():
    """Phi-3's qkv_proj / gate_up_proj: a KV-head and a channel cut equal the same cuts made on
    the unfused equivalent (the fused rows sliced per part)."""
    import copy

    from compactor.models.tiny import tiny_model
    from compactor.prune.structured import prune_kv_groups, prune_mlp_channels

    m = tiny_model("phi3")
    ref = copy.deepcopy(m)
    keep_kv, keep_ch = [torch.tensor([1])] * 2, [torch.tensor([3, 9, 64, 100])] * 2
    prune_kv_groups(m, keep_kv)
    prune_mlp_channels(m, keep_ch)
    hd, ff = 16, 128
    for lm, lr in zip(m.model.layers, ref.model.layers):
        w = lr.self_attn.qkv_proj.weight
        q, k, v = w[:64], w[64:96], w[96:128]
        q_keep = torch.cat([q[32:48], q[48:64]])  # query heads 2, 3 attend through kv head 1
        expect = torch.cat([q_keep, k[16:32], v[16:32]])
        assert torch.equal(lm.self_attn.qkv_proj.weight, expect)
        assert torch.equal(lm.self_attn.o_proj.weight, lr.self_attn.o_proj.weight[:, 32:64])
        g = lr.mlp.gate_up_proj.weight
        assert torch.equal(lm.mlp.gate_up_proj.weight, torch.cat([g[:ff][keep_ch[0]], g[ff:][keep_ch[0]]]))
        assert torch.equal(lm.mlp.down_proj.weight, lr.mlp.down_proj.weight[:, keep_ch[0]])
    x = torch.randint(0, 256, (1, 12))
    assert torch.isfinite(m(x).logits).all() and m.config.num_key_value_heads == 1
