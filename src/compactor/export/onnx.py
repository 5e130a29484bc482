"""ONNX export (``input_ids [batch, seq] -> logits [batch, seq, vocab]``) checked in onnxruntime.

The graph is traced with torch's dynamo exporter (the TorchScript exporter cannot lower
transformers' mask code). Quantized linears on 4-bit symmetric grids (GGUF Q4_0, int4 per
group) then carry their codes and scales into onnxruntime's ``MatMulNBits``
(:mod:`compactor.export.onnx_nbits`); other grids keep their dequantized weights (ONNX has no
ggml block types), and the summary says which. ``int8=True`` then applies onnxruntime's own dynamic int8
quantization (``quantize_dynamic``: per-channel int8 weights, activations quantized per
batch at run time) and keeps both files. No KV cache: this graph scores or prefills.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.quant.storage import dequantized_view

#: onnxruntime vs in-memory thresholds: the float graph must match to rounding; the dynamic
#: int8 graph is a different (quantized) model, so only gross breakage is rejected.
MAX_KLD_FLOAT, MAX_KLD_INT8 = 1e-4, 0.5


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(model, out_dir: Path, int8: bool = False, embed_type: str = "q8_0") -> dict:
    """Write ``model.onnx`` (and ``model.int8.onnx`` with ``int8``) into ``out_dir``.
    ``embed_type``: ``q8_0`` — the token embedding and the head in Q8_0 blocks
    (:mod:`compactor.export.onnx_embed`; verify against :class:`RoundedEmbedding`) — or ``f32``."""
    if embed_type not in ("q8_0", "f32"):
        raise CompactorError(f"ONNX export: the embedding type is q8_0 or f32 here, got {embed_type!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CompactorError("ONNX export needs onnx and onnxruntime: pip install 'compactor[onnx]'") from None
    out_dir = Path(out_dir)
    path = out_dir / "model.onnx"
    ids = torch.zeros((1, 16), dtype=torch.long)
    seq = torch.export.Dim("seq", min=2, max=int(getattr(model.config, "max_position_embeddings", 4096)))
    batch = torch.export.Dim("batch", max=1024)
    with dequantized_view(model), torch.no_grad():
        try:
            torch.onnx.export(_Logits(model).eval(), (ids,), str(path), input_names=["input_ids"],
                              output_names=["logits"], dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: seq},), verbose=False)
        except Exception as exc:  # the exporter raises many types; name the model and cause
            raise CompactorError(f"ONNX export of {type(model).__name__} failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300]}") from None
    summary = {"file": path.name}
    from compactor.export.onnx_nbits import rewrite_matmul_nbits
    from compactor.quant.qlinear import QuantizedLinear

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):  # our 4-bit codes, unchanged
        summary.update(rewrite_matmul_nbits(path, model))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if embed_type == "q8_0":
        from compactor.export.onnx_embed import fits, rewrite_embedding_q8

        if not fits(emb):
            raise CompactorError(f"ONNX export: the embedding's width {emb.shape[1]} is not a multiple of "
                                 "Q8_0's block of 32; use --embed-type f32")
        summary.update(rewrite_embedding_q8(path, emb, None if head is None else head.weight))
    summary["embed_type"] = "q8_0" if summary.get("embedding") == "q8_0" else "f32"
    summary["size_bytes"] = path.stat().st_size
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = out_dir / "model.int8.onnx"
        quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8, per_channel=True)
        summary.update(file=q.name, float_file=path.name, size_bytes=q.stat().st_size,
                       float_size_bytes=path.stat().st_size)
    return summary


class OnnxBackend:
    """An ONNX graph in onnxruntime, as an evaluation backend."""

    kind = "onnxruntime"

    def __init__(self, path: Path, threads: int = 2):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.name = Path(path).name
        self.load_seconds = 0.0
        self.size_bytes = os.path.getsize(path)
        self.params = 0
        out = self.session.get_outputs()[0]
        self.vocab_size = int(out.shape[-1]) if isinstance(out.shape[-1], int) else 0

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        arr = ids.to(torch.int64).numpy()[None]
        return torch.from_numpy(np.asarray(self.session.run(None, {"input_ids": arr})[0][0], dtype=np.float32))

    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        """Median prefill throughput (tokens/s) of one ``prompt_len`` window. This graph has
        no KV cache, so there is no decode figure: each new token would re-run the prefix."""
        from compactor.evaluate.backends import _median_time

        ids = {"input_ids": np.zeros((1, prompt_len), dtype=np.int64)}
        self.session.run(None, ids)  # warm-up: onnxruntime plans its buffers on the first run
        return {"prefill_tok_s": prompt_len / _median_time(lambda: self.session.run(None, ids), repeats),
                "decode_tok_s": None, "prompt_len": prompt_len}


def verify_onnx(model, path: Path, windows, int8: bool = False) -> dict:
    """Score the graph in onnxruntime against the in-memory model."""
    from compactor.evaluate.harness import evaluate

    be = OnnxBackend(path)
    be.params = sum(p.numel() for p in model.parameters())
    be.vocab_size = be.vocab_size or model.config.vocab_size
    res = evaluate(be, windows, reference=model, speed=False, progress=False)
    max_kld = MAX_KLD_INT8 if int8 else MAX_KLD_FLOAT
    return {"runtime": "onnxruntime", "kld_mean": res.kld_mean, "kld_p99": res.kld_p99, "top1": res.top1,
            "tokens": res.tokens, "max_kld": max_kld, "passed": res.kld_mean <= max_kld}
