"""Every family through every operation, table-driven: adding a family is adding a row.

Each case runs a one-stage recipe on a tiny random checkpoint of the family (saved and
loaded as a transformers directory) and checks what the operation promises: the model still
evaluates against the original, compression happened, and every export is verified in its
runtime (llama.cpp, transformers + compressed-tensors, onnxruntime) by the export itself.
GPTQ per family is in tests/calibration/test_sequential.py, f32 GGUF parity per family in
tests/export/test_gguf.py.
"""

import importlib.util

import pytest
import torch

from compactor.models.tiny import tiny_model
from compactor.recipe import Recipe, run_recipe

torch.set_num_threads(1)

#: family -> what its tiny config needs beyond the defaults
FAMILIES = {
    "llama": {},
    "mistral": {},
    # transformers loads a qwen2 directory's tokenizer as Qwen2Tokenizer, which adds its
    # <|endoftext|> (id 258): the tiny model gets the row for it, as real Qwen2 models have
    "qwen2": {"vocab_size": 259},
    "qwen3": {},
    "gemma": {},
    "gemma2": {},
    "gemma3": {},
    "phi3": {},  # fused qkv_proj / gate_up_proj
}

_GGUF = {"format": "gguf", "file": "m.gguf"}
#: operation -> (steps, what to check, runtime package needed)
OPERATIONS = {
    "rtn q4_0 + gguf": ([{"rtn": {"grid": "q4_0"}}, {"export": _GGUF}], "export", "llama_cpp"),
    "awq+gptq int4 + compressed-tensors": (
        [{"awq": {"grid": "int", "group_size": 32, "then": "none"}},
         {"gptq": {"grid": "int", "group_size": 32}},
         {"export": {"format": "compressed-tensors", "file": "ct"}}], "export", "compressed_tensors"),
    "mixed precision": ([{"mixed_precision": {"target_bpw": 6.0, "candidates": ["q4_0", "q8_0"],
                                              "kl_tokens": 128}}], "eval", None),
    "wanda 50%": ([{"wanda": {"sparsity": 0.5}}], "sparse", None),
    "sparsegpt 2:4 + onnx": ([{"sparsegpt": {"sparsity": 0.5, "pattern": "2:4"}},
                              {"export": {"format": "onnx", "file": "onnx"}}], "export", "onnxruntime"),
    "drop a layer + distill": ([{"drop_layers": {"count": 1}},
                                # KL only: a random teacher is no model of the test text, so CE
                                # would pull the student away from it
                                {"distill": {"tokens": 64 * 4 * 12, "window": 64, "batch": 4, "micro_batch": 2,
                                             "eval_tokens": 128, "checkpoint_every": 0, "lr": 2e-3, "ce": 0.0,
                                             "kl": 1.0, "precision": "fp32"}}], "distill", None),
    "kv-head and channel cuts + gguf": ([{"prune_heads": {"count": 1}},
                                         {"prune_channels": {"fraction": 0.5, "multiple_of": 32}},
                                         {"export": _GGUF}], "export", "llama_cpp"),
}


#: (family, operation) -> the refusal llama.cpp's limits call for (named before writing)
REFUSED = {("qwen2", "kv-head and channel cuts + gguf"): "builds q/o projections of hidden x hidden",
           ("phi3", "kv-head and channel cuts + gguf"): "builds q/o projections of hidden x hidden"}


def _case_ids():
    return [(f, o) for f in FAMILIES for o in OPERATIONS]


@pytest.mark.parametrize("family,operation", _case_ids(), ids=[f"{f}-{o}" for f, o in _case_ids()])
def test_family_through_operation(tmp_path, tok, text_file, family, operation):
    steps, check, runtime = OPERATIONS[operation]
    if runtime and importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} is not installed (COMPACTOR_REQUIRE_EXTRAS makes this a failure)")
    src = tmp_path / family
    layers = 3 if check == "distill" else 2  # a layer-dropped student keeps 2
    tiny_model(family, num_hidden_layers=layers, **FAMILIES[family]).save_pretrained(src)
    tok.save_pretrained(src)
    for step in steps:  # the training text is the test text file
        if "distill" in step:
            step["distill"]["data"] = step["distill"]["eval_data"] = str(text_file)
    recipe = Recipe.from_dict({
        "model": str(src), "eval": {"data": str(text_file), "tokens": 256, "window": 64, "speed": False},
        "calibration": {"data": str(text_file), "samples": 4, "window": 64},
        "stages": [{"name": operation, "steps": steps}]})
    if (family, operation) in REFUSED:
        from compactor.errors import CompactorError

        with pytest.raises(CompactorError, match=REFUSED[family, operation]):
            run_recipe(recipe, out=tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        return
    ctx = run_recipe(recipe, out=tmp_path / "out", progress=False)
    res = ctx.results[-1]
    assert res.kld_mean > 0 and torch.isfinite(torch.tensor(res.ppl))  # compressed, and still a model
    if check == "export":
        rep = next(r for r in ctx.reports if r["step"] == "export")
        assert rep["verification"] and rep["verification"].get("passed", True), rep["verification"]
    elif check == "sparse":
        rep = next(r for r in ctx.reports if r["step"] == "wanda")
        assert abs(rep["sparsity"]["measured_sparsity"] - 0.5) < 0.01
    elif check == "distill":
        rep = next(r for r in ctx.reports if r["step"] == "distill")
        assert ctx.model.config.num_hidden_layers == 2 and rep["after"]["kld"] < rep["before"]["kld"]
    else:
        rep = next(r for r in ctx.reports if r["step"] == "mixed_precision")
        assert rep["achieved_bpw"] <= 6.0
