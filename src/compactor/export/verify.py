"""Prove an exported GGUF file is the model we measured: read it back and run it in llama.cpp.

Two checks:

1. **Tensors.** Every tensor exported from integer codes is dequantized from the file by the
   reference reader (``gguf.quants``), its q/k rows un-permuted, and compared with the
   in-memory weight: they must agree to fp32 rounding — the codes were written as chosen.
2. **Runtime.** llama.cpp (``llama-cpp-python``) scores fixed token windows, and its logits are
   compared with the in-memory model's (tensors the exporter rounded itself are set to the
   file's values first, so only the runtime differs): mean KL(memory ‖ file) and top-1
   agreement must stay within the runtime noise floor.

llama.cpp quantizes activations to 8 bits inside quantized dot products, so a correct file is
not bit-identical in output. :data:`MAX_KLD` and :data:`MIN_TOP1` come from the noise floor
measured on SmolLM2-135M with F32, Q8_0 and 4-bit files (``bench/results/gguf_noise_floor.md``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.export.gguf import GGUFExport, permuted_heads, qk_row_permutation

#: Mean KL(memory ‖ llama.cpp) per token above which a file is rejected. The measured floor
#: is ~0.003 for 4-bit files (8-bit activation rounding); a real export bug (a wrong
#: permutation, a wrong scale) shows KLD > 0.5.
MAX_KLD = 0.02
#: Minimum top-1 agreement between the file in llama.cpp and the in-memory model.
MIN_TOP1 = 0.90
#: Allowed relative difference between file-dequantized and in-memory weights (fp32 rounding).
TENSOR_RTOL = 1e-5


@dataclass
class Verification:
    """Outcome of :func:`verify_gguf`."""

    path: str
    tensors_checked: int
    max_tensor_error: float  # max |file - memory| / max |memory| over code tensors
    worst_tensor: str | None
    kld_mean: float
    kld_p99: float
    top1: float
    tokens: int
    max_kld: float
    min_top1: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"verification {verdict}: {self.tensors_checked} code tensors match to "
                f"{self.max_tensor_error:.1e}; llama.cpp vs memory on {self.tokens} tokens: "
                f"KLD {self.kld_mean:.5f} (max {self.max_kld}), top-1 {self.top1:.3f} "
                f"(min {self.min_top1})")


class FileTensors:
    """Tensors of a GGUF file, each read with plain file I/O at its offset and dequantized by
    ``gguf.quants`` when asked for, as float32 ``[rows, cols]`` in the file's row order —
    not through the reader's memory map, whose touched pages would stay counted in RSS (a
    whole 4 GB file, for an 8B model)."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        self.by_name = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    def __getitem__(self, name: str) -> torch.Tensor:
        from compactor.models.gguf_convert import _read_tensor

        with open(self.path, "rb") as f:
            return _read_tensor(f, self.by_name[name])


def _unpermute(w: torch.Tensor, record, model, exp: GGUFExport) -> torch.Tensor:
    n_head = permuted_heads(record.source, exp.adapter, model.config)
    if not n_head:
        return w
    perm = qk_row_permutation(w.shape[0], n_head)
    restored = torch.empty_like(w)
    restored[perm] = w  # file row r holds memory row perm[r]
    return restored


def _layer_of(name: str, adapter) -> int | None:
    head, _, rest = name.partition(f"{adapter.layers}.")
    idx = rest.split(".", 1)[0]
    return int(idx) if not head and idx.isdigit() else None


