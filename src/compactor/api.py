"""The data-free walker — the other place that walks a model: match target modules and
replace each by its handler's result. Also the recipe glue that routes module steps to this
walker or to the sequential calibration runner."""

from __future__ import annotations

from torch import nn

from compactor.errors import CompactorError
from compactor.registry import lookup_config
from compactor.targeting import match_modules


def quantize_(model: nn.Module, cfg, progress: bool = False) -> list[str]:
    """Apply a data-free step (e.g. :class:`RTNConfig`) to every matched module, in place.
    Returns the qualified names of the replaced modules."""
    entry = lookup_config(cfg)
    if getattr(cfg, "needs_calibration", False):
        raise CompactorError(f"{type(cfg).name} needs calibration data: use the sequential runner "
                             "(compactor quantize ... --method gptq) instead of quantize_")
    names = match_modules(model, cfg.targets, cfg.ignore)
    # Steps that decide across modules (global magnitude pruning) look at all of them first.
    shared = cfg.prepare(model, names) if hasattr(cfg, "prepare") else None
    for name in names:
        model.set_submodule(name, entry.handler(model.get_submodule(name), cfg, name=name, stats=shared))
    return names
