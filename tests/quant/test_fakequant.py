"""Fake quantization equals the file: after training steps that move weights and scales, the
exported codes dequantize (through gguf.quants, llama.cpp's reference reader) to exactly the
module's forward weight, for every grid; the straight-through gradient is the identity inside
the range; LSQ's scale gradient matches its formula."""

import pytest
import torch

from compactor.errors import CompactorError
from compactor.primitives.fakequant import fake_quant_reference, fake_quant_values, round_to_level
from compactor.primitives.ggml import GGML_TYPES, ggml_qparams
from compactor.primitives.grids import choose_qparams, nf4_qparams
from compactor.primitives.packing import dequantize_ggml_bytes, pack_ggml
from compactor.quant.fakequant import FakeQuantLinear
from compactor.quant.qlinear import QuantizedLinear


def _weights(seed=0, out=6, n=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * 0.05
    w[0, :40] = 0.0  # a dead block
    w[1, 7] = 1.5  # an outlier
    w[2] = w[2].abs()  # an all-positive row
    return w


def _train(m: FakeQuantLinear, seed: int, steps: int = 5, lr: float = 1e-2) -> None:
    """A few SGD steps on a random regression: weights and scales both move."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, m.in_features, generator=g)
    target = torch.randn(32, m.out_features, generator=g)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(steps):
        opt.zero_grad()
        ((m(x) - target) ** 2).mean().backward()
        opt.step()
    moved = [n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "weight" in moved and len(moved) >= 2, moved  # the test must exercise learned scales


def _quantized(w, qp, label):
    return QuantizedLinear(qp.quantize(w), qp, label, 4.5)


@pytest.mark.parametrize("name", list(GGML_TYPES))
@pytest.mark.parametrize("seed", [0, 1])
def test_gguf_file_dequant_equals_trained_fake_quant(name, seed):
    w = _weights(seed)
    q = _quantized(w, ggml_qparams(w, name, search=True), name)
    m = FakeQuantLinear.from_quantized(q, learn_scales=True, learn_offsets=True)
    assert torch.equal(m.current_codes(), q.codes.to(torch.int32))  # starts on the PTQ codes
    assert torch.equal(m.fake_weight(), q.qparams.dequantize(q.codes.to(torch.int32)))
    _train(m, seed)
    hard = m.to_quantized()
    packed = pack_ggml(hard.codes, hard.qparams, name)
    file_w = dequantize_ggml_bytes(packed, name, tuple(w.shape))
    assert (file_w - m.fake_weight().detach()).abs().max().item() == 0.0
    assert torch.equal(hard.weight, file_w)


@pytest.mark.parametrize("bits,sym,group", [(4, True, 128), (4, False, 64), (3, True, -1), (8, False, 0),
                                            (2, False, 32)])
def test_int_grids_equal_their_dequantized_codes(bits, sym, group):
    w = _weights(3)
    q = _quantized(w, choose_qparams(w, bits, sym, group), "int")
    m = FakeQuantLinear.from_quantized(q, learn_scales=True)
    _train(m, 3)
    hard = m.to_quantized()
    assert torch.equal(hard.qparams.dequantize(hard.codes.to(torch.int32)), m.fake_weight().detach())
    assert hard.codes.min() >= hard.qparams.qmin and hard.codes.max() <= hard.qparams.qmax


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_equals_its_codes(double_quant):
    w = _weights(4)
    qp = nf4_qparams(w, 64, double_quant=double_quant)
    q = _quantized(w, qp, "nf4_g64")
    if double_quant:
        with pytest.raises(CompactorError, match="double-quantized"):
            FakeQuantLinear.from_quantized(q, learn_scales=True)
    m = FakeQuantLinear.from_quantized(q, learn_scales=not double_quant)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.add_(torch.randn(w.shape, generator=g) * 0.01)
    hard = m.to_quantized()
    assert torch.equal(hard.qparams.dequantize(hard.codes.to(torch.int32)), m.fake_weight().detach())
    if double_quant:
        assert set(hard.qparams.extra) >= {"scale_codes", "scale_scales", "scale_mean"}


def test_fp8_trains_and_refuses_export():
    lin = torch.nn.Linear(64, 8)
    m = FakeQuantLinear.fp8(lin)
    v = m.fake_weight()
    scale = lin.weight.detach().abs().amax(1, keepdim=True) / 448
    assert torch.equal(v.detach(), (lin.weight.detach() / scale).to(torch.float8_e4m3fn).float() * scale)
    v.sum().backward()
    assert torch.equal(m.weight.grad, torch.ones_like(m.weight))
    with pytest.raises(CompactorError, match="FP8"):
        m.to_quantized()


def test_ste_is_identity_inside_the_range_and_zero_outside():
    y = torch.tensor([-9.0, -8.0, -3.4, 0.2, 6.9, 7.0, 7.6, 12.0], requires_grad=True)
    g = torch.arange(1.0, 9.0)
    (round_to_level(y, -8, 7) * g).sum().backward()
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(y.grad, g * inside)
    cb = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0])
    y2 = torch.tensor([-1.5, -0.6, 0.3, 0.99, 1.2], requires_grad=True)
    out = round_to_level(y2, 0, 4, cb)
    assert torch.equal(out.detach(), torch.tensor([-1.0, -0.25, 0.5, 1.0, 1.0]))
    out.sum().backward()
    assert torch.equal(y2.grad, torch.tensor([0.0, 1, 1, 1, 0]))


def test_lsq_scale_gradient_matches_its_formula():
    """∂/∂s Σ g·v with v = s·clamp(round(w/s)): g·(level − w/s) inside the range, g·level outside."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=g)
    s = torch.full((3, 1), 0.2, requires_grad=True)
    up = torch.randn(3, 8, generator=g)
    (fake_quant_values(w, s, None, 8, -4, 3) * up).sum().backward()
    y = w / 0.2
    level = torch.round(y).clamp(-4, 3)
    inside = (y >= -4) & (y <= 3)
    expect = (up * torch.where(inside, level - y, level)).sum(1, keepdim=True)
    assert torch.allclose(s.grad, expect, atol=1e-5)


def test_frozen_codes_stay_and_scales_still_move():
    w = _weights(5)
    q = _quantized(w, ggml_qparams(w, "q4_0"), "q4_0")
    m = FakeQuantLinear.from_quantized(q, learn_scales=True)
    m.freeze_codes()
    codes = m.current_codes().clone()
    d0 = m.d.detach().clone()
    _train_frozen = torch.optim.SGD(m.parameters(), lr=0.05)
    x = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        _train_frozen.zero_grad()
        (m(x) ** 2).mean().backward()
        assert m.weight.grad is None  # frozen codes: the latent weight gets no gradient
        _train_frozen.step()
    assert torch.equal(m.current_codes(), codes) and not torch.equal(m.d.detach(), d0)
    hard = m.to_quantized()
    assert torch.equal(dequantize_ggml_bytes(pack_ggml(hard.codes, hard.qparams, "q4_0"), "q4_0", (6, 512)),
                       m.fake_weight().detach())


def test_state_dict_round_trip_keeps_frozen_codes():
    w = _weights(6)
    q = _quantized(w, ggml_qparams(w, "q4_k", search=True), "q4_k")
    a = FakeQuantLinear.from_quantized(q, learn_scales=True)
    a.freeze_codes()
    b = FakeQuantLinear.from_quantized(q, learn_scales=True)
    with torch.no_grad():
        b.weight.add_(1.0)  # different latent: only the loaded state may make them agree
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.fake_weight(), b.fake_weight())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["sym", "offset", "codebook"])
def test_fused_fake_quant_equals_autograd_reference(seed, kind):
    """The one-node fake quantization gives the reference's values exactly and its gradients
    (weights, scales, offsets) up to summation order — dead blocks and clipped values included."""
    g = torch.Generator().manual_seed(seed)
    out, n, block = 6, 64, 16
    w = (torch.randn(out, n, generator=g) * 2).requires_grad_(True)
    scale = (torch.rand(out, n // block, generator=g) * 0.3 + 0.05)
    scale[0, 1] = 0.0  # a dead block
    scale.requires_grad_(True)
    offset = (torch.randn(out, n // block, generator=g) * 0.2).requires_grad_(True) if kind == "offset" else None
    cb = torch.tensor([-1.0, -0.5, -0.1, 0.0, 0.2, 0.6, 1.0]) * 4 if kind == "codebook" else None
    qmin, qmax = (0, 15) if kind == "offset" else (-8, 7)
    up = torch.randn(out, n, generator=g)
    leaves = [t for t in (w, scale, offset) if t is not None]
    grads = []
    for fn in (fake_quant_values, fake_quant_reference):
        v = fn(w, scale, offset, block, qmin, qmax, cb)
        grads.append((v.detach().clone(), torch.autograd.grad((v * up).sum(), leaves)))
    (v1, g1), (v2, g2) = grads
    assert torch.equal(v1, v2)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(g1[0][0, 16:32], torch.zeros(16))  # nothing flows through a dead block
