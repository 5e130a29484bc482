"""compressed-tensors checkpoints (transformers and vLLM load them): ``pack-quantized`` for
weight-only models, ``int-quantized`` for W8A8 (int8 weights and int8 input activations,
dynamic per token or static per tensor with our calibrated scale).

Every :class:`QuantizedLinear` on a linear integer grid with an integer zero point maps
exactly: codes ``q`` with ``value = scale * (q - zero)`` become compressed-tensors codes
``q' = q - 2^(b-1)`` and zero point ``zero - 2^(b-1)`` (signed storage), one scheme per
distinct (bits, symmetric, group) combination, targeting modules by name. The
``compressed-tensors`` package writes the tensors and ``quantization_config``; we check that
the packed codes it wrote are ours. Grids that do not fit (K-quant two-level scales, Q4_1's
float minimum, codebooks such as NF4 / IQ4_NL) are refused by name.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from compactor.errors import CompactorError
from compactor.quant.qlinear import QuantizedLinear
from compactor.quant.storage import dequantized_view, quantized_modules


def ct_args(m: QuantizedLinear, name: str) -> tuple[int, bool, int | None]:
    """(bits, symmetric, group size or None for per-channel) of a representable module."""
    qp = m.qparams
    levels = qp.qmax - qp.qmin + 1
    bits = levels.bit_length() - 1
    why = None
    if qp.codebook is not None:
        why = "a non-linear codebook"
    elif "sc" in qp.extra:
        why = "two-level (super-block) scales"
    elif 1 << bits != levels or bits not in (4, 8):
        why = f"{levels} levels (compressed-tensors pack-quantized here: 4 or 8 bits)"
    elif qp.offset is not None and "zero_point" not in qp.extra:
        why = "a float minimum instead of an integer zero point"
    elif qp.offset is None and qp.qmin != -(levels // 2):
        why = f"an unsigned code range {qp.qmin}..{qp.qmax} without zero point"
    elif qp.offset is not None:
        # Written fine, but transformers 5.23 + compressed-tensors 0.20 cannot load packed
        # zero points (shape mismatch on load; vllm-project/llm-compressor#1618): refuse
        # rather than write a checkpoint its runtime rejects.
        why = ("a zero point: asymmetric pack-quantized checkpoints do not load in this "
               "transformers/compressed-tensors pair (llm-compressor issue 1618)")
    if why:
        raise CompactorError(f"{name}: grid {m.label!r} has {why}; it cannot be written as "
                             "compressed-tensors (export it as GGUF, or quantize on an int grid)")
    group = None if qp.block == m.in_features else qp.block
    return bits, qp.offset is None, group


def act_modes(model) -> dict[str, tuple[str, int]]:
    """(mode, bits) of every linear whose input is quantized (W8A8), by module name."""
    from compactor.quant.activations import ActQuantLinear

    return {n: (m.mode, m.bits) for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}


def _schemes(qmods: dict[str, QuantizedLinear], acts: dict[str, tuple[str, int]]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, m in qmods.items():
        groups.setdefault((ct_args(m, name), acts.get(name)), []).append(name)
    schemes = {}
    for i, (((bits, sym, group), act), names) in enumerate(sorted(groups.items(), key=str)):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="group" if group else "channel", group_size=group)
        inputs = None
        if act is not None:
            mode, abits = act
            inputs = QuantizationArgs(num_bits=abits, type="int", symmetric=True,
                                      strategy="token" if mode == "dynamic" else "tensor",
                                      dynamic=mode == "dynamic")
        schemes[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args, input_activations=inputs)
    return schemes


def export_compressed_tensors(model, tokenizer, out: Path, progress: bool = True,
                              float_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write ``model`` as a pack-quantized checkpoint directory ``out`` (must not exist);
    tensors outside the quantized linears are written in ``float_dtype``."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise CompactorError("compressed-tensors export needs the package: pip install 'compactor[ct]'") from None
    qmods = quantized_modules(model, linear_only=True)  # vLLM reads embeddings as float
    if not qmods:
        raise CompactorError("the model has no quantized linear layers to write as compressed-tensors")
    acts = act_modes(model)
    if missing := sorted(set(acts) - set(qmods)):
        raise CompactorError(f"{missing[0]}: activations are quantized but the weights are float; "
                             "compressed-tensors W8A8 needs int8 weights too (add an rtn/gptq step)")
    fmt = "int-quantized" if acts else "pack-quantized"
    schemes = _schemes(qmods, acts)
    with dequantized_view(model):
        dense = copy.deepcopy(model)
    config = QuantizationConfig(config_groups=schemes, format=fmt)
    apply_quantization_config(dense, config, show_progress=False)
    with torch.no_grad():
        for name, m in qmods.items():
            mod = dense.get_submodule(name)
            bits, sym, _ = ct_args(m, name)
            half = 1 << (bits - 1)
            # our value = scale * q - offset, offset = zero * scale; theirs (q' - zp') * scale
            mod.weight_scale.data = m.qparams.scale.to(mod.weight_scale.dtype).reshape(mod.weight_scale.shape)
            if not sym:
                zp = m.qparams.extra["zero_point"].to(torch.int32) - half
                mod.weight_zero_point.data = zp.to(mod.weight_zero_point.dtype).reshape(mod.weight_zero_point.shape)
            if acts.get(name, ("",))[0] == "static":  # our calibrated per-tensor input scale
                scale = model.get_submodule(name).act_scale
                mod.input_scale.data = scale.to(mod.input_scale.dtype).reshape(mod.input_scale.shape)
    compressor = ModelCompressor.from_pretrained_model(dense, quantization_format=fmt)
    compressor.compress_model(dense)
    # The package recomputed codes from (weight, scale, zero point): they must be ours.
    for name, m in qmods.items():
        mod = dense.get_submodule(name)
        bits = ct_args(m, name)[0]
        codes = (mod.weight.data if fmt == "int-quantized" else
                 unpack_from_int32(mod.weight_packed.data, bits, torch.Size([m.out_features, m.in_features])))
        shift = 0 if m.qparams.offset is None else 1 << (bits - 1)
        bad = (codes.to(torch.int32) != m.codes.to(torch.int32) - shift).sum().item()
        if bad:
            raise CompactorError(f"{name}: {bad} codes changed while packing for compressed-tensors")
    # Float tensors outside the quantized linears (embedding, tied head, norms) in half
    # precision: in float32 the tied embedding alone was 113 of 175 MB on SmolLM2.
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if _kept_float(name, qmods) and p.dtype == torch.float32:
                p.data = p.data.to(float_dtype)
    dense.save_pretrained(out)
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    size = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {"size_bytes": size, "float_dtype": str(float_dtype).replace("torch.", ""), "modules": len(qmods), "config_groups": len(schemes),
            "format": cfg.get("format"), "schemes": {k: v.weights.model_dump(include={"num_bits", "symmetric", "strategy", "group_size"})
                                                     for k, v in schemes.items()}}


def _kept_float(name: str, qmods: dict) -> bool:
    """A parameter the export writes as a float (not part of a quantized linear)."""
    return not any(name.startswith(q + ".") for q in qmods)


def verify_compressed(model, out: Path, windows, max_kld: float = 1e-4, min_top1: float = 0.99,
                      float_dtype: torch.dtype = torch.float32) -> dict:
    """Load ``out`` with plain transformers and compare logits with the in-memory model
    (its float tensors rounded to ``float_dtype`` as the export wrote them, so only the
    runtime is compared)."""
    from transformers import AutoModelForCausalLM

    from compactor.evaluate.harness import evaluate

    expected = model
    if float_dtype != torch.float32:
        qmods = quantized_modules(model, linear_only=True)
        expected = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in expected.named_parameters():
                if _kept_float(name, qmods) and p.dtype == torch.float32:
                    p.data = p.data.to(float_dtype).float()
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True).eval()
    res = evaluate(loaded, windows, reference=expected, speed=False, progress=False, name=Path(out).name)
    passed = res.kld_mean <= max_kld and res.top1 >= min_top1
    return {"runtime": "transformers", "kld_mean": res.kld_mean, "kld_p99": res.kld_p99,
            "top1": res.top1, "tokens": res.tokens, "max_kld": max_kld, "min_top1": min_top1,
            "passed": passed}
