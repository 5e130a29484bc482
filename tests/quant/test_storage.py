import pytest
import torch

from compactor.api import quantize_
from compactor.evaluate.size import model_size
from compactor.models.load import load_model
from compactor.quant.qlinear import QuantizedLinear
from compactor.quant.rtn import RTNConfig
from compactor.quant.storage import save_model


def test_codes_round_trip_and_plain_transformers_loads(tmp_path, tiny, tok):
    names = quantize_(tiny, RTNConfig(grid="int", bits=4, group_size=32, symmetric=False))
    assert len(names) == 14 and "lm_head" not in names
    save_model(tiny, tok, tmp_path / "q")
    back = load_model(tmp_path / "q")
    assert back.info["quantized_modules"] == 14
    for n in names:
        a, b = tiny.get_submodule(n), back.model.get_submodule(n)
        assert isinstance(b, QuantizedLinear) and torch.equal(a.codes, b.codes) and b.label == "int4_asym_g32"
        assert torch.equal(a.qparams.extra["zero_point"], b.qparams.extra["zero_point"])
    x = torch.randint(0, 256, (1, 20))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.allclose(back.model(x).logits, tiny(x).logits, atol=1e-5)
        assert torch.allclose(plain(x).logits, tiny(x).logits, atol=1e-5)


def test_quantized_size_counts_packed_bits(tiny):
    before, n_before = model_size(tiny)
    quantize_(tiny, RTNConfig(grid="q4_0"))
    after, n_after = model_size(tiny)
    linear_params = sum(m.out_features * m.in_features for m in tiny.modules() if isinstance(m, QuantizedLinear))
    assert n_after == n_before
    assert before - after == linear_params * 4 - linear_params * 18 // 32


def test_w8a8_model_saves_loads_and_refuses_export(tmp_path, tok):
    from compactor.api import quantize_
    from compactor.errors import CompactorError
    from compactor.export.api import export_model
    from compactor.models.load import load_model
    from compactor.models.tiny import tiny_model
    from compactor.quant.activations import ActivationQuantConfig, ActQuantLinear
    from compactor.quant.rtn import RTNConfig
    from compactor.quant.storage import save_model

    m = tiny_model()
    quantize_(m, RTNConfig(grid="int", bits=8, group_size=-1))
    quantize_(m, ActivationQuantConfig(mode="dynamic"))
    save_model(m, tok, tmp_path / "w8a8")
    back = load_model(tmp_path / "w8a8")
    q = back.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, ActQuantLinear) and q.mode == "dynamic" and back.info["quantized_modules"] == 14
    ids = torch.arange(30)[None]
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, m(ids).logits)
    with pytest.raises(CompactorError, match="W8A8.*export compressed-tensors"):
        export_model(back, "gguf", tmp_path / "x.gguf", verify=False, progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_a_module_straddling_two_code_shards_restores(tmp_path, tok):
    """Tiny shards force a module's codes and scales into different files."""
    import torch

    from compactor.api import quantize_
    from compactor.models.load import load_model
    from compactor.models.tiny import tiny_model
    from compactor.quant.rtn import RTNConfig
    from compactor.quant.storage import ModelWriter, quantized_modules

    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_k"))  # K-quants keep extra tensors (super-block scales)
    out = tmp_path / "w"
    w = ModelWriter(out, max_shard_bytes=3000)
    w.add(m)
    w.close(m.config, tok)
    import json

    shards = set(json.loads((out / "quantization.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 3
    back = load_model(out).model
    for n, q in quantized_modules(m).items():
        assert torch.equal(back.get_submodule(n).codes, q.codes), n
