"""Apply a recipe: load the model, run each stage's steps through the registry, evaluate
after each stage against the original, and write a self-describing output directory
(model, recipe, metrics, provenance) atomically.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactor.data.windows import TokenWindows, domain_windows, windows_for
from compactor.evaluate.harness import EvalResult, evaluate
from compactor.io import atomic_dir
from compactor.memory import fmt_bytes
from compactor.models.load import LoadedModel, load_model
from compactor.quant.storage import save_model
from compactor.recipe.schema import Recipe
from compactor.recipe.streamed import StepOutput
from compactor.registry import lookup_config


@dataclass
class RunContext:
    """What steps see: the current model, the recipe, lazily built data and the results."""

    recipe: Recipe
    loaded: LoadedModel
    out_dir: Path | None = None
    results: list[EvalResult] = field(default_factory=list)
    stage: str = ""
    modified: bool = False  # has any step changed the model yet?
    _reference: LoadedModel | None = None
    _reference_backend: Any = None
    _eval_windows: TokenWindows | dict[str, TokenWindows] | None = None
    _calib_windows: TokenWindows | None = None
    log: list[dict] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    work_dir: Path | None = None  # checkpoints of long steps; survives a crash, removed on success
    resume: bool = False  # continue long steps from their checkpoints in work_dir
    layer_origin: list[int] | None = None  # original index of each current layer, after drop_layers
    streamed_notes: list[str] = field(default_factory=list)  # notes of the layers a streamed step wrote
    streamed_sparsity: list = field(default_factory=list)  # their sparsity rows, for pruning steps
    plan: Any = None  # the memory plan printed before the run
    gates: list[dict] = field(default_factory=list)  # every gate checked, with its figures
    passed_stage: str | None = None  # the last stage whose model a failed gate leaves behind
    _reference_decode: float | None = None

    @property
    def model(self):
        return self.loaded.model

    def reference(self) -> LoadedModel | None:
        """The reference model (the recipe's input, reloaded untouched), loaded once."""
        ref = self.recipe.reference
        if ref is None:
            return None
        if self._reference is None:
            self._reference = load_model(self.recipe.model if ref == "original" else ref,
                                         stream=self.loaded.streamed)
        return self._reference

    def reference_scorer(self):
        """The reference as an evaluation backend whose window logits are computed once and
        reused by every later comparison in the run (float16, shift-normalized), cached on
        disk in the work directory, so memory holds one window's logits at a time."""
        from compactor.evaluate.backends import CachedBackend
        from compactor.evaluate.harness import as_backend

        ref = self.reference()
        if ref is None:
            return None
        if self._reference_backend is None:
            self._reference_backend = CachedBackend(as_backend(ref), half=True,
                                                    directory=self.work_dir / "reference-logits")
        return self._reference_backend

    def eval_windows(self) -> TokenWindows | dict[str, TokenWindows]:
        """The evaluation windows: one set, or several by domain spec."""
        if self._eval_windows is None:
            e = self.recipe.eval
            by_domain = domain_windows(self.loaded.tokenizer, e.data, e.window, e.stride,
                                       e.bos, e.tokens)
            self._eval_windows = (next(iter(by_domain.values())) if len(by_domain) == 1
                                  else by_domain)
        return self._eval_windows

    def calib_windows(self) -> TokenWindows:
        if self._calib_windows is None:
            c = self.recipe.calibration
            self._calib_windows = windows_for(self.loaded.tokenizer, c.data, c.window,
                                              max_tokens=c.samples * c.window)
        return self._calib_windows


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    from compactor import __version__

    return {
        "compactor": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


#: Steps that work on a streamed model: layer-local compression, evaluation, export.
STREAMABLE_KINDS = ("module", "pair", "eval")
#: ... except these, which need the whole float model in memory.
NOT_STREAMABLE = ("llamacpp_quantize", "activations")


def _check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, a streamed recipe with a step that needs the whole model."""
    from compactor.errors import ConfigError

    if not recipe.stream:
        return
    for stage in recipe.stages:
        for step in stage.steps:
            kind = lookup_config(step.config).kind
            if kind not in STREAMABLE_KINDS or step.name in NOT_STREAMABLE:
                raise ConfigError(
                    f"stage {stage.name!r}: step {step.name!r} needs the whole model in memory and "
                    f"cannot run streamed yet (streamed steps: rtn, gptq, awq, smoothquant, wanda, "
                    f"sparsegpt, magnitude with layer scope, evaluate, export)")


def memory_plan(recipe: Recipe, show: bool = True) -> tuple[Recipe, object]:
    """Print the run's memory plan and stop (exit 2, nothing written) when it is over the
    cap — before any weight is loaded: the plan reads only the model's config.

    A streamed run whose calibration activations would not fit under the cap spills them
    to disk instead (as ``--spill-activations`` asks), and says so; the recipe returned is
    the one to run."""
    import dataclasses

    from compactor.models.adapters import adapter_for
    from compactor.models.load import resolve_source
    from compactor.models.stream import load_skeleton
    from compactor.plan import check_plan, plan_for_recipe

    directory, _, adapter = resolve_source(recipe.model)
    skeleton = load_skeleton(directory)
    adapter = adapter or adapter_for(skeleton)
    plan = plan_for_recipe(recipe, skeleton, adapter)
    if not plan.fits and recipe.stream and not recipe.spill_activations:
        spilled = dataclasses.replace(recipe, spill_activations=True)
        alt = plan_for_recipe(spilled, skeleton, adapter)
        if alt.fits:
            print(f"note: in memory the calibration activations would take the plan to "
                  f"{fmt_bytes(plan.total)}, over the cap of {fmt_bytes(plan.cap)}: they spill to disk "
                  "(as --spill-activations asks)", file=sys.stderr)
            recipe, plan = spilled, alt
    if show:
        print(plan.describe(), file=sys.stderr)
    check_plan(plan)
    return recipe, plan


def run_recipe(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False,
               progress: bool = True, resume: bool = False) -> RunContext:
    """Run ``recipe``; if ``out`` is given, write the output directory there (atomically).

    Long steps (distillation) checkpoint into ``<out>.work/``, which outlives a crash and is
    removed once the output is in place; ``resume`` continues them from there."""
    _check_streamable(recipe)
    recipe, plan = memory_plan(recipe, progress)
    with _memory_guard(recipe, plan):
        return _run(recipe, plan, out, overwrite, progress, resume)


def _memory_guard(recipe: Recipe, plan):
    """The cap a recipe names (``max_memory``) enforced while it runs; none otherwise (the
    plan's check against the memory available is then the only bound)."""
    import contextlib

    from compactor.memory import MemoryGuard, parse_bytes

    if recipe.max_memory is None:
        return contextlib.nullcontext()
    return MemoryGuard(parse_bytes(recipe.max_memory), f"max_memory {recipe.max_memory}",
                       planned=plan.total if plan is not None else None)


def _run(recipe: Recipe, plan, out, overwrite: bool, progress: bool, resume: bool) -> RunContext:
    loaded = load_model(recipe.model, stream=recipe.stream)
    started = time.time()
    if out is None:
        with tempfile.TemporaryDirectory(prefix="compactor-work-") as work:
            ctx = RunContext(recipe=recipe, loaded=loaded, work_dir=Path(work), plan=plan)
            try:
                _run_stages(ctx, progress)
            except _GateStop as stop:
                from compactor.errors import GateFailed

                raise GateFailed(str(stop).split("; the output holds")[0] + " (no output was asked for)") from None
        return ctx
    work = Path(out).parent / f"{Path(out).name}.work"
    from compactor.distributed import dist_info

    rank = dist_info()[0]
    if rank == 0 and work.exists() and overwrite and not resume:
        shutil.rmtree(work)
    ctx = RunContext(recipe=recipe, loaded=loaded, work_dir=work, resume=resume, plan=plan)
    if rank != 0:
        # Under torchrun only rank 0 writes; the others train alongside and share work_dir
        # (rank 0's checkpoints) so that --resume restores every process.
        _run_stages(ctx, progress)
        return ctx
    from compactor.errors import GateFailed

    failed = None
    if any(st.gate is not None for st in recipe.stages):
        work.mkdir(parents=True, exist_ok=True)
        _snapshot(ctx)  # the input model: what a gate failing in the first stage leaves
        ctx.passed_stage = None
    try:
        with atomic_dir(out, overwrite=overwrite or resume) as tmp:
            ctx.out_dir = tmp
            try:
                _run_stages(ctx, progress)
            except _GateStop as stop:
                failed = str(stop)
                ctx.loaded = load_model(work / "last-passed")  # the last model that passed
            _write_outputs(ctx, tmp, started, failed)
    finally:
        if failed is not None:
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    ctx.out_dir = Path(out)
    if failed is not None:
        raise GateFailed(failed + f" ({out})")
    return ctx


def write_applied(ctx: RunContext, recipe: Recipe, out: str | Path, overwrite: bool = False,
                  progress: bool = True) -> RunContext:
    """Write the output directory for a model that ``recipe``'s single stage was already
    applied to in ``ctx`` (the search keeps its chosen candidate): the stage is evaluated
    against the reference and written as :func:`run_recipe` writes it."""
    started = time.time()
    ctx.recipe, ctx.stage, ctx.modified = recipe, recipe.stages[-1].name, True
    with atomic_dir(out, overwrite=overwrite) as tmp:
        ctx.out_dir = tmp
        ctx.results.append(evaluate(ctx.loaded, ctx.eval_windows(), reference=ctx.reference_scorer(),
                                    speed=recipe.eval.speed, name=ctx.stage, progress=progress))
        _write_outputs(ctx, tmp, started)
    ctx.out_dir = Path(out)
    return ctx


def apply_step(ctx: RunContext, cfg, progress: bool = True, lead: bool = True) -> bool:
    """Run one step's config in ``ctx``; True if it changes the model. ``lead``: this
    process evaluates and writes (rank 0 under torchrun); evaluation steps are skipped elsewhere."""
    entry = lookup_config(cfg)
    if entry.kind in ("module", "pair", "plan"):
        apply_module_step(ctx, cfg, progress)
    elif entry.kind != "eval" or lead:
        entry.handler(ctx, cfg)
    return entry.kind in ("module", "pair", "plan", "model")


def _run_stages(ctx: RunContext, progress: bool) -> None:
    from compactor.distributed import dist_info

    lead = dist_info()[0] == 0  # under torchrun only rank 0 evaluates, exports and writes
    for stage in ctx.recipe.stages:
        ctx.stage = stage.name
        stage_modified = False
        for step in stage.steps:
            t0 = time.perf_counter()
            stage_modified |= apply_step(ctx, step.config, progress, lead)
            ctx.modified |= stage_modified
            ctx.log.append({"stage": stage.name, "step": step.name,
                            "seconds": round(time.perf_counter() - t0, 3)})
        # A stage that changed the model is scored against the original (a gated stage is
        # always scored: its gate needs the figures).
        gated = stage.gate is not None and not stage.gate.empty
        if lead and ((ctx.recipe.eval.after_each_stage and stage_modified) or gated):
            ref = ctx.reference_scorer() if ctx.modified else None
            res = evaluate(ctx.loaded, ctx.eval_windows(), reference=ref,
                           speed=ctx.recipe.eval.speed, name=f"{stage.name}",
                           progress=progress)
            ctx.results.append(res)
            if gated:
                _check_stage_gate(ctx, stage, res)
        if lead and any(st.gate is not None for st in ctx.recipe.stages[ctx.recipe.stages.index(stage) + 1:]):
            _snapshot(ctx)  # this stage passed: the model a later failed gate leaves behind


class _GateStop(Exception):
    """A failed gate inside the run (turned into GateFailed once the output is written)."""


def _snapshot(ctx: RunContext) -> None:
    d = ctx.work_dir / "last-passed"
    shutil.rmtree(d, ignore_errors=True)
    lm = ctx.loaded
    save_model(lm.model, lm.tokenizer, d, store=lm.store, adapter=lm.adapter,
               weight_dtype=lm.store.input_dtype if lm.streamed else None)
    ctx.passed_stage = ctx.stage


def _check_stage_gate(ctx: RunContext, stage, res) -> None:
    from compactor.recipe.gates import check_gate, describe_failure

    ref_decode = None
    if stage.gate.min_decode_speedup is not None and ctx.reference() is not None:
        from compactor.evaluate.backends import TorchBackend

        if ctx._reference_decode is None:
            ctx._reference_decode = TorchBackend(ctx.reference().model).speed()["decode_tok_s"]
        ref_decode = ctx._reference_decode
    checks = check_gate(stage.gate, res, ref_decode)
    ctx.gates.append({"stage": stage.name, "checks": checks})
    if not all(c["passed"] for c in checks):
        kept = (f"the output holds the model after stage {ctx.passed_stage!r}, the last that passed"
                if ctx.passed_stage else "the output holds the input model (no stage before it)")
        raise _GateStop(describe_failure(stage.name, checks, kept))


def _write_outputs(ctx: RunContext, tmp: Path, started: float, failed: str | None = None) -> None:
    lm = ctx.loaded
    save_model(lm.model, lm.tokenizer, tmp, store=lm.store, adapter=lm.adapter,
               weight_dtype=lm.store.input_dtype if lm.streamed else None)
    (tmp / "recipe.yaml").write_text(ctx.recipe.to_yaml())
    (tmp / "metrics.json").write_text(json.dumps([r.to_dict() for r in ctx.results], indent=2))
    if ctx.results:
        (tmp / "results.md").write_text(results_markdown(ctx, started))
    prov = {
        "model_source": ctx.recipe.model,
        "model_gguf": str(ctx.loaded.gguf) if ctx.loaded.gguf else None,
        "eval_data": _provenance(ctx._eval_windows),
        "calibration_data": ctx._calib_windows.provenance if ctx._calib_windows else None,
        "calibration_domains": (calibration_domains(ctx._calib_windows.provenance)
                                if ctx._calib_windows else None),
        "steps": ctx.log,
        "gates": ctx.gates,
        "gate_failed": failed,
        "memory_plan": ctx.plan.to_dict() if ctx.plan is not None else None,
        "reports": ctx.reports,
        "environment": _environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2, default=str))
    if ctx.results:
        from compactor.report import write_report

        write_report(tmp)  # report.html beside the files it is drawn from



def results_markdown(ctx: RunContext, started: float) -> str:
    """The run's results table (and per-domain table) with where it came from: what
    ``make demo`` copies to ``bench/results/demo.md`` and the README quotes."""
    import subprocess

    from compactor.evaluate.report import table

    try:
        root = Path(__file__).parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=root).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
        rev += "-dirty" if dirty else ""
    except OSError:
        rev = "unknown"
    ev, cal = ctx._eval_windows, ctx._calib_windows
    specs = list(ev) if isinstance(ev, dict) else [ctx.recipe.eval.data]
    lines = [f"# {Path(ctx.recipe.model).name}: {', '.join(st.name for st in ctx.recipe.stages)}", "",
             f"Recipe: {ctx.recipe.model}; commit {rev}; "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}; "
             f"`{' '.join(['compactor'] + sys.argv[1:]) if sys.argv and 'compactor' in sys.argv[0] else 'run_recipe'}`.",
             f"Evaluation: {', '.join(map(str, specs))}, {ctx.recipe.eval.tokens} tokens each in windows "
             f"of {ctx.recipe.eval.window}.",
             "Calibration: " + (f"{ctx.recipe.calibration.data} ({', '.join(calibration_domains(cal.provenance))}), "
                                f"{len(cal)} x {cal.length} tokens." if cal is not None else "none."),
             f"Environment: {', '.join(f'{k} {v}' for k, v in _environment().items())}.", "",
             table(ctx.results), ""]
    return "\n".join(lines)


