"""The memory plan of a GGUF export, printed before anything is written and held to a cap.

An export has three phases that are never in memory together: packing (one decoder layer
materialized, or the embedding / head), the expected logits of a streamed model (the outer
parts and the windows' final hidden states), and the runtime check, where llama.cpp holds the
whole file. Measured on the 32-layer 8B-width synthetic model (``bench/results/scale.md``):
before rows were packed a few at a time and llama.cpp read the file instead of mapping it,
the export peaked at 9.76 GB (a whole 49,152 x 4,096 embedding packed at once took ~4 GB of
temporaries; a mapped file stays counted in RSS beside llama.cpp's repacked copy of its
Q4_0 tensors).
"""

from __future__ import annotations

from compactor.memory import fmt_bytes
from compactor.plan import MemoryPlan, memory_cap, param_counts

#: gguf-py's writer spools tensors in memory up to this size, then in a file on disk.
WRITER_SPOOL = 256 << 20
_FLOAT_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


def _tensor_bytes(type_name: str, rows: int, cols: int) -> int:
    from compactor.primitives.ggml import resolve_type
    from compactor.primitives.packing import ggml_row_bytes

    if type_name in _FLOAT_BYTES:
        return rows * cols * _FLOAT_BYTES[type_name]
    # the type the exporter will fall back to where the row width does not take this one
    return rows * ggml_row_bytes(resolve_type(type_name, cols, "plan")[0].name, cols)


def quantized_shapes(loaded) -> dict[str, tuple[str, int, int]]:
    """Module name -> (ggml grid, rows, cols) of every quantized linear, without materializing a
    weight: the streamed source's manifest, or the quantized modules in memory (whose codes
    are buffers, not parameters)."""
    if loaded.streamed:
        from compactor.quant.storage import read_manifest

        return {n: (e["grid"], *e["shape"]) for n, e in read_manifest(loaded.path).items()
                if e.get("kind") == "linear"}
    from compactor.quant.storage import quantized_modules

    return {n: (m.label, m.out_features, m.in_features) for n, m in quantized_modules(loaded.model).items()}


def gguf_file_bytes(loaded, types) -> int:
    """The tensor bytes the file will hold (header excluded): quantized linears on their grid,
    the rest at the types the export assigns (an estimate where a K-quant falls back)."""
    model, adapter = loaded.model, loaded.adapter
    quantized = quantized_shapes(loaded)
    embed_w, head_w = f"{adapter.embed}.weight", f"{adapter.lm_head}.weight"
    tied = getattr(model.config, "tie_word_embeddings", False)
    total = sum(_tensor_bytes(grid, rows, cols) for grid, rows, cols in quantized.values())
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if (tied and name == head_w) or (module in quantized and name.endswith(".weight")):
            continue
        if p.dim() < 2:
            total += p.numel() * 4
            continue
        want = (types.embed if name == embed_w else (types.head or types.embed) if name == head_w
                else types.body)
        total += _tensor_bytes(want, p.shape[0], p.numel() // p.shape[0])
    return total


def plan_gguf_export(loaded, types, *, verify_windows: tuple[int, int] | None, n_ctx: int,
                     max_memory: str | int | None = None) -> MemoryPlan:
    """The plan of exporting ``loaded`` as GGUF with ``types``; ``verify_windows``: (windows,
    tokens per window) of the runtime check, or None without one; ``n_ctx``: llama.cpp's
    context there (its logits buffer holds every position of it)."""
    import psutil

    from compactor.primitives.packing import CHUNK_WEIGHTS

    model = loaded.model
    cfg = model.config
    layer_params, _, outer = param_counts(model, loaded.adapter)
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    # Measured after loading: for a model in memory this already holds its weights.
    items = [("this process now (torch, transformers, tokenizer" + ("" if loaded.streamed else ", the model")
              + ")", psutil.Process().memory_info().rss)]
    phases: dict[str, str] = {}

    def add(name: str, nbytes: int, phase: str | None = None) -> None:
        items.append((name, int(nbytes)))
        if phase:
            phases[name] = phase

    if loaded.streamed:
        add("largest decoder layer (streamed; float32 and codes)", layer_params * 4 * 2, "layer")
        add("embedding / head while materialized (float32)", outer * 4, "outer")
    largest_2d = max(p.numel() for p in model.parameters() if p.dim() == 2)
    file_bytes = gguf_file_bytes(loaded, types)
    # int64 codes, float32 scale expansions and numpy temporaries of one chunk of rows
    add("packing a few rows at a time (temporaries)", min(CHUNK_WEIGHTS, largest_2d) * 8 * 8)
    add("the largest packed tensor before the writer spools it", largest_2d * 2, "layer")
    add("GGUF writer: in-memory spool (then a file on disk)", min(WRITER_SPOOL, file_bytes))
    if verify_windows is not None:
        n, length = verify_windows
        from compactor.evaluate.backends import chunk_rows

        rows = min(length, chunk_rows(vocab))
        if loaded.streamed:
            add("verification: final hidden states of every window", n * length * hidden * 4 * 2, "outer")
        # llama.cpp reads the file into its own buffers (not mapped: see above), keeps logits
        # for every position of its context; we score a chunk of positions against the cache.
        add("verification: llama.cpp's copy of the file", file_bytes, "runtime")
        add("verification: llama.cpp's logits and compute buffers", n_ctx * vocab * 4 * 2 + (256 << 20), "runtime")
        add("verification: scoring one chunk of positions", rows * vocab * 4 * 8, "runtime")
    cap, source = memory_cap(max_memory, items[0][1])
    plan = MemoryPlan(items, cap, source, phases=phases)
    if not plan.fits:
        plan.suggestions = (["--stream (weights read layer by layer from disk)"] if not loaded.streamed else [])
        if verify_windows is not None and file_bytes > plan.cap // 2:
            plan.suggestions.append("a smaller file (a lower --embed-type / --type), or a machine that holds "
                                    f"the file ({fmt_bytes(file_bytes)}) in llama.cpp for the check")
    return plan
