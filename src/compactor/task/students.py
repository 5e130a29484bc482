"""Students of a task teacher: fewer layers (chosen three ways) and a trimmed vocabulary.

Layer choice (the student is initialized from the kept teacher layers, DistilBERT's "good
initialization is crucial", Sanh et al., 2019, arXiv:1910.01108):

* ``every``  every other layer, DistilBERT's choice (the kept layers spread over the depth);
* ``lower``  the lowest layers ("How to distill your BERT", 2023, finds lower layers better
  for logit and hidden-state KD);
* ``importance``  the layers that change the hidden state most on task data: block influence
  ``BI_i = 1 − E[cos(h_i, h_{i+1})]`` over real tokens (ShortGPT, Men et al., 2024,
  arXiv:2403.03853); the least influential are dropped.

Spec grammar: ``layers:F[:every|lower|importance]`` (F a fraction of the teacher's layers
such as ``0.5``, or an integer count such as ``3``) or ``layers:i,j,k`` (explicit teacher
layer indices, at least one comma: ``layers:5,`` keeps layer 5 alone).
"""

from __future__ import annotations

import copy
import json
import math

import torch
from torch import nn

from compactor.errors import CompactorError
from compactor.task.model import LoadedTask, TaskModel, encoder_layers

CHOICES = ("every", "lower", "importance")


def parse_layers(spec: str, n_layers: int) -> tuple[list[int] | None, str]:
    """``spec`` -> (explicit indices or None, choice); the count comes with :func:`layer_count`."""
    if not spec.startswith("layers:"):
        raise CompactorError(f"student {spec!r}: expected layers:F[:every|lower|importance] or layers:i,j,k")
    body = spec[len("layers:"):]
    if "," in body:
        try:
            idx = sorted({int(x) for x in body.split(",") if x.strip()})
        except ValueError:
            raise CompactorError(f"student {spec!r}: layer indices must be integers") from None
        if not idx or idx[0] < 0 or idx[-1] >= n_layers:
            raise CompactorError(f"student {spec!r}: layer indices must lie in 0..{n_layers - 1}")
        return idx, "explicit"
    amount, _, choice = body.partition(":")
    choice = choice or "every"
    if choice not in CHOICES:
        raise CompactorError(f"student {spec!r}: layer choice must be one of {', '.join(CHOICES)}")
    return [layer_count(amount, n_layers, spec)], choice


def layer_count(amount: str, n_layers: int, spec: str = "") -> int:
    try:
        x = float(amount)
    except ValueError:
        raise CompactorError(f"student {spec!r}: {amount!r} is not a fraction or a layer count") from None
    k = round(x * n_layers) if "." in amount else int(x)
    if not 1 <= k <= n_layers:
        raise CompactorError(f"student {spec!r}: keeps {k} layers; the teacher has {n_layers}")
    return k


def every_other(k: int, n: int) -> list[int]:
    """``k`` of ``n`` layers spread evenly, the last layer always kept (6 -> 3: 1, 3, 5)."""
    return sorted({n - 1 - math.floor(i * n / k) for i in range(k)})


@torch.no_grad()
def block_influence(model: TaskModel, batches) -> torch.Tensor:
    """``[layers]``: 1 − mean cosine between each layer's input and output hidden states
    over the real tokens of ``batches`` (an iterable of (ids, mask))."""
    total, count = None, 0.0
    for ids, mask in batches:
        hs = model(ids, mask, hidden=True).hidden                  # layers+1 of [B, T, d]
        m = mask.bool()
        cos = torch.stack([nn.functional.cosine_similarity(a[m], b[m], dim=-1).sum()
                           for a, b in zip(hs[:-1], hs[1:])])
        total = cos if total is None else total + cos
        count += float(m.sum())
    return 1 - total / max(count, 1.0)


