"""Sizes of in-memory models: the GGUF a model would export to, predicted before exporting."""

import pytest
import torch

from compactor.api import quantize_
from compactor.evaluate.size import gguf_size, model_size
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.models.tiny import tiny_model
from compactor.quant.rtn import RTNConfig


def _tensor_bytes(path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("grid,embed,tied", [("q4_0", "q8_0", True), ("q8_0", "q4_0", False), (None, "q8_0", True)])
def test_gguf_size_is_the_exported_tensor_bytes(tmp_path, tok, grid, embed, tied):
    m = tiny_model("llama", tie_word_embeddings=tied)
    if grid:
        quantize_(m, RTNConfig(grid=grid))
    predicted = gguf_size(m, embed_type=embed, float_type="f16")
    export_gguf(m, tmp_path / "m.gguf", types=GGUFTypes("f16", embed), tokenizer=tok, progress=False)
    assert predicted == _tensor_bytes(tmp_path / "m.gguf")
    # In memory the embedding stays float32: the torch size is larger than the file's.
    assert model_size(m)[0] > predicted
