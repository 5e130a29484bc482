"""ONNX export of a causal LM with its KV cache, checked in onnxruntime.

One graph serves scoring, prefill and decoding (no second copy of the weights):
``input_ids [batch, seq]`` and, per layer ``i``, ``past_key_values.i.key`` / ``.value``
``[batch, kv_heads, past, head_dim]`` (``past`` may be 0: a prompt) in; ``logits [batch,
seq, vocab]`` and ``present.i.key`` / ``.value`` (the past with this call's positions
appended) out — the names onnxruntime-genai and optimum use. Positions continue from the
past's length; no padding (one sequence, or equal lengths).

The graph is traced with torch's dynamo exporter (the TorchScript exporter cannot lower
transformers' mask code). Quantized linears on 4-bit symmetric grids (GGUF Q4_0, int4 per
group) then carry their codes and scales into onnxruntime's ``MatMulNBits``
(:mod:`compactor.export.onnx_nbits`); other grids keep their dequantized weights (ONNX has no
ggml block types), and the summary says which. ``int8=True`` then applies onnxruntime's own dynamic int8
quantization (``quantize_dynamic``: per-channel int8 weights, activations quantized per
batch at run time) and keeps both files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.quant.storage import dequantized_view

#: onnxruntime vs in-memory thresholds: the float graph must match to rounding; the dynamic
#: int8 graph is a different (quantized) model, so only gross breakage is rejected. A graph
#: whose MatMulNBits quantize activations to int8 (``matmul_accuracy="int8"``) is held to the
#: GGUF check's bound, the noise floor of the same arithmetic in llama.cpp.
MAX_KLD_FLOAT, MAX_KLD_INT8 = 1e-4, 0.5


class _Step(torch.nn.Module):
    """``(input_ids, past tensors) -> (logits, present tensors)`` through transformers' own
    cache, so the traced attention is the model's (every family of the adapter table).

    Every layer's cache is a plain growing one, sliding-window layers included: their window
    is applied by the model's own sliding mask over the full past. (A window-trimming cache
    branches on the past's length, which a graph with a dynamic past cannot trace: the
    exported graph then failed once the context passed the window.)"""

    def __init__(self, model, n_layers: int):
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, input_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: no window-trimming layers (see the class doc)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_geometry(model) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer's cache, read from one forward of the model itself."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    return [(int(la.keys.shape[1]), int(la.keys.shape[3])) for la in out.past_key_values.layers]


def past_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The graph's cache inputs and outputs, in order (key, value per layer)."""
    ins = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ins, [n.replace("past_key_values", "present") for n in ins]


