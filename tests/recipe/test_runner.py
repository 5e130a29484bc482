import json

import pytest
import yaml

from compactor.errors import CompactorError
from compactor.models.load import load_model
from compactor.recipe import load_recipe, run_recipe


def _recipe(tmp_path, model, text, steps):
    r = {
        "model": str(model),
        "eval": {"data": str(text), "tokens": 128, "window": 64, "speed": False},
        "stages": [{"name": "only", "steps": steps}],
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return load_recipe(p)


def test_run_writes_self_describing_output(tmp_path, tiny_dir, text_file):
    rec = _recipe(tmp_path, tiny_dir, text_file, [{"evaluate": {"label": "tiny"}}])
    out = tmp_path / "out"
    ctx = run_recipe(rec, out=out, progress=False)
    assert ctx.results[0].name == "tiny" and ctx.results[0].tokens == 2 * 63
    for f in ("config.json", "model.safetensors.index.json", "recipe.yaml", "metrics.json", "provenance.json"):
        assert (out / f).exists(), f
    assert json.loads((out / "metrics.json").read_text())[0]["ppl"] == pytest.approx(ctx.results[0].ppl)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["environment"]["compactor"] == "0.1.0"
    assert prov["eval_data"]["window"] == 64 and prov["eval_data"]["source"] == "user"
    assert load_recipe(out / "recipe.yaml").to_dict() == rec.to_dict()
    md = (out / "results.md").read_text()  # the table, from the same results, with provenance
    assert "| model " in md and f"{ctx.results[0].ppl:.3f}" in md and "commit " in md
    assert prov["memory_plan"]["fits"] and prov["memory_plan"]["total"] > 0
    load_model(out)  # the output directory is itself a loadable model


def test_failure_leaves_nothing(tmp_path, tiny_dir, text_file):
    rec = _recipe(tmp_path, tiny_dir, text_file, [{"evaluate": {"source": str(tmp_path / "missing")}}])
    out = tmp_path / "out"
    with pytest.raises(CompactorError, match="model not found"):
        run_recipe(rec, out=out, progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(tmp_path, tiny_dir, text_file):
    rec = _recipe(tmp_path, tiny_dir, text_file, [{"evaluate": {}}])
    (tmp_path / "out").mkdir()
    with pytest.raises(CompactorError, match="already exists"):
        run_recipe(rec, out=tmp_path / "out", progress=False)
    run_recipe(rec, out=tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "metrics.json").exists()


def test_chained_quantization_recipe(tmp_path, tiny_dir, text_file):
    """AWQ (scales only) -> GPTQ, and mixed precision, through the recipe runner."""
    steps = [{"awq": {"grid": "q4_0", "then": "none"}}, {"gptq": {"grid": "q4_0"}}]
    rec = _recipe(tmp_path, tiny_dir, text_file, steps)
    rec.calibration = type(rec.calibration)(data=str(text_file), samples=4, window=64)
    ctx = run_recipe(rec, out=tmp_path / "o1", progress=False)
    assert [r["step"] for r in ctx.reports] == ["awq", "gptq"] and ctx.reports[1]["modules"] == 14
    assert ctx.results[-1].kld_mean > 0  # evaluated against the original after the stage
    back = load_model(tmp_path / "o1")
    assert back.info["quantized_modules"] == 14

    mp = [{"mixed_precision": {"candidates": ["q4_0", "q8_0"], "target_bpw": 6.0}}]
    rec = _recipe(tmp_path, tiny_dir, text_file, mp)
    rec.calibration = type(rec.calibration)(data=str(text_file), samples=4, window=64)
    ctx = run_recipe(rec, progress=False)
    rep = ctx.reports[0]
    assert rep["achieved_bpw"] <= 6.0 and set(rep["plan"].values()) <= {"q4_0", "q8_0"}
    assert len(set(rep["plan"].values())) == 2  # a real mix at this budget
    assert rep["sensitivity"] == "kl" and len(rep["measured_kl"]) == 2 + 1  # 2 layers + embedding


def test_mixed_precision_embedding_is_stored_as_codes_and_stays_tied(tmp_path, tiny_dir, text_file):
    import numpy as np
    import torch
    from gguf import GGUFReader

    from compactor.export.gguf import export_gguf
    from compactor.quant.qlinear import QuantizedEmbedding

    mp = [{"mixed_precision": {"candidates": ["q4_0", "q8_0"], "target_bpw": 5.0, "then": "gptq"}}]
    rec = _recipe(tmp_path, tiny_dir, text_file, mp)
    rec.calibration = type(rec.calibration)(data=str(text_file), samples=4, window=64)
    ctx = run_recipe(rec, out=tmp_path / "mp", progress=False)
    rep, model = ctx.reports[0], ctx.loaded.model
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.label == rep["plan"]["model.embed_tokens"]
    assert model.lm_head.weight is emb.weight  # the tied head computes with the quantized table
    assert rep["then"] == "gptq" and rep["achieved_bpw"] <= 5.0
    back = load_model(tmp_path / "mp")
    assert back.info["quantized_modules"] == 15 and back.model.lm_head.weight is back.model.model.embed_tokens.weight
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, model(ids).logits)
    out = export_gguf(model, tmp_path / "m.gguf", tokenizer=ctx.loaded.tokenizer, progress=False)
    rec_embd = next(r for r in out.tensors if r.name == "token_embd.weight")
    assert rec_embd.origin == "codes" and rec_embd.type == emb.label
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert "output.weight" not in names  # tied: llama.cpp reads token_embd for the head
    assert np.isfinite(out.bpw)
