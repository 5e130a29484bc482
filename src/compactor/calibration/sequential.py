"""The sequential calibration runner — one of the two places that walk a model.

For every decoder layer, in order: for each group of linears in the adapter's sequential
order ([q,k,v] -> [o] -> [gate,up] -> [down] when ``true_sequential``; all at once
otherwise), run the layer on the calibration inputs with hooks that accumulate the
statistic the method observes (stopping the forward pass as soon as the group's inputs are
seen), then apply the method to each linear of the group; finally propagate: run the
(now compressed) layer without hooks to produce the next layer's inputs. Peak memory is one
layer's weights plus two copies of the calibration activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from compactor.calibration.hooks import StopForward, input_hooks
from compactor.data.windows import TokenWindows
from compactor.errors import CompactorError
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.models.adapters import Adapter, adapter_for, decoder_layers
from compactor.primitives.hessian import HessianAccumulator

#: handler(module, cfg, name, stats) -> replacement module
Handler = Callable[..., torch.nn.Module]


@dataclass
class CalibrationReport:
    layers: int = 0
    modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    tokens: int = 0


def _capture_layer0(model, layers, windows: TokenWindows, batch: int):
    """Inputs (hidden states) and keyword arguments of decoder layer 0, per batch."""
    captured = []

    def grab(_m, args, kwargs):
        captured.append((args[0].detach(), {k: v for k, v in kwargs.items()}))
        raise StopForward

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, len(windows), batch):
                try:
                    model(windows.input_ids[s:s + batch], use_cache=False)
                except StopForward:
                    pass
    finally:
        h.remove()
    return captured


def run_sequential(model, windows: TokenWindows, handler: Handler, cfg, *,
                   adapter: Adapter | None = None, true_sequential: bool = True,
                   skip: Callable[[str], bool] = lambda name: False,
                   batch: int = 8, progress: bool = True) -> CalibrationReport:
    """Calibrate and apply ``handler`` to every linear of every decoder layer, in place."""
    if len(windows) == 0:
        raise CompactorError("calibration data is empty: no token windows to observe")
    adapter = adapter or adapter_for(model)
    layers = decoder_layers(model, adapter)
    report = CalibrationReport(layers=len(layers), tokens=int(windows.input_ids.numel()))
    reset_peak_rss()
    t0 = time.perf_counter()
    inputs = _capture_layer0(model, layers, windows, batch)
    groups = adapter.sequential_groups if true_sequential else (adapter.linears,)
    for li in tqdm(range(len(layers)), desc=f"calibrate {type(cfg).name}", disable=not progress, unit="layer"):
        layer = layers[li]
        prefix = f"{adapter.layers}.{li}"
        for group in groups:
            names = [n for n in group if not skip(f"{prefix}.{n}")]
            if not names:
                continue
            mods = {n: layer.get_submodule(n) for n in names}
            stats = {n: HessianAccumulator(m.in_features) for n, m in mods.items()}
            # Members of a group share one input: stop after the last one is reached.
            order = [n for n in adapter.linears if n in mods]
            with torch.no_grad(), input_hooks(mods, lambda n, x: stats[n].add(x), stop_after=order[-1]):
                for hidden, kwargs in inputs:
                    try:
                        layer(hidden, **kwargs)
                    except StopForward:
                        pass
            for n, m in mods.items():
                new = handler(m, cfg, name=f"{prefix}.{n}", stats=stats[n])
                layer.set_submodule(n, new)
                report.modules.append(f"{prefix}.{n}")
                if getattr(new, "note", None):
                    report.notes.append(new.note)
            del stats
        # Propagate the compressed layer's outputs to the next layer.
        with torch.no_grad():
            inputs = [(_out(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _out(result):
    return result[0] if isinstance(result, tuple) else result
