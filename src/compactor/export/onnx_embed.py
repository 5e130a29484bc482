"""The token embedding (and the output head) of an ONNX causal LM in 8-bit blocks: Q8_0's
grid in onnxruntime's ``GatherBlockQuantized`` and ``MatMulNBits`` (com.microsoft).

Once the decoder linears are 4-bit (``onnx_nbits``), a float32 embedding is most of the file
(SmolLM2-135M: 113 MB of 184). GGUF files keep it in Q8_0 — blocks of 32 along the hidden
dimension, one fp16 scale ``d`` each, ``w = d · q`` with q in −127..127 — and so does this
export: the codes go in as ``u = q + 128`` (both operators' default zero point for 8-bit
uint8 data is 128) with the fp16 scales in float32 (exact). The lookup becomes
``GatherBlockQuantized(data [V, H] uint8, indices, scales [V, H/32])`` and the head
``MatMulNBits(bits=8, block_size=32)`` on the same codes laid out ``[V, H/32, 32]``; a tied
head is stored once (its codes reach the head through a ``Reshape`` of the lookup's
initializer). Verification then compares onnxruntime with the in-memory model whose
embedding holds those same rounded values, as the GGUF verification does for tensors the
exporter rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from compactor.export.onnx_nbits import ACCURACY_LEVELS, digest, save_rewritten

BLOCK = 32  # Q8_0's block


def q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int [V, H] in −127..127, scales float32 [V, H/32], dequantized float32 [V, H])
    of ``weight`` on GGUF's Q8_0 grid (our ggml RTN, the values a Q8_0 file holds)."""
    from compactor.primitives.ggml import ggml_qparams

    w = weight.detach().float()
    qp = ggml_qparams(w, "q8_0")
    codes = qp.quantize(w)
    return codes, qp.scale.float(), qp.dequantize(codes)


def fits(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[1] % BLOCK == 0


def _u8(codes: torch.Tensor) -> np.ndarray:
    """Q8_0 codes −127..127 as the operators' uint8 with zero point 128."""
    return (codes.to(torch.int64) + 128).numpy().astype(np.uint8)


def rewrite_embedding_q8(path, embed_weight: torch.Tensor, head_weight: torch.Tensor | None,
                         accuracy: str = "fp32") -> dict:
    """Rewrite the ONNX file ``path``: the ``Gather`` on the embedding initializer becomes a
    ``GatherBlockQuantized`` and the head's ``MatMul`` (on ``head_weight``ᵀ; the embedding
    itself when tied, ``head_weight is embed_weight``) a ``MatMulNBits``, both 8-bit Q8_0.
    Initializers are found by value. Returns what was replaced."""
    import onnx
    from onnx import helper, numpy_helper

    g = onnx.load(str(path))
    inits = {i.name: i for i in g.graph.initializer}
    codes, scales, _ = q8_0(embed_weight)
    tied = head_weight is None or head_weight is embed_weight
    head_weight = embed_weight if tied else head_weight
    emb_digest = digest(embed_weight.detach().float().numpy())
    head_digest = digest(head_weight.detach().float().numpy())  # [V, H], as stored
    v, h = codes.shape
    new_inits = [numpy_helper.from_array(_u8(codes), "embed_q8_data"),  # [V, H]
                 numpy_helper.from_array(scales.numpy().astype(np.float32), "embed_q8_scales")]
    # The exporter writes the head as MatMul(x, Wᵀ): Wᵀ either a folded initializer [H, V] or
    # a Transpose of the [V, H] initializer the lookup also reads (a tied head).
    transposed = {n.output[0]: n.input[0] for n in g.graph.node if n.op_type == "Transpose"
                  and n.input[0] in inits and [a.ints for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])}

    def is_head(name: str) -> bool:
        if name in inits and list(inits[name].dims) == [h, v]:
            return digest(numpy_helper.to_array(inits[name]).T) == head_digest
        src = inits.get(transposed.get(name, ""))
        return src is not None and list(src.dims) == [v, h] and digest(numpy_helper.to_array(src)) == head_digest

    done = {"gather": 0, "head": 0}
    nodes = []
    scale_name = "embed_q8_scales" if tied else "head_q8_scales"
    for node in g.graph.node:
        data = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if data is not None and list(data.dims) == [v, h] and digest(numpy_helper.to_array(data)) == emb_digest:
            nodes.append(helper.make_node("GatherBlockQuantized", ["embed_q8_data", node.input[1], "embed_q8_scales"],
                                          list(node.output), name="embed_q8_gather", domain="com.microsoft",
                                          bits=8, block_size=BLOCK, gather_axis=0, quantize_axis=1))
            done["gather"] += 1
            continue
        if node.op_type == "MatMul" and len(node.input) == 2 and is_head(node.input[1]):
            if not done["head"]:
                if tied:  # the lookup's codes, reshaped to MatMulNBits' [N, k_blocks, blob]
                    new_inits.append(numpy_helper.from_array(np.array([v, h // BLOCK, BLOCK], np.int64),
                                                             "head_q8_shape"))
                    nodes.append(helper.make_node("Reshape", ["embed_q8_data", "head_q8_shape"], ["head_q8_B"],
                                                  name="head_q8_reshape"))
                else:
                    hc, hs, _ = q8_0(head_weight)
                    new_inits += [numpy_helper.from_array(_u8(hc).reshape(v, h // BLOCK, BLOCK), "head_q8_B"),
                                  numpy_helper.from_array(hs.numpy().astype(np.float32), "head_q8_scales")]
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], "head_q8_B", scale_name],
                                          list(node.output), name=f"head_q8_{done['head']}", domain="com.microsoft",
                                          K=h, N=v, bits=8, block_size=BLOCK,
                                          accuracy_level=ACCURACY_LEVELS[accuracy]))
            done["head"] += 1
            continue
        nodes.append(node)
    if not done["gather"]:
        return {"embedding": "float32 (its Gather was not found in the graph)"}
    # Transposes no node reads any more (the initializers go with them).
    consumed = {i for node in nodes for i in node.input} | {o.name for o in g.graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and n.output[0] not in consumed)]
    save_rewritten(g, path, nodes, new_inits)
    return {"embedding": "q8_0", "embedding_gathers": done["gather"], "head_matmuls": done["head"],
            "head": ("float32 (its MatMul was not found in the graph)" if not done["head"]
                     else "q8_0 (tied: the embedding's codes)" if tied else "q8_0")}


class RoundedEmbedding:
    """While active, the model's embedding (and untied head) hold their Q8_0-rounded values:
    the in-memory side of the verification of a graph written by :func:`rewrite_embedding_q8`."""

    def __init__(self, model, head: bool = True):
        self.model = model
        self.head = head  # the graph's head is Q8_0 too (see rewrite_embedding_q8's summary)
        self.saved = []

    def __enter__(self):
        emb = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        head_w = None if head is None else head.weight
        if head_w is emb and not self.head:
            raise ValueError("a tied head shares the embedding: it cannot stay float while the lookup is Q8_0")
        ws = [emb] + ([head_w] if self.head and head_w is not None and head_w is not emb else [])
        for w in ws:
            self.saved.append((w, w.data))
            w.data = q8_0(w)[2].to(w.dtype)
        return self.model

    def __exit__(self, *exc):
        for w, data in self.saved:
            w.data = data
        self.saved = []
