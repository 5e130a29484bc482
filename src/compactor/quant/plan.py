"""Applying a planned (global) quantization step such as mixed precision: observe every
decoder linear's input Hessian in one sequential pass (modules unchanged), probe the
model's KL where the step asks for it, plan, then quantize every module on its planned grid
(RTN, or GPTQ in a second sequential pass). The embedding (shared with a tied head) and an
untied head are planned too when the step includes them.
"""

from __future__ import annotations

import time

from compactor.calibration.probe import KLProbe
from compactor.calibration.sequential import calibration_dtype, run_sequential
from compactor.data.windows import TokenWindows
from compactor.models.adapters import Adapter, adapter_for
from compactor.quant.gptq import GPTQConfig, apply_gptq
from compactor.quant.qlinear import QuantizedLinear, tie_head
from compactor.quant.rtn import RTNConfig, apply_rtn, rtn_embedding
from compactor.targeting import match_modules


def apply_planned(model, calib: TokenWindows, cfg, planner, *, adapter: Adapter | None = None,
                  progress: bool = True) -> dict:
    """Plan with ``planner(modules, hessians, cfg, measure=, tensors=, progress=)`` and
    quantize ``model`` in place accordingly. Returns the step's report (plan included;
    ``notes``: the fallback note of every module, one entry each)."""
    adapter = adapter or adapter_for(model)
    chosen = set(match_modules(model, cfg.targets, cfg.ignore))
    hessians, modules = {}, {}

    def record(module, _cfg, name, stats):
        hessians[name], modules[name] = stats.hessian(), module
        return module

    dtype = calibration_dtype(cfg.calibration_dtype)
    rep = run_sequential(model, calib, record, cfg, adapter=adapter, dtype=dtype,
                         skip=lambda name: name not in chosen, progress=progress)
    tensors = {}
    if cfg.embeddings:
        tensors[adapter.embed] = model.get_submodule(adapter.embed).weight
        head = model.get_submodule(adapter.lm_head) if adapter.lm_head else None
        tied = head is not None and head.weight is tensors[adapter.embed]
        if head is not None and not tied and not isinstance(head, QuantizedLinear):
            tensors[adapter.lm_head] = head.weight
    probe = KLProbe(model, calib, cfg.kl_tokens) if cfg.sensitivity == "kl" else None
    t0 = time.perf_counter()
    plan, summary = planner(modules, hessians, cfg, measure=probe, tensors=tensors, progress=progress)
    plan_seconds = time.perf_counter() - t0
    del hessians, probe
    notes = []
    for name in tensors:  # the embedding (shared with a tied head) and an untied head
        if name == adapter.embed:
            new = rtn_embedding(model.get_submodule(name).weight, RTNConfig(grid=plan[name]), name)
            model.set_submodule(name, new)
            tie_head(model, adapter.embed, adapter.lm_head)
        else:
            new = apply_rtn(model.get_submodule(name), RTNConfig(grid=plan[name]), name=name)
            model.set_submodule(name, new)
        notes += [new.note] if getattr(new, "note", None) else []
    t1 = time.perf_counter()
    if cfg.then == "gptq":
        def planned_gptq(module, _cfg, name, stats):
            return apply_gptq(module, GPTQConfig(grid=plan[name]), name=name, stats=stats)

        qrep = run_sequential(model, calib, planned_gptq, GPTQConfig(), adapter=adapter, dtype=dtype,
                              skip=lambda name: name not in modules, progress=progress)
        notes += qrep.notes
    else:
        for name in modules:
            new = apply_rtn(model.get_submodule(name), RTNConfig(grid=plan[name]), name=name)
            model.set_submodule(name, new)
            notes += [new.note] if getattr(new, "note", None) else []
    return {"modules": len(plan), "seconds": round(rep.seconds, 1), "plan_seconds": round(plan_seconds, 1),
            "quantize_seconds": round(time.perf_counter() - t1, 1), "calibration_tokens": rep.tokens,
            "peak_rss_bytes": rep.peak_rss_bytes, "then": cfg.then, "notes": notes, **summary, "plan": plan}
