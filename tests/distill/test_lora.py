"""The ``lora`` step: adapters over a quantized base, trained by KD; kept separate (saved,
reloaded, exported as a llama.cpp adapter GGUF and verified there) or merged."""

import pytest
import torch

from compactor.distill.lora import LoRALinear, lora_modules
from compactor.errors import CompactorError
from compactor.evaluate import evaluate
from compactor.data.windows import windows_for
from compactor.quant.qlinear import QuantizedLinear
from compactor.recipe import Recipe, run_recipe

torch.set_num_threads(1)
from test_qat import _text  # noqa: E402


def _recipe(model, text, steps):
    return Recipe.from_dict({
        "model": str(model), "eval": {"data": str(text), "tokens": 512, "window": 64, "speed": False},
        "calibration": {"data": str(text), "samples": 8, "window": 64},
        "stages": [{"name": "s", "steps": steps}]})


def _lora(text, **kw):
    base = dict(data=str(text), tokens=64 * 8 * 10, window=64, batch=8, micro_batch=4, eval_tokens=256,
                eval_data=str(text), checkpoint_every=0, lr=3e-3, precision="fp32", rank=4, alpha=8.0)
    base.update(kw)
    return {"lora": base}


def test_lora_linear_starts_unchanged_and_its_delta_is_b_a():
    base = torch.nn.Linear(16, 8)
    m = LoRALinear(base, 4, 8.0, torch.Generator().manual_seed(0))
    x = torch.randn(3, 16)
    assert torch.equal(m(x), base(x))
    with torch.no_grad():
        m.lora_B.normal_()
    naive = base(x) + x @ (m.lora_B @ m.lora_A).T * 2.0
    assert torch.allclose(m(x), naive, atol=1e-5) and torch.allclose(m.delta(), m.lora_B @ m.lora_A * 2.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_kd_lora_over_a_q4_base_recovers_held_out_kld_and_exports_beside_the_base(tmp_path, tok, seed):
    pytest.importorskip("llama_cpp")
    from compactor.models.load import load_model
    from compactor.models.tiny import tiny_model

    d = tmp_path / "m"
    tiny_model(seed=seed).save_pretrained(d)
    tok.save_pretrained(d)
    train, ev = _text(tmp_path / "train.txt", 200 + seed), _text(tmp_path / "eval.txt", 800 + seed)
    rtn = {"rtn": {"grid": "q4_0"}}
    out = tmp_path / "out"
    ctx = run_recipe(_recipe(d, train, [rtn, _lora(train, seed=seed, qlora=True),
                                        {"export": {"format": "gguf"}}]), out=out, progress=False)
    assert len(lora_modules(ctx.model)) == 14  # 7 linears x 2 layers, every base quantized
    assert all(isinstance(m.base, QuantizedLinear) for m in lora_modules(ctx.model).values())
    ref = load_model(str(d)).model
    win = windows_for(ctx.loaded.tokenizer, str(ev), 64, max_tokens=1024)
    base = run_recipe(_recipe(d, train, [rtn]), progress=False).model
    k_base = evaluate(base, win, reference=ref, speed=False, progress=False).kld_mean
    k_lora = evaluate(ctx.model, win, reference=ref, speed=False, progress=False).kld_mean
    assert k_lora < 0.9 * k_base, (k_base, k_lora)
    # kept separate: base file + adapter file, verified together in llama.cpp by the export
    assert (out / "model.gguf").exists() and (out / "model.lora.gguf").exists()
    rep = next(r for r in ctx.reports if r["step"] == "export")
    assert rep["verification"]["passed"] and rep["lora_adapter"]["rank"] == 4
    # reloaded: the same adapters on the same codes
    again = load_model(str(out)).model
    x = win.input_ids[:2]
    assert torch.allclose(again(x).logits, ctx.model(x).logits, atol=1e-5)
    # the adapter file really changes llama.cpp's output (not a silently ignored file)
    from compactor.evaluate.backends import LlamaCppBackend

    merged = run_recipe(Recipe.from_dict({
        "model": str(out), "reference": str(d), "eval": {"data": str(ev), "tokens": 512, "window": 64, "speed": False},
        "calibration": {"data": str(train), "samples": 8, "window": 64},
        "stages": [{"name": "m", "steps": [{"lora_merge": {"merge": "requantize"}}]}]}), progress=False)
    assert not lora_modules(merged.model) and isinstance(merged.model.model.layers[0].mlp.up_proj, QuantizedLinear)
    plain = LlamaCppBackend(out / "model.gguf").window_logits(win.input_ids[0])
    with_a = LlamaCppBackend(out / "model.gguf", lora_path=out / "model.lora.gguf").window_logits(win.input_ids[0])
    assert (plain - with_a).abs().max() > 1e-2


def test_merge_paths_leave_plain_modules(tiny_dir, tmp_path):
    train = _text(tmp_path / "t.txt", 3)
    for merge, kind in (("requantize", QuantizedLinear), ("float", torch.nn.Linear)):
        ctx = run_recipe(_recipe(tiny_dir, train, [{"rtn": {"grid": "q4_0"}}, _lora(train, merge=merge)]),
                         progress=False)
        assert not lora_modules(ctx.model)
        layer = ctx.model.model.layers[0].self_attn
        assert type(layer.q_proj) is kind
        rep = next(r for r in ctx.reports if r["step"] == "lora")
        assert rep["merged"] == 14 and rep["after"]["kld"] < rep["before"]["kld"]


def test_bad_lora_requests_are_refused_before_training(tiny_dir, tmp_path):
    train = _text(tmp_path / "t.txt", 4)
    with pytest.raises(CompactorError, match="match no module.*QuantizedLinear"):
        run_recipe(_recipe(tiny_dir, train, [{"rtn": {"grid": "q4_0"}}, _lora(train, targets=["nothing_here"])]),
                   progress=False)
    with pytest.raises(CompactorError, match="qlora needs a quantized base"):
        run_recipe(_recipe(tiny_dir, train, [_lora(train, qlora=True)]), progress=False)
    with pytest.raises(CompactorError, match="requantize"):
        run_recipe(_recipe(tiny_dir, train, [{"rtn": {"grid": "int", "group_size": 32}},
                                             _lora(train, merge="requantize")]), progress=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eora_beats_plain_svd_on_held_out_inputs_and_svd_is_the_frobenius_optimum(seed):
    from compactor.distill.lora import low_rank_error

    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(24, 32, generator=g)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)  # anisotropic inputs
    x_cal, x_held = torch.randn(2000, 32, generator=g) @ mix, torch.randn(2000, 32, generator=g) @ mix
    b, a = low_rank_error(delta, 4)
    u, s, vh = torch.linalg.svd(delta)
    assert torch.allclose(b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-4)
    be, ae = low_rank_error(delta, 4, x_cal.T @ x_cal / len(x_cal))
    err = lambda bb, aa: ((delta - bb @ aa) @ x_held.T).pow(2).sum()
    assert err(be, ae) < 0.8 * err(b, a)  # scored on inputs it did not see


def test_training_free_eora_init_already_lowers_held_out_kld(tiny_dir, tmp_path):
    from compactor.models.load import load_model

    train, ev = _text(tmp_path / "t.txt", 11), _text(tmp_path / "e.txt", 12)
    rtn = {"rtn": {"grid": "int", "bits": 3, "group_size": 32}}
    # one optimizer step at a negligible learning rate: what is measured is the initialization
    frozen = dict(tokens=64 * 8, lr=1e-12, warmup=0.0)
    base = run_recipe(_recipe(tiny_dir, train, [rtn]), progress=False).model
    eora = run_recipe(_recipe(tiny_dir, train, [rtn, _lora(train, init="eora", **frozen)]), progress=False).model
    zeros = run_recipe(_recipe(tiny_dir, train, [rtn, _lora(train, init="zeros", **frozen)]), progress=False).model
    ref = load_model(str(tiny_dir)).model
    win = windows_for(load_model(str(tiny_dir)).tokenizer, str(ev), 64, max_tokens=1024)
    k = {n: evaluate(m, win, reference=ref, speed=False, progress=False).kld_mean
         for n, m in (("base", base), ("eora", eora), ("zeros", zeros))}
    assert abs(k["zeros"] - k["base"]) < 1e-4 and k["eora"] < 0.9 * k["base"], k
