"""What to cut: importance of MLP channels, key/value head groups and whole layers, measured
on calibration data in one pass of the sequential runner over the unmodified model.

* MLP channel j of a layer: ``E ||W_down[:, j] x_j||^2 = E[x_j^2] * ||W_down[:, j]||^2`` — the
  energy it adds to the residual stream (x: the input of ``down_proj``).
* Query head h: ``E ||W_o,h x_h||^2 = tr(W_o,h Σ_hh W_o,h^T)`` with Σ the covariance of
  ``o_proj``'s input; a key/value group sums its query heads.
* Layer l: block influence (Men et al., 2024, "ShortGPT", arXiv:2403.03853),
  ``BI = 1 - E_t cos(h_in, h_out)``; or the angular distance of ``n`` consecutive layers
  (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
  arXiv:2403.17887), ``arccos(cos(h_l, h_l+n)) / pi``, which picks the best block to drop.
A unit that never contributes (zero weights or zero activations) scores exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.config import StepConfig
from compactor.models.adapters import Adapter, adapter_for


@dataclass(frozen=True)
class _Observe(StepConfig):
    """Sequential-runner settings for observing (nothing is modified)."""

    name = "importance"


@dataclass
class Importance:
    """Per-layer scores: ``channels[l] [intermediate]``, ``kv_groups[l] [n_kv]``."""

    channels: list[torch.Tensor]
    kv_groups: list[torch.Tensor]


def unit_importance(model, windows, adapter: Adapter | None = None, progress: bool = True) -> Importance:
    """Channel and head-group importance of every decoder layer (one calibration pass)."""
    from compactor.calibration.sequential import run_sequential

    adapter = adapter or adapter_for(model)
    cfg = model.config
    n_heads, n_kv = getattr(cfg, adapter.heads_key), getattr(cfg, adapter.kv_heads_key)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    o_name, down_name = adapter.attn[3], adapter.mlp[2]
    channels: dict[int, torch.Tensor] = {}
    groups: dict[int, torch.Tensor] = {}

    def record(module, _cfg, name, stats):
        li = int(name.split(".")[-3])
        W = module.weight.detach().float()
        if name.endswith(down_name):
            channels[li] = stats.mean_sq() * W.pow(2).sum(0)  # [intermediate]
        else:
            sigma = stats.second_moment()  # E[x x^T], [heads*hd, heads*hd]
            per_head = torch.stack([
                ((W[:, h * hd:(h + 1) * hd] @ sigma[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd])
                 * W[:, h * hd:(h + 1) * hd]).sum()
                for h in range(n_heads)])
            groups[li] = per_head.reshape(n_kv, n_heads // n_kv).sum(1).clamp_min(0)
        return module

    wanted = (o_name, down_name)
    run_sequential(model, windows, record, _Observe(), adapter=adapter, progress=progress,
                   skip=lambda name: not name.endswith(wanted), true_sequential=False)
    n = len(channels)
    return Importance([channels[i] for i in range(n)], [groups[i] for i in range(n)])


def layer_importance(model, windows, metric: str = "block_influence", span: int = 1,
                     adapter: Adapter | None = None, progress: bool = True) -> torch.Tensor:
    """Score per layer (block influence) or per block start (angular distance of ``span``
    consecutive layers); low scores change the hidden state least."""
    from compactor.calibration.sequential import run_sequential

    hidden: list[list[torch.Tensor]] = []
    scores: dict[int, float] = {}

    def cos_mean(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        c = [torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten() for x, y in zip(a, b)]
        return torch.cat(c).clamp(-1, 1)

    def observe(li, inputs, outputs):
        if metric == "block_influence":
            scores[li] = float(1 - cos_mean(inputs, outputs).mean())
            return
        if not hidden:
            hidden.append(inputs)
        hidden.append(outputs)  # hidden[k] is the input of layer k
        if len(hidden) > span:  # the block [li - span + 1, li] is complete
            start = li - span + 1
            scores[start] = float(torch.arccos(cos_mean(hidden[-span - 1], hidden[-1])).mean() / torch.pi)
            hidden.pop(0)

    run_sequential(model, windows, lambda m, *a, **k: m, _Observe(), adapter=adapter,
                   progress=progress, skip=lambda name: True, on_layer=observe)
    return torch.tensor([scores[i] for i in sorted(scores)])