def check_tensors(model, exp: GGUFExport, store=None) -> tuple[int, float, str | None, list]:
    """Compare code tensors with memory, layer by layer from ``store`` (in memory by
    default); return (count, max error, worst, records of the tensors the exporter rounded)."""
    from compactor.models.stream import ResidentWeights

    store = store or ResidentWeights()
    file_t = FileTensors(exp.path)
    worst, worst_name, n, rounded = 0.0, None, 0, []
    held = None  # (layer index, module) currently materialized
    for rec in exp.tensors:
        if rec.origin == "float":
            continue
        if rec.origin == "rounded":
            rounded.append(rec)
            continue
        li = _layer_of(rec.source, exp.adapter)
        if li is not None and (held is None or held[0] != li):
            if held is not None:
                store.done(model, held[0], exp.adapter)
            held = (li, store.layer(model, li, exp.adapter))
        w = _unpermute(file_t[rec.name], rec, model, exp)
        mem = model.get_submodule(rec.source.rsplit(".", 1)[0]).weight.detach().float()
        if mem.shape != w.shape:
            raise CompactorError(f"{exp.path}: tensor {rec.name} has shape {tuple(w.shape)}, "
                                 f"memory {rec.source} has {tuple(mem.shape)}")
        err = float((w - mem).abs().max() / mem.abs().max().clamp_min(1e-30))
        n += 1
        if err >= worst:
            worst, worst_name = err, rec.name
    if held is not None:
        store.done(model, held[0], exp.adapter)
    return n, worst, worst_name, rounded


def verify_context(windows) -> int:
    """llama.cpp's context for verifying on ``windows``."""
    return max(1024, windows.length + 160)


def verify_gguf(model, exp: GGUFExport, windows, max_kld: float = MAX_KLD,
                min_top1: float = MIN_TOP1, progress: bool = False, loaded=None,
                lora_path: Path | None = None) -> Verification:
    """Run both checks on the file ``exp`` describes; the result says whether it passed.

    ``loaded``: the model's :class:`LoadedModel` when its weights are streamed; the expected
    logits then come layer by layer, with the exporter-rounded tensors read from the file.
    ``lora_path``: a LoRA adapter GGUF applied beside the file in llama.cpp; the expected
    logits are then the model's with its adapters (the tensors are checked without them)."""
    from compactor.distill.lora import detached_adapters
    from compactor.evaluate.backends import LlamaCppBackend
    from compactor.evaluate.harness import evaluate

    streamed = loaded is not None and loaded.streamed
    with detached_adapters(model):
        n, err, worst, rounded = check_tensors(model, exp, loaded.store if streamed else None)
    expected = loaded if streamed else model
    if rounded and streamed:
        file_t = FileTensors(exp.path)
        expected.store.overrides = {rec.source: (lambda rec=rec: _unpermute(file_t[rec.name], rec, model, exp))
                                    for rec in rounded}
    elif rounded:
        file_t = FileTensors(exp.path)
        expected = copy.deepcopy(model)
        with torch.no_grad(), detached_adapters(expected):
            for rec in rounded:
                w = _unpermute(file_t[rec.name], rec, model, exp)
                expected.get_parameter(rec.source).copy_(w.to(expected.get_parameter(rec.source).dtype))
    if streamed:
        # The streamed model's logits first, cached on disk, so the model (layer by layer) and
        # llama.cpp's copy of the file are never in memory together.
        import tempfile

        from compactor.evaluate.backends import CachedBackend, chunk_rows
        from compactor.evaluate.harness import as_backend

        cache_dir = tempfile.mkdtemp(prefix=".verify-logits-", dir=str(exp.path.parent))
        expected = CachedBackend(as_backend(expected), directory=cache_dir)
        expected.fill(windows.input_ids, chunk_rows(expected.vocab_size))
        loaded.store.overrides = {}
    # Read into llama.cpp's buffers, not mapped: a mapped file stays counted in RSS beside the
    # copy llama.cpp repacks its Q4_0 tensors into (export.plan).
    runtime = LlamaCppBackend(exp.path, n_ctx=verify_context(windows), name=exp.path.name,
                              lora_path=lora_path, use_mmap=False)
    try:
        res = evaluate(runtime, windows, reference=expected, speed=False, progress=progress)
    finally:
        runtime.close()
        if streamed:
            import shutil

            shutil.rmtree(cache_dir, ignore_errors=True)
    ok = err <= TENSOR_RTOL and res.kld_mean <= max_kld and res.top1 >= min_top1
    return Verification(str(exp.path), n, err, worst, res.kld_mean, res.kld_p99, res.top1,
                        res.tokens, max_kld, min_top1, ok)
