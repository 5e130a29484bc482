"""GGUF metadata: architecture keys from the transformers config, the tokenizer (copied from a
source GGUF, or built from a transformers BPE tokenizer), and compactor's provenance.

Every key is written with an explicit GGUF value type so llama.cpp reads exactly what the
reference converter would write. Facts: ../shared/design/FORMATS.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compactor.errors import CompactorError

#: llama.cpp token types (llama_token_type): normal, control (special), user-defined.
_NORMAL, _CONTROL, _USER = 1, 3, 4


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = rope_params(config).get("rope_theta", 10000.0)
    return float(theta)


def rope_params(config, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of a config (transformers >= 5 ``rope_parameters``, older
    ``rope_scaling``), with its type under ``rope_type``. Models with per-layer-type RoPE
    (Gemma 3: ``{"sliding_attention": ..., "full_attention": ...}``) give ``layer_type``'s."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type in params and isinstance(params[layer_type], dict):
        params = dict(params[layer_type])
    params.setdefault("rope_type", params.get("type", "default") or "default")
    return params


def check_swa_layout(config, arch: str, pattern: int, local_base: float, where: str) -> None:
    """Refuse a sliding-window layout llama.cpp would run differently: its ``arch`` builds
    every ``pattern``-th layer global (the rest sliding) with a fixed local RoPE base."""
    types = getattr(config, "layer_types", None)
    if types:
        expect = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(types))]
        if list(types) != expect:
            raise CompactorError(f"{where}: layer_types {list(types)} differ from llama.cpp's {arch} layout "
                                 f"(every {pattern}th layer global); the file would attend differently")
    local = rope_params(config, "sliding_attention").get("rope_theta", local_base)
    if float(local) != local_base:
        raise CompactorError(f"{where}: sliding layers' RoPE base {local} differs from the {local_base} "
                             f"llama.cpp's {arch} assumes")


#: RoPE types llama.cpp runs and compactor writes: unscaled, linear and YaRN (metadata),
#: llama3 (a ``rope_freqs`` tensor of per-dimension factors, as llama.cpp's converter writes it).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _check_rope(config, where: str) -> None:
    kind = rope_params(config)["rope_type"]
    if kind not in ROPE_TYPES:
        raise CompactorError(
            f"{where}: RoPE scaling {kind!r} is not supported by compactor's GGUF exporter yet "
            f"(supported: {', '.join(ROPE_TYPES)}); the file would run with wrong positions"
        )


def llama3_rope_factors(config):
    """Per-frequency divisors of Llama 3.x RoPE scaling (``[head_dim / 2]`` float32): 1 for
    short wavelengths, ``factor`` for long ones, smoothly in between — what llama.cpp reads
    from ``rope_freqs`` and transformers' llama3 RoPE applies. The original context length is
    the config's (transformers' rule), so the file computes what the in-memory model does."""
    import math

    import torch

    p = rope_params(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = _rope_theta(config)
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings",
                      getattr(config, "original_max_position_embeddings", 8192)))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def arch_metadata(config, arch: str, where: str = "model", extra: tuple = ()) -> dict[str, tuple[Any, str]]:
    """``{key: (value, gguf value type name)}`` for the architecture section; ``extra``: the
    adapter's (key, config attribute, type) triples."""
    _check_rope(config, where)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    u, f = "UINT32", "FLOAT32"
    meta = {
        f"{arch}.context_length": (int(config.max_position_embeddings), u),
        f"{arch}.embedding_length": (int(config.hidden_size), u),
        f"{arch}.block_count": (int(config.num_hidden_layers), u),
        f"{arch}.feed_forward_length": (int(config.intermediate_size), u),
        f"{arch}.attention.head_count": (int(config.num_attention_heads), u),
        f"{arch}.attention.head_count_kv": (int(config.num_key_value_heads), u),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), f),
        f"{arch}.rope.freq_base": (_rope_theta(config), f),
        f"{arch}.rope.dimension_count": (int(head_dim), u),
        f"{arch}.attention.key_length": (int(head_dim), u),
        f"{arch}.attention.value_length": (int(head_dim), u),
        f"{arch}.vocab_size": (int(config.vocab_size), u),
    }
    for key, attr, vtype in extra:
        value = getattr(config, attr, None)
        if value is not None:
            meta[f"{arch}.{key}"] = (float(value) if vtype == "FLOAT32" else int(value), vtype)
    rope = rope_params(config)
    if rope["rope_type"] == "linear":
        meta[f"{arch}.rope.scaling.type"] = ("linear", "STRING")
        meta[f"{arch}.rope.scaling.factor"] = (float(rope["factor"]), f)
    if rope["rope_type"] == "yarn":
        _check_yarn(rope, where)
        orig = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        meta[f"{arch}.rope.scaling.type"] = ("yarn", "STRING")
        meta[f"{arch}.rope.scaling.factor"] = (float(rope["factor"]), f)
        meta[f"{arch}.rope.scaling.original_context_length"] = (int(orig), u)
    return meta


