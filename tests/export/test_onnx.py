"""ONNX export checked in onnxruntime (float graph and onnxruntime's dynamic int8)."""

import pytest
import torch

from compactor.api import quantize_
from compactor.data.windows import make_windows
from compactor.export.api import export_model
from compactor.models.adapters import adapter_for
from compactor.models.load import LoadedModel
from compactor.models.tiny import tiny_model
from compactor.quant.rtn import RTNConfig

pytest.importorskip("onnxruntime")


def _q4_0_tiny(tok, seed: int):
    """(tiny Llama on Q4_0 by RTN, as loaded; two random windows of 48 tokens)."""
    torch.manual_seed(seed)
    win = make_windows(torch.randint(0, 258, (2 * 48,)), 48)
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_0"))
    return LoadedModel(m, tok, adapter_for(m), "tiny"), win


def test_quantized_model_to_onnx_with_int8(tmp_path, tok):
    loaded, win = _q4_0_tiny(tok, 3)
    res = export_model(loaded, "onnx", tmp_path / "f", windows=win, progress=False)
    assert res.verification["kld_mean"] < 1e-5 and res.verification["top1"] > 0.99
    # onnxruntime's int8 has something to do only where float weights are left: the embedding here.
    res8 = export_model(loaded, "onnx", tmp_path / "q", windows=win, progress=False, int8=True, embed_type="f32")
    float_emb = export_model(loaded, "onnx", tmp_path / "fe", windows=win, progress=False, embed_type="f32")
    assert (tmp_path / "q" / "model.int8.onnx").exists()
    assert res8.summary["size_bytes"] < float_emb.summary["size_bytes"]
    # int8 weights + activations: a different model, close but not identical
    assert 1e-5 < res8.verification["kld_mean"] < 0.5


@pytest.mark.parametrize("grid,kw,expect", [("q4_0", {}, 14), ("int", {"bits": 4, "group_size": 32}, 14),
                                            ("q5_0", {}, 0)])
def test_4bit_codes_go_into_matmul_nbits_unchanged(tmp_path, tok, grid, kw, expect):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(4)
    win = make_windows(torch.randint(0, 258, (2 * 48,)), 48)
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid=grid, **kw))
    res = export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "onnx", tmp_path / "o", windows=win,
                       progress=False)
    assert res.summary["matmul_nbits"] == expect
    assert res.verification["kld_mean"] < 1e-5 and res.verification["top1"] > 0.99
    g = onnx.load(str(tmp_path / "o" / "model.onnx"))
    if not expect:
        assert "q5_0" in next(iter(res.summary["kept_float"]))
        return
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    node = next(n for n in g.graph.node if n.op_type == "MatMulNBits" and "down_proj" in n.name)
    q = m.model.layers[0].mlp.down_proj if "layers_0" in node.name else m.model.layers[1].mlp.down_proj
    packed = inits[node.input[1]]
    # unpack by hand: low nibble = even element, high = odd; value - 8 is our code
    u = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(q.out_features, -1).astype(np.int64) - 8
    assert np.array_equal(u, q.codes.numpy())
    assert np.array_equal(inits[node.input[2]], q.qparams.scale.numpy().reshape(-1))


