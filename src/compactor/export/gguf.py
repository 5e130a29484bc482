"""Write a model as a GGUF file that llama.cpp loads unchanged.

Weights already quantized on a ggml grid (:class:`QuantizedLinear` with a ggml label, chosen
by RTN / GPTQ / AWQ) are packed exactly as chosen — no re-rounding. Float matrices (the
embedding, an untied head, any linear left unquantized) are rounded by the exporter to the
type the :class:`GGUFTypes` policy gives them, and the report lists each one. Llama-family
q/k rows are permuted the way llama.cpp's converter does, on the packed rows, so codes and
their block scales move together. The file is written to a temporary path and renamed only
when complete.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from compactor.errors import CompactorError
from compactor.export.gguf_meta import (arch_metadata, check_swa_layout, llama3_rope_factors, provenance_metadata, rope_params,
                                        tokenizer_from_gguf,
                                        tokenizer_from_transformers)
from compactor.io import atomic_file
from compactor.models.adapters import Adapter, adapter_for
from compactor.primitives.ggml import GGML_TYPES, ggml_qparams, resolve_type
from compactor.primitives.packing import pack_ggml, packed_by_rows
from compactor.quant.qlinear import QuantizedLinear

FLOAT_TYPES = ("f32", "f16", "bf16")
GGUF_TYPES = FLOAT_TYPES + tuple(GGML_TYPES)


@dataclass(frozen=True)
class GGUFTypes:
    """Which type each float tensor gets (quantized linears keep their own grid).

    ``body``: linears not quantized in memory; ``embed``: the token embedding (llama.cpp keeps
    it Q8_0 on this model: its rows are 576 wide, and Q6_K falls back to Q8_0);
    ``head``: an untied output head (None: same as ``embed``). Norms and biases stay F32.
    """

    body: str = "q8_0"
    embed: str = "q8_0"
    head: str | None = None

    def __post_init__(self) -> None:
        for key in ("body", "embed", "head"):
            v = getattr(self, key)
            if v is not None and v not in GGUF_TYPES:
                raise CompactorError(f"GGUF type for {key}: {v!r} is not one of {', '.join(GGUF_TYPES)}")


@dataclass
class TensorRecord:
    """One written tensor: its GGUF name and type, and how its values were obtained."""

    name: str
    source: str  # the transformers parameter / module name
    type: str
    numel: int
    nbytes: int
    origin: str  # "codes" (written as chosen), "rounded" (by the exporter) or "float" (f32 as is)
    note: str | None = None


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    tensors: list[TensorRecord]
    size_bytes: int
    params: int
    seconds: float
    adapter: Adapter
    notes: list[str] = field(default_factory=list)

    @property
    def bpw(self) -> float:
        """File bits per weight (tokenizer and metadata included), the comparison we report."""
        return self.size_bytes * 8 / self.params

    def type_mix(self) -> dict[str, float]:
        """Share of parameters per GGUF type, largest first."""
        c: Counter[str] = Counter()
        for t in self.tensors:
            c[t.type] += t.numel
        total = sum(c.values())
        return {k: v / total for k, v in c.most_common()}

    def summary(self) -> dict[str, Any]:
        origins = Counter(t.origin for t in self.tensors)
        return {"path": str(self.path), "size_bytes": self.size_bytes, "bpw": round(self.bpw, 4),
                "params": self.params, "seconds": round(self.seconds, 1),
                "type_mix": {k: round(v, 4) for k, v in self.type_mix().items()},
                "tensors_by_origin": dict(origins), "notes": self.notes}


def qk_row_permutation(out: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k projections: within each head, the two
    RoPE halves (rotate_half layout) become interleaved pairs (GPT-J layout).
    Row ``r`` of the GGUF tensor is row ``perm[r]`` of the transformers weight."""
    hd = out // n_head
    return torch.arange(out).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def permuted_heads(hf_name: str, adapter: Adapter, config) -> int | None:
    """Head count whose RoPE row permutation llama.cpp applies to this tensor (q/k of
    Llama-family models), or None when its rows stay in order."""
    if not adapter.gguf_permute_qk:
        return None
    short = ".".join(hf_name.rsplit(".", 1)[0].split(".")[-2:])
    if short == adapter.attn[0]:
        return getattr(config, adapter.heads_key)
    if short == adapter.attn[1]:
        return getattr(config, adapter.kv_heads_key)
    return None


