"""The sequential calibration runner — one of the two places that walk a model.

For every decoder layer, in order: for each group of linears in the adapter's sequential
order ([q,k,v] -> [o] -> [gate,up] -> [down] when ``true_sequential``; all at once
otherwise), run the layer on the calibration inputs with hooks that accumulate the
statistic the method observes (stopping the forward pass as soon as the group's inputs are
seen; members of a group share one input and one statistic), then apply the method to each
linear of the group; finally propagate: run the (now compressed) layer without hooks to
produce the next layer's inputs. Peak memory is one layer's weights plus two copies of the
calibration activations.

Once everything upstream of o_proj (of down_proj) is final and its input has been
observed, later passes over that layer replay the cached inputs instead of recomputing
attention (the gate/up projections): ``replay``; the results are the same.

``dtype``: the forward passes of calibration may run in bfloat16 (a shadow copy of the
layer), which is several times faster on CPUs with native bf16 matrix units; statistics are
accumulated in float32 and the methods always quantize the float32 weights.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from compactor.calibration.activations import Activations
from compactor.calibration.hooks import StopForward, input_hooks, replay_block
from compactor.data.windows import TokenWindows
from compactor.distributed import all_reduce_stats, broadcast_module, dist_info, owners, shard_batches
from compactor.errors import CompactorError
from compactor.evaluate.memory import peak_rss_bytes, reset_peak_rss
from compactor.models.adapters import Adapter, adapter_for, decoder_layers
from compactor.models.stream import ResidentWeights, release_freed_memory
from compactor.primitives.hessian import HessianAccumulator
from compactor.primitives.stats import InputSample

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
    pairs: list[dict] = field(default_factory=list)
    #: wall seconds by phase, summed over layers: read (a layer from the weight store),
    #: observe (forwards that collect statistics), reduce (across processes), solve (the
    #: method's handler), propagate (forwards to the next layer's inputs), write (the sink)
    phase_seconds: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - t0


def _capture_layer0(model, layers, windows: TokenWindows, batch: int, dtype: torch.dtype, into: Activations):
    """Inputs (hidden states) and keyword arguments of decoder layer 0, per batch, cast to
    the calibration ``dtype`` as each batch arrives (at 8B width 128 windows of float32
    hidden states are 1 GB before a bf16 cast) and appended to ``into``. The embedding must
    be materialized; no decoder layer runs."""

    def grab(_m, args, kwargs):
        into.append(_cast(args[0].detach(), dtype), {k: _cast(v, dtype) for k, v in kwargs.items()})
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


def bf16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (oneDNN's check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def calibration_dtype(name: str) -> torch.dtype:
    """``auto``: bfloat16 where the CPU has native bf16 matrix units, else float32."""
    if name == "auto":
        return torch.bfloat16 if bf16_is_fast() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return obj.to(dtype)
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    return obj


def run_sequential(model, windows: TokenWindows, handler: Handler, cfg, *,
                   adapter: Adapter | None = None, true_sequential: bool = True,
                   skip: Callable[[str], bool] = lambda name: False,
                   batch: int = 8, dtype: torch.dtype = torch.float32,
                   progress: bool = True, on_layer: Callable | None = None,
                   replay: bool = True, store=None,
                   sink: Callable[[int, torch.nn.Module], None] | None = None,
                   spill_dir=None, start_layer: int = 0) -> CalibrationReport:
    """Calibrate and apply ``handler`` to every linear of every decoder layer, in place.

    ``on_layer(index, inputs, outputs)``: called after each layer with its input and output
    hidden states (lists of batches), e.g. to measure how much a layer changes its input.
    ``store``: where the weights live (:mod:`compactor.models.stream`; in memory by
    default): each layer is taken from it before its work and handed back after, so a
    streamed model holds one layer at a time. ``sink(index, layer)``: called with each
    finished layer before it is handed back (a streamed run writes it out there).
    ``spill_dir``: keep the activations between layers in files there instead of memory
    (one batch in memory at a time), and so do the replayed consumers' cached inputs.
    ``start_layer``: layers before it are already done (a resumed run): they only propagate
    the activations, as they would have."""
    if len(windows) == 0:
        raise CompactorError("calibration data is empty: no token windows to observe")
    adapter = adapter or adapter_for(model)
    store = store or ResidentWeights()
    layers = decoder_layers(model, adapter)
    report = CalibrationReport(layers=len(layers), tokens=int(windows.input_ids.numel()))
    rank, world = dist_info()
    if world > 1:
        if getattr(cfg, "smoothing", False):
            raise CompactorError(f"{type(cfg).name} searches scales on sampled input rows, which "
                                 "cannot be merged across processes yet: run it without torchrun")
        # This process's share: every world-th batch (each batch the same forward pass as
        # in one process); statistics are summed across processes after each observation.
        windows = windows.select(shard_batches(len(windows), batch, rank, world))
    reset_peak_rss()
    t0 = time.perf_counter()
    inputs = Activations(spill_dir)
    with store.parts(model, [adapter.embed], adapter):
        _capture_layer0(model, layers, windows, batch, dtype, inputs)
    release_freed_memory()  # the embedding's forward temporaries, before the first layer
    smoothing = getattr(cfg, "smoothing", False)
    # Smoothing methods (AWQ, SmoothQuant) visit producer -> consumers pairs; the others
    # visit groups of linears that share an input.
    units = ([(p, c) for p, c in adapter.smooth_pairs] if smoothing
             else [(None, g) for g in adapter.sequential_groups] if true_sequential
             else [(None, adapter.sequential_groups)])
    # Consumers whose block can be replayed: attention's o_proj and the MLP's down_proj.
    replayable = {adapter.attn[3]: True, adapter.mlp[2]: False}  # name -> block returns a tuple
    for li in tqdm(range(len(layers)), desc=f"calibrate {type(cfg).name}", disable=not progress, unit="layer"):
        with report.timed("read"):
            layer = store.layer(model, li, adapter)
        if li < start_layer:
            runner = layer if dtype == torch.float32 else copy.deepcopy(layer).to(dtype)
            _propagate(runner, inputs, {}, replayable, on_layer, li)
            del runner, layer
            store.done(model, li, adapter)
            continue
        cache: dict[str, list] = {}  # consumer -> its inputs, per batch, once upstream is final
        # The forward passes run on `runner` (a reduced-precision shadow, or the layer itself).
        runner = layer if dtype == torch.float32 else copy.deepcopy(layer).to(dtype)
        prefix = f"{adapter.layers}.{li}"
        for producer, unit in units:
            # A unit is observed in one forward pass: a smoothing pair's consumers, one
            # sequential group, or (true_sequential=False) every group of the layer at once.
            # Members of a group share one input, observed on the first member.
            unit_groups = [unit] if producer is not None or true_sequential else list(unit)
            todo = [(next(n for n in adapter.linears if n in g),
                     [n for n in g if not skip(f"{prefix}.{n}")]) for g in unit_groups]
            todo = [(first, names) for first, names in todo if names]
            if not todo:
                continue
            stats = {}
            for first, _ in todo:
                width = layer.get_submodule(first).in_features
                stats[first] = (InputSample(width, getattr(cfg, "sample_tokens", 1024))
                                if getattr(cfg, "statistic", "hessian") == "inputs"
                                else HessianAccumulator(width))
            last = max((f for f, _ in todo), key=adapter.linears.index)
            pending = [n for _, names in todo for n in names]
            first_pending = min(adapter.linears.index(n) for n in pending)
            # A consumer's input can be cached in this pass if nothing upstream of it changes
            # afterwards (smoothing methods rescale producers, so they never cache).
            capture = {f: _spool(spill_dir, f) for f, _ in todo if replay and producer is None
                       and f in replayable and f not in cache and adapter.linears.index(f) <= first_pending}

            def observe(n, x):
                stats[n].add(x)
                if n in capture:
                    capture[n].append(x, {})

            with report.timed("observe"), torch.no_grad(), input_hooks(
                    {f: runner.get_submodule(f) for f, _ in todo}, observe, stop_after=last), \
                    _replayed(runner, cache, replayable):
                for hidden, kwargs in inputs:
                    try:
                        runner(hidden, **kwargs)
                    except StopForward:
                        pass
            if world > 1:
                with report.timed("reduce"):
                    for st in stats.values():
                        all_reduce_stats(st)
            cache.update(capture)
            if producer is not None:
                # Scales fold into the producer and all consumers of this input.
                with report.timed("solve"):
                    report.pairs.append(handler(layer, cfg, name=prefix, producer=producer,
                                                consumers=list(unit), stats=stats[todo[0][0]],
                                                norm_offset=adapter.norm_offset))
                if runner is not layer:
                    runner = copy.deepcopy(layer).to(dtype)
                continue
            # Under torchrun each module of the unit is solved by one owner process and sent
            # to the others (the solves of a unit are independent: they share only inputs).
            names_all = [n for _, names in todo for n in names]
            own = (owners({n: layer.get_submodule(n).weight.numel() for n in names_all}, world)
                   if world > 1 else {})
            solved = {}
            with report.timed("solve"):
                for first, names in todo:
                    for n in names:
                        if own.get(n, rank) == rank:
                            solved[n] = handler(layer.get_submodule(n), cfg, name=f"{prefix}.{n}",
                                                stats=stats[first])
            if world > 1:
                with report.timed("reduce"):
                    for n in names_all:
                        solved[n] = broadcast_module(solved.get(n), own[n])
            for first, names in todo:
                for n in names:
                    new = solved[n]
                    layer.set_submodule(n, new)
                    if runner is not layer:
                        runner.set_submodule(n, copy.deepcopy(new).to(dtype))
                    report.modules.append(f"{prefix}.{n}")
                    if getattr(new, "note", None):
                        report.notes.append(new.note)
            del stats
        follow = cfg.followup() if hasattr(cfg, "followup") else None
        if follow is not None:  # e.g. AWQ then RTN: quantize the smoothed layer
            from compactor.registry import lookup_config

            fh = lookup_config(follow).handler
            for n in adapter.linears:
                if skip(f"{prefix}.{n}"):
                    continue
                new = fh(layer.get_submodule(n), follow, name=f"{prefix}.{n}")
                layer.set_submodule(n, new)
                report.modules.append(f"{prefix}.{n}")
                if getattr(new, "note", None):
                    report.notes.append(new.note)
            if runner is not layer:
                runner = copy.deepcopy(layer).to(dtype)
        # Propagate the compressed layer's outputs to the next layer.
        with report.timed("propagate"):
            _propagate(runner, inputs, cache if follow is None else {}, replayable, on_layer, li)
        for spool in cache.values():
            spool.clear()
        del runner, cache
        if sink is not None:
            with report.timed("write"):
                sink(li, layer)
        del layer
        store.done(model, li, adapter, changed=True)
        release_freed_memory()
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _propagate(runner, inputs: Activations, cache: dict, replayable: dict, on_layer, li: int) -> None:
    """Replace every batch of ``inputs`` by the (compressed) layer's output on it."""
    with torch.no_grad(), _replayed(runner, cache, replayable):
        if on_layer is None:  # overwrite batch by batch: one copy of the activations, not two
            for i, (hidden, kwargs) in enumerate(inputs):
                inputs[i] = (_out(runner(hidden, **kwargs)), kwargs)
        else:
            outputs = [(_out(runner(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
            on_layer(li, [h for h, _ in inputs], [h for h, _ in outputs])
            for i, out in enumerate(outputs):
                inputs[i] = out


def _spool(spill_dir, consumer: str) -> Activations:
    """Where a replayed consumer's inputs are cached: memory, or files beside the spilled
    activations."""
    return Activations(None if spill_dir is None else Path(spill_dir) / f"replay-{consumer}")


def _replayed(layer, cache: dict[str, Activations], replayable: dict[str, bool]) -> contextlib.ExitStack:
    """Replay every cached block (see :func:`replay_block`)."""
    stack = contextlib.ExitStack()
    for consumer, inputs in cache.items():
        stack.enter_context(replay_block(layer, consumer, inputs.tensors(), replayable[consumer]))
    return stack


def _out(result):
    return result[0] if isinstance(result, tuple) else result
