"""GGUF export: tensors written as chosen, metadata llama.cpp accepts, verified in llama.cpp."""

import dataclasses

import gguf
import pytest
import torch

from compactor.api import quantize_
from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.export.api import VerificationFailed, export_model
from compactor.export.gguf import GGUFTypes, export_gguf, qk_row_permutation
from compactor.export.verify import verify_gguf
from compactor.models.adapters import adapter_for
from compactor.models.load import LoadedModel
from compactor.models.tiny import tiny_model
from compactor.quant.rtn import RTNConfig

#: Only the tests that run the file in llama.cpp need llama-cpp-python; the others (packing,
#: metadata, refusals) run without it.
needs_llamacpp = pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed")


@pytest.fixture
def windows():
    torch.manual_seed(1)
    return make_windows(torch.randint(0, 258, (4 * 64,)), 64)


def _loaded(model, tok):
    return LoadedModel(model, tok, adapter_for(model), "tiny")


def test_qk_permutation_is_llamacpp_converters():
    """Naive reference: convert_hf_to_gguf's reshape(n_head, 2, hd/2, in).swapaxes(1, 2)."""
    w = torch.randn(48, 5)
    n_head = 3
    naive = w.reshape(n_head, 2, 48 // n_head // 2, 5).swapaxes(1, 2).reshape(48, 5)
    assert torch.equal(w[qk_row_permutation(48, n_head)], naive)


@needs_llamacpp
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"])
def test_f32_file_matches_memory_in_llamacpp(tmp_path, tok, windows, family):
    """An unquantized export runs in llama.cpp with the same logits (families: one adapter
    entry each; qwen2 has q/k/v biases, gemma a norm offset and no q/k permutation)."""
    m = tiny_model(family)
    exp = export_gguf(m, tmp_path / "m.gguf", types=GGUFTypes("f32", "f32"), tokenizer=tok, progress=False)
    v = verify_gguf(m, exp, windows)
    assert v.passed and v.kld_mean < 1e-4 and v.top1 > 0.98, v.describe()


@needs_llamacpp
@pytest.mark.parametrize("grid", ["q4_0", "q5_1", "iq4_nl", "q4_k", "q6_k", "q3_k", "q2_k"])
def test_codes_written_exactly_and_run(tmp_path, tok, windows, grid):
    m = tiny_model("llama", intermediate_size=256)  # down_proj rows of 256 take a K-quant
    quantize_(m, RTNConfig(grid=grid))
    exp = export_gguf(m, tmp_path / "m.gguf", tokenizer=tok, progress=False)
    v = verify_gguf(m, exp, windows)
    assert v.tensors_checked == 14 and v.max_tensor_error == 0.0
    assert v.passed, v.describe()
    assert grid in exp.type_mix() and abs(sum(exp.type_mix().values()) - 1) < 1e-9
    reader = gguf.GGUFReader(str(exp.path))
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert down.tensor_type.name.lower() == grid


def test_metadata_and_provenance(tmp_path, tok):
    m = tiny_model("llama")
    exp = export_gguf(m, tmp_path / "m.gguf", tokenizer=tok, progress=False,
                      provenance={"calibration": {"source": "austen:calib", "tokens": 128}})
    f = gguf.GGUFReader(str(exp.path)).fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.block_count"].contents() == 2 and f["llama.attention.head_count_kv"].contents() == 2
    assert len(f["tokenizer.ggml.tokens"].contents()) == 258
    assert f["compactor.version"].contents() == "0.1.0"
    assert '"tokens": 128' in f["compactor.calibration"].contents()
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(exp.path)).tensors}  # tied


def test_non_ggml_grid_is_refused_and_nothing_written(tmp_path, tok):
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="int", bits=4, group_size=32))
    with pytest.raises(CompactorError, match="int4_sym_g32.*no GGUF block type"):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=tok, progress=False)
    assert list(tmp_path.iterdir()) == []


@needs_llamacpp
def test_failed_verification_leaves_no_file(tmp_path, tok, windows):
    """A wrong q/k row order (as if the adapter forgot llama.cpp's permutation) is caught."""
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q8_0"))
    bad = dataclasses.replace(adapter_for(m), gguf_permute_qk=False)
    loaded = LoadedModel(m, tok, bad, "tiny")
    with pytest.raises(VerificationFailed, match="FAILED"):
        export_model(loaded, "gguf", tmp_path / "m.gguf", windows=windows, progress=False)
    assert list(tmp_path.iterdir()) == []