def _pack_float(w: torch.Tensor, type_name: str) -> tuple[np.ndarray, int]:
    """Float storage: (array, GGML type id)."""
    from gguf import GGMLQuantizationType as Q

    w = w.detach().float().contiguous()
    if type_name == "f32":
        return w.numpy(), Q.F32
    if type_name == "f16":
        return w.numpy().astype(np.float16), Q.F16
    # bf16: top 16 bits of the fp32 pattern, round-to-nearest-even as torch does
    return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), Q.BF16


def _encode(w: torch.Tensor, type_name: str, where: str) -> tuple[np.ndarray, int, str, str | None]:
    """Round a float matrix to ``type_name`` (RTN on our ggml grid, with explicit fallback)."""
    if type_name in FLOAT_TYPES:
        arr, tid = _pack_float(w, type_name)
        return arr, tid, type_name, None
    t, note = resolve_type(type_name, w.shape[1], where)
    w = w.detach().float()

    def part(a: int, b: int) -> np.ndarray:  # rows round independently: a few at a time bound the temporaries
        qp = ggml_qparams(w[a:b], t.name)
        return pack_ggml(qp.quantize(w[a:b]), qp, t.name)

    return packed_by_rows(*w.shape, part), t.type_id, t.name, note


def _walk_module(module, prefix: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(transformers name, tensor-or-QuantizedLinear) for every weight of ``module``, each
    once (tied parameters under the embedding), names prefixed, those under ``skip`` left out."""
    quantized = {n: m for n, m in module.named_modules() if isinstance(m, QuantizedLinear)
                 and not (prefix + n).startswith(skip)}
    for n, m in quantized.items():
        yield f"{prefix}{n}.weight", m
        if m.bias is not None:
            yield f"{prefix}{n}.bias", m.bias
    inside = tuple(f"{n}." for n in quantized)
    for n, p in module.named_parameters():
        if not n.startswith(inside) and not (prefix + n).startswith(skip):
            yield prefix + n, p


def _walk(model, adapter: Adapter, store) -> Iterator[tuple[str, Any]]:
    """Every weight, layer by layer from the weight store (each decoder layer materialized
    while its tensors are packed, then released), then the embedding, final norm and head."""
    from compactor.models.adapters import decoder_layers

    n_layers = len(decoder_layers(model, adapter))
    for i in range(n_layers):
        layer = store.layer(model, i, adapter)
        yield from _walk_module(layer, prefix=f"{adapter.layers}.{i}.")
        del layer
        store.done(model, i, adapter)
    with store.parts(model, [adapter.embed, adapter.final_norm, adapter.lm_head], adapter):
        yield from _walk_module(model, skip=(f"{adapter.layers}.",))


def _tensor_name(name_map, hf_name: str, where: str) -> str:
    gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise CompactorError(f"{where}: tensor {hf_name!r} has no GGUF name for this architecture "
                             "(gguf's tensor map does not know it)")
    return gname


def export_gguf(model, path: str | Path, *, types: GGUFTypes | None = None, tokenizer=None,
                tokenizer_gguf: str | Path | None = None, provenance: dict | None = None,
                adapter: Adapter | None = None, progress: bool = True, store=None) -> GGUFExport:
    """Write ``model`` (transformers causal LM, possibly with QuantizedLinear modules) to
    ``path``. The tokenizer is copied from ``tokenizer_gguf`` when given (keeps llama.cpp's
    pre-tokenizer name), else built from the transformers ``tokenizer``.

    Tensors are packed layer by layer from ``store`` (in memory by default, or streamed
    from disk) and spooled to a temporary file as they are packed, so memory holds one
    layer and its packed arrays, not the file."""
    from compactor.models.stream import ResidentWeights

    import gguf

    store = store or ResidentWeights()
    t0 = time.perf_counter()
    types = types or GGUFTypes()
    adapter = adapter or adapter_for(model)
    path = Path(path)
    if adapter.gguf_arch is None:
        raise CompactorError(f"family {adapter.family!r} has no GGUF architecture in the adapter table")
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[adapter.gguf_arch]
    cfg = model.config
    if adapter.gguf_swa:
        check_swa_layout(cfg, adapter.gguf_arch, *adapter.gguf_swa, str(path))
    if adapter.gguf_square_attn:
        heads = getattr(cfg, adapter.heads_key)
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if heads * hd != cfg.hidden_size:
            raise CompactorError(
                f"{path}: llama.cpp's {adapter.gguf_arch} architecture builds q/o projections of "
                f"hidden x hidden ({cfg.hidden_size}), but this model has {heads} heads x {hd} = "
                f"{heads * hd} (attention heads were cut): it cannot run there; export "
                "compressed-tensors or ONNX, or cut MLP channels/layers instead")
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tok_keys = _tokenizer_keys(cfg, tokenizer, tokenizer_gguf)

    records: list[TensorRecord] = []
    notes: list[str] = []
    embed_w = f"{adapter.embed}.weight"
    import tempfile

    writer = gguf.GGUFWriter(None, adapter.gguf_arch, use_temp_file=True)
    # Packed tensors spool to a file beside the output (past 256 MB in memory), in order;
    # the header, written last, is followed by a copy of the spool.
    writer.temp_file = tempfile.SpooledTemporaryFile(mode="w+b", max_size=256 * 1024**2,
                                                     dir=str(path.parent.resolve()))
    _pack_all(model, adapter, store, types, cfg, name_map, path, embed_w, records, notes, writer,
              progress)
    if rope_params(cfg)["rope_type"] == "llama3":  # per-frequency divisors, as llama.cpp's converter writes
        factors = llama3_rope_factors(cfg).numpy()
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        records.append(TensorRecord("rope_freqs.weight", "(llama3 RoPE scaling)", "f32", factors.size,
                                    factors.nbytes, "float"))
    with atomic_file(path) as tmp:
        _add_metadata(writer, cfg, adapter, str(path), tok_keys, _file_type(records), provenance)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    size = path.stat().st_size
    params = sum(r.numel for r in records if r.name != "rope_freqs.weight")  # weights, not RoPE factors
    return GGUFExport(path, records, size, params, time.perf_counter() - t0, adapter, _count(notes))


def _pack_all(model, adapter, store, types, cfg, name_map, path, embed_w, records, notes, writer,
              progress) -> None:
    """Pack every tensor (codes as chosen, floats rounded to the policy's type) and hand it
    to the writer, which spools it; records what was written."""
    import gguf
    from tqdm.auto import tqdm

    for hf_name, obj in tqdm(_walk(model, adapter, store), desc="gguf tensors", disable=not progress,
                             leave=False):
        gname = _tensor_name(name_map, hf_name, str(path))
        note = None
        if isinstance(obj, QuantizedLinear):
            if obj.label not in GGML_TYPES:
                raise CompactorError(
                    f"{hf_name}: quantized on grid {obj.label!r}, which has no GGUF block type; "
                    "quantize on a ggml grid (q4_0, q4_k, iq4_nl ...) or export compressed-tensors")
            arr, tid, tname, origin = pack_ggml(obj.codes, obj.qparams, obj.label), \
                GGML_TYPES[obj.label].type_id, obj.label, "codes"
            rows = obj.out_features
        else:
            w = obj.detach()
            if w.dim() == 1:
                if hf_name.endswith("norm.weight") and adapter.norm_offset:
                    w = w + adapter.norm_offset  # llama.cpp stores the effective RMSNorm gain
                arr, tid = _pack_float(w, "f32")
                tname, origin = "f32", "float"
            else:
                want = (types.embed if hf_name == embed_w
                        else (types.head or types.embed) if hf_name == f"{adapter.lm_head}.weight"
                        else types.body)
                arr, tid, tname, note = _encode(w, want, hf_name)
                origin = "float" if tname == "f32" else "rounded"  # f16/bf16 round too
            rows = w.shape[0]
        n_head = permuted_heads(hf_name, adapter, cfg)
        if n_head:  # packed rows (or bias entries) move whole, codes and scales together
            arr = arr[qk_row_permutation(rows, n_head).numpy()]
        numel = obj.out_features * obj.in_features if isinstance(obj, QuantizedLinear) else obj.numel()
        records.append(TensorRecord(gname, hf_name, tname, numel, arr.nbytes, origin, note))
        raw = gguf.GGMLQuantizationType(tid)
        writer.add_tensor(gname, np.ascontiguousarray(arr), raw_dtype=None if raw.name in ("F32", "F16") else raw)
        if note:
            notes.append(note)



def _tokenizer_keys(cfg, tokenizer, tokenizer_gguf) -> list:
    if tokenizer_gguf is not None:
        return tokenizer_from_gguf(Path(tokenizer_gguf), cfg.vocab_size)
    if tokenizer is not None:
        return tokenizer_from_transformers(tokenizer, cfg.vocab_size)
    raise CompactorError("GGUF export needs a tokenizer: pass the transformers tokenizer or a GGUF to copy it from")


def _add_metadata(writer, cfg, adapter: Adapter, where: str, tok_keys: list, file_type: int,
                  provenance: dict | None) -> None:
    """The key/value section: general keys, the architecture's, the tokenizer's, provenance."""
    import gguf

    writer.add_string("general.name", getattr(cfg, "_name_or_path", "") or "compactor model")
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    writer.add_uint32("general.file_type", file_type)
    for key, (value, vtype) in arch_metadata(cfg, adapter.gguf_arch, where, adapter.gguf_keys).items():
        writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    for key, value, vtype, sub in tok_keys:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for key, value in provenance_metadata(provenance or {}).items():
        writer.add_string(key, value)


#: Upper bound on one tensor's entry in a GGUF header: its name (<= 64 bytes) with length,
#: dimension count, up to 4 dimensions, type, offset; plus up to 31 bytes of data alignment.
_TENSOR_INFO_BYTES = 8 + 64 + 4 + 4 * 8 + 4 + 8 + 31


def header_bytes(model, tokenizer=None, tokenizer_gguf=None, adapter: Adapter | None = None,
                 provenance: dict | None = None) -> int:
    """Bytes a GGUF export of ``model`` adds around its tensor data (the key/value section
    with the tokenizer, and the tensor infos, bounded from above): with the tensor bytes
    (:func:`compactor.evaluate.size.gguf_size`) the size of the file, known before export."""
    import tempfile

    import gguf

    adapter = adapter or adapter_for(model)
    cfg = model.config
    tok_keys = _tokenizer_keys(cfg, tokenizer, tokenizer_gguf)
    with tempfile.TemporaryDirectory(prefix="compactor-header-") as d:
        writer = gguf.GGUFWriter(str(Path(d) / "h.gguf"), adapter.gguf_arch)
        _add_metadata(writer, cfg, adapter, "model", tok_keys, 0, provenance)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        kv = (Path(d) / "h.gguf").stat().st_size
    from compactor.evaluate.size import stored_tensors

    return kv + (stored_tensors(model) + 1) * _TENSOR_INFO_BYTES  # + llama3's rope_freqs


def _count(notes: list[str]) -> list[str]:
    c = Counter(n.split(": ", 1)[-1] for n in notes)
    return [f"{k} tensor{'s' if k > 1 else ''}: {n}" for n, k in sorted(c.items())]


def _file_type(records: list[TensorRecord]) -> int:
    """general.file_type: the type holding most matrix parameters (informational for llama.cpp)."""
    from gguf import LlamaFileType as F

    c: Counter[str] = Counter()
    for r in records:
        if r.origin != "float" or r.type != "f32":
            c[r.type] += r.numel
    main = c.most_common(1)[0][0] if c else "f32"
    name = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q4_k": "MOSTLY_Q4_K_M",
            "q5_k": "MOSTLY_Q5_K_M", "q3_k": "MOSTLY_Q3_K_M", "q2_k": "MOSTLY_Q2_K",
            "q6_k": "MOSTLY_Q6_K"}.get(main, f"MOSTLY_{main.upper()}")
    return int(F[name])

