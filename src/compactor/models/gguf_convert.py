"""A GGUF file as a float32 safetensors checkpoint, converted tensor by tensor.

The inverse of our GGUF exporter (and of llama.cpp's converter): every tensor is read with
plain file I/O at its offset (not through the reader's memory map, whose touched pages would
stay counted in RSS), dequantized by ``gguf.quants``, its q/k rows put back in transformers'
order for the Llama family, Gemma's stored ``1 + w`` norm gains turned back into ``w``, and
written into sharded safetensors in layer order — never a whole dequantized model in memory.
The config and tokenizer come from transformers' GGUF metadata readers (no tensors loaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.models.adapters import Adapter


def _read_tensor(f, t) -> torch.Tensor:
    """One GGUF tensor as float32 ``[rows, cols]`` (or ``[n]``), read at its offset a few rows
    at a time into the result (``gguf.quants`` dequantizes through float temporaries several
    times a whole embedding's size)."""
    from gguf.quants import dequantize

    from compactor.primitives.packing import row_chunks

    stored = [int(d) for d in t.data.shape]  # [..., rows, row bytes or values], or [n]
    shape = [int(d) for d in reversed(t.shape)] if len(t.shape) > 1 else [-1]
    rows = int(np.prod(stored[:-1])) if len(stored) > 1 else 1
    row_bytes = int(t.n_bytes) // rows
    out = torch.empty(rows, int(np.prod([int(d) for d in t.shape])) // rows, dtype=torch.float32)
    f.seek(int(t.data_offset))
    for a, b in row_chunks(rows, out.shape[1]):
        raw = f.read(row_bytes * (b - a))
        if len(raw) != row_bytes * (b - a):
            raise CompactorError(f"tensor {t.name} is truncated (rows {a}..{b} of {rows} incomplete)")
        data = np.frombuffer(raw, dtype=t.data.dtype).reshape(b - a, -1)
        out[a:b] = torch.from_numpy(np.asarray(dequantize(data, t.tensor_type), dtype=np.float32).reshape(b - a, -1))
    return out.reshape(shape)


def convert_gguf(path: Path, dest: Path, adapter: Adapter) -> None:
    """Write ``path`` as a transformers checkpoint directory at ``dest`` (must exist)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from compactor.export.gguf import permuted_heads, qk_row_permutation
    from compactor.models.stream import skeleton_from_config
    from compactor.quant.storage import ModelWriter

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # damaged metadata surfaces as assorted types from transformers/tokenizers
        raise CompactorError(f"transformers cannot read the metadata of GGUF {path}: "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    model = skeleton_from_config(config)
    config.architectures = [type(model).__name__]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[adapter.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    head = f"{adapter.lm_head}.weight"
    tied = getattr(config, "tie_word_embeddings", False)
    writer = ModelWriter(dest)
    with open(path, "rb") as f:
        for name, p in model.named_parameters(remove_duplicate=False):
            gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if name == head and (tied or gname not in by_name):
                if not tied:
                    raise CompactorError(f"{path}: no tensor output.weight for the untied head")
                continue
            if gname not in by_name:
                raise CompactorError(f"{path}: tensor {gname} (for {name}) is not in the file")
            w = _read_tensor(f, by_name[gname])
            if list(w.shape) != list(p.shape):
                raise CompactorError(f"{path}: tensor {gname} has shape {list(w.shape)}, the "
                                     f"config says {list(p.shape)}")
            n_head = permuted_heads(name, adapter, config)
            if n_head:  # file row r holds transformers row perm[r]
                restored = torch.empty_like(w)
                restored[qk_row_permutation(w.shape[0], n_head)] = w
                w = restored
            if adapter.norm_offset and name.endswith("norm.weight"):
                w = w - adapter.norm_offset
            writer.weights.add(name, w)
    writer.close(config, tok)
