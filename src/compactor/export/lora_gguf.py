"""LoRA adapters as llama.cpp adapter GGUF files, loaded beside the base file at run time.

The layout llama.cpp reads (its ``llama-adapter.cpp``): ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``; for every adapted base tensor ``<name>`` two
tensors ``<name>.lora_a`` (``[r, in]`` in PyTorch order, ggml ``ne = [in, r]``) and
``<name>.lora_b`` (``[out, r]``). llama.cpp scales by ``alpha / r`` with ``r`` read from the
tensor, so one ``alpha`` per file means one ``alpha/r`` for every adapter. Rows of ``lora_b``
for q/k projections get the same RoPE permutation as the base tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compactor.errors import CompactorError
from compactor.io import atomic_file


def export_lora_gguf(model, adapters: dict, path: str | Path, adapter=None) -> dict:
    """Write ``adapters`` (name -> :class:`LoRALinear`) of ``model`` to ``path``; returns a summary."""
    import gguf

    from compactor.export.gguf import _tensor_name, permuted_heads, qk_row_permutation
    from compactor.models.adapters import adapter_for

    if not adapters:
        raise CompactorError("no LoRA adapters to export")
    adapter = adapter or adapter_for(model)
    if adapter.gguf_arch is None:
        raise CompactorError(f"family {adapter.family!r} has no GGUF architecture in the adapter table")
    scalings = {m.scaling for m in adapters.values()}
    ranks = {m.rank for m in adapters.values()}
    if len(scalings) != 1 or len(ranks) != 1:
        raise CompactorError(f"a llama.cpp adapter file has one alpha/rank: these adapters use ranks "
                             f"{sorted(ranks)} and scalings {sorted(scalings)}")
    path = Path(path)
    cfg = model.config
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[adapter.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    rank, scaling = ranks.pop(), scalings.pop()
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), adapter.gguf_arch)
        w.add_string("general.type", "adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(scaling * rank))  # llama.cpp: scale = alpha / r
        nbytes = 0
        for n, m in adapters.items():
            gname = _tensor_name(name_map, f"{n}.weight", str(path))
            a = m.lora_A.detach().float().contiguous().numpy()
            b = m.lora_B.detach().float().contiguous().numpy()
            heads = permuted_heads(f"{n}.weight", adapter, cfg)
            if heads:
                b = b[qk_row_permutation(b.shape[0], heads).numpy()]
            w.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a))
            w.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(b))
            nbytes += a.nbytes + b.nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"path": str(path), "modules": len(adapters), "rank": rank, "alpha": scaling * rank,
            "size_bytes": path.stat().st_size, "tensor_bytes": nbytes}
