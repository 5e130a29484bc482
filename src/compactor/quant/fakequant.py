"""``FakeQuantLinear``: a trainable linear layer that computes in the exact deployed grid.

It holds a float latent weight and the grid's parameters in the format's own terms — for a
GGUF type the fp16 block scale ``d`` (Q4_0, Q5_0, Q8_0, IQ4_NL), ``d`` and the fp16 minimum
``m`` (Q4_1, Q5_1), or the fp16 super-block scales ``d``/``dmin`` over fixed integer sub-block
scales (K-quants) — so any learned scale is one the file can store. ``to_quantized`` turns it
back into a :class:`QuantizedLinear` whose codes and parameters the exporters pack unchanged:
the file's dequantized weight equals this module's forward weight exactly.

Two data-free steps route through the walker: ``fake_quant`` (QuantizedLinear → this module,
codes kept) and ``harden`` (this module → QuantizedLinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactor.config import StepConfig
from compactor.errors import CompactorError
from compactor.primitives.fakequant import dequant_codes, fake_quant_values, fp8_fake_quant, round_fp16
from compactor.primitives.ggml import GGML_TYPES, QK_K
from compactor.primitives.grids import FP8_E4M3_MAX
from compactor.primitives.qparams import QParams
from compactor.quant.qlinear import QuantizedLinear, code_dtype
from compactor.registry import register

#: how each grid family parametrizes its scales (see the module docstring)
_LAYOUT = {"q8_0": "d", "q4_0": "d", "q5_0": "d", "iq4_nl": "d", "q4_1": "dm", "q5_1": "dm",
           "q4_k": "kmin", "q5_k": "kmin", "q2_k": "kmin", "q6_k": "ksym", "q3_k": "ksym"}


def _layout(label: str, qp: QParams | None) -> str:
    if label == "fp8_e4m3":
        return "fp8"
    if label in _LAYOUT:
        return _LAYOUT[label]
    if qp is not None and "scale_codes" in qp.extra:
        return "fixed"  # NF4 with double-quantized scales: the scales are themselves codes
    return "free"  # int grids, plain NF4: a float32 scale per group (+ integer zero point)


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward weight is ``dequantize(quantize(w))`` on a fixed grid
    geometry, with straight-through gradients to ``w`` and (optionally) learned scales.

    ``learn_scales``: the grid's scales are parameters (LSQ-style gradients); ``learn_offsets``:
    so are the offsets of grids that have a learnable one (Q4_1/Q5_1 minima, K-quant ``dmin``) —
    the learned lower clipping bound. Symmetric grids clip at ``qmax·s``, so learning the scale
    is learning their clipping. :meth:`freeze_codes` fixes the codes (only scales still move).
    """

    def __init__(self, weight: torch.Tensor, qp: QParams | None, label: str, bits_per_weight: float,
                 bias: torch.Tensor | None = None, learn_scales: bool = False, learn_offsets: bool = False,
                 codes: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.label, self.bits_per_weight = label, float(bits_per_weight)
        self.layout = _layout(label, qp)
        if learn_scales and self.layout == "fixed":
            raise CompactorError(f"{label}: its block scales are double-quantized codes; learned scales "
                                 "are not available on this grid (train the weights only)")
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("frozen", torch.tensor(False))
        dt = torch.int8 if qp is None else code_dtype(qp)
        self.register_buffer("codes", torch.zeros(weight.shape, dtype=dt))
        if self.layout == "fp8":
            s = (weight.detach().float().abs().amax(1, keepdim=True) / FP8_E4M3_MAX).clamp_min(
                torch.finfo(torch.float32).tiny)
            self._param("fp8_scale", s, learn_scales)
            return
        self.block, self.qmin, self.qmax = qp.block, qp.qmin, qp.qmax
        self.register_buffer("codebook", None if qp.codebook is None else qp.codebook.clone())
        self._init_params(qp, learn_scales, learn_offsets)
        if codes is not None:  # start exactly on the given codes (a PTQ result)
            got = self.current_codes()
            if not torch.equal(got, codes.to(got.dtype)):
                n = int((got != codes.to(got.dtype)).sum())
                raise CompactorError(f"{label}: {n} codes of the initial weight do not round back to "
                                     "the quantized model's codes")

    # ---- parameters in the format's terms ----------------------------------------------
    def _param(self, name: str, value: torch.Tensor, learn: bool) -> None:
        value = value.detach().float().clone()
        if learn:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _init_params(self, qp: QParams, learn_scales: bool, learn_offsets: bool) -> None:
        e, lay = qp.extra, self.layout
        out = self.out_features
        if lay in ("d", "dm"):
            self._param("d", e["d"], learn_scales)
            if lay == "dm":
                self._param("m", e["m"], learn_offsets)
        elif lay in ("kmin", "ksym"):
            t = GGML_TYPES[self.label]
            per = QK_K // t.sub
            self._param("d", e["d"], learn_scales)
            self.register_buffer("sc", e["sc"].float().reshape(out, -1, per).clone())
            if lay == "kmin":
                self._param("dmin", e["dmin"], learn_offsets)
                self.register_buffer("mi", e["m"].float().reshape(out, -1, per).clone())
        else:  # free / fixed
            self._param("scale", qp.scale, learn_scales and lay == "free")
            zp = e.get("zero_point")
            self.register_buffer("zero_point", None if zp is None else zp.float().clone())

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective ``(scale, offset) [out, in/block]`` exactly as the file will hold them."""
        lay, out = self.layout, self.out_features
        if lay == "d":
            return round_fp16(self.d), None
        if lay == "dm":  # value = d*q + m  ==  scale*q - offset, offset = -m
            return round_fp16(self.d), -round_fp16(self.m)
        if lay == "kmin":  # float(d)*sc, float(dmin)*m, as ggml dequantizes
            scale = (round_fp16(self.d)[..., None] * self.sc).reshape(out, -1)
            return scale, (round_fp16(self.dmin)[..., None] * self.mi).reshape(out, -1)
        if lay == "ksym":
            return (round_fp16(self.d)[..., None] * self.sc).reshape(out, -1), None
        off = None if self.zero_point is None else self.zero_point * self.scale
        return self.scale, off

    def fake_weight(self) -> torch.Tensor:
        """The forward weight ``[out, in]`` (float32): the deployed values, differentiable."""
        if self.layout == "fp8":
            return fp8_fake_quant(self.weight, self.fp8_scale)
        scale, offset = self.scale_offset()
        if bool(self.frozen):
            return dequant_codes(self.codes, scale, offset, self.block, self.codebook)
        return fake_quant_values(self.weight, scale, offset, self.block, self.qmin, self.qmax, self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.fake_weight().to(x.dtype), self.bias)

    # ---- codes and export --------------------------------------------------------------
    def qparams(self) -> QParams:
        """The grid as it stands, with the integers an exporter packs (``extra``)."""
        if self.layout == "fp8":
            raise CompactorError(f"{self.label}: no export format compactor writes holds FP8 weights")
        with torch.no_grad():
            scale, offset = (t if t is None else t.detach().clone() for t in self.scale_offset())
            lay = self.layout
            if lay == "d":
                extra = {"d": round_fp16(self.d).half()}
            elif lay == "dm":
                extra = {"d": round_fp16(self.d).half(), "m": round_fp16(self.m).half()}
            elif lay == "kmin":
                extra = {"d": round_fp16(self.d).half(), "dmin": round_fp16(self.dmin).half(),
                         "sc": self.sc.to(torch.uint8), "m": self.mi.to(torch.uint8)}
            elif lay == "ksym":
                extra = {"d": round_fp16(self.d).half(), "sc": self.sc.to(torch.int8)}
            else:
                extra = {} if self.zero_point is None else {"zero_point": self.zero_point.to(torch.int32)}
                extra.update(getattr(self, "_fixed_extra", {}))
        return QParams(scale, offset, self.block, self.qmin, self.qmax,
                       None if self.codebook is None else self.codebook.clone(), extra)

    def current_codes(self) -> torch.Tensor:
        """The codes the forward uses now (int32 ``[out, in]``)."""
        if bool(self.frozen):
            return self.codes.to(torch.int32)
        with torch.no_grad():
            return self.qparams().quantize(self.weight)

    def freeze_codes(self) -> None:
        """Fix the codes at their current values; later steps move only the scales."""
        if self.layout == "fp8":
            raise CompactorError("fp8: codes are float8 values of the weight, there is nothing to freeze")
        self.codes.copy_(self.current_codes().to(self.codes.dtype))
        self.frozen.fill_(True)

    def to_quantized(self) -> QuantizedLinear:
        """A :class:`QuantizedLinear` holding exactly this module's codes and grid."""
        qp = self.qparams()
        q = QuantizedLinear(self.current_codes(), qp, self.label, self.bits_per_weight,
                            None if self.bias is None else self.bias.detach(), torch.float32)
        q.note = None
        return q

    @classmethod
    def from_quantized(cls, q: QuantizedLinear, learn_scales: bool = False,
                       learn_offsets: bool = False) -> "FakeQuantLinear":
        """Start from a quantized layer (RTN/GPTQ/AWQ codes): latent weight = its dequantized
        weight, so the initial codes are exactly its codes (checked)."""
        latent = q.qparams.dequantize(q.codes.to(torch.int32))  # float32, whatever q computes in
        m = cls(latent, q.qparams, q.label, q.bits_per_weight, q.bias, learn_scales, learn_offsets,
                codes=q.codes)
        if m.layout == "fixed":
            m._fixed_extra = {k: v for k, v in q.qparams.extra.items() if k != "zero_point"}
        return m

    @classmethod
    def fp8(cls, lin: nn.Linear, learn_scales: bool = False) -> "FakeQuantLinear":
        """float8 e4m3 weights with a per-row absmax scale (training only: no exporter writes
        FP8 weights yet, and :meth:`to_quantized` says so)."""
        return cls(lin.weight, None, "fp8_e4m3", 8.0, lin.bias, learn_scales)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, grid={self.label}, "
                f"learned={[n for n, _ in self.named_parameters(recurse=False) if n != 'weight']}")