def _provenance(windows) -> dict | None:
    if windows is None:
        return None
    if isinstance(windows, dict):
        return {spec: w.provenance for spec, w in windows.items()}
    return windows.provenance


def calibration_domains(prov: dict) -> list[str]:
    """Which domains a calibration set covered: the mix's domains, a domain split's
    domain, ``prose`` for the Austen novels, or ``user text``."""
    if prov.get("source") == "mix":
        return list(prov["domains"])
    if prov.get("source") == "austen":
        return ["prose"]
    return [prov["domain"]] if "domain" in prov else ["user text"]


def apply_module_step(ctx: RunContext, cfg, progress: bool = True) -> None:
    """Route a module-level step to a walker: calibrated steps to the sequential runner
    (on the recipe's calibration windows), data-free ones to :func:`compactor.api.quantize_`."""
    from compactor.api import quantize_
    from compactor.calibration.sequential import calibration_dtype, run_sequential
    from compactor.distributed import dist_info
    from compactor.targeting import match_modules

    model = ctx.loaded.model
    entry = lookup_config(cfg)
    if entry.kind == "plan":
        _apply_planned(ctx, cfg, entry, progress)
    elif getattr(cfg, "needs_calibration", False):
        chosen = set(match_modules(model, cfg.targets, cfg.ignore))
        out = StepOutput.open(ctx, type(cfg).name, cfg)
        # One directory per process: under torchrun every rank spills its own windows.
        spill = (ctx.work_dir / f"activations-rank{dist_info()[0]}" if ctx.recipe.spill_activations
                 else None)
        rep = run_sequential(model, ctx.calib_windows(), entry.handler, cfg,
                             adapter=ctx.loaded.adapter, spill_dir=spill,
                             true_sequential=getattr(cfg, "true_sequential", True),
                             dtype=calibration_dtype(getattr(cfg, "calibration_dtype", "float32")),
                             skip=lambda name: name not in chosen, progress=progress,
                             store=ctx.loaded.store, sink=out.sink, start_layer=out.resume_from)
        out.commit()
        ctx.reports.append({"step": type(cfg).name, "modules": len(rep.modules),
                            "seconds": round(rep.seconds, 1), "peak_rss_bytes": rep.peak_rss_bytes,
                            "phase_seconds": {k: round(v, 1) for k, v in rep.phase_seconds.items()},
                            "calibration_tokens": rep.tokens, "streamed": ctx.loaded.streamed,
                            "calibration_domains": calibration_domains(ctx.calib_windows().provenance),
                            "notes": _count(rep.notes),
                            **({"pairs": rep.pairs} if rep.pairs else {}),
                            **_sparsity(ctx, rep.modules, cfg)})
    else:
        out = StepOutput.open(ctx, type(cfg).name, cfg)
        names = quantize_(model, cfg, store=ctx.loaded.store, adapter=ctx.loaded.adapter, sink=out.sink,
                          start_layer=out.resume_from)
        out.commit()
        notes = (ctx.streamed_notes if ctx.loaded.streamed else
                 [m.note for n in names if getattr(m := model.get_submodule(n), "note", None)])
        ctx.reports.append({"step": type(cfg).name, "modules": len(names), "notes": _count(notes),
                            **_sparsity(ctx, names, cfg)})


