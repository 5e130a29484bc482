"""Recipe steps ``prune_heads``, ``prune_channels`` and ``drop_layers``: measure importance on
the recipe's calibration windows, cut the least important units, report what was removed.

Library use (e.g. to build distillation students)::

    imp = unit_importance(model, windows)
    keep = lowest_removed(imp.channels, n_remove)
    prune_mlp_channels(model, keep)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.prune.importance import layer_importance, unit_importance
from compactor.prune.structured import count_params, drop_layers, prune_kv_groups, prune_mlp_channels
from compactor.registry import register


def lowest_removed(scores: list[torch.Tensor], n_remove: int) -> list[torch.Tensor]:
    """Per layer, the indices kept after removing the ``n_remove`` lowest scores (stable)."""
    return [torch.argsort(s, stable=True)[n_remove:] for s in scores]


def channels_kept(width: int, fraction: float, multiple_of: int = 64) -> int:
    """MLP width left after removing ``fraction``, rounded to a multiple of ``multiple_of``
    (at least one multiple, at most ``width``)."""
    keep = max(multiple_of, int(round(width * (1 - fraction) / multiple_of)) * multiple_of)
    return min(keep, width)


def _calib(ctx, samples: int | None):
    win = ctx.calib_windows()
    return win.head(samples) if samples else win


@dataclass(frozen=True)
class PruneHeadsConfig(StepConfig):
    """Remove ``fraction`` (or ``count``) of the key/value head groups of every layer, with
    their query heads, by importance."""

    name = "prune_heads"
    fraction: float = 0.0
    count: int | None = None
    samples: int | None = 32
    #: ``activation``: each head's output energy (prune/importance.py, one pass, streams);
    #: ``gradient``: Michel et al.'s head-mask gradient (prune/head_mask.py, needs backward)
    importance: Literal["activation", "gradient"] = "activation"

    def validate(self) -> None:
        check(0 <= self.fraction < 1, f"prune_heads.fraction must be in [0, 1), got {self.fraction}")
        check(self.count is None or self.count >= 0, f"prune_heads.count must be >= 0, got {self.count}")


@dataclass(frozen=True)
class PruneChannelsConfig(StepConfig):
    """Remove ``fraction`` of every layer's MLP channels, rounded so the remaining width is a
    multiple of ``multiple_of`` (keeps GGUF blocks and SIMD widths whole)."""

    name = "prune_channels"
    fraction: float = 0.25
    multiple_of: int = 64
    samples: int | None = 32

    def validate(self) -> None:
        check(0 <= self.fraction < 1, f"prune_channels.fraction must be in [0, 1), got {self.fraction}")
        check(self.multiple_of >= 1, f"prune_channels.multiple_of must be >= 1, got {self.multiple_of}")


@dataclass(frozen=True)
class DropLayersConfig(StepConfig):
    """Remove ``count`` (or ``fraction``) of the decoder layers. ``metric``:
    ``block_influence`` (the individually least influential layers) or ``angular`` (the
    contiguous block whose input and output are closest), or explicit ``layers``."""

    name = "drop_layers"
    count: int | None = None
    fraction: float = 0.0
    metric: Literal["block_influence", "angular"] = "block_influence"
    layers: tuple[int, ...] | None = None
    samples: int | None = 32

    def validate(self) -> None:
        check(0 <= self.fraction < 1, f"drop_layers.fraction must be in [0, 1), got {self.fraction}")
        check(self.count is None or self.count >= 0, f"drop_layers.count must be >= 0, got {self.count}")


@register(PruneHeadsConfig, kind="model")
def _prune_heads(ctx, cfg: PruneHeadsConfig) -> None:
    model, adapter = ctx.loaded.model, ctx.loaded.adapter
    n_kv = getattr(model.config, adapter.kv_heads_key)
    n = cfg.count if cfg.count is not None else int(round(cfg.fraction * n_kv))
    if n >= n_kv:
        raise CompactorError(f"prune_heads: removing {n} of {n_kv} key/value heads per layer would leave none")
    before = count_params(model)
    if n:
        windows = _calib(ctx, cfg.samples)
        if cfg.importance == "gradient":
            from compactor.prune.head_mask import head_mask_importance

            scores = head_mask_importance(model, windows, adapter)
        else:
            scores = unit_importance(model, windows, adapter).kv_groups
        prune_kv_groups(model, lowest_removed(scores, n), adapter)
    ctx.reports.append({"step": cfg.name, "importance": cfg.importance, "kv_heads_removed_per_layer": n,
                        "kv_heads": n_kv - n,
                        "params_before": before, "params_after": count_params(model)})


@register(PruneChannelsConfig, kind="model")
def _prune_channels(ctx, cfg: PruneChannelsConfig) -> None:
    model, adapter = ctx.loaded.model, ctx.loaded.adapter
    width = model.config.intermediate_size
    keep_n = channels_kept(width, cfg.fraction, cfg.multiple_of)
    before = count_params(model)
    if keep_n < width:
        imp = unit_importance(model, _calib(ctx, cfg.samples), adapter)
        prune_mlp_channels(model, lowest_removed(imp.channels, width - keep_n), adapter)
    ctx.reports.append({"step": cfg.name, "intermediate_size": [width, keep_n],
                        "params_before": before, "params_after": count_params(model)})


def choose_layers(model, windows, count: int, metric: str, adapter=None, progress: bool = True) -> list[int]:
    """Which ``count`` layers to drop: the lowest block influence, or the best contiguous block."""
    n = model.config.num_hidden_layers
    if count >= n:
        raise CompactorError(f"drop_layers: removing {count} of {n} layers would leave none")
    if count == 0:
        return []
    if metric == "block_influence":
        s = layer_importance(model, windows, "block_influence", adapter=adapter, progress=progress)
        return sorted(torch.argsort(s, stable=True)[:count].tolist())
    s = layer_importance(model, windows, "angular", span=count, adapter=adapter, progress=progress)
    start = int(torch.argmin(s))
    return list(range(start, start + count))


@register(DropLayersConfig, kind="model")
def _drop_layers(ctx, cfg: DropLayersConfig) -> None:
    model, adapter = ctx.loaded.model, ctx.loaded.adapter
    n = model.config.num_hidden_layers
    before = count_params(model)
    if cfg.layers is not None:
        chosen = sorted(set(cfg.layers))
    else:
        count = cfg.count if cfg.count is not None else int(round(cfg.fraction * n))
        chosen = choose_layers(model, _calib(ctx, cfg.samples), count, cfg.metric, adapter)
    drop_layers(model, chosen, adapter)
    origin = ctx.layer_origin or list(range(n))
    ctx.layer_origin = [o for i, o in enumerate(origin) if i not in set(chosen)]
    ctx.reports.append({"step": cfg.name, "metric": cfg.metric if cfg.layers is None else "explicit",
                        "dropped": chosen, "layers": [n, n - len(chosen)],
                        "params_before": before, "params_after": count_params(model)})
