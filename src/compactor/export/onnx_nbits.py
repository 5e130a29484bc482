"""Our 4-bit codes in onnxruntime's block-quantized ``MatMulNBits`` (com.microsoft), unchanged.

``MatMulNBits`` computes ``x · Wᵀ`` from unsigned 4-bit codes ``u`` in blocks of ``block_size``
along the input dimension, one float scale per (output row, block) and, absent explicit zero
points, the zero point 8: ``w = (u − 8) · scale``. Our symmetric 4-bit grids — GGUF Q4_0
(``d · q``, q in −8..7, fp16 d) and int4 symmetric per group — are exactly that with
``u = q + 8``, so the codes and scales go in as chosen, no re-rounding (Q4_0's fp16 scales are
exact in float32). Other grids (K-quants' two-level scales, Q4_1/IQ4_NL, 3/5/8 bits) keep
their dequantized float weights in the graph; the export reports which.

The float graph from torch's exporter holds each linear as ``MatMul(x, Wᵀ)`` with ``Wᵀ`` a
constant-folded initializer; it is found by value (bit-identical to the dequantized weight)
and the ``MatMul`` replaced.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from compactor.quant.qlinear import QuantizedEmbedding, QuantizedLinear

#: block sizes MatMulNBits accepts (a power of two, >= 16)
_BLOCKS = (16, 32, 64, 128, 256)


def nbits_fit(m: QuantizedLinear) -> str | None:
    """Why ``m`` cannot go into MatMulNBits as it is, or None when it can."""
    qp = m.qparams
    if qp.codebook is not None or qp.offset is not None:
        return "a codebook or an offset"
    if (qp.qmin, qp.qmax) != (-8, 7):
        return f"codes {qp.qmin}..{qp.qmax} (MatMulNBits here: 4-bit symmetric)"
    if qp.block not in _BLOCKS or m.in_features % qp.block:
        return f"block {qp.block}"
    return None


def pack_nbits(codes: torch.Tensor, scale: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, n_blocks, block/2], scales float32 [N * n_blocks]) for codes ``[N, K]``
    in −8..7: element 2i of a block in the low nibble of byte i, 2i+1 in the high one."""
    n, k = codes.shape
    u = (codes.to(torch.int64) + 8).numpy().astype(np.uint8).reshape(n, k // block, block)
    packed = (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)
    return np.ascontiguousarray(packed.astype(np.uint8)), scale.float().contiguous().numpy().reshape(-1)


def digest(a: np.ndarray) -> str:
    """Fingerprint of a float array's values (graph initializers are found by value)."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def save_rewritten(g, path, nodes: list, new_inits: list = ()) -> None:
    """Give graph ``g`` its rewritten ``nodes`` and ``new_inits``, drop the initializers no
    node reads any more, declare the com.microsoft domain, and save it to ``path``."""
    import onnx
    from onnx import helper

    del g.graph.node[:]
    g.graph.node.extend(nodes)
    g.graph.initializer.extend(new_inits)
    still = {n for node in g.graph.node for n in node.input} | {o.name for o in g.graph.output}
    keep = [i for i in g.graph.initializer if i.name in still]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in g.opset_import):
        g.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(g, str(path))


#: ``--matmul-accuracy`` -> MatMulNBits' ``accuracy_level``: 0 computes in float32 from the
#: dequantized blocks (the graph equals the in-memory model to rounding); 4 quantizes the
#: activations to int8 per block of the weight's block size inside the kernel (MLAS's int8
#: dot products, the arithmetic llama.cpp's CPU kernels use). On this machine (onnxruntime
#: 1.32, 2 threads, one token) the 8-bit 576 x 49,152 head took 394 ms at level 1 and 6.2 ms at
#: level 4, a 4-bit 576 x 1,536 linear 0.35 ms at level 0 and 0.02 ms at level 4.
ACCURACY_LEVELS = {"fp32": 0, "int8": 4}


def rewrite_matmul_nbits(path, model, accuracy: str = "fp32") -> dict:
    """Replace, in the ONNX file ``path``, every ``MatMul`` by a quantized linear's weight
    that fits with a ``MatMulNBits`` on its codes (``accuracy``: a key of
    :data:`ACCURACY_LEVELS`); returns counts and the reasons for the rest."""
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.load(str(path))
    inits = {i.name: i for i in g.graph.initializer}
    by_digest = {}
    skipped: dict[str, int] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLinear) or isinstance(m, QuantizedEmbedding):
            continue
        why = nbits_fit(m)
        if why:
            skipped[f"{m.label}: {why}"] = skipped.get(f"{m.label}: {why}", 0) + 1
            continue
        w = m.qparams.dequantize(m.codes.to(torch.int32)).numpy()  # the graph's float weight
        by_digest.setdefault(digest(w.T), []).append((name, m))
    replaced, nodes = 0, []
    for node in g.graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        init = inits.get(b) if b else None
        hit = None
        if init is not None and len(init.dims) == 2:
            hit = by_digest.get(digest(numpy_helper.to_array(init)))
        if not hit:
            nodes.append(node)
            continue
        name, m = hit[0]
        qb, sc = pack_nbits(m.codes, m.qparams.scale, m.qparams.block)
        tag = name.replace(".", "_")
        g.graph.initializer.extend([numpy_helper.from_array(qb, f"{tag}_nbits_B"),
                                    numpy_helper.from_array(sc, f"{tag}_nbits_scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{tag}_nbits_B", f"{tag}_nbits_scales"],
                                      list(node.output), name=f"{tag}_nbits", domain="com.microsoft",
                                      K=m.in_features, N=m.out_features, bits=4, block_size=m.qparams.block,
                                      accuracy_level=ACCURACY_LEVELS[accuracy]))
        replaced += 1
    save_rewritten(g, path, nodes)
    return {"matmul_nbits": replaced, "kept_float": skipped}
