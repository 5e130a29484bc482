"""Structured cuts that make a model physically smaller: whole decoder layers, key/value head
groups (with their query heads), and MLP channels. Weights are sliced and the config updated,
so the result is a plain transformers model that saves and loads without compactor.

A transformers config has one head count and one MLP width for all layers, so head and
channel cuts remove the same *number* of units from every layer (which units differs per
layer). These functions only cut; choosing what to cut is :mod:`compactor.prune.importance`.
"""

from __future__ import annotations

import torch
from torch import nn

from compactor.errors import CompactorError
from compactor.models.adapters import Adapter, adapter_for, decoder_layers


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` (None: all)."""
    if not isinstance(lin, nn.Linear):
        raise CompactorError(f"structured pruning works on float Linear layers, got {type(lin).__name__} "
                             "(prune before quantizing)")
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def drop_layers(model, indices: list[int], adapter: Adapter | None = None) -> None:
    """Remove decoder layers ``indices`` in place and renumber the rest."""
    adapter = adapter or adapter_for(model)
    layers = decoder_layers(model, adapter)
    n = len(layers)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise CompactorError(f"drop_layers: layer {bad[0]} does not exist (the model has {n})")
    drop = set(indices)
    if len(drop) >= n:
        raise CompactorError(f"drop_layers: removing {len(drop)} of {n} layers would leave none")
    kept = [layers[i] for i in range(n) if i not in drop]
    for new_idx, layer in enumerate(kept):
        attn = layer.get_submodule(adapter.attn[0].rsplit(".", 1)[0])
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by it
    parent_name, _, attr = adapter.layers.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.ModuleList(kept))
    cfg = model.config
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in drop]


def prune_mlp_channels(model, keep: list[torch.Tensor], adapter: Adapter | None = None) -> None:
    """Keep MLP channels ``keep[l]`` (same count in every layer) of each decoder layer."""
    adapter = adapter or adapter_for(model)
    layers = decoder_layers(model, adapter)
    sizes = {len(k) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise CompactorError("prune_mlp_channels: give one index set per layer, all of the same size")
    width = sizes.pop()
    if width < 1:
        raise CompactorError("prune_mlp_channels: at least one channel must remain in every layer")
    gate, up, down = adapter.mlp
    inter = model.config.intermediate_size
    for layer, k in zip(layers, keep):
        k = torch.sort(k).values
        if adapter.fused_gate_up:  # rows [gate | up]: the same channels of each half
            layer.set_submodule(gate, _slice_linear(layer.get_submodule(gate), rows=torch.cat([k, inter + k])))
        else:
            layer.set_submodule(gate, _slice_linear(layer.get_submodule(gate), rows=k))
            layer.set_submodule(up, _slice_linear(layer.get_submodule(up), rows=k))
        layer.set_submodule(down, _slice_linear(layer.get_submodule(down), cols=k))
    model.config.intermediate_size = width


def prune_kv_groups(model, keep: list[torch.Tensor], adapter: Adapter | None = None) -> None:
    """Keep key/value heads ``keep[l]`` (same count per layer) and the query heads that
    attend through them; with one query head per KV head this is plain head pruning."""
    adapter = adapter or adapter_for(model)
    cfg = model.config
    layers = decoder_layers(model, adapter)
    n_heads, n_kv = getattr(cfg, adapter.heads_key), getattr(cfg, adapter.kv_heads_key)
    rep = n_heads // n_kv
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    sizes = {len(k) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise CompactorError("prune_kv_groups: give one index set per layer, all of the same size")
    width = sizes.pop()
    if not 1 <= width <= n_kv:
        raise CompactorError(f"prune_kv_groups: {n_kv} key/value heads exist; cannot keep {width}")
    q, k_, v, o = adapter.attn
    for layer, kk in zip(layers, keep):
        kk = torch.sort(kk).values
        kv_rows = (kk[:, None] * hd + torch.arange(hd)).flatten()
        q_heads = (kk[:, None] * rep + torch.arange(rep)).flatten()
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
        if adapter.fused_qkv:  # rows [q heads | k heads | v heads]
            nq, nk = n_heads * hd, n_kv * hd
            rows = torch.cat([q_rows, nq + kv_rows, nq + nk + kv_rows])
            layer.set_submodule(q, _slice_linear(layer.get_submodule(q), rows=rows))
        else:
            layer.set_submodule(q, _slice_linear(layer.get_submodule(q), rows=q_rows))
            layer.set_submodule(k_, _slice_linear(layer.get_submodule(k_), rows=kv_rows))
            layer.set_submodule(v, _slice_linear(layer.get_submodule(v), rows=kv_rows))
        layer.set_submodule(o, _slice_linear(layer.get_submodule(o), cols=q_rows))
    setattr(cfg, adapter.heads_key, width * rep)
    setattr(cfg, adapter.kv_heads_key, width)
    cfg.head_dim = hd  # no longer hidden_size / heads


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
