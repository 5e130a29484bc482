"""The embedding step: the table on a GGUF grid in memory, written unchanged by the exporter."""

import gguf
import numpy as np
import pytest
import torch

from compactor.errors import ConfigError
from compactor.export.gguf import GGUFTypes, export_gguf
from compactor.models.tiny import tiny_model
from compactor.quant.embedding import EmbeddingQuantConfig, quantize_embedding
from compactor.quant.qlinear import QuantizedEmbedding


@pytest.mark.parametrize("grid", ["q4_0", "q5_0", "iq4_nl"])
def test_tied_table_is_what_the_file_holds(tmp_path, tok, grid):
    m = tiny_model("llama", tie_word_embeddings=True)
    before = m.get_input_embeddings().weight.detach().clone()
    quantize_embedding(m, EmbeddingQuantConfig(grid=grid))
    emb = m.get_input_embeddings()
    assert isinstance(emb, QuantizedEmbedding) and emb.label == grid
    assert m.get_output_embeddings().weight is emb.weight  # the tied head computes with the codes
    assert not torch.equal(emb.weight, before)  # rounded (the test can fail)
    # The exporter keeps these codes even when told another embedding type.
    exp = export_gguf(m, tmp_path / "m.gguf", types=GGUFTypes(embed="q8_0"), tokenizer=tok, progress=False)
    t = next(t for t in gguf.GGUFReader(str(exp.path)).tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name.lower() == grid
    back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(emb.weight.shape)
    np.testing.assert_array_equal(back, emb.weight.detach().numpy())


def test_untied_head_gets_its_own_grid():
    m = tiny_model("llama", tie_word_embeddings=False)
    quantize_embedding(m, EmbeddingQuantConfig(grid="q4_0", head="q8_0"))
    assert m.get_input_embeddings().label == "q4_0" and m.get_output_embeddings().label == "q8_0"


def test_refusals():
    with pytest.raises(ConfigError, match="embedding.grid: 'int4'"):
        EmbeddingQuantConfig(grid="int4")
    m = tiny_model("llama")
    quantize_embedding(m, EmbeddingQuantConfig(grid="q8_0"))
    with pytest.raises(Exception, match="already on grid q8_0"):
        quantize_embedding(m, EmbeddingQuantConfig(grid="q4_0"))