@dataclass(frozen=True)
class FakeQuantConfig(StepConfig):
    """Data-free step: every quantized linear becomes a :class:`FakeQuantLinear` on the same
    codes and grid (the start of quantization-aware training)."""

    name = "fake_quant"
    targets: tuple[str, ...] = ("QuantizedLinear",)
    ignore: tuple[str, ...] = ()
    learn_scales: bool = True
    learn_offsets: bool = True
    needs_calibration = False


@register(FakeQuantConfig)
def apply_fake_quant(module: QuantizedLinear, cfg: FakeQuantConfig, name: str = "", stats=None) -> FakeQuantLinear:
    """``QuantizedLinear`` → ``FakeQuantLinear`` (codes unchanged)."""
    if not isinstance(module, QuantizedLinear):
        raise CompactorError(f"{name}: fake_quant needs a quantized linear, got {type(module).__name__}")
    return FakeQuantLinear.from_quantized(module, cfg.learn_scales, cfg.learn_offsets)


@dataclass(frozen=True)
class HardenConfig(StepConfig):
    """Data-free step: every :class:`FakeQuantLinear` becomes the :class:`QuantizedLinear` it
    computes (after training, before export)."""

    name = "harden"
    targets: tuple[str, ...] = ("FakeQuantLinear",)
    ignore: tuple[str, ...] = ()
    needs_calibration = False


@register(HardenConfig)
def apply_harden(module: FakeQuantLinear, cfg: HardenConfig, name: str = "", stats=None) -> QuantizedLinear:
    """``FakeQuantLinear`` → ``QuantizedLinear`` (the trained codes and scales, not re-rounded)."""
    return module.to_quantized()