def _sparsity(ctx: RunContext, names: list[str], cfg) -> dict:
    """After a pruning step: measured sparsity, checked against the step's target (for a
    streamed model, checked layer by layer as each was written)."""
    if not hasattr(cfg, "target_sparsity"):
        return {}
    from compactor.prune.stats import check_pruned, summarize_pruned

    if ctx.loaded.streamed:  # rows come from the writing process (rank 0 under torchrun)
        return {"sparsity": summarize_pruned(ctx.streamed_sparsity, cfg)} if ctx.streamed_sparsity else {}
    return {"sparsity": check_pruned(ctx.loaded.model, names, cfg)}


def _count(notes: list[str]) -> list[str]:
    """'<n> modules: <note>' for each distinct note (fallbacks are reported, never silent)."""
    from collections import Counter

    return [f"{k} module{'s' if k > 1 else ''}: {note}" for note, k in sorted(Counter(notes).items())]


def _apply_planned(ctx: RunContext, cfg, entry, progress: bool) -> None:
    """Steps that decide globally (mixed precision) run through their planner."""
    from compactor.quant.plan import apply_planned

    report = apply_planned(ctx.loaded.model, ctx.calib_windows(), cfg, entry.handler,
                           adapter=ctx.loaded.adapter, progress=progress)
    report["notes"] = _count(report["notes"])
    ctx.reports.append({"step": type(cfg).name, **report})
