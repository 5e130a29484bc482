"""Exports of the real model, verified in their runtimes (slow)."""

import copy

import gguf
import pytest

from compactor.api import quantize_
from compactor.export.api import export_model
from compactor.quant.rtn import RTNConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from compactor.models.load import load_model

    return load_model("smollm2-135m")


def test_gguf_q4_0_codes_in_llama_cpp(smol, tmp_path):
    """Our Q4_0 codes are written bit-exactly and llama.cpp reproduces the in-memory model
    within its activation-rounding noise; the tokenizer section is the original's."""
    loaded = copy.copy(smol)
    loaded.model = copy.deepcopy(smol.model)
    quantize_(loaded.model, RTNConfig(grid="q4_0"))
    res = export_model(loaded, "gguf", tmp_path / "q4_0.gguf", progress=False)
    v = res.verification
    assert v["passed"] and v["tensors_checked"] == 210 and v["max_tensor_error"] == 0.0
    assert v["kld_mean"] < 0.01 and v["top1"] > 0.93
    assert 5.3 < res.summary["bpw"] < 5.6  # q4_0 body, q8_0 tied embedding
    fields = gguf.GGUFReader(str(tmp_path / "q4_0.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(fields["tokenizer.ggml.merges"].contents()) == 48900


def test_compressed_tensors_int4_reloads_in_transformers(smol, tmp_path):
    loaded = copy.copy(smol)
    loaded.model = copy.deepcopy(smol.model)
    quantize_(loaded.model, RTNConfig(grid="int", bits=4, group_size=32))
    res = export_model(loaded, "compressed-tensors", tmp_path / "ct", progress=False)
    assert res.verification["passed"] and res.verification["kld_mean"] < 1e-6
    assert res.summary["size_bytes"] < 0.4 * 134_515_008 * 4


def test_mixed_precision_with_planned_embedding_in_llama_cpp(smol, tmp_path):
    """Measured-KL mixed precision (embedding included) at 4.5 bpw: the plan meets the
    budget, and llama.cpp reads the planned token_embd codes and reproduces the model."""
    from compactor.data.windows import windows_for
    from compactor.quant.mixed import MixedPrecisionConfig, plan_mixed_precision
    from compactor.quant.plan import apply_planned

    loaded = copy.copy(smol)
    loaded.model = copy.deepcopy(smol.model)
    calib = windows_for(smol.tokenizer, "austen:calib", 512, max_tokens=2 * 512)
    cfg = MixedPrecisionConfig(target_bpw=4.5, kl_tokens=128)  # the plan's mechanics, not its quality
    rep = apply_planned(loaded.model, calib, cfg, plan_mixed_precision, adapter=smol.adapter, progress=False)
    assert rep["achieved_bpw"] <= 4.5 and len(rep["measured_kl"]) == 30 + 1
    assert len(set(rep["plan"].values())) > 1
    win = windows_for(smol.tokenizer, "austen:eval", 512, max_tokens=512)
    res = export_model(loaded, "gguf", tmp_path / "mixed.gguf", windows=win, progress=False)
    v = res.verification
    # 210 linears + the embedding, all written as codes; only the norms stay float.
    assert v["passed"] and v["tensors_checked"] == 211 and v["max_tensor_error"] == 0.0
    assert res.summary["tensors_by_origin"] == {"codes": 211, "float": 61}


def test_onnx_q4_0_codes_in_matmul_nbits(smol, tmp_path):
    """The real model's Q4_0 codes go into onnxruntime's MatMulNBits unchanged: every decoder
    linear replaced, the file a fraction of the float graph, onnxruntime equal to memory."""
    pytest.importorskip("onnxruntime")
    from compactor.data.windows import windows_for

    loaded = copy.copy(smol)
    loaded.model = copy.deepcopy(smol.model)
    quantize_(loaded.model, RTNConfig(grid="q4_0"))
    win = windows_for(smol.tokenizer, "austen:eval", 512, max_tokens=512)
    res = export_model(loaded, "onnx", tmp_path / "onnx", windows=win, progress=False)
    assert res.summary["matmul_nbits"] == 210 and not res.summary["kept_float"]
    assert res.verification["passed"] and res.verification["kld_mean"] < 1e-4
    # The graph's KV cache: decoding token by token on it gives the in-memory model's logits.
    assert res.verification["decode_passed"] and res.verification["decode_kld_mean"] < 1e-4
    # 4.5-bit linears and the embedding (tied head, stored once) in Q8_0: a fifth of the float
    # graph (with a float32 embedding it was 184 MB). ~10 MB over the GGUF's 91.7: the block
    # scales are float32 (the operators take A's type), fp16 in the GGUF.
    assert res.summary["embedding"] == "q8_0" and res.summary["head_matmuls"] == 1
    assert res.summary["size_bytes"] < 0.2 * 134_515_008 * 4