def _check_yarn(rope: dict, where: str) -> None:
    """llama.cpp derives YaRN's attention factor (0.1·ln(factor) + 1) and uses β 32 / 1; refuse
    settings it would run differently, by name."""
    import math

    factor = float(rope["factor"])
    att = rope.get("attention_factor")
    if att is not None and abs(att - (0.1 * math.log(factor) + 1)) > 1e-6:
        raise CompactorError(f"{where}: YaRN attention_factor {att} differs from the 0.1·ln(factor)+1 "
                             "llama.cpp derives")
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if float(rope.get(key, default) or default) != default:
            raise CompactorError(f"{where}: YaRN {key} {rope[key]} differs from llama.cpp's {default}")


def tokenizer_from_gguf(path: Path, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """Every ``tokenizer.*`` key of a GGUF file as (key, value, type, sub_type)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), field.types[0], sub))
    tokens = next((v for k, v, _, _ in out if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise CompactorError(f"{path}: GGUF has no tokenizer.ggml.tokens to copy")
    if len(tokens) != vocab_size:
        raise CompactorError(f"{path}: its tokenizer has {len(tokens)} tokens but the model's "
                             f"vocabulary has {vocab_size}; they must match")
    return out


def tokenizer_from_transformers(tokenizer, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """A GPT-2-style BPE tokenizer (tokenizer.json) as GGUF keys.

    The pre-tokenizer is written as ``default``: llama.cpp identifies pre-tokenizers by name,
    which a transformers tokenizer does not carry. Token ids (and so our verification) are
    unaffected; text tokenization inside llama.cpp may differ slightly for exotic input.
    """
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CompactorError(f"{type(tokenizer).__name__} has no tokenizer.json model; GGUF export "
                             "needs a fast (BPE) tokenizer or a source GGUF to copy one from")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CompactorError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export "
                             "(only byte-level BPE); pass a GGUF whose tokenizer should be copied")
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    kinds = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = _CONTROL if added.get("special") else _USER
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id, default=-1) >= vocab_size:
        raise CompactorError(f"tokenizer has token id {max(by_id)} but the model's vocabulary has "
                             f"{vocab_size} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, _NORMAL if i in by_id else _USER) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp's BPE loader requires merges; a merge-less (pure byte) vocabulary is written as
    # "none": the file then runs on token ids only (llama.cpp cannot tokenize text for it).
    out = [
        ("tokenizer.ggml.model", "gpt2" if merges else "none", T.STRING, None),
        ("tokenizer.ggml.pre", "default", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        *([("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)] if merges else []),
        ("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), T.BOOL, None),
    ]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                      ("unknown", "unk_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            out.append((f"tokenizer.ggml.{key}_token_id", int(tid), T.UINT32, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(("tokenizer.chat_template", template, T.STRING, None))
    return out


def provenance_metadata(info: dict[str, Any]) -> dict[str, str]:
    """compactor's own keys: version, recipe, calibration source and token count."""
    from compactor import __version__

    meta = {"compactor.version": __version__}
    for key, value in info.items():
        if value is None:
            continue
        meta[f"compactor.{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta
