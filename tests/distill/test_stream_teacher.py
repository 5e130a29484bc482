"""A teacher bigger than memory: read layer by layer from its shards, it fills the top-k cache
and the evaluation's logit cache, and the student trains as with the teacher in memory."""

import numpy as np
import pytest
import torch

from compactor.errors import CompactorError
from compactor.recipe import Recipe, run_recipe

torch.set_num_threads(1)


def _recipe(student_dir, text, **distill):
    d = dict(teacher=None, signal="cache", top_k=8, data=str(text), tokens=64 * 4 * 2, window=64, batch=4,
             micro_batch=2, eval_tokens=256, eval_data=str(text), checkpoint_every=0, lr=1e-3, ce=0.0, kl=1.0,
             precision="fp32")
    d.update(distill)
    return Recipe.from_dict({
        "model": str(student_dir),
        "eval": {"data": str(text), "tokens": 256, "window": 64, "speed": False},
        "stages": [{"name": "s", "steps": [{"distill": d}]}]})


@pytest.fixture
def teacher_dir(tmp_path, tok):
    from compactor.models.tiny import tiny_model

    d = tmp_path / "teacher"
    tiny_model(num_hidden_layers=3, seed=7).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_streamed_teacher_equals_the_teacher_in_memory(tiny_dir, teacher_dir, text_file, tmp_path):
    from compactor.distill.teacher import TopKCache

    runs = {}
    for stream in (False, True):
        cache = tmp_path / f"cache-{stream}"
        ctx = run_recipe(_recipe(tiny_dir, text_file, teacher=str(teacher_dir), teacher_stream=stream,
                                 cache_dir=str(cache)))
        runs[stream] = (ctx, cache)
    (mem, mem_cache), (st, st_cache) = runs[False], runs[True]
    a, b = sorted(mem_cache.glob("shard_*.npz")), sorted(st_cache.glob("shard_*.npz"))
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):
        with np.load(x) as za, np.load(y) as zb:
            # Same top-k tokens; log-probs equal to float16 rounding.
            assert (za["idx"] == zb["idx"]).mean() > 0.999
            np.testing.assert_allclose(za["logp"].astype(np.float32), zb["logp"].astype(np.float32), atol=2e-3)
    ra = next(r for r in mem.reports if r["step"] == "distill")
    rb = next(r for r in st.reports if r["step"] == "distill")
    assert rb["after"]["kld"] == pytest.approx(ra["after"]["kld"], rel=1e-2)
    assert rb["before"]["teacher_ppl"] == pytest.approx(ra["before"]["teacher_ppl"], rel=1e-4)
    assert rb["after"]["kld"] < rb["before"]["kld"]  # it learned from the streamed teacher
    for pa, pb in zip(mem.model.parameters(), st.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


def test_streamed_teacher_is_never_materialized_whole(tiny_dir, teacher_dir, text_file, monkeypatch):
    from compactor.models.stream import StreamedWeights

    live, peak = set(), []
    orig_layer, orig_done = StreamedWeights.layer, StreamedWeights.done

    def layer(self, model, i, adapter):
        live.add(i)
        peak.append(len(live))
        return orig_layer(self, model, i, adapter)

    def done(self, model, i, adapter, changed=False):
        live.discard(i)
        return orig_done(self, model, i, adapter, changed)

    monkeypatch.setattr(StreamedWeights, "layer", layer)
    monkeypatch.setattr(StreamedWeights, "done", done)
    run_recipe(_recipe(tiny_dir, text_file, teacher=str(teacher_dir), teacher_stream=True))
    assert peak and max(peak) == 1  # one teacher layer in memory at a time


@pytest.mark.parametrize("bad,match", [
    ({"signal": "live"}, "signal: cache"),
    ({"sequence_kd": True}, "sequence_kd"),
    ({"student": "layers:1"}, "current model"),
])
def test_streamed_teacher_refusals(tiny_dir, teacher_dir, text_file, bad, match):
    with pytest.raises(CompactorError, match=match):
        _recipe(tiny_dir, text_file, teacher=str(teacher_dir), teacher_stream=True, **bad)


def test_cli_distill_with_a_streamed_teacher(tiny_dir, teacher_dir, text_file, tmp_path, capsys):
    from compactor.cli import main

    out = tmp_path / "student-out"
    code = main(["distill", "--teacher", str(teacher_dir), "--teacher-stream", "--student", str(tiny_dir),
                 "--train-data", str(text_file), "--train-tokens", str(64 * 4 * 2), "--train-window", "64", "--eval-window", "64", "--calib-window", "64", "--batch", "4",
                 "--micro-batch", "2", "--top-k", "8", "--eval-data", str(text_file), "--eval-tokens", "256",
                 "--no-speed", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    import yaml

    step = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["steps"][0]["distill"]
    assert step["teacher_stream"] is True and step["signal"] == "cache" and step["teacher"] == str(teacher_dir)
