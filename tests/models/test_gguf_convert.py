"""GGUF -> float checkpoint, tensor by tensor: the exact inverse of our exporter."""

import pytest
import torch

from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.models.load import load_model
from compactor.models.tiny import tiny_model


# (transformers reads no Gemma-1 GGUF config, so a Gemma GGUF cannot be an input yet.)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f32_gguf_converts_back_to_the_same_weights(tmp_path, tok, monkeypatch, family):
    import transformers

    monkeypatch.setenv("COMPACTOR_HOME", str(tmp_path / "home"))
    # The tiny byte-level tokenizer has no GGUF tokenizer model transformers can rebuild;
    # hand it back directly (the weights are what this test is about).
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda src, **kw: tok if "gguf_file" in kw else real(src, **kw))
    model = tiny_model(family)
    path = tmp_path / f"{family}.gguf"
    export_gguf(model, path, types=GGUFTypes("f32", "f32"), tokenizer=tok, progress=False)
    back = load_model(path)
    assert back.path.parent == tmp_path / "home" / "converted"
    assert (back.path / "model.safetensors.index.json").exists()  # written in shards by us
    got = dict(back.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p), name  # q/k rows un-permuted for llama
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.allclose(back.model(ids).logits, model(ids).logits, atol=1e-5)
    streamed = load_model(path, stream=True)  # the converted cache streams like any checkpoint
    layer = streamed.store.layer(streamed.model, 1, streamed.adapter)
    assert torch.equal(layer.self_attn.q_proj.weight, model.model.layers[1].self_attn.q_proj.weight)
