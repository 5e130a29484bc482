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


@pytest.mark.parametrize("type_name", ["f32", "q8_0", "q4_k"])
def test_tensors_read_a_few_rows_at_a_time_equal_gguf_dequantize(tmp_path, tok, monkeypatch, type_name):
    # The reader fills the result chunk by chunk; with 3-row chunks (uneven at the end) every
    # tensor equals gguf.quants' dequantization of the whole tensor.
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    import compactor.primitives.packing as packing
    from compactor.models.gguf_convert import _read_tensor

    path = tmp_path / "m.gguf"
    model = tiny_model()
    export_gguf(model, path, types=GGUFTypes(type_name, type_name), tokenizer=tok, progress=False)
    monkeypatch.setattr(packing, "CHUNK_WEIGHTS", 3 * 64)
    monkeypatch.setattr(packing.row_chunks, "__defaults__", (3 * 64,))
    reader = gguf.GGUFReader(str(path))
    with open(path, "rb") as f:
        for t in reader.tensors:
            want = np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
            got = _read_tensor(f, t)
            assert np.array_equal(got.numpy().reshape(want.shape), want), t.name
