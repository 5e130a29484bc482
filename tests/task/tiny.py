"""A tiny random BERT and a synthetic 3-label task for the task path's tests.

Texts are 8 words drawn from positive, negative and filler words; the label is the sign of
(#positive − #negative): negative / neutral / positive, a function a 2-layer model learns.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch

POS = [f"good{i}" for i in range(6)]
NEG = [f"bad{i}" for i in range(6)]
FILL = [f"word{i}" for i in range(24)]
NAMES = ("negative", "neutral", "positive")


def make_tokenizer(d: Path):
    """A WordPiece tokenizer (BERT's normalizer, pre-tokenizer and [CLS] ... [SEP]) whose
    vocabulary holds the task's words and every single character."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), *POS, *NEG, *FILL]
    ids = {t: i for i, t in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    d.mkdir(parents=True, exist_ok=True)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]")


def make_encoder(d: Path, layers: int = 2, hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """A random BertModel + tokenizer saved as a transformers directory ``d``."""
    from transformers import BertConfig, BertModel

    tok = make_tokenizer(d)
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


def examples(n: int, seed: int, noise: float = 0.0) -> list[dict]:
    """``n`` labeled texts; ``noise``: the fraction of labels replaced by a random one."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(POS + NEG + FILL + FILL) for _ in range(8)]
        s = sum(w in POS for w in words) - sum(w in NEG for w in words)
        label = NAMES[(s > 0) - (s < 0) + 1]
        if noise and rng.random() < noise:
            label = rng.choice(NAMES)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
