"""One entry point for every export format: write to a temporary path, verify the artifact in
its runtime, and rename it into place only if verification passed."""

from __future__ import annotations

import contextlib

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactor.errors import CompactorError
from compactor.io import atomic_dir, atomic_file
from compactor.models.load import LoadedModel

FORMATS = ("gguf", "compressed-tensors", "onnx")


class VerificationFailed(CompactorError):
    """The exported artifact does not reproduce the in-memory model; nothing was written."""


@dataclass
class ExportResult:
    """What was written, and the verification that allowed it."""

    format: str
    path: Path
    summary: dict[str, Any]
    verification: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.path), **self.summary,
                "verification": self.verification}


def source_provenance(loaded: LoadedModel) -> dict[str, Any]:
    """What produced this model: source, recipe and calibration data (from a compactor
    output directory's provenance.json / recipe.yaml when present)."""
    info: dict[str, Any] = {"source_model": loaded.source}
    d = loaded.path
    if d is not None and (d / "provenance.json").exists():
        prov = json.loads((d / "provenance.json").read_text())
        info["source_model"] = prov.get("model_source", loaded.source)
        cal = prov.get("calibration_data")
        if cal:
            info["calibration"] = {k: cal.get(k) for k in ("source", "tokens", "windows", "length")
                                   if k in cal} or cal
        info["steps"] = [s.get("step") for s in prov.get("steps", [])]
    if d is not None and (d / "recipe.yaml").exists():
        info["recipe"] = (d / "recipe.yaml").read_text()
    return info


def tokenizer_gguf_for(loaded: LoadedModel) -> Path | None:
    """The GGUF whose tokenizer section should be copied: the file the model was loaded from,
    or the one a compactor output directory records as its origin."""
    if loaded.gguf is not None:
        return Path(loaded.gguf)
    d = loaded.path
    if d is not None and (d / "provenance.json").exists():
        g = json.loads((d / "provenance.json").read_text()).get("model_gguf")
        if g and Path(g).is_file():
            return Path(g)
    return None


def export_model(loaded: LoadedModel, fmt: str, out: str | Path, *, overwrite: bool = False,
                 verify: bool = True, windows=None, provenance: dict | None = None,
                 progress: bool = True, **options) -> ExportResult:
    """Export ``loaded`` as ``fmt`` to ``out``; verify it (unless ``verify=False``) on
    ``windows`` (default: the first 2,048 tokens of the Austen evaluation split)."""
    if fmt not in FORMATS:
        raise CompactorError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if fmt != "gguf" and out.suffix == ".gguf":
        raise CompactorError(f"{out}: a {fmt} export is a directory; give a directory path")
    if out.exists() and not overwrite:
        raise CompactorError(f"output {out} already exists (pass --force to replace it)")
    if verify and windows is None:
        from compactor.data.windows import windows_for

        windows = windows_for(loaded.tokenizer, "austen:eval", 512, max_tokens=2048)
    from compactor.quant.activations import ActQuantLinear

    acts = [n for n, m in loaded.model.named_modules() if isinstance(m, ActQuantLinear)]
    if acts and fmt != "compressed-tensors":
        # The file would silently run with float activations: refuse instead.
        raise CompactorError(
            f"{len(acts)} modules (first: {acts[0]}) quantize their activations (W8A8), which "
            f"compactor cannot write as {fmt}; export compressed-tensors (vLLM's W8A8 format), "
            "or quantize without the activations step to export the weights")
    from compactor.distill.lora import lora_modules

    if lora_modules(loaded.model) and fmt != "gguf":
        raise CompactorError(f"the model carries LoRA adapters, which a {fmt} export cannot hold beside "
                             "its base; export GGUF (base + llama.cpp adapter file) or merge them "
                             "(lora step with merge: requantize or float)")
    if loaded.streamed and fmt != "gguf":
        raise CompactorError(f"a {fmt} export needs the model in memory; it is streamed (export "
                             "GGUF from a streamed model, or load it without --stream)")
    prov = {**source_provenance(loaded), **(provenance or {})}
    if fmt == "gguf":
        res = _export_gguf(loaded, out, verify, windows, prov, progress, **options)
    elif fmt == "compressed-tensors":
        res = _export_ct(loaded, out, verify, windows, prov, overwrite, **options)
    else:
        res = _export_onnx(loaded, out, verify, windows, prov, overwrite, **options)
    return _with_bits_per_weight(res, loaded.model)


def _with_bits_per_weight(res: ExportResult, model) -> ExportResult:
    """Every format's summary states its size in bits per weight: file bytes · 8 over the
    model's logical weight count (tied weights once; a quantized linear counts its weights,
    which it holds as codes in buffers, not as parameters)."""
    from compactor.evaluate.size import model_size

    s = res.summary
    if "bpw" not in s and s.get("size_bytes"):
        params = s.get("params") or model_size(model)[1]
        s.update(params=params, bpw=round(s["size_bytes"] * 8 / params, 4))
    return res


