"""llama.cpp's own quantizer through llama-cpp-python, and our importance matrix for it."""

import gguf
import numpy as np
import pytest
import torch

from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.export.llamacpp import collect_imatrix, llamacpp_quantize
from compactor.models.adapters import adapter_for
from compactor.models.load import LoadedModel
from compactor.models.tiny import tiny_model

pytest.importorskip("llama_cpp")


def _types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_imatrix_is_mean_square_of_layer_inputs(tok):
    m = tiny_model("llama", intermediate_size=256)
    loaded = LoadedModel(m, tok, adapter_for(m), "tiny")
    torch.manual_seed(0)
    win = make_windows(torch.randint(0, 258, (2 * 32,)), 32)
    im = collect_imatrix(loaded, win, progress=False, dtype="float32")
    assert len(im) == 14 and im["blk.1.ffn_down.weight"].shape == (256,)
    # naive reference: hook the real forward pass and average x^2 over all tokens
    seen = {}
    h = m.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        m(win.input_ids)
    h.remove()
    ref = seen["x"].reshape(-1, 256).pow(2).mean(0).numpy()
    np.testing.assert_allclose(im["blk.1.ffn_down.weight"], ref, rtol=1e-4)


def test_llamacpp_quantize_with_and_without_imatrix(tmp_path, tok):
    m = tiny_model("llama", intermediate_size=256)
    src = export_gguf(m, tmp_path / "f32.gguf", types=GGUFTypes("f32", "f32"), tokenizer=tok,
                      progress=False).path
    plain = llamacpp_quantize(src, tmp_path / "a.gguf", "q4_k_m")
    types = _types(plain)
    assert types["blk.0.attn_q.weight"] != "F32" and types["blk.0.attn_norm.weight"] == "F32"
    loaded = LoadedModel(m, tok, adapter_for(m), "tiny")
    win = make_windows(torch.randint(0, 258, (2 * 32,)), 32)
    im = collect_imatrix(loaded, win, progress=False)
    im = {k: v * np.linspace(0.01, 100, v.size, dtype=np.float32) for k, v in im.items()}
    weighted = llamacpp_quantize(src, tmp_path / "b.gguf", "q4_k_m", im)
    a = next(t for t in gguf.GGUFReader(str(plain)).tensors if t.name == "blk.0.ffn_down.weight")
    b = next(t for t in gguf.GGUFReader(str(weighted)).tensors if t.name == "blk.0.ffn_down.weight")
    assert a.tensor_type == b.tensor_type and not np.array_equal(a.data, b.data)  # imatrix used
    with pytest.raises(CompactorError, match="q9_k"):
        llamacpp_quantize(src, tmp_path / "c.gguf", "q9_k")
