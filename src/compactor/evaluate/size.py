"""Storage size and parameter counts of in-memory models.

A module that stores compressed weights (packed integer codes + scales) reports its own
storage through a ``storage_nbytes()`` method and its logical weight count through
``logical_numel()``; its parameters and buffers are then not counted again.
"""

from __future__ import annotations

import torch


def _stored(model: torch.nn.Module):
    """What a model stores, once each: ``(module, None)`` for a module that reports its own
    storage (``storage_nbytes``), else ``(None, tensor)`` for every parameter and persistent
    buffer; tied tensors once, non-persistent buffers (rotary tables) left out."""
    seen: set[int] = set()
    for mod in model.modules():
        if hasattr(mod, "storage_nbytes"):
            seen.update(t.data_ptr() for t in mod.parameters(recurse=False))
            yield mod, None
            continue
        nonpersistent = getattr(mod, "_non_persistent_buffers_set", set())
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or name in nonpersistent:
                continue
            seen.add(t.data_ptr())
            yield None, t


def stored_tensors(model: torch.nn.Module) -> int:
    """How many tensors ``model`` stores (a quantized module's codes as one, tied ones once)."""
    return sum(1 for _ in _stored(model))


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """(storage bytes, parameter count) of a model; tied tensors counted once.

    Persistent buffers count toward bytes (they are saved); non-persistent buffers such as
    rotary tables do not.
    """
    nbytes, numel = 0, 0
    for mod, t in _stored(model):
        if mod is not None:
            nbytes += int(mod.storage_nbytes())
            numel += int(mod.logical_numel())
        else:
            nbytes += t.numel() * t.element_size()
            numel += t.numel() if isinstance(t, torch.nn.Parameter) else 0
    return nbytes, numel


def gguf_size(model: torch.nn.Module, embed_type: str = "q8_0", float_type: str = "f16") -> int:
    """Bytes of tensor data a GGUF export of ``model`` with these types would hold
    (``compactor export --format gguf`` defaults): quantized modules at their grid's size,
    a float token embedding (and the head, once if tied) at ``embed_type``, other float
    matrices at ``float_type``, vectors (norms, biases) in float32. The file adds its header
    and tokenizer on top. Known before exporting: a torch row's size counts the float32
    embedding a quantized model still holds in memory."""
    from compactor.primitives.ggml import GGML_TYPES

    def bpw(t: str) -> float:
        return {"f32": 32.0, "f16": 16.0, "bf16": 16.0}.get(t) or GGML_TYPES[t].bpw

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    table = {id(m.weight) for m in (emb, head) if m is not None and hasattr(m, "weight")}
    nbytes = 0.0
    for mod, t in _stored(model):
        if mod is not None:
            nbytes += int(mod.storage_nbytes())
        else:
            kind = embed_type if id(t) in table else float_type if t.dim() == 2 else "f32"
            nbytes += t.numel() * bpw(kind) / 8
    return int(round(nbytes))


def deployed_size(model: torch.nn.Module) -> tuple[int, int | None]:
    """(bytes a deployment of ``model`` holds, bytes in memory when they differ). A model
    whose quantized modules are all on GGUF grids deploys as a GGUF file: its tensor bytes
    at the export defaults (:func:`gguf_size`; a float32 embedding in memory is Q8_0 in the
    file); any other model as it is stored (:func:`model_size`)."""
    from compactor.primitives.ggml import GGML_TYPES
    from compactor.quant.qlinear import QuantizedLinear

    memory = model_size(model)[0]
    grids = {m.label for m in model.modules() if isinstance(m, QuantizedLinear)}
    if grids and grids <= set(GGML_TYPES):
        return gguf_size(model), memory
    return memory, None
