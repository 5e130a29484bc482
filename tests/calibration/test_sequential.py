import copy

import pytest
import torch

from compactor.calibration.activations import Activations
from compactor.calibration.sequential import run_sequential
from compactor.data.windows import make_windows
from compactor.errors import CompactorError
from compactor.models.adapters import adapter_for
from compactor.models.tiny import tiny_model
from compactor.primitives.hessian import HessianAccumulator
from compactor.quant.gptq import GPTQConfig, apply_gptq
from compactor.quant.qlinear import QuantizedLinear


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(0)
    return make_windows(torch.randint(0, 256, (8 * 32,), generator=g).tolist(), length=32)


def _by_hand(model, windows, cfg, batch):
    """Layer by layer, group by group, with a full model forward each time (slow, obvious).

    The forwards take the same batches as the runner: float sums in another order move the
    Hessian by ~1e-6, enough to flip a code, and GPTQ on a tiny random model amplifies one
    flip into hundreds in the next layer."""
    a = adapter_for(model)
    layers = model.model.layers
    for li, layer in enumerate(layers):
        for group in a.sequential_groups:
            acc = HessianAccumulator(layer.get_submodule(group[0]).in_features)
            h = layer.get_submodule(group[0]).register_forward_pre_hook(lambda m, args: acc.add(args[0]))
            with torch.no_grad():
                for s in range(0, len(windows), batch):
                    model(windows.input_ids[s:s + batch], use_cache=False)
            h.remove()
            for n in group:
                layer.set_submodule(n, apply_gptq(layer.get_submodule(n), cfg, name=n, stats=acc))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"])
def test_runner_equals_layer_by_layer_by_hand(windows, family):
    cfg = GPTQConfig(grid="int", bits=4, group_size=32)
    m1 = tiny_model(family)
    m2 = copy.deepcopy(m1)
    rep = run_sequential(m1, windows, apply_gptq, cfg, batch=3, progress=False)
    _by_hand(m2, windows, cfg, batch=3)
    from compactor.models.adapters import adapter_for

    assert len(rep.modules) == 2 * len(adapter_for(m1).linears) and rep.peak_rss_bytes > 0
    for (n1, q1), (n2, q2) in zip(m1.named_modules(), m2.named_modules()):
        if isinstance(q1, QuantizedLinear):
            assert n1 == n2 and (q1.codes != q2.codes).float().mean() < 1e-3, n1


