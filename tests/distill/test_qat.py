"""The ``qat`` step: quantization-aware distillation from PTQ codes, scored on held-out text,
hardened into codes that export unchanged, resumed bit-identically after a kill."""

import pytest
import torch

from compactor.errors import CompactorError
from compactor.evaluate import evaluate
from compactor.data.windows import windows_for
from compactor.quant.fakequant import FakeQuantLinear
from compactor.quant.qlinear import QuantizedLinear
from compactor.recipe import Recipe, run_recipe

torch.set_num_threads(1)

WORDS = ("the of and to a in that it was her she he had for with as his not be but at on you "
         "by this which all have so were my from they an one or when there very would could").split()


def _text(path, seed, lines=60):
    g = torch.Generator().manual_seed(seed)
    rows = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (14,), generator=g).tolist())
            for _ in range(lines)]
    path.write_text("\n".join(rows))
    return path


def _recipe(model, train, ev, steps, calib=None):
    return Recipe.from_dict({
        "model": str(model),
        "eval": {"data": str(ev), "tokens": 512, "window": 64, "speed": False},
        "calibration": {"data": str(calib or train), "samples": 8, "window": 64},
        "stages": [{"name": "s", "steps": steps}]})


def _qat(train, **kw):
    base = dict(data=str(train), tokens=64 * 8 * 12, window=64, batch=8, micro_batch=4, eval_tokens=256,
                eval_data=str(train), checkpoint_every=4, lr=3e-3, precision="fp32")
    base.update(kw)
    return {"qat": base}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qad_beats_its_ptq_init_on_held_out_text(tmp_path, tok, seed):
    from compactor.models.tiny import tiny_model

    d = tmp_path / f"tiny{seed}"
    tiny_model(seed=seed).save_pretrained(d)
    tok.save_pretrained(d)
    train, ev = _text(tmp_path / "train.txt", 100 + seed), _text(tmp_path / "eval.txt", 900 + seed)
    rtn = {"rtn": {"grid": "int", "bits": 3, "group_size": 32}}
    ptq = run_recipe(_recipe(d, train, ev, [rtn]), progress=False)
    qat = run_recipe(_recipe(d, train, ev, [rtn, _qat(train, seed=seed)]), progress=False)
    # held-out windows: another text, never trained on, scored against the float original
    from compactor.models.load import load_model

    ref = load_model(str(d)).model
    win = windows_for(ptq.loaded.tokenizer, str(ev), 64, max_tokens=1024)
    k_ptq = evaluate(ptq.model, win, reference=ref, speed=False, progress=False).kld_mean
    k_qat = evaluate(qat.model, win, reference=ref, speed=False, progress=False).kld_mean
    assert k_qat < 0.9 * k_ptq, (k_ptq, k_qat)
    # the result is a quantized model again, on the same grid geometry
    mods = [m for m in qat.model.modules() if isinstance(m, QuantizedLinear)]
    assert mods and not any(isinstance(m, FakeQuantLinear) for m in qat.model.modules())
    assert {m.label for m in mods} == {"int3_sym_g32"}
    rep = next(r for r in qat.reports if r["step"] == "qat")
    assert rep["after"]["kld"] < rep["before"]["kld"]


def test_qat_needs_a_quantized_model(tiny_dir, text_file):
    with pytest.raises(CompactorError, match="needs a quantized model"):
        run_recipe(_recipe(tiny_dir, text_file, text_file, [_qat(text_file)]), progress=False)


def test_scales_only_keeps_the_ptq_codes(tiny_dir, tmp_path):
    train = _text(tmp_path / "t.txt", 5)
    rtn = {"rtn": {"grid": "q4_0"}}
    ptq = run_recipe(_recipe(tiny_dir, train, train, [rtn]), progress=False)
    qat = run_recipe(_recipe(tiny_dir, train, train, [rtn, _qat(train, learn="scales", tokens=64 * 8 * 3)]),
                     progress=False)
    a = {n: m for n, m in ptq.model.named_modules() if isinstance(m, QuantizedLinear)}
    b = {n: m for n, m in qat.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n].codes, b[n].codes) for n in a)
    assert any(not torch.equal(a[n].qparams.scale, b[n].qparams.scale) for n in a)


def test_freeze_codes_fixes_them_for_the_last_steps(tiny_dir, tmp_path):
    train = _text(tmp_path / "t.txt", 6)
    qat = run_recipe(_recipe(tiny_dir, train, train, [{"rtn": {"grid": "q4_0"}},
                                                      _qat(train, freeze_codes=0.5, tokens=64 * 8 * 4)]),
                     progress=False)
    rep = next(r for r in qat.reports if r["step"] == "qat")
    assert rep["frozen_modules"] == rep["modules"] > 0


