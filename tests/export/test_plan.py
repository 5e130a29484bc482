"""The GGUF export's memory plan: its file-size estimate against the file actually written
(in memory and streamed), and a plan over its cap refused before anything is written."""

import pytest
import torch

from compactor.api import quantize_
from compactor.errors import CompactorError
from compactor.export.api import export_model
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.export.plan import gguf_file_bytes, plan_gguf_export
from compactor.models.adapters import adapter_for
from compactor.models.load import LoadedModel, load_model
from compactor.models.tiny import tiny_model
from compactor.quant.rtn import RTNConfig
from compactor.quant.storage import save_model


@pytest.mark.parametrize("types", [GGUFTypes("f16", "q8_0"), GGUFTypes("q8_0", "f32", "q4_0"),
                                   GGUFTypes("q4_k", "q6_k")])  # K-quants fall back on rows of 64
def test_file_bytes_estimate_equals_the_written_tensors(tmp_path, tok, types):
    m = tiny_model("llama", intermediate_size=256, tie_word_embeddings=types.head is None)
    # Some linears quantized (their grid counts), the others left for the export's body type.
    quantize_(m, RTNConfig(grid="q4_k", ignore=("lm_head", "re:.*self_attn.*")))
    exp = export_gguf(m, tmp_path / "m.gguf", types=types, tokenizer=tok, progress=False)
    written = sum(r.nbytes for r in exp.tensors)
    assert gguf_file_bytes(LoadedModel(m, tok, adapter_for(m), "tiny"), types) == written
    save_model(m, tok, tmp_path / "q")
    streamed = load_model(str(tmp_path / "q"), stream=True)
    assert streamed.streamed and gguf_file_bytes(streamed, types) == written


def test_plan_phases_and_the_runtime_copy(tok):
    m = tiny_model("llama")
    loaded = LoadedModel(m, tok, adapter_for(m), "tiny")
    plan = plan_gguf_export(loaded, GGUFTypes(), verify_windows=(4, 64), n_ctx=1024)
    items = dict(plan.items)
    assert items["verification: llama.cpp's copy of the file"] == gguf_file_bytes(loaded, GGUFTypes())
    assert plan.phases["verification: llama.cpp's copy of the file"] == "runtime"
    none = plan_gguf_export(loaded, GGUFTypes(), verify_windows=None, n_ctx=0)
    assert not any(k.startswith("verification") for k, _ in none.items) and none.total < plan.total


def test_export_over_its_cap_writes_nothing(tmp_path, tok):
    m = tiny_model("llama")
    torch.manual_seed(0)
    out = tmp_path / "m.gguf"
    with pytest.raises(CompactorError, match="memory plan needs .* over the cap of 1 MB"):
        export_model(LoadedModel(m, tok, adapter_for(m), "tiny"), "gguf", out, max_memory="1MB",
                     progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
