"""compressed-tensors pack-quantized: our codes packed by the package, reloaded by transformers."""

import json

import pytest
import torch

from compactor.api import quantize_
from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.export.api import export_model
from compactor.models.adapters import adapter_for
from compactor.models.load import LoadedModel
from compactor.models.tiny import tiny_model
from compactor.quant.rtn import RTNConfig

pytest.importorskip("compressed_tensors")


@pytest.fixture
def windows():
    torch.manual_seed(2)
    return make_windows(torch.randint(0, 258, (3 * 64,)), 64)


@pytest.mark.parametrize("kw,strategy", [
    (dict(grid="int", bits=4, group_size=32), "group"),
    (dict(grid="int", bits=8, group_size=-1), "channel"),
    (dict(grid="q4_0"), "group"),  # GGUF Q4_0 codes are symmetric int4 in groups of 32
])
def test_round_trip_in_transformers(tmp_path, tok, windows, kw, strategy):
    m = tiny_model("llama")
    quantize_(m, RTNConfig(**kw))
    res = export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "compressed-tensors",
                       tmp_path / "ct", windows=windows, progress=False)
    assert res.verification["passed"] and res.verification["kld_mean"] < 1e-6
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == strategy and group["weights"]["symmetric"]
    assert len(group["targets"]) == 14 and "lm_head" not in group["targets"]


@pytest.mark.parametrize("kw,match", [
    (dict(grid="q4_k", targets=("re:.*down_proj",)), "two-level"), (dict(grid="nf4", group_size=32), "codebook"),
    (dict(grid="q4_1"), "float minimum"), (dict(grid="int", bits=3, group_size=32), "8 levels"),
    (dict(grid="int", bits=4, group_size=32, symmetric=False), "zero point"),
])
def test_unrepresentable_grids_refused_nothing_written(tmp_path, tok, kw, match):
    m = tiny_model("llama", intermediate_size=256)
    quantize_(m, RTNConfig(**kw))
    with pytest.raises(CompactorError, match=match):
        export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "compressed-tensors",
                     tmp_path / "ct", verify=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_w8a8_round_trip_in_transformers(tmp_path, tok, windows, mode):
    """int8 weights + int8 input activations: transformers (compressed-tensors' own QDQ)
    reproduces the in-memory W8A8 model."""
    from compactor.calibration.sequential import run_sequential
    from compactor.quant.activations import w8a8_
    from compactor.quant.smoothquant import SmoothQuantConfig, apply_smoothquant

    m = tiny_model("llama")
    run_sequential(m, windows, apply_smoothquant, SmoothQuantConfig(), progress=False)
    w8a8_(m, windows, mode)
    res = export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "compressed-tensors",
                       tmp_path / "ct", windows=windows, progress=False)
    assert res.verification["passed"] and res.verification["kld_mean"] < 1e-6
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    (group,) = qc["config_groups"].values()
    ia = group["input_activations"]
    assert ia["num_bits"] == 8 and ia["dynamic"] == (mode == "dynamic")
    assert ia["strategy"] == ("token" if mode == "dynamic" else "tensor")
