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
