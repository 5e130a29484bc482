"""Streamed weights: the same runner on a meta skeleton whose layers come from disk gives
the same bytes as the in-memory model; damaged checkpoints are refused by name."""

import filecmp
import json

import pytest
import torch
from safetensors.torch import save_file

from compactor.errors import CompactorError
from compactor.models.load import load_model
from compactor.models.tiny import tiny_model
from compactor.recipe.runner import run_recipe
from compactor.recipe.schema import Recipe

STEPS = {
    "rtn": [{"rtn": {"grid": "q4_0"}}],
    "gptq": [{"gptq": {"grid": "q4_0"}}],
    "awq": [{"awq": {"grid": "q4_0", "clip": True}}],
    "awq+gptq": [{"awq": {"grid": "q4_0", "then": "none"}}, {"gptq": {"grid": "q4_0"}}],
    "wanda": [{"wanda": {"sparsity": 0.5}}],
    "sparsegpt 2:4": [{"sparsegpt": {"sparsity": 0.5, "pattern": "2:4"}}],
}


def _recipe(src, text, steps, stream):
    return Recipe.from_dict({
        "model": str(src), "stream": stream,
        "eval": {"data": str(text), "tokens": 256, "window": 64, "speed": False},
        "calibration": {"data": str(text), "samples": 6, "window": 64},
        "stages": [{"name": "step", "steps": steps}]})


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(f"Line {i}: it is a truth universally acknowledged that {i * 7 % 13} men "
                           f"want {i % 5} wives." for i in range(120)))
    return p


@pytest.mark.parametrize("method", list(STEPS))
def test_streamed_equals_in_memory_byte_for_byte(tmp_path, tiny_dir, corpus, method):
    outs, results = [], []
    for stream in (False, True):
        out = tmp_path / f"out-{int(stream)}"
        ctx = run_recipe(_recipe(tiny_dir, corpus, STEPS[method], stream), out=out, progress=False)
        outs.append(out)
        results.append(ctx.results[-1])
    a, b = outs
    files = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json")
                   and p.name not in ("metrics.json", "provenance.json"))
    assert "model.safetensors.index.json" in files
    assert files == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json")
                           and p.name not in ("metrics.json", "provenance.json"))
    for f in files:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
    # Scored layer by layer (streamed, reference logits cached on disk) = scored in memory.
    assert results[1].runtime == "torch (streamed)" and results[0].runtime == "torch"
    assert results[1].kld_mean == pytest.approx(results[0].kld_mean, rel=1e-6, abs=1e-9)
    assert results[1].ppl == pytest.approx(results[0].ppl, rel=1e-6)
    assert results[1].top1 == results[0].top1
    # The streamed output reloads in memory as the same model.
    m = load_model(b).model
    assert torch.equal(m.model.layers[1].mlp.down_proj.weight, load_model(a).model.model.layers[1].mlp.down_proj.weight)


