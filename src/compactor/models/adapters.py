"""Architecture knowledge as data: one small record per model family.

Everything that walks a model (the data-free walker, the sequential calibration runner,
structured pruning, exporters) asks an :class:`Adapter` where things are instead of
hard-coding names. A new family is one entry in :data:`ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compactor.errors import CompactorError

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Adapter:
    """Where a decoder-only family keeps its parts (names relative to the model or a layer).

    Attributes:
        family: short family name ("llama").
        model_types: values of ``config.model_type`` this entry serves.
        gguf_arch: ``general.architecture`` in GGUF files of this family (None: no GGUF).
        layers: dotted path of the ``nn.ModuleList`` of decoder layers.
        embed / final_norm / lm_head: dotted paths from the model root.
        attn: (q, k, v, o) projection names inside a layer.
        mlp: (gate, up, down) projection names inside a layer.
        input_norm / post_attn_norm: norm names inside a layer: the one feeding attention and
            the one feeding the MLP (Gemma 2/3: ``pre_feedforward_layernorm``; their
            ``post_attention_layernorm`` normalizes the attention output instead).
        sequential_groups: the true-sequential order in which a layer's linears are
            calibrated; a group's members share one input.
        smooth_pairs: (producer, consumers) pairs that an activation scale can be folded
            through (AWQ / SmoothQuant): producer is a norm or linear whose output feeds the
            consumers' input.
        norm_offset: RMSNorm multiplies by ``offset + weight`` (Gemma: 1.0).
        heads_key / kv_heads_key: config keys for the number of attention / key-value heads.
        gguf_permute_qk: llama.cpp's converter interleaves the rows of q/k projections of
            this family for its RoPE layout; the GGUF exporter applies the same permutation.
        gguf_keys: extra GGUF metadata from the config: (key after ``{arch}.``, config
            attribute, GGUF value type); written when the attribute is set.
        gguf_swa: (pattern, local RoPE base) llama.cpp hard-codes for this architecture's
            sliding-window layers (every pattern-th layer global); the exporter refuses a
            config that differs.
        gguf_square_attn: llama.cpp builds this architecture's q/o projections as
            hidden x hidden, so heads x head_dim must equal the hidden size (a head cut
            cannot run there; the exporter refuses it by name).
    """

    family: str
    model_types: tuple[str, ...]
    gguf_arch: str | None
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: tuple[str, str, str, str] = _ATTN
    mlp: tuple[str, str, str] = _MLP
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    norm_offset: float = 0.0
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    gguf_permute_qk: bool = False
    gguf_keys: tuple[tuple[str, str, str], ...] = ()
    gguf_swa: tuple[int, float] | None = None
    gguf_square_attn: bool = False
    sequential_groups: tuple[tuple[str, ...], ...] = field(default=())
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        q, k, v, o = self.attn
        gate, up, down = self.mlp
        uniq = lambda *names: tuple(dict.fromkeys(names))  # a fused projection appears once
        if not self.sequential_groups:
            object.__setattr__(self, "sequential_groups", (uniq(q, k, v), (o,), uniq(gate, up), (down,)))
        if not self.smooth_pairs:
            pairs = [(self.input_norm, uniq(q, k, v))]
            if v != q:  # a fused qkv output is not v alone: no v -> o folding
                pairs.append((v, (o,)))  # exact only when n_heads == n_kv_heads or per-group scales
            pairs.append((self.post_attn_norm, uniq(gate, up)))
            if up != gate:  # a fused gate_up output is not down's input
                pairs.append((up, (down,)))
            object.__setattr__(self, "smooth_pairs", tuple(pairs))

    @property
    def fused_qkv(self) -> bool:
        """q, k and v are one projection (rows: q heads, then k, then v)."""
        return self.attn[0] == self.attn[1] == self.attn[2]

    @property
    def fused_gate_up(self) -> bool:
        """gate and up are one projection (rows: gate, then up)."""
        return self.mlp[0] == self.mlp[1]

    @property
    def linears(self) -> tuple[str, ...]:
        """All linear layers inside one decoder layer, in sequential order."""
        return tuple(dict.fromkeys(name for group in self.sequential_groups for name in group))


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llama", ("llama",), "llama", gguf_permute_qk=True),
    Adapter("mistral", ("mistral",), "llama", gguf_permute_qk=True),
    Adapter("qwen2", ("qwen2",), "qwen2", gguf_square_attn=True),
    # Qwen3: per-head q/k RMSNorm inside attention (after the projections, so AWQ's
    # input-norm -> q/k/v folding still holds), no q/k/v biases.
    Adapter("qwen3", ("qwen3",), "qwen3"),
    Adapter("gemma", ("gemma",), "gemma", norm_offset=1.0),
    # Gemma 2: pre- and post-norms around attention and the MLP, logit soft-capping,
    # sliding-window attention on every other layer (llama.cpp assumes the same pattern).
    Adapter("gemma2", ("gemma2",), "gemma2", norm_offset=1.0, post_attn_norm="pre_feedforward_layernorm",
            gguf_keys=(("attn_logit_softcapping", "attn_logit_softcapping", "FLOAT32"),
                       ("final_logit_softcapping", "final_logit_softcapping", "FLOAT32"),
                       ("attention.sliding_window", "sliding_window", "UINT32"))),
    # Gemma 3 (text): Gemma 2's layout plus per-head q/k RMSNorm (offset 1 like every Gemma
    # norm), no soft-capping; 5 sliding-window layers per global one, local RoPE base 10k.
    Adapter("gemma3", ("gemma3_text",), "gemma3", norm_offset=1.0, post_attn_norm="pre_feedforward_layernorm",
            gguf_keys=(("attention.sliding_window", "sliding_window", "UINT32"),),
            gguf_swa=(6, 10000.0)),
    # Phi-3: fused q/k/v and gate/up projections (one input, one Hessian each); structured
    # cuts slice them by the split geometry (rows: q, k, v heads; gate, then up).
    Adapter("phi3", ("phi3",), "phi3", attn=("self_attn.qkv_proj",) * 3 + ("self_attn.o_proj",),
            mlp=("mlp.gate_up_proj", "mlp.gate_up_proj", "mlp.down_proj"), gguf_square_attn=True),
)

@dataclass(frozen=True)
class EncoderAdapter:
    """Where a bidirectional encoder family (BERT and kin) keeps its parts, relative to the
    transformers base model (``AutoModel``, no task head) or one of its layers.

    Attributes:
        family / model_types: as for :class:`Adapter`.
        layers: dotted path of the ``nn.ModuleList`` of encoder layers.
        embed: the word embedding (the bulk of a small encoder's file).
        attn: (q, k, v, o) projection names inside a layer.
        ffn: (in, out) linears of the feed-forward block inside a layer.
        attn_norm / ffn_norm: the post-LayerNorms after attention and after the FFN.
        pooler: the optional pooler (unused by mean pooling; dropped from students).
        heads_key: config key of the number of attention heads.
        pad_key: config key of the padding token id.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str = "encoder.layer"
    embed: str = "embeddings.word_embeddings"
    attn: tuple[str, str, str, str] = ("attention.self.query", "attention.self.key",
                                       "attention.self.value", "attention.output.dense")
    ffn: tuple[str, str] = ("intermediate.dense", "output.dense")
    attn_norm: str = "attention.output.LayerNorm"
    ffn_norm: str = "output.LayerNorm"
    pooler: str = "pooler"
    heads_key: str = "num_attention_heads"
    pad_key: str = "pad_token_id"

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear inside one encoder layer, in forward order."""
        return (*self.attn, *self.ffn)


ENCODER_ADAPTERS: tuple[EncoderAdapter, ...] = (
    # BERT, and the MiniLM / all-MiniLM sentence encoders built on its layout.
    EncoderAdapter("bert", ("bert",)),
)


def encoder_adapter_for_model_type(model_type: str, where: str = "") -> EncoderAdapter:
    """The encoder adapter serving ``config.model_type``; an encoder-specific error otherwise
    (a causal LM given where an encoder is expected is named as such)."""
    for a in ENCODER_ADAPTERS:
        if model_type in a.model_types:
            return a
    src = f" ({where})" if where else ""
    kind = "a causal LM" if any(model_type in a.model_types for a in ADAPTERS) else "a model family"
    raise CompactorError(
        f"{kind} {model_type!r}{src} was given where an encoder is expected (encoder families in "
        f"models/adapters.py: {', '.join(a.family for a in ENCODER_ADAPTERS)})")


def is_encoder_type(model_type: str) -> bool:
    return any(model_type in a.model_types for a in ENCODER_ADAPTERS)


#: What a new family's entry must provide, quoted in the error for an unknown family.
_NEEDS = (
    "the path of the decoder layer list, the q/k/v/o attention and gate/up/down MLP "
    "projection names, the norm names, and the head-count config keys"
)


def known_families() -> list[str]:
    return [a.family for a in ADAPTERS]


def adapter_for_model_type(model_type: str, where: str = "") -> Adapter:
    """The adapter serving ``config.model_type``, or a CompactorError naming what is missing."""
    for a in ADAPTERS:
        if model_type in a.model_types:
            return a
    src = f" ({where})" if where else ""
    if is_encoder_type(model_type):
        raise CompactorError(
            f"{model_type!r}{src} is an encoder, given to a causal-LM step; encoders take the "
            "task path (--task classify: distill, eval, export)")
    raise CompactorError(
        f"model family {model_type!r}{src} is not in compactor's adapter table "
        f"(models/adapters.py; known: {', '.join(known_families())}); an entry needs {_NEEDS}"
    )


def adapter_for_gguf_arch(arch: str, where: str = "") -> Adapter:
    """The adapter for a GGUF ``general.architecture`` value."""
    for a in ADAPTERS:
        if a.gguf_arch == arch:
            return a
    src = f" ({where})" if where else ""
    raise CompactorError(
        f"GGUF architecture {arch!r}{src} is not in compactor's adapter table "
        f"(models/adapters.py; known: "
        f"{', '.join(sorted({a.gguf_arch for a in ADAPTERS if a.gguf_arch}))}); "
        f"an entry needs {_NEEDS}"
    )


def adapter_for(model) -> Adapter:
    """The adapter for a transformers model instance."""
    return adapter_for_model_type(model.config.model_type, type(model).__name__)


def get_submodule(root, dotted: str):
    """``root.get_submodule`` with an error that names the missing path."""
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        raise CompactorError(
            f"{type(root).__name__} has no submodule {dotted!r}; the adapter entry for this "
            "family does not match the model"
        ) from None


def decoder_layers(model, adapter: Adapter | None = None):
    """The ``nn.ModuleList`` of decoder layers."""
    adapter = adapter or adapter_for(model)
    return get_submodule(model, adapter.layers)