@needs_llamacpp
def test_export_model_with_verification(tmp_path, tok, windows):
    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_0"))
    res = export_model(_loaded(m, tok), "gguf", tmp_path / "m.gguf", windows=windows, progress=False,
                       types=GGUFTypes(embed="q8_0"))
    assert res.verification["passed"] and res.path.exists()
    assert res.summary["tensors_by_origin"] == {"codes": 14, "rounded": 1, "float": 5}
    with pytest.raises(CompactorError, match="already exists"):
        export_model(_loaded(m, tok), "gguf", tmp_path / "m.gguf", windows=windows)


def test_bad_type_and_vocab_mismatch(tmp_path, tok):
    with pytest.raises(CompactorError, match="q4_9"):
        GGUFTypes(body="q4_9")
    m = tiny_model("llama", vocab_size=300)
    src = export_gguf(tiny_model("llama"), tmp_path / "a.gguf", tokenizer=tok, progress=False).path
    with pytest.raises(CompactorError, match="258 tokens but the model's vocabulary has 300"):
        export_gguf(m, tmp_path / "b.gguf", tokenizer_gguf=src, progress=False)


def test_unsupported_rope_scaling_is_refused(tmp_path, tok):
    m = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(CompactorError, match="RoPE scaling 'dynamic' is not supported"):
        export_gguf(m, tmp_path / "m.gguf", tokenizer=tok, progress=False)
    assert list(tmp_path.iterdir()) == []


@needs_llamacpp
@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0},
])
def test_scaled_rope_runs_in_llamacpp_as_in_memory(tmp_path, tok, rope):
    """Llama 3.x scaling (the rope_freqs tensor llama.cpp's converter writes), linear and YaRN
    scaling (metadata): llama.cpp reproduces the scaled in-memory model — and an unscaled
    model's logits differ, so the check can fail."""
    import copy

    m = tiny_model("llama", rope_parameters=rope, max_position_embeddings=512)
    plain = tiny_model("llama", max_position_embeddings=512)
    win = make_windows(torch.randint(0, 258, (4 * 200,), generator=torch.Generator().manual_seed(3)), 200)
    with torch.no_grad():
        assert not torch.allclose(m(win.input_ids[:1]).logits, plain(win.input_ids[:1]).logits, atol=1e-3)
    exp = export_gguf(m, tmp_path / "m.gguf", types=GGUFTypes("f32", "f32"), tokenizer=tok, progress=False)
    v = verify_gguf(m, exp, win)
    assert v.passed and v.kld_mean < 1e-4, v.describe()
    if rope["rope_type"] == "llama3":
        assert any(t.name == "rope_freqs.weight" for t in exp.tensors)
        # the same file judged against the unscaled model fails: the factors matter
        assert not verify_gguf(copy.deepcopy(plain), exp, win).passed


def test_yarn_settings_llamacpp_would_run_differently_are_refused(tmp_path, tok):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4,
            "beta_fast": 16.0}
    with pytest.raises(CompactorError, match="YaRN beta_fast 16.0 differs"):
        export_gguf(tiny_model("llama", rope_parameters=rope), tmp_path / "y.gguf", tokenizer=tok, progress=False)
    assert not list(tmp_path.iterdir())


def test_gemma3_layouts_llamacpp_would_run_differently_are_refused(tmp_path, tok):
    m = tiny_model("gemma3", num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(CompactorError, match="every 6th layer global"):
        export_gguf(m, tmp_path / "a.gguf", tokenizer=tok, progress=False)
    m = tiny_model("gemma3", rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                                              "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    with pytest.raises(CompactorError, match="RoPE base 50000"):
        export_gguf(m, tmp_path / "b.gguf", tokenizer=tok, progress=False)
    assert not list(tmp_path.iterdir())


def test_header_and_tensor_bytes_predict_the_file_size(tmp_path, tok):
    from compactor.evaluate.size import gguf_size
    from compactor.export.gguf import header_bytes

    m = tiny_model("llama")
    quantize_(m, RTNConfig(grid="q4_0"))
    predicted = gguf_size(m, embed_type="q5_0") + header_bytes(m, tok)
    exp = export_gguf(m, tmp_path / "m.gguf", types=GGUFTypes(embed="q5_0"), tokenizer=tok, progress=False)
    n_tensors = len(gguf.GGUFReader(str(exp.path)).tensors)
    # An upper bound (names, dimensions and alignment bounded per tensor), and a tight one.
    assert exp.path.stat().st_size <= predicted < exp.path.stat().st_size + 120 * n_tensors
