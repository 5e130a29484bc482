import numpy as np
import pytest
import torch

from compactor.errors import CompactorError
from compactor.primitives.ggml import GGML_TYPES, ggml_qparams, resolve_type
from compactor.primitives.packing import dequantize_ggml_bytes, ggml_row_bytes, pack_ggml


def _weights(seed=0, out=5, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[0, :40] = 0.0  # an all-zero block and a partly zero super-block
    w[1, 7] = 1.5  # an outlier
    w[2] = w[2].abs()  # an all-positive row (exercises the min handling)
    return w


@pytest.mark.parametrize("name", list(GGML_TYPES))
@pytest.mark.parametrize("search", [None, True])
def test_bit_exact_round_trip_through_gguf(name, search):
    w = _weights()
    qp = ggml_qparams(w, name, search=search)
    q = qp.quantize(w)
    assert q.min() >= qp.qmin and q.max() <= qp.qmax
    packed = pack_ggml(q, qp, name)
    assert packed.shape == (5, ggml_row_bytes(name, 512)) and packed.dtype == np.uint8
    ref = dequantize_ggml_bytes(packed, name, tuple(w.shape))
    assert torch.equal(qp.dequantize(q), ref)  # bit for bit
    # Arbitrary (e.g. GPTQ-chosen) codes in range pack exactly too.
    rnd = torch.randint(qp.qmin, qp.qmax + 1, q.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qp.dequantize(rnd), dequantize_ggml_bytes(pack_ggml(rnd, qp, name), name, tuple(w.shape)))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_legacy_rtn_is_llama_cpp_rounding(name):
    """Our plain fit + rounding reproduces gguf's (= llama.cpp's reference) quantizer."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = _weights(1)
    qp = ggml_qparams(w, name)
    ours = pack_ggml(qp.quantize(w), qp, name)
    theirs = quantize(w.numpy(), GGMLQuantizationType(GGML_TYPES[name].type_id))
    # Near-ties may round differently (x/d here vs x*(1/d) and half-up there); nearly every
    # byte agrees, and the scales (fit) are identical.
    assert (ours == theirs).mean() > 0.99


def test_k_quants_beat_legacy_at_similar_size():
    w = _weights(2, out=16, n=1024)
    err = lambda n: (ggml_qparams(w, n).fake_quantize(w) - w).pow(2).mean()
    assert err("q4_k") < err("q4_0")
    assert err("q5_k") < err("q5_0")
    assert err("q6_k") < err("q5_k") < err("q4_k") < err("q3_k") < err("q2_k")


def test_importance_weighting_lowers_weighted_error():
    w = _weights(4, out=32, n=256)
    imp = torch.ones(256)
    imp[:32] = 100.0  # the first 32 columns matter most
    werr = lambda qp: ((qp.fake_quantize(w) - w).pow(2) * imp).sum()
    for name in ("q6_k", "q4_k", "q3_k", "q2_k"):
        assert werr(ggml_qparams(w, name, importance=imp)) <= werr(ggml_qparams(w, name))


def test_k_quant_fallback_is_explicit():
    t, why = resolve_type("q4_k", 576, "model.layers.0.self_attn.q_proj")
    assert t.name == "q5_0" and "q4_k needs rows that are a multiple of 256" in why
    assert "q_proj" in why
    assert resolve_type("q4_k", 1536)[1] is None
    assert [resolve_type(n, 576)[0].name for n in ("q2_k", "q3_k", "q5_k", "q6_k")] == \
        ["q4_0", "q4_0", "q5_1", "q8_0"]
    with pytest.raises(CompactorError, match="not a multiple"):
        ggml_qparams(torch.randn(2, 576), "q4_k")
    with pytest.raises(CompactorError, match="unknown GGUF grid 'q7_0'"):
        resolve_type("q7_0", 512)


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_packing_a_few_rows_at_a_time_gives_the_same_bytes(name):
    # Large weights are packed in row chunks to bound the temporaries; with chunks of one and
    # of two rows (and an uneven last chunk) the bytes equal packing all five rows at once.
    w = _weights(2)
    qp = ggml_qparams(w, name)
    q = qp.quantize(w)
    whole = pack_ggml(q, qp, name, chunk_weights=1 << 30)
    for rows in (1, 2):
        assert np.array_equal(pack_ggml(q, qp, name, chunk_weights=rows * 512), whole)
    assert qp.rows(1, 3).shape == (2, 512) and torch.equal(qp.rows(1, 3).quantize(w[1:3]), q[1:3])