#: compressed-tensors: the dtype of tensors outside the quantized linears, by name.
CT_FLOAT = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def _export_ct(loaded, out, verify, windows, prov, overwrite, float_type: str = "bf16") -> ExportResult:
    import torch

    from compactor.export.compressed import export_compressed_tensors, verify_compressed

    if float_type not in CT_FLOAT:
        raise CompactorError(f"compressed-tensors float type {float_type!r}: expected one of {', '.join(CT_FLOAT)}")
    dtype = getattr(torch, CT_FLOAT[float_type])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = export_compressed_tensors(loaded.model, loaded.tokenizer, tmp, float_dtype=dtype)
        (tmp / "compactor_provenance.json").write_text(json.dumps(prov, indent=2, default=str))
        ver = None
        if verify:
            ver = verify_compressed(loaded.model, tmp, windows, float_dtype=dtype)
            if not ver["passed"]:
                raise VerificationFailed(f"{out}: transformers reload differs from memory (KLD "
                                         f"{ver['kld_mean']:.2e}, top-1 {ver['top1']:.3f}); nothing written")
    return ExportResult("compressed-tensors", out, summary, ver)


def _export_onnx(loaded, out, verify, windows, prov, overwrite, int8: bool = False,
                 embed_type: str = "q8_0", matmul_accuracy: str = "fp32") -> ExportResult:
    from compactor.export.onnx import export_onnx, verify_onnx
    from compactor.export.onnx_embed import RoundedEmbedding

    with atomic_dir(out, overwrite=overwrite) as tmp:
        summary = export_onnx(loaded.model, tmp, int8=int8, embed_type=embed_type, matmul_accuracy=matmul_accuracy)
        (tmp / "compactor_provenance.json").write_text(json.dumps(prov, indent=2, default=str))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        ver = None
        if verify:
            # The graph's Q8_0 embedding against the same rounded values in memory.
            with (RoundedEmbedding(loaded.model, head=summary.get("head_matmuls", 0) > 0)
                  if summary["embed_type"] == "q8_0" else contextlib.nullcontext()):
                ver = verify_onnx(loaded.model, tmp / summary["file"], windows, int8=int8,
                                  matmul_accuracy=matmul_accuracy)
            if not ver["passed"]:
                raise VerificationFailed(f"{out}: onnxruntime differs from memory (KLD "
                                         f"{ver['kld_mean']:.2e} > {ver['max_kld']}, top-1 "
                                         f"{ver['top1']:.3f}); nothing written")
    return ExportResult("onnx", out, summary, ver)


def _export_gguf(loaded, out, verify, windows, prov, progress, types=None,
                 min_top1: float | None = None, max_memory: str | int | None = None) -> ExportResult:
    """The base file; with LoRA adapters in the model also ``<out stem>.lora.gguf`` beside it,
    verified together in llama.cpp against the in-memory model with its adapters.

    ``min_top1``: the verification's top-1 floor (default :data:`~compactor.export.verify.MIN_TOP1`).
    Only random-weight models need another: their near-flat logits turn top-1 into a coin toss
    between near-tied tokens under llama.cpp's 8-bit activation rounding, while the exact code
    check and the KLD bound still hold them to the file.

    The memory plan (:mod:`compactor.export.plan`) is printed first and held to
    ``max_memory`` (default: the memory available now): over it, nothing is written (exit 2)."""
    import sys

    from compactor.distill.lora import detached_adapters
    from compactor.export.gguf import GGUFTypes, export_gguf
    from compactor.export.lora_gguf import export_lora_gguf
    from compactor.export.plan import plan_gguf_export
    from compactor.export.verify import MIN_TOP1, verify_context, verify_gguf
    from compactor.plan import check_plan

    min_top1 = MIN_TOP1 if min_top1 is None else min_top1
    if not 0.0 <= min_top1 <= 1.0:
        raise CompactorError(f"the verification's top-1 floor is a fraction in [0, 1], got {min_top1}")
    types = types or GGUFTypes()
    n_ctx = verify_context(windows) if verify else 0
    plan = plan_gguf_export(loaded, types, verify_windows=(len(windows.input_ids), windows.length) if verify else None,
                            n_ctx=n_ctx, max_memory=max_memory)
    if progress:
        print(plan.describe(), file=sys.stderr)
    check_plan(plan)
    lora_out = out.with_name(out.stem + ".lora.gguf")
    with atomic_file(out) as tmp:
        with detached_adapters(loaded.model) as lora:
            exp = export_gguf(loaded.model, tmp, types=types, tokenizer=loaded.tokenizer,
                              tokenizer_gguf=tokenizer_gguf_for(loaded), provenance=prov,
                              adapter=loaded.adapter, progress=progress, store=loaded.store)
        ver, summary = None, exp.summary()
        with atomic_file(lora_out) if lora else contextlib.nullcontext() as lora_tmp:
            if lora:
                summary["lora_adapter"] = export_lora_gguf(loaded.model, lora, lora_tmp, loaded.adapter)
                summary["lora_adapter"]["path"] = str(lora_out)
            if verify:
                v = verify_gguf(loaded.model, exp, windows, min_top1=min_top1, progress=progress,
                                loaded=loaded, lora_path=lora_tmp)
                if not v.passed:
                    raise VerificationFailed(f"{out}{' + ' + lora_out.name if lora else ''}: {v.describe()}; "
                                             "the file was not written")
                ver = v.to_dict()
    exp.path = out
    return ExportResult("gguf", out, summary, ver, exp.notes)
