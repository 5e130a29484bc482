"""Head importance by the gradient of the loss with respect to a head mask (Michel et al.,
2019, "Are Sixteen Heads Really Better than One?", arXiv:1905.10650, eq. 2):

    I_h = E_x | dL(x) / d xi_h |,

where xi_h multiplies head h's output (the slice of the attention output projection's input
that head h writes) and L is the model's loss (here next-token cross-entropy on calibration
windows). Scores are normalized per layer by their L2 norm, as in the paper (sec. 4.1), and a
key/value group (what a GQA cut removes) sums its query heads. The alternative next to the
activation energy of ``prune/importance.py``: it needs one backward pass per batch and the
model in memory.
"""

from __future__ import annotations

import torch

from compactor.models.adapters import Adapter, adapter_for, decoder_layers


def mask_gradients(out_projs, n_heads: int, head_dim: int, loss_fn, model,
                   mask: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``dL/d xi`` per layer ``[heads]``: ``xi`` multiplies the input columns of each layer's
    attention output projection (``out_projs``), head h owning columns h·hd .. (h+1)·hd, and
    ``loss_fn()`` runs the model and returns the scalar loss. The model's own parameters get
    no gradient (their ``requires_grad`` is restored)."""
    xi = [(m.detach().clone() if mask is not None else torch.ones(n_heads)).requires_grad_(True)
          for m in (mask or [None] * len(out_projs))]
    hooks = []
    for proj, x in zip(out_projs, xi):

        def scale(_m, args, x=x):
            h = args[0]  # [B, T, heads * hd]: head h writes columns h*hd .. (h+1)*hd
            return (h * x.to(h.dtype).repeat_interleave(head_dim),)

        hooks.append(proj.register_forward_pre_hook(scale))
    was = [p.requires_grad for p in model.parameters()]
    try:
        model.requires_grad_(False)
        grads = torch.autograd.grad(loss_fn(), xi)
    finally:
        for h in hooks:
            h.remove()
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return [g.detach() for g in grads]


def normalized(total: list[torch.Tensor], batches: int) -> list[torch.Tensor]:
    """Mean over ``batches`` and L2-normalized per layer (Michel et al., sec. 4.1)."""
    return [(t / batches) / (t / batches).norm().clamp_min(1e-12) for t in total]


def head_mask_gradients(model, input_ids: torch.Tensor, adapter: Adapter | None = None,
                        mask: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``dL/d xi`` per layer ``[heads]`` for one batch ``input_ids [B, T]`` (mean token CE),
    with the mask at ``mask`` (default all ones)."""
    adapter = adapter or adapter_for(model)
    cfg = model.config
    n_heads = getattr(cfg, adapter.heads_key)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    projs = [layer.get_submodule(adapter.attn[3]) for layer in decoder_layers(model, adapter)]
    return mask_gradients(projs, n_heads, hd,
                          lambda: model(input_ids=input_ids, labels=input_ids, use_cache=False).loss, model, mask)


def head_mask_importance(model, windows, adapter: Adapter | None = None, batch: int = 4) -> list[torch.Tensor]:
    """Per layer, the key/value groups' importance ``[n_kv]``: E|dL/d xi_h| over batches of
    ``windows``, normalized per layer (L2), summed over each group's query heads."""
    adapter = adapter or adapter_for(model)
    cfg = model.config
    n_heads, n_kv = getattr(cfg, adapter.heads_key), getattr(cfg, adapter.kv_heads_key)
    total = None
    ids = windows.input_ids
    for s in range(0, len(ids), batch):
        g = [x.abs() for x in head_mask_gradients(model, ids[s:s + batch], adapter)]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return [t.reshape(n_kv, n_heads // n_kv).sum(1) for t in normalized(total, len(range(0, len(ids), batch)))]