def export_onnx(model, out_dir: Path, int8: bool = False, embed_type: str = "q8_0",
                matmul_accuracy: str = "fp32") -> dict:
    """Write ``model.onnx`` (and ``model.int8.onnx`` with ``int8``) into ``out_dir``.
    ``embed_type``: ``q8_0`` — the token embedding and the head in Q8_0 blocks
    (:mod:`compactor.export.onnx_embed`; verify against :class:`RoundedEmbedding`) — or ``f32``.
    ``matmul_accuracy``: how the MatMulNBits nodes compute (``fp32`` or ``int8``; see
    :data:`compactor.export.onnx_nbits.ACCURACY_LEVELS`)."""
    from compactor.export.onnx_nbits import ACCURACY_LEVELS

    if embed_type not in ("q8_0", "f32"):
        raise CompactorError(f"ONNX export: the embedding type is q8_0 or f32 here, got {embed_type!r}")
    if matmul_accuracy not in ACCURACY_LEVELS:
        raise CompactorError(f"ONNX export: the MatMulNBits accuracy is one of {', '.join(ACCURACY_LEVELS)}, "
                             f"got {matmul_accuracy!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise CompactorError("ONNX export needs onnx and onnxruntime: pip install 'compactor[onnx]'") from None
    out_dir = Path(out_dir)
    path = out_dir / "model.onnx"
    ids = torch.zeros((1, 16), dtype=torch.long)
    ctx_len = int(getattr(model.config, "max_position_embeddings", 4096))
    seq = torch.export.Dim("seq", min=1, max=ctx_len)
    past_len = torch.export.Dim("past", min=0, max=ctx_len)
    batch = torch.export.Dim("batch", max=1024)
    with dequantized_view(model), torch.no_grad():
        geometry = cache_geometry(model)
        # Traced with a past of 5 positions (0 and 1 would be specialized); runs with any.
        past = tuple(torch.zeros((1, h, 5, d)) for h, d in geometry for _ in range(2))
        ins, outs = past_names(len(geometry))
        # A trace starts from a clean compiler cache: guards specialized while tracing an
        # earlier model (another config of the same family) must not constrain this one.
        torch._dynamo.reset()
        try:
            torch.onnx.export(_Step(model, len(geometry)).eval(), (ids, past), str(path),
                              input_names=["input_ids", *ins], output_names=["logits", *outs], dynamo=True,
                              external_data=False, verbose=False,
                              dynamic_shapes=({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past)))
        except Exception as exc:  # the exporter raises many types; name the model and the root cause
            root = exc
            while root.__cause__ is not None:  # the exporter wraps torch.export's own error
                root = root.__cause__
            first = (str(root).strip().splitlines() or [""])[0]
            raise CompactorError(f"ONNX export of {type(model).__name__} failed: {type(root).__name__}: "
                                 f"{first[:300]}") from None
    summary = {"file": path.name, "kv_cache": {"layers": len(geometry), "kv_heads": geometry[0][0],
                                               "head_dim": geometry[0][1]}}
    from compactor.export.onnx_nbits import rewrite_matmul_nbits
    from compactor.quant.qlinear import QuantizedLinear

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):  # our 4-bit codes, unchanged
        summary.update(rewrite_matmul_nbits(path, model, matmul_accuracy))
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if embed_type == "q8_0":
        from compactor.export.onnx_embed import fits, rewrite_embedding_q8

        if not fits(emb):
            raise CompactorError(f"ONNX export: the embedding's width {emb.shape[1]} is not a multiple of "
                                 "Q8_0's block of 32; use --embed-type f32")
        summary.update(rewrite_embedding_q8(path, emb, None if head is None else head.weight, matmul_accuracy))
    summary["matmul_accuracy"] = matmul_accuracy
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
    """An ONNX graph in onnxruntime, as an evaluation backend (with its KV cache, if it has one)."""

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
        # Cache inputs: [batch, kv_heads, past, head_dim], heads and width fixed in the graph.
        self.past = [(i.name, int(i.shape[1]), int(i.shape[3])) for i in self.session.get_inputs()
                     if i.name.startswith("past_key_values.")]

    def empty_past(self, batch: int = 1) -> dict:
        """A zero-length cache: the graph then scores (or prefills) its input alone."""
        return {n: np.zeros((batch, h, 0, d), dtype=np.float32) for n, h, d in self.past}

    def step(self, ids: np.ndarray, past: dict | None = None) -> tuple[np.ndarray, dict]:
        """One call: logits ``[batch, seq, vocab]`` and the cache with ``ids`` appended."""
        feeds = {"input_ids": ids.astype(np.int64)}
        if self.past:
            feeds.update(self.empty_past(ids.shape[0]) if past is None else past)
        out = self.session.run(None, feeds)
        present = {n: t for (n, _, _), t in zip(self.past, out[1:])}
        return out[0], present

    def window_logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.step(ids.to(torch.int64).numpy()[None])
        return torch.from_numpy(np.asarray(logits[0], dtype=np.float32))

    def decode_logits(self, ids: torch.Tensor, prompt: int) -> torch.Tensor:
        """Logits of ``ids [seq]`` computed as a generator does: the first ``prompt`` tokens
        in one call, then one token per call on the growing cache."""
        arr = ids.to(torch.int64).numpy()[None]
        first, past = self.step(arr[:, :prompt])
        rows = [first[0]]
        for t in range(prompt, arr.shape[1]):
            logits, past = self.step(arr[:, t:t + 1], past)
            rows.append(logits[0])
        return torch.from_numpy(np.concatenate(rows).astype(np.float32))

    def speed(self, prompt_len: int = 512, gen_tokens: int = 128, repeats: int = 3) -> dict:
        """Median prefill throughput of one ``prompt_len`` window and, with a KV cache, the
        median decode throughput of ``gen_tokens`` greedy tokens after it (tokens/s)."""
        from compactor.evaluate.backends import _median_time

        ids = np.zeros((1, prompt_len), dtype=np.int64)
        self.step(ids)  # warm-up: onnxruntime plans its buffers on the first run
        prefill = prompt_len / _median_time(lambda: self.step(ids), repeats)
        if not self.past:
            return {"prefill_tok_s": prefill, "decode_tok_s": None, "prompt_len": prompt_len}
        logits, cache = self.step(ids)

        def generate():
            past, tok = cache, np.argmax(logits[:, -1], -1)[:, None]
            for _ in range(gen_tokens):
                out, past = self.step(tok, past)
                tok = np.argmax(out[:, -1], -1)[:, None]

        return {"prefill_tok_s": prefill, "decode_tok_s": gen_tokens / _median_time(generate, repeats),
                "prompt_len": prompt_len, "gen_tokens": gen_tokens}


def verify_onnx(model, path: Path, windows, int8: bool = False, matmul_accuracy: str = "fp32") -> dict:
    """Score the graph in onnxruntime against the in-memory model."""
    from compactor.export.verify import MAX_KLD

    from compactor.evaluate.harness import evaluate

    be = OnnxBackend(path)
    be.params = sum(p.numel() for p in model.parameters())
    be.vocab_size = be.vocab_size or model.config.vocab_size
    res = evaluate(be, windows, reference=model, speed=False, progress=False)
    max_kld = MAX_KLD_INT8 if int8 else MAX_KLD if matmul_accuracy == "int8" else MAX_KLD_FLOAT
    out = {"runtime": "onnxruntime", "kld_mean": res.kld_mean, "kld_p99": res.kld_p99, "top1": res.top1,
           "tokens": res.tokens, "max_kld": max_kld, "passed": res.kld_mean <= max_kld}
    if be.past:  # the cache path a generator takes must compute the same logits
        out.update(_verify_decode(model, be, windows, max_kld))
        out["passed"] = out["passed"] and out["decode_passed"]
    return out


def _verify_decode(model, be: OnnxBackend, windows, max_kld: float, tokens: int = 24) -> dict:
    """KLD between the in-memory model's logits and the graph's, computed token by token on
    its own cache (a prompt of half the window's first ``tokens``, then one token a call)."""
    from compactor.evaluate.metrics import kl_per_token

    ids = windows.input_ids[0][:tokens]
    with torch.no_grad():
        want = model(input_ids=ids[None]).logits[0].float()
    got = be.decode_logits(ids, prompt=len(ids) // 2)
    kld = float(kl_per_token(want, got).mean())
    return {"decode_kld_mean": kld, "decode_tokens": len(ids) - len(ids) // 2,
            "decode_passed": kld <= max_kld}
