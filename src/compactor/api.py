"""The data-free walker — the other place that walks a model: match target modules and
replace each by its handler's result. Also the recipe glue that routes module steps to this
walker or to the sequential calibration runner."""

from __future__ import annotations

from torch import nn

from compactor.errors import CompactorError
from compactor.registry import lookup_config
from compactor.targeting import match_modules


def quantize_(model: nn.Module, cfg, progress: bool = False, store=None, adapter=None,
              sink=None, start_layer: int = 0) -> list[str]:
    """Apply a data-free step (e.g. :class:`RTNConfig`) to every matched module, in place.
    Returns the qualified names of the replaced modules.

    ``store``: a streamed model's weights (:mod:`compactor.models.stream`): the walk then
    goes layer by layer, each layer materialized, changed, handed to ``sink(index, layer)``
    and released; layers before ``start_layer`` are already done (a resumed run)."""
    entry = lookup_config(cfg)
    if getattr(cfg, "needs_calibration", False):
        raise CompactorError(f"{type(cfg).name} needs calibration data: use the sequential runner "
                             "(compactor quantize ... --method gptq) instead of quantize_")
    names = match_modules(model, cfg.targets, cfg.ignore)
    if store is not None and store.streamed:
        return _quantize_streamed(model, cfg, entry, names, store, adapter, sink, start_layer)
    # Steps that decide across modules (global magnitude pruning) look at all of them first.
    shared = cfg.prepare(model, names) if hasattr(cfg, "prepare") else None
    for name in names:
        model.set_submodule(name, entry.handler(model.get_submodule(name), cfg, name=name, stats=shared))
    return names


def _quantize_streamed(model, cfg, entry, names: list[str], store, adapter, sink, start_layer) -> list[str]:
    from compactor.models.adapters import adapter_for, decoder_layers

    adapter = adapter or adapter_for(model)
    if hasattr(cfg, "prepare"):
        raise CompactorError(f"{type(cfg).name} with a model-wide decision (global scope) needs "
                             "every weight at once; a streamed model can take the layer scope")
    n_layers = len(decoder_layers(model, adapter))
    by_layer: dict[int, list[str]] = {}
    for name in names:
        head, _, rest = name.partition(f"{adapter.layers}.")
        idx = rest.split(".", 1)[0]
        if head or not idx.isdigit():
            raise CompactorError(f"{type(cfg).name}: module {name} is outside the decoder layers, "
                                 "which a streamed model cannot change yet; add it to 'ignore'")
        by_layer.setdefault(int(idx), []).append(rest.split(".", 1)[1])
    for i in range(start_layer, n_layers):
        if i not in by_layer:
            continue
        layer = store.layer(model, i, adapter)
        for local in by_layer[i]:
            full = f"{adapter.layers}.{i}.{local}"
            layer.set_submodule(local, entry.handler(layer.get_submodule(local), cfg, name=full, stats=None))
        if sink is not None:
            sink(i, layer)
        del layer
        store.done(model, i, adapter, changed=True)
    return names