def test_sigkilled_qat_resumes_to_identical_codes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    script = str(Path(__file__).parent / "qat_run.py")
    run = lambda *a, check=True: subprocess.run([sys.executable, script, *map(str, a)], capture_output=True,
                                                text=True, check=check)
    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    run(tmp_path / "full", tmp_path / "full.st")
    killed = run(tmp_path / "cut", tmp_path / "cut.st", "--kill-at", "7", check=False)  # freeze at 6, resume from 6
    assert killed.returncode == -9 and not (tmp_path / "cut.st").exists()
    run(tmp_path / "cut", tmp_path / "cut.st", "--resume")
    full, cut = load_file(str(tmp_path / "full.st")), load_file(str(tmp_path / "cut.st"))
    assert full.keys() == cut.keys() and full
    for k in full:
        assert torch.equal(full[k], cut[k]), k


def test_a_grid_the_export_cannot_hold_is_refused_before_training(tiny_dir, tmp_path):
    train = _text(tmp_path / "t.txt", 7)
    r = _recipe(tiny_dir, train, train, [{"rtn": {"grid": "int", "bits": 4, "group_size": 32}}, _qat(train),
                                         {"export": {"format": "gguf"}}])
    with pytest.raises(CompactorError, match="not a GGUF block type"):
        run_recipe(r, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists() or \
        not list((tmp_path / "out.work").glob("qat-*"))


def test_cli_qat_exports_exactly_the_trained_codes_to_gguf(tiny_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from compactor.cli import main
    from compactor.models.load import load_model

    train = _text(tmp_path / "t.txt", 8)
    out = tmp_path / "qat"
    args = ["qat", str(tiny_dir), "--grid", "q4_0", "--init", "rtn", "--train-data", str(train), "--train-tokens", "1536",
            "--train-window", "64", "--eval-window", "64", "--calib-window", "64", "--batch", "8", "--micro-batch", "4", "--lr", "3e-3", "--precision", "fp32",
            "--calib-data", str(train), "--samples", "4", "--eval-data", str(train), "--eval-tokens", "256",
            "--no-speed", "--export", "gguf", "--out", str(out)]
    assert main(args) == 0
    assert "KLD vs teacher" in capsys.readouterr().out
    with_lora = args[:-1] + [str(tmp_path / "qat-lora"), "--lora-rank", "2"]
    assert main(with_lora) == 0
    assert (tmp_path / "qat-lora" / "model.lora.gguf").exists()
    model = load_model(str(out)).model  # codes restored from quantization-*.safetensors
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    reader = GGUFReader(str(out / "model.gguf"))
    by_name = {t.name: t for t in reader.tensors}
    w = qmods["model.layers.0.mlp.down_proj"].weight
    t = by_name["blk.0.ffn_down.weight"]
    file_w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(w.shape)
    assert (torch.from_numpy(file_w) - w.float()).abs().max().item() == 0.0
    # the grid an export cannot hold: refused with exit 2 before training, nothing written
    bad = args[:]
    bad[bad.index("q4_0")] = "int"
    bad[bad.index(str(out))] = str(tmp_path / "bad")
    assert main(bad + ["--group-size", "32"]) == 2
    assert "not a GGUF block type" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prune_distill_then_qad_then_export(tmp_path, tok):
    """prune → distill → quantize → QAD → export, in one recipe (a student, not the teacher's
    own shape, is trained in the grid; the teacher is the original)."""
    pytest.importorskip("llama_cpp")
    from compactor.models.tiny import tiny_model

    d = tmp_path / "four"
    tiny_model(num_hidden_layers=4).save_pretrained(d)
    tok.save_pretrained(d)
    train = _text(tmp_path / "t.txt", 9)
    distill = dict(_qat(train)["qat"], ce=0.5, kl=0.5, lr=1e-3, tokens=64 * 8 * 4)
    ctx = run_recipe(_recipe(d, train, train, [{"drop_layers": {"layers": [1, 2]}}, {"distill": distill},
                                               {"rtn": {"grid": "q4_0"}}, _qat(train, tokens=64 * 8 * 4),
                                               {"export": {"format": "gguf"}}]),
                     out=tmp_path / "out", progress=False)
    rep = next(r for r in ctx.reports if r["step"] == "qat")
    assert ctx.model.config.num_hidden_layers == 2 and rep["after"]["kld"] < rep["before"]["kld"]
    assert next(r for r in ctx.reports if r["step"] == "export")["verification"]["passed"]
