"""Tiny random models and a byte-level tokenizer, for fast tests and examples.

Nothing here touches the network: configs are built in code and weights are random (seeded).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3": Gemma3TextConfig,
    "phi3": Phi3Config,
}

#: Byte-level vocabulary: 256 bytes + BOS + EOS.
TINY_VOCAB = 258


def tiny_config(family: str = "llama", **overrides):
    """A 2-layer, 64-wide config of ``family`` with 4 heads / 2 KV heads (GQA)."""
    if family not in _CONFIGS:
        raise ValueError(f"tiny models exist for {sorted(_CONFIGS)}, not {family!r}")
    kw = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
    )
    if family in ("gemma2", "gemma3"):  # attention scale and window, sized for the tiny model
        kw.update(query_pre_attn_scalar=16, sliding_window=32)
    kw.update(overrides)
    return _CONFIGS[family](**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM (float32, eval mode) built from :func:`tiny_config`."""
    cfg = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG is left as it was
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # Random init with std 0.02 gives near-uniform logits; widen so tests see real contrasts.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: every UTF-8 byte is one token (ids 0..255), BOS 256, EOS 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for bytes
    # Order ids by byte value so id == byte.
    byte_to_char = {b: c for b, c in enumerate(_bytes_to_unicode())}
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
