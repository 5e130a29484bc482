"""The export and llamacpp_quantize recipe steps inside a run."""

import json

import gguf
import pytest
import yaml

from compactor.errors import ConfigError
from compactor.recipe import Recipe, load_recipe, run_recipe

pytest.importorskip("llama_cpp")


def _recipe(tmp_path, model, text, stages):
    r = {"model": str(model), "eval": {"data": str(text), "tokens": 128, "window": 64, "speed": False},
         "calibration": {"data": str(text), "samples": 2, "window": 64}, "stages": stages}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return load_recipe(p)


def test_quantize_export_and_llamacpp_baseline(tmp_path, tiny_dir, text_file):
    rec = _recipe(tmp_path, tiny_dir, text_file, [
        {"name": "q", "steps": [{"rtn": {"grid": "q4_0"}}]},
        {"name": "export", "steps": [{"export": {"file": "tiny.gguf"}}]},
        {"name": "llama.cpp", "steps": [{"llamacpp_quantize": {"type": "q4_0", "imatrix": True}}]},
    ])
    ctx = run_recipe(rec, out=tmp_path / "out", progress=False)
    names = [r.name for r in ctx.results]
    assert names == ["q", "tiny.gguf (llama.cpp)", "llama.cpp Q4_0 + imatrix (llama.cpp)"]
    assert ctx.results[1].runtime == "llama.cpp" and ctx.results[1].kld_mean is not None
    # the file in llama.cpp scores what the in-memory model scores, within the runtime noise
    assert abs(ctx.results[1].ppl - ctx.results[0].ppl) / ctx.results[0].ppl < 0.05
    rep = next(r for r in ctx.reports if r["step"] == "export")
    assert rep["verification"]["passed"] and rep["type_mix"]["q4_0"] > 0.5
    meta = gguf.GGUFReader(str(tmp_path / "out" / "tiny.gguf")).fields
    assert "rtn" in meta["compactor.recipe"].contents()
    assert json.loads((tmp_path / "out" / "provenance.json").read_text())["reports"][1]["path"] == "tiny.gguf"


def test_export_step_validation():
    with pytest.raises(ConfigError, match="export.type"):
        Recipe.from_dict({"model": "x", "stages": [{"steps": [{"export": {"type": "q4_9"}}]}]})
    with pytest.raises(ConfigError, match="llamacpp_quantize.type"):
        Recipe.from_dict({"model": "x", "stages": [{"steps": [{"llamacpp_quantize": {"type": "q1"}}]}]})


def test_export_step_passes_its_types_to_the_exporter(tmp_path, tiny_dir, text_file):
    # A non-default embedding type must reach the file (it once stayed at the default, unseen
    # because every recipe used the default).
    rec = _recipe(tmp_path, tiny_dir, text_file, [
        {"name": "q", "steps": [{"rtn": {"grid": "q4_0"}}]},
        {"name": "export", "steps": [{"export": {"file": "t.gguf", "embed_type": "f16", "type": "q8_0",
                                                 "score": False}}]},
    ])
    run_recipe(rec, out=tmp_path / "out", progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out" / "t.gguf")).tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q4_0"
