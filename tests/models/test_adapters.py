import pytest

from compactor.errors import CompactorError
from compactor.models.adapters import ADAPTERS, adapter_for, adapter_for_model_type, decoder_layers
from compactor.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3"])
def test_adapter_names_exist_in_tiny_models(family):
    m = tiny_model(family)
    a = adapter_for(m)
    assert a.family == family
    layers = decoder_layers(m, a)
    assert len(layers) == 2
    for name in a.linears + (a.input_norm, a.post_attn_norm):
        layers[0].get_submodule(name)
    for name in (a.embed, a.final_norm, a.lm_head):
        m.get_submodule(name)
    # Every smoothing consumer is a linear of the layer.
    for producer, consumers in a.smooth_pairs:
        layers[0].get_submodule(producer)
        assert set(consumers) <= set(a.linears)


def test_unknown_family_names_what_is_missing():
    with pytest.raises(CompactorError) as e:
        adapter_for_model_type("gpt2", "GPT2LMHeadModel")
    msg = str(e.value)
    assert "'gpt2'" in msg and "adapters.py" in msg and "decoder layer" in msg and "llama" in msg


def test_families_unique():
    types = [t for a in ADAPTERS for t in a.model_types]
    assert len(types) == len(set(types))
