"""Attention-head pruning of task encoders by Michel et al.'s head-mask importance ("Are
Sixteen Heads Really Better than One?", 2019, arXiv:1905.10650): I_h = E|dL/d xi_h| with L the
task's cross-entropy, normalized per layer (:mod:`compactor.prune.head_mask`).

A pruned layer keeps the q/k/v rows and output-projection columns of its kept heads, so each
layer may keep its own number of heads. The count per layer is saved in ``task.json``
(``heads``) and :func:`compactor.task.model.load_task` rebuilds those shapes before reading the
weights (plain transformers cannot: its config has one head count for every layer).
"""

from __future__ import annotations

import torch

from compactor.distill.losses import cross_entropy
from compactor.errors import CompactorError
from compactor.models.adapters import EncoderAdapter
from compactor.prune.head_mask import mask_gradients, normalized
from compactor.task.model import TaskModel, encoder_layers


def _attn(layer, adapter: EncoderAdapter):
    """The self-attention module (parent of q) and the q, k, v, o linears of ``layer``."""
    q, k, v, o = (layer.get_submodule(n) for n in adapter.attn)
    return layer.get_submodule(adapter.attn[0].rpartition(".")[0]), q, k, v, o


def head_counts(model: TaskModel, adapter: EncoderAdapter) -> list[int]:
    hd = model.config.hidden_size // getattr(model.config, adapter.heads_key)
    return [_attn(layer, adapter)[1].out_features // hd for layer in encoder_layers(model, adapter)]


def head_importance(model: TaskModel, adapter: EncoderAdapter, batches) -> list[torch.Tensor]:
    """Per layer ``[heads]``: E|dL/d xi_h| over ``batches`` of (ids, mask, labels), L2-normalized
    per layer. Dropout is off while measuring (the model is put in eval mode and restored)."""
    counts = head_counts(model, adapter)
    if len(set(counts)) != 1:
        raise CompactorError("head importance of a model that was already head-pruned is not supported")
    hd = model.config.hidden_size // getattr(model.config, adapter.heads_key)
    projs = [_attn(layer, adapter)[4] for layer in encoder_layers(model, adapter)]
    was = model.training
    model.eval()
    total, n = None, 0
    try:
        for ids, mask, y in batches:
            g = mask_gradients(projs, counts[0], hd, lambda: cross_entropy(model(ids, mask).logits, y).mean(), model)
            g = [x.abs() for x in g]
            total = g if total is None else [a + b for a, b in zip(total, g)]
            n += 1
    finally:
        model.train(was)
    if total is None:
        raise CompactorError("head importance needs at least one batch of labeled data")
    return normalized(total, n)


def choose_heads(scores: list[torch.Tensor], fraction: float) -> list[list[int]]:
    """The most important ``round(fraction · heads)`` heads of every layer (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise CompactorError(f"heads:{fraction}: the fraction of heads kept must be in (0, 1]")
    return [sorted(torch.topk(s, max(1, round(fraction * len(s)))).indices.tolist()) for s in scores]


@torch.no_grad()
def prune_heads(model: TaskModel, adapter: EncoderAdapter, keep: list[list[int]]) -> None:
    """Keep only the heads ``keep[layer]`` of every layer, in place."""
    hd = model.config.hidden_size // getattr(model.config, adapter.heads_key)
    for layer, heads in zip(encoder_layers(model, adapter), keep):
        attn, q, k, v, o = _attn(layer, adapter)
        cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])  # this layer's head slices
        for lin in (q, k, v):  # rows: output features of q / k / v
            lin.weight = torch.nn.Parameter(lin.weight[cols].clone())
            lin.bias = torch.nn.Parameter(lin.bias[cols].clone())
            lin.out_features = len(cols)
        o.weight = torch.nn.Parameter(o.weight[:, cols].clone())  # columns: o's input features
        o.in_features = len(cols)
        attn.num_attention_heads, attn.all_head_size = len(heads), len(cols)


def shrink_to_counts(model: TaskModel, adapter: EncoderAdapter, counts: list[int]) -> None:
    """Give a freshly built model the per-layer head counts of a saved pruned one (the first
    heads are kept; their weights are then overwritten by the checkpoint)."""
    if len(counts) != len(encoder_layers(model, adapter)):
        raise CompactorError(f"task.json lists head counts for {len(counts)} layers, the model has "
                             f"{len(encoder_layers(model, adapter))}")
    prune_heads(model, adapter, [list(range(n)) for n in counts])