def test_streamed_layers_are_released(tiny_dir):
    lm = load_model(tiny_dir, stream=True)
    layers = lm.model.model.layers
    assert all(p.device.type == "meta" for p in lm.model.parameters())
    layer = lm.store.layer(lm.model, 1, lm.adapter)
    ref = tiny_model("llama")  # the fixture's weights
    assert torch.equal(layer.self_attn.q_proj.weight, ref.model.layers[1].self_attn.q_proj.weight)
    assert layers[1] is layer
    lm.store.done(lm.model, 1, lm.adapter)
    assert all(p.device.type == "meta" for p in layers[1].parameters())
    with lm.store.parts(lm.model, [lm.adapter.embed, lm.adapter.lm_head], lm.adapter):
        assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tied
        assert torch.equal(lm.model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert lm.model.model.embed_tokens.weight.device.type == "meta"


def _shard(tiny_dir, tmp_path):
    """The tiny model re-written as two shards with an index."""
    from safetensors.torch import load_file

    d = tmp_path / "sharded"
    d.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    sd = load_file(tiny_dir / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    parts = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for shard, members in parts.items():
        save_file({n: sd[n] for n in members}, d / shard)
    index = {"weight_map": {n: s for s, ms in parts.items() for n in ms}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d, index


def test_sharded_checkpoint_streams(tiny_dir, tmp_path):
    d, _ = _shard(tiny_dir, tmp_path)
    lm = load_model(d, stream=True)
    layer = lm.store.layer(lm.model, 0, lm.adapter)
    assert torch.equal(layer.mlp.up_proj.weight, tiny_model("llama").model.layers[0].mlp.up_proj.weight)


def test_missing_shard_or_tensor_is_named(tiny_dir, tmp_path, corpus):
    d, index = _shard(tiny_dir, tmp_path)
    (d / "b.safetensors").unlink()
    with pytest.raises(CompactorError, match=r"shard b.safetensors .* is missing"):
        load_model(d, stream=True)
    d2, index = _shard(tiny_dir, tmp_path / "x")
    gone = "model.layers.1.mlp.down_proj.weight"
    del index["weight_map"][gone]
    (d2 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CompactorError, match=gone.replace(".", r"\.") + ".* not in the checkpoint"):
        load_model(d2, stream=True)
    out = tmp_path / "never"
    with pytest.raises(CompactorError, match="not in the checkpoint"):
        run_recipe(_recipe(d2, corpus, STEPS["rtn"], True), out=out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_lying_safetensors_header_is_refused(tiny_dir, tmp_path):
    from compactor.models.checkpoint import CheckpointIndex

    raw = (tiny_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated: offsets past the end
    with pytest.raises(CompactorError, match="past the"):
        CheckpointIndex(bad)
    (bad / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + raw[8:100])
    with pytest.raises(CompactorError, match="header length"):
        CheckpointIndex(bad)


def test_streamed_gguf_export_is_identical_and_verified(tmp_path, tiny_dir, corpus):
    pytest.importorskip("llama_cpp")
    from compactor.data.windows import windows_for
    from compactor.export.api import export_model

    q = tmp_path / "q"
    run_recipe(_recipe(tiny_dir, corpus, STEPS["gptq"], False), out=q, progress=False)
    mem = load_model(q)
    win = windows_for(mem.tokenizer, str(corpus), 64, max_tokens=256)
    a = export_model(mem, "gguf", tmp_path / "a.gguf", windows=win, progress=False)
    b = export_model(load_model(q, stream=True), "gguf", tmp_path / "b.gguf", windows=win,
                     progress=False)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert b.verification["passed"] and b.verification["tensors_checked"] == 14
    # The embedding was rounded to Q8_0 by the exporter: both checks read it from the file.
    assert b.verification["kld_mean"] == pytest.approx(a.verification["kld_mean"], rel=1e-5, abs=1e-7)


_KILLED_RUN = r'''
import os, signal, sys
from compactor.quant import storage
from compactor.recipe.runner import run_recipe
from compactor.recipe.schema import load_recipe

calls = {"n": 0}
orig = storage.ModelWriter.checkpoint

def checkpoint(self):
    state = orig(self)
    calls["n"] += 1
    if calls["n"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no cleanup at all
    return state

storage.ModelWriter.checkpoint = checkpoint
run_recipe(load_recipe(sys.argv[1]), out=sys.argv[2], progress=False)
'''


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_sigkill_during_streamed_calibration_resumes_to_the_same_bytes(tmp_path, corpus, method):
    import subprocess
    import sys

    from compactor.models.tiny import tiny_tokenizer
    from compactor.recipe.schema import load_recipe

    src = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(src, corpus, STEPS[method], True).to_yaml())
    whole = tmp_path / "whole"
    run_recipe(load_recipe(recipe), out=whole, progress=False)
    out = tmp_path / "out"
    # Killed inside the last step's 3rd layer checkpoint, before its progress record
    # landed: layers 0 and 1 count as done.
    kill_at = 3 if method == "gptq" else 4 + 3
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(recipe), str(out), str(kill_at)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and (tmp_path / "out.work").exists()
    step_dirs = sorted((tmp_path / "out.work").glob("step*"))
    progress = json.loads((step_dirs[-1] / "progress.json").read_text())
    assert progress["done"] == [0, 1]
    run_recipe(load_recipe(recipe), out=out, progress=False, resume=True)
    for f in sorted(p.name for p in whole.iterdir() if p.suffix == ".safetensors" or
                    p.name in ("quantization.json", "model.safetensors.index.json")):
        assert filecmp.cmp(whole / f, out / f, shallow=False), f
    assert not (tmp_path / "out.work").exists()