def choose_layers(task: LoadedTask, spec: str, batches=None) -> list[int]:
    """The teacher layers a student of ``spec`` keeps (``batches`` feed ``importance``)."""
    n = len(encoder_layers(task.model, task.adapter))
    idx, choice = parse_layers(spec, n)
    if choice == "explicit":
        return idx
    k = idx[0]
    if choice == "every":
        return every_other(k, n)
    if choice == "lower":
        return list(range(k))
    if batches is None:
        raise CompactorError(f"student {spec!r}: importance-chosen layers need data")
    bi = block_influence(task.model, batches)
    return sorted(torch.topk(bi, k).indices.tolist())


def layer_student(task: LoadedTask, keep: list[int]) -> TaskModel:
    """A copy of the teacher with only the layers ``keep`` (and its head)."""
    student = copy.deepcopy(task.model)
    layers = encoder_layers(student, task.adapter)
    kept = nn.ModuleList([layers[i] for i in keep])
    parent, _, name = task.adapter.layers.rpartition(".")
    setattr(student.encoder.get_submodule(parent) if parent else student.encoder, name, kept)
    student.encoder.config.num_hidden_layers = len(keep)
    for i, layer in enumerate(kept):  # transformers layers that know their index keep it right
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    return student


# ---- vocabulary trimming ------------------------------------------------------------------

def kept_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Token ids a trimmed vocabulary keeps: every id the task's ``texts`` use, the special
    tokens, and every single-character piece (``a``, ``##a``), so any word of unseen text
    can still be spelled out instead of collapsing to [UNK]."""
    used = set()
    for ids in tokenizer(list(texts), truncation=False)["input_ids"]:
        used.update(ids)
    used.update(tokenizer.all_special_ids)
    for tok, i in tokenizer.get_vocab().items():
        if len(tok) == 1 or (tok.startswith("##") and len(tok) == 3):
            used.add(i)
    return sorted(used)


def trim_vocabulary(model: TaskModel, tokenizer, keep: list[int], adapter):
    """(model, tokenizer) with only the token ids ``keep`` (in their old order): the
    embedding rows are gathered and the tokenizer's WordPiece vocabulary is rewritten to the
    new ids. Works on a fast (``tokenizers``) WordPiece tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("model", {}).get("type") != "WordPiece":
        raise CompactorError("vocabulary trimming needs a WordPiece tokenizer (BERT family)")
    old_to_new = {old: new for new, old in enumerate(keep)}
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {t: old_to_new[i] for t, i in vocab.items() if i in old_to_new}
    if spec["model"].get("unk_token") not in spec["model"]["vocab"]:
        raise CompactorError("the trimmed vocabulary must keep the unknown token")
    for added in spec.get("added_tokens", []):
        added["id"] = old_to_new[added["id"]]
    post = spec.get("post_processor") or {}
    for entry in (post.get("special_tokens") or {}).values():
        entry["ids"] = [old_to_new[i] for i in entry["ids"]]
    for key in ("cls", "sep"):  # BertProcessing stores [token, id] pairs
        if isinstance(post.get(key), list):
            post[key][1] = old_to_new[post[key][1]]
    new_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                      **{k: getattr(tokenizer, k) for k in
                                         ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")},
                                      model_max_length=tokenizer.model_max_length)
    student = copy.deepcopy(model)
    emb = student.encoder.get_submodule(adapter.embed)
    rows = torch.as_tensor(keep)
    new_emb = nn.Embedding(len(keep), emb.embedding_dim, padding_idx=old_to_new.get(emb.padding_idx))
    new_emb.weight.data = emb.weight.data[rows].clone()
    parent, _, name = adapter.embed.rpartition(".")
    setattr(student.encoder.get_submodule(parent), name, new_emb)
    cfg = student.encoder.config
    cfg.vocab_size = len(keep)
    pad = getattr(cfg, adapter.pad_key, None)
    if pad is not None:
        setattr(cfg, adapter.pad_key, old_to_new[pad])
    return student, new_tok
