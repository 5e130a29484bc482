"""The ``distill`` recipe step and ``compactor distill`` on tiny models."""

import json

import pytest
import torch
import yaml

from compactor.cli import main
from compactor.recipe import Recipe, run_recipe

torch.set_num_threads(1)


def _recipe(model, text, steps, **top):
    return Recipe.from_dict({
        "model": str(model),
        "eval": {"data": str(text), "tokens": 256, "window": 64, "speed": False},
        "calibration": {"data": str(text), "samples": 4, "window": 64},
        "stages": [{"name": "s", "steps": steps}], **top})


def _distill(**kw):
    base = dict(data=None, tokens=64 * 4 * 3, window=64, batch=4, micro_batch=2, eval_tokens=256,
                checkpoint_every=1, lr=1e-3)
    base.update(kw)
    return {"distill": {k: v for k, v in base.items() if v is not None}}


def test_drop_layers_then_distill_maps_hidden_states_to_the_kept_layers(tiny_dir, text_file, tmp_path):
    from compactor.models.tiny import tiny_model

    four = tiny_model(num_hidden_layers=4)
    four.save_pretrained(tiny_dir)
    r = _recipe(tiny_dir, text_file, [{"drop_layers": {"layers": [1, 2]}},
                                      _distill(data=str(text_file), hidden_mse=1.0)])
    ctx = run_recipe(r, out=tmp_path / "out")
    rep = next(x for x in ctx.reports if x["step"] == "distill")
    assert rep["layer_map"] == [0, 3] and rep["steps"] == 3 and rep["tokens"] == 64 * 4 * 3
    assert rep["after"]["kld"] < rep["before"]["kld"]
    assert "hidden_mse" in rep["final_terms"]
    assert not (tmp_path / "out.work").exists()  # checkpoints are removed once the output is in place
    saved = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert any(x["step"] == "distill" for x in saved["reports"])
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["stages"][0]["steps"][1]["distill"]["hidden_mse"] == 1.0


def test_progressive_and_self_distillation_are_recipes(tiny_dir, text_file):
    from compactor.models.tiny import tiny_model

    tiny_model(num_hidden_layers=4).save_pretrained(tiny_dir)
    steps = [_distill(data=str(text_file), student="layers:every-other"),  # teacher -> intermediate
             _distill(data=str(text_file), teacher="current", student="layers:1")]  # intermediate -> student
    ctx = run_recipe(_recipe(tiny_dir, text_file, steps))
    reps = [x for x in ctx.reports if x["step"] == "distill"]
    assert ctx.model.config.num_hidden_layers == 1 and reps[0]["layer_map"] == [0, 2]
    born_again = run_recipe(_recipe(tiny_dir, text_file, [_distill(data=str(text_file), student="random")]))
    assert born_again.model.config.num_hidden_layers == 4


def test_cli_distill_writes_a_loadable_student(tiny_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COMPACTOR_HOME", str(tmp_path / "home"))  # the teacher cache goes there
    out = tmp_path / "student"
    rc = main(["distill", "--teacher", str(tiny_dir), "--student", "layers:1", "--train-data", str(text_file),
               "--calib-data", str(text_file), "--eval-data", str(text_file), "--eval-tokens", "256",
               "--train-tokens", "768", "--train-window", "64", "--eval-window", "64", "--calib-window", "64", "--batch", "4", "--micro-batch", "2", "--kl", "1",
               "--ce", "0", "--signal", "cache", "--top-k", "8", "--no-speed", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "KLD vs teacher" in text and "1 process" in text
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 1
    assert list((tmp_path / "home" / "teacher-cache").glob("*/shard_*.npz"))


def test_cli_distill_bad_input(tiny_dir, text_file, tmp_path, capsys):
    args = ["distill", "--teacher", str(tiny_dir), "--train-data", str(text_file), "--eval-data", str(text_file),
            "--calib-data", str(text_file), "--train-window", "64", "--eval-window", "64", "--calib-window", "64", "--out", str(tmp_path / "o")]
    assert main(args + ["--train-tokens", "0"]) == 2
    assert "tokens must be > 0" in capsys.readouterr().err
    assert main(args + ["--student", "config:hidden_size=128,intermediate_size=512"]) == 2
    assert "should be smaller" in capsys.readouterr().err
    (tmp_path / "o.work" / "distill-distill-0" / "checkpoints" / "step_0000001").mkdir(parents=True)
    ((tmp_path / "o.work" / "distill-distill-0" / "checkpoints" / "step_0000001" / "state.json")
     .write_text('{"step": 1, "fingerprint": "elsewhere"}'))
    assert main(args + ["--train-tokens", "256", "--batch", "4", "--micro-batch", "2", "--resume"]) == 2
    assert "another run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_vocabulary_mismatch_refused(tiny, tmp_path, tok):
    from compactor.distill.student import build_student
    from compactor.errors import CompactorError
    from compactor.models.tiny import tiny_model

    d = tmp_path / "big-vocab"
    tiny_model(vocab_size=300).save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(CompactorError, match="vocabulary mismatch"):
        build_student(tiny, str(d))


def test_cli_distill_under_torchrun_writes_once(tiny_dir, text_file, tmp_path):
    import os
    import subprocess
    import sys

    from tests.torchrun import failure

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29519", "-m", "compactor.cli", "distill", "--teacher", str(tiny_dir),
                        "--student", "layers:1", "--train-data", str(text_file), "--calib-data", str(text_file),
                        "--eval-data", str(text_file), "--eval-tokens", "256", "--train-tokens", "1024",
                        "--train-window", "64", "--eval-window", "64", "--calib-window", "64", "--batch", "4", "--micro-batch", "2", "--no-speed", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, failure(r)
    assert r.stdout.count("wrote ") == 1 and "2 process(es)" in r.stdout
    rep = next(x for x in json.loads((out / "provenance.json").read_text())["reports"] if x["step"] == "distill")
    assert rep["processes"] == 2 and rep["steps"] == 4
    assert not (tmp_path / "ddp.work").exists()


def test_sequence_kd_on_policy_and_checkpointing_options_run(tiny_dir, text_file, tmp_path):
    from compactor.data.windows import windows_for
    from compactor.distill.teacher import generate_windows
    from compactor.models.tiny import tiny_model, tiny_tokenizer

    teacher = tiny_model()
    ids = windows_for(tiny_tokenizer(), str(text_file), 64).input_ids[:3]
    gen = generate_windows(teacher, ids, 16, seed=0, progress=False)
    assert gen.shape == ids.shape and torch.equal(gen[:, :16], ids[:, :16]) and not torch.equal(gen, ids)
    assert torch.equal(gen, generate_windows(teacher, ids, 16, seed=0, progress=False))  # seeded

    r = _recipe(tiny_dir, text_file, [_distill(data=str(text_file), student="same", sequence_kd=True,
                                               prompt_len=16)])
    ctx = run_recipe(r, out=tmp_path / "seq")
    assert next(x for x in ctx.reports if x["step"] == "distill")["steps"] == 3
    r = _recipe(tiny_dir, text_file, [_distill(data=str(text_file), student="same", on_policy=1.0, prompt_len=16,
                                               gradient_checkpointing=True, eval_every=1)])
    ctx = run_recipe(r)
    rep = next(x for x in ctx.reports if x["step"] == "distill")
    assert rep["steps"] == 3 and rep["final_terms"]["kl"] > 0
    assert [e["step"] for e in rep["evals"]] == [0, 1, 2, 3]