def _held_out(seed: int):
    """Calibration windows and other windows of the same token distribution to score on.

    2,048 calibration tokens for inputs up to 256 wide: with only 256 tokens (8 windows of
    32) the Hessians are near-singular and GPTQ loses to RTN on held-out windows — it had
    only ever been scored on its own calibration windows."""
    g = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, 256, (48 * 64,), generator=g).tolist()
    return make_windows(ids[: 32 * 64], length=64), make_windows(ids[32 * 64:], length=64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_model_beats_rtn_model(seed):
    """KLD against the float model on held-out windows, over several seeds (model and data)."""
    from compactor.api import quantize_
    from compactor.evaluate import evaluate
    from compactor.quant.rtn import RTNConfig

    calib, held = _held_out(seed)
    ref = tiny_model("llama", seed=seed, hidden_size=128, intermediate_size=256, head_dim=32)
    g, r = copy.deepcopy(ref), copy.deepcopy(ref)
    run_sequential(g, calib, apply_gptq, GPTQConfig(grid="q4_0"), progress=False)
    quantize_(r, RTNConfig(grid="q4_0"))
    kl = lambda m: evaluate(m, held, reference=ref, speed=False, progress=False).kld_mean
    assert kl(g) < kl(r)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_shadow_keeps_quality(seed):
    from compactor.api import quantize_
    from compactor.evaluate import evaluate
    from compactor.quant.rtn import RTNConfig

    calib, held = _held_out(seed)
    cfg = GPTQConfig(grid="q4_0")
    ref = tiny_model(seed=seed, hidden_size=128, intermediate_size=256, head_dim=32)
    m32, m16, r = copy.deepcopy(ref), copy.deepcopy(ref), copy.deepcopy(ref)
    run_sequential(m32, calib, apply_gptq, cfg, progress=False)
    run_sequential(m16, calib, apply_gptq, cfg, dtype=torch.bfloat16, progress=False)
    quantize_(r, RTNConfig(grid="q4_0"))
    assert m16.model.layers[1].mlp.down_proj.weight.dtype == torch.float32  # model stays fp32
    kl = lambda m: evaluate(m, held, reference=ref, speed=False, progress=False).kld_mean
    assert kl(m16) < 1.2 * kl(m32) and kl(m16) < kl(r)


def test_empty_calibration_refused():
    from compactor.data.windows import TokenWindows

    empty = TokenWindows(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.bool))
    with pytest.raises(CompactorError, match="calibration data is empty"):
        run_sequential(tiny_model(), empty, apply_gptq, GPTQConfig(), progress=False)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_pass_mode_observes_each_input_separately(seed):
    """true_sequential=False: one forward per layer, but each group keeps its own input."""
    from compactor.api import quantize_
    from compactor.evaluate import evaluate
    from compactor.quant.rtn import RTNConfig

    calib, held = _held_out(seed)
    ref = tiny_model(seed=seed, hidden_size=128, intermediate_size=256, head_dim=32)
    one, r = copy.deepcopy(ref), copy.deepcopy(ref)
    rep = run_sequential(one, calib, apply_gptq, GPTQConfig(grid="q4_0"), true_sequential=False,
                         progress=False)
    assert len(rep.modules) == 14
    quantize_(r, RTNConfig(grid="q4_0"))
    kl = lambda m: evaluate(m, held, reference=ref, speed=False, progress=False).kld_mean
    assert kl(one) < kl(r)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_block_replay_changes_nothing(windows, family):
    """Replaying cached o_proj / down_proj inputs gives the same codes and next-layer
    inputs as recomputing attention and the gate/up projections in every pass."""
    cfg = GPTQConfig(grid="q4_0")
    m1 = tiny_model(family)
    m2 = copy.deepcopy(m1)
    outs = {True: [], False: []}
    for m, replay in ((m1, True), (m2, False)):
        run_sequential(m, windows, apply_gptq, cfg, batch=3, progress=False, replay=replay,
                       on_layer=lambda i, x, y, r=replay: outs[r].append(torch.cat(y)))
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)
    for q1, q2 in zip(m1.modules(), m2.modules()):
        if isinstance(q1, QuantizedLinear):
            assert torch.equal(q1.codes, q2.codes)


def test_spilled_activations_give_the_same_codes(windows, tmp_path):
    cfg = GPTQConfig(grid="q4_0")
    m1, m2 = tiny_model("llama", hidden_size=64), tiny_model("llama", hidden_size=64)
    run_sequential(m1, windows, apply_gptq, cfg, batch=3, progress=False)
    seen = []
    real = Activations.append

    def append(self, hidden, kwargs):  # where each batch went: a file, or memory
        real(self, hidden, kwargs)
        seen.append((self.spill_dir, self.nbytes_in_memory()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Activations, "append", append)
        run_sequential(m2, windows, apply_gptq, cfg, batch=3, progress=False, spill_dir=tmp_path / "spill")
    assert len(list((tmp_path / "spill").glob("batch*.bin"))) == 3  # one file per batch
    # The replayed consumers' inputs were cached too (replay stays on), in files, not memory;
    # their files are deleted after each layer.
    assert {d.name for d, _ in seen if d != tmp_path / "spill"} == {"replay-self_attn.o_proj", "replay-mlp.down_proj"}
    assert all(b == 0 for _, b in seen)
    assert not list((tmp_path / "spill").glob("replay-*/*.bin"))
    for (n, q1), (_, q2) in zip(m1.named_modules(), m2.named_modules()):
        if isinstance(q1, QuantizedLinear):
            assert torch.equal(q1.codes, q2.codes), n


def test_spilled_bf16_round_trips(tmp_path):
    from compactor.calibration.activations import Activations

    acts = Activations(tmp_path)
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    acts.append(x, {"k": 1})
    acts[0] = (x * 2, {"k": 1})
    got, kw = acts[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, x * 2) and kw == {"k": 1}
    assert acts.nbytes_in_memory() == 0


def test_phase_seconds_are_recorded_and_fit_in_the_wall_time(windows):
    model = tiny_model(seed=0)
    rep = run_sequential(model, windows, apply_gptq, GPTQConfig(grid="int", bits=4, group_size=32),
                         progress=False)
    assert {"read", "observe", "solve", "propagate"} <= set(rep.phase_seconds)
    assert all(v >= 0 for v in rep.phase_seconds.values())
    assert sum(rep.phase_seconds.values()) <= rep.seconds
