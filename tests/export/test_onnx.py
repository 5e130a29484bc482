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


def test_quantized_model_to_onnx_with_int8(tmp_path, tok):
    torch.manual_seed(3)
    win = make_windows(torch.randint(0, 258, (2 * 48,)), 48)
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_0"))
    loaded = LoadedModel(m, tok, adapter_for(m), "tiny")
    res = export_model(loaded, "onnx", tmp_path / "f", windows=win, progress=False)
    assert res.verification["kld_mean"] < 1e-5 and res.verification["top1"] > 0.99
    res8 = export_model(loaded, "onnx", tmp_path / "q", windows=win, progress=False, int8=True)
    assert (tmp_path / "q" / "model.int8.onnx").exists() and res8.summary["size_bytes"] < res.summary["size_bytes"]
    # int8 weights + activations: a different model, close but not identical
    assert 1e-5 < res8.verification["kld_mean"] < 0.5