def test_bits_per_weight_count_the_quantized_weights(tmp_path, tok):
    """The summary's bpw divides by every weight, codes included (a quantized linear holds its
    weights in buffers, which a parameter count misses)."""
    from compactor.api import quantize_
    from compactor.evaluate.size import model_size
    from compactor.export.api import export_model
    from compactor.models.adapters import adapter_for
    from compactor.models.load import LoadedModel
    from compactor.models.tiny import tiny_model
    from compactor.quant.rtn import RTNConfig

    m = tiny_model()
    n = sum(p.numel() for p in m.parameters())
    quantize_(m, RTNConfig(grid="q4_0"))
    res = export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "onnx", tmp_path / "o", verify=False)
    assert res.summary["params"] == model_size(m)[1] == n  # every weight once, tied ones once
    assert res.summary["bpw"] == round(res.summary["size_bytes"] * 8 / n, 4)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_head_in_q8_0_blocks(tmp_path, tok, tied):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from compactor.export.onnx_embed import q8_0

    torch.manual_seed(5)
    win = make_windows(torch.randint(0, 258, (2 * 48,)), 48)
    m = tiny_model("llama", tie_word_embeddings=tied)
    quantize_(m, RTNConfig(grid="q4_0"))
    loaded = LoadedModel(m, tok, adapter_for(m), "tiny")
    before = m.get_input_embeddings().weight.detach().clone()
    q8 = export_model(loaded, "onnx", tmp_path / "q8", windows=win, progress=False)
    f32 = export_model(loaded, "onnx", tmp_path / "f32", windows=win, progress=False, embed_type="f32")
    assert q8.summary["embedding"] == "q8_0" and q8.summary["head_matmuls"] == 1
    assert q8.summary["head"].startswith("q8_0 (tied") == tied
    # Verified against the same rounded values in memory: only the runtime differs.
    assert q8.verification["kld_mean"] < 1e-5 and q8.verification["top1"] > 0.99
    # Q8_0 in the graph: 8-bit codes plus one scale per 32 (fp16 values held in float32, as
    # onnxruntime's kernels take them) = 9 bits per weight instead of 32, in the stored payload.
    emb = m.get_input_embeddings().weight
    n_float = emb.numel() * (1 if tied else 2)

    def payload(d):
        return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(d / "model.onnx")).graph.initializer)

    saved = payload(tmp_path / "f32") - payload(tmp_path / "q8")
    assert saved == pytest.approx(n_float * (4 - 9 / 8), rel=0.01)
    assert f32.summary["size_bytes"] - q8.summary["size_bytes"] > 0.9 * saved  # and the file shrinks
    g = onnx.load(str(tmp_path / "q8" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    codes, scales, _ = q8_0(emb)
    assert np.array_equal(inits["embed_q8_data"].astype(np.int64) - 128, codes.numpy())  # the codes, unchanged
    assert np.array_equal(inits["embed_q8_scales"], scales.numpy())
    assert not any(n.op_type == "Gather" for n in g.graph.node)
    assert ("head_q8_B" in inits) != tied  # a tied head reads the lookup's codes (stored once)
    # Untouched by verification: the model in memory keeps its float embedding.
    assert torch.equal(m.get_input_embeddings().weight, before)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_one_graph_scores_prefills_and_decodes_on_its_cache(tmp_path, tok, family):
    """The KV-cache graph: a whole window in one call, and the same window as a generator
    runs it (prompt, then one token per call on the returned cache), both equal torch —
    past a sliding window's length too (the tiny Gemma 2's window is 32 positions)."""
    import numpy as np

    from compactor.export.onnx import OnnxBackend
    from compactor.quant.storage import dequantized_view

    torch.manual_seed(5)
    win = make_windows(torch.randint(0, 258, (2 * 40,)), 40)
    long_ids = torch.randint(0, 258, (70,))
    m = tiny_model(family)
    quantize_(m, RTNConfig(grid="q4_0"))
    res = export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "onnx", tmp_path / "o", windows=win,
                       progress=False)
    v = res.verification
    assert v["passed"] and v["decode_passed"] and v["decode_kld_mean"] < 1e-5 and v["decode_tokens"] == 12
    be = OnnxBackend(tmp_path / "o" / "model.onnx")
    assert len(be.past) == 2 * m.config.num_hidden_layers
    ids = win.input_ids[1][:20]
    want = be.window_logits(ids)  # (the graph's embedding is Q8_0: torch's is compared in verification)
    assert torch.allclose(be.decode_logits(ids, prompt=3), want, atol=1e-4)
    with dequantized_view(m), torch.no_grad():  # beyond any window: the float graph equals torch
        ref = m(long_ids[None]).logits[0]
    export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "onnx", tmp_path / "f", verify=False,
                 embed_type="f32")
    f32 = OnnxBackend(tmp_path / "f" / "model.onnx")
    assert torch.allclose(f32.decode_logits(long_ids, prompt=5), ref, atol=1e-4)
    # The cache carries the context: decoding the last token without it gives other logits.
    last, _ = be.step(ids[None, -1:].numpy())
    assert not np.allclose(last[0, -1], want[-1].numpy(), atol=1e-2)
    speed = be.speed(prompt_len=16, gen_tokens=4, repeats=1)
    assert speed["decode_tok_s"] > 0 and speed["gen_tokens"] == 4


def test_int8_matmul_accuracy_marks_every_nbits_node_and_is_checked_to_the_gguf_bound(tmp_path, tok):
    import onnx

    from compactor.export.verify import MAX_KLD

    loaded, win = _q4_0_tiny(tok, 6)
    exact = export_model(loaded, "onnx", tmp_path / "fp32", windows=win, progress=False)
    fast = export_model(loaded, "onnx", tmp_path / "int8", windows=win, progress=False, matmul_accuracy="int8")
    nodes = [n for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 15  # 14 decoder linears + the Q8_0 head
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)
    assert fast.summary["matmul_accuracy"] == "int8" and fast.verification["max_kld"] == MAX_KLD
    assert fast.verification["passed"]
    # int8 activations are another arithmetic: the graph no longer equals memory to rounding.
    assert fast.verification["kld_mean"] > 10 * exact.verification["kld_mean"]
    with pytest.raises(Exception, match="fp32, int8"):
        export_model(loaded, "onnx", tmp_path / "bad", windows=win, progress=False, matmul_accuracy="int4")
    assert not (tmp_path / "bad").exists()
