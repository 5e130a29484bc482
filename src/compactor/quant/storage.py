"""Save and restore quantized models.

An output directory stays a normal transformers checkpoint (``model.safetensors`` holds the
dequantized weights, so plain transformers loads it) and adds the integer codes and grid
parameters of every quantized linear in ``quantization.safetensors``, described by
``quantization.json``. compactor restores :class:`QuantizedLinear` modules from them, and
exporters pack those codes without re-rounding. Activation quantization (W8A8) is recorded
per module in ``activations.json`` (mode, bits, calibrated scale) and re-applied on load.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from compactor.errors import CompactorError
from compactor.primitives.qparams import QParams
from compactor.quant.activations import ActQuantLinear
from compactor.quant.qlinear import QuantizedEmbedding, QuantizedLinear, tie_head

MANIFEST = "quantization.json"
TENSORS = "quantization.safetensors"
ACTIVATIONS = "activations.json"


def quantized_modules(model, linear_only: bool = False) -> dict[str, QuantizedLinear]:
    """Every module stored as codes (linears and a quantized embedding), by name; a linear
    wrapped for activation quantization is named by its wrapper's (architecture) name."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, ActQuantLinear) and isinstance(m.inner, QuantizedLinear):
            out[n] = m.inner
        elif isinstance(m, QuantizedLinear) and not n.endswith(".inner"):
            if not (linear_only and isinstance(m, QuantizedEmbedding)):
                out[n] = m
    return out


@contextlib.contextmanager
def dequantized_view(model) -> Iterator[None]:
    """Temporarily swap quantized modules (and activation wrappers) for plain Linear /
    Embedding ones, so that the model is its architecture's own (for save_pretrained)."""
    swapped = {n: m for n, m in model.named_modules()
               if isinstance(m, ActQuantLinear) or (isinstance(m, QuantizedLinear) and not n.endswith(".inner"))}
    for n, m in swapped.items():
        inner = m.inner if isinstance(m, ActQuantLinear) else m
        model.set_submodule(n, inner.to_linear() if isinstance(inner, QuantizedLinear) else inner)
    try:
        yield
    finally:
        for n, m in swapped.items():
            model.set_submodule(n, m)


def save_quantization(model, directory: Path) -> dict:
    """Write codes + parameters of every QuantizedLinear; returns the manifest."""
    tensors, manifest = {}, {}
    for n, m in quantized_modules(model).items():
        qp = m.qparams
        tensors[f"{n}.codes"] = m.codes.contiguous()
        tensors[f"{n}.scale"] = qp.scale.contiguous()
        if qp.offset is not None:
            tensors[f"{n}.offset"] = qp.offset.contiguous()
        if qp.codebook is not None:
            tensors[f"{n}.codebook"] = qp.codebook.contiguous()
        extra = [k for k, v in qp.extra.items() if isinstance(v, torch.Tensor)]
        for k in extra:
            tensors[f"{n}.extra.{k}"] = qp.extra[k].contiguous()
        manifest[n] = {"kind": "embedding" if isinstance(m, QuantizedEmbedding) else "linear",
                       "grid": m.label, "bits_per_weight": m.bits_per_weight, "block": qp.block,
                       "qmin": qp.qmin, "qmax": qp.qmax, "extra": extra,
                       "shape": [m.out_features, m.in_features]}
    if manifest:
        save_file(tensors, str(directory / TENSORS))
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    acts = {n: {"mode": m.mode, "bits": m.bits, "scale": float(m.act_scale)}
            for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    if acts:
        (directory / ACTIVATIONS).write_text(json.dumps(acts, indent=1))
    return manifest


def restore_quantization(model, directory: Path, lm_head: str = "lm_head") -> int:
    """Replace the modules listed in ``quantization.json`` by their quantized forms (a
    quantized embedding is re-shared with a tied head at ``lm_head``). Returns how many
    were restored (0 if the directory holds no quantization)."""
    path = Path(directory) / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    t = {}
    if manifest:
        try:
            t = load_file(str(Path(directory) / TENSORS))
        except Exception as exc:
            raise CompactorError(f"{directory}/{TENSORS} is unreadable: {exc}") from None
    for n, info in manifest.items():
        try:
            lin = model.get_submodule(n)
            qp = QParams(t[f"{n}.scale"], t.get(f"{n}.offset"), info["block"], info["qmin"],
                         info["qmax"], t.get(f"{n}.codebook"),
                         {k: t[f"{n}.extra.{k}"] for k in info["extra"]})
            codes = t[f"{n}.codes"]
        except (AttributeError, KeyError) as exc:
            raise CompactorError(f"{directory}/{MANIFEST}: module {n}: missing {exc}") from None
        if list(codes.shape) != info["shape"]:
            raise CompactorError(f"{directory}: {n}.codes has shape {list(codes.shape)}, "
                                 f"manifest says {info['shape']}")
        if info.get("kind") == "embedding":
            model.set_submodule(n, QuantizedEmbedding(codes, qp, info["grid"], info["bits_per_weight"]))
            tie_head(model, n, lm_head)
        else:
            model.set_submodule(n, QuantizedLinear(codes, qp, info["grid"], info["bits_per_weight"],
                                                   getattr(lin, "bias", None), torch.float32))
    acts_path = Path(directory) / ACTIVATIONS
    for n, a in (json.loads(acts_path.read_text()) if acts_path.exists() else {}).items():
        try:
            inner = model.get_submodule(n)
        except AttributeError:
            raise CompactorError(f"{acts_path}: module {n} is not in the model") from None
        model.set_submodule(n, ActQuantLinear(inner, a["mode"], a["bits"], torch.tensor(a["scale"])))
    return len(manifest)


def save_model(model, tokenizer, directory: Path) -> None:
    """save_pretrained (dequantized weights) + tokenizer + quantization codes."""
    with dequantized_view(model):
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_quantization(model, directory)
