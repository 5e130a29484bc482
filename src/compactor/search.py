"""Search: the best file under a size budget, or the smallest file that meets a quality floor.

The space (:mod:`compactor.search_space`) is what compactor already builds: uniform GGUF
grids for the decoder linears by RTN, GPTQ and AWQ+GPTQ, the embedding's type, the
measured-KL mixed-precision plan at the budget, and (``pruning``) depth cuts healed by a
short distillation. Each candidate is made from a copy of the original and scored against
the reference's logits, computed once and cached on disk; its size — the GGUF file's,
header included — is known before any work, so candidates that cannot fit are never built.

Cheapest first. The first method (RTN: seconds) ranks configurations — a grid with an
embedding type — and the calibrated methods (minutes) are built only on the best ``top``
of them: they improve on RTN by similar factors on neighbouring grids, so RTN's order is
theirs (an assumption the search records, not a proof). With ``rank_windows`` (a subset of
the evaluation windows: scoring is most of an RTN candidate's cost) the ranking is measured
there; a candidate is measured on the whole evaluation before it can be chosen or rule a
grid out near the floor (within ``RANK_MARGIN``), so every choice rests on the full windows.

- Under a budget: for each grid, the largest embedding type that fits (a smaller one at the
  same grid only loses quality), ranked by RTN; the calibrated methods on the best ``top``;
  the mixed plan filling the budget; cuts of the grids that fit only when cut. The lowest
  KLD measured wins.
- Under a floor: RTN on the grids smallest first, each at its largest embedding type, up to
  the first grid that meets it (a grid that misses it even so is not tried with a smaller
  embedding); then the smaller configurations of the grids left, smallest first; then
  each calibrated method on the ``top`` smaller configurations RTN came closest on, and the
  smallest file that meets the floor wins; then (``pruning``) larger grids cut below it.

Every measurement is written to ``cache_file`` as it finishes, so an interrupted search
resumes where it stopped. The chosen candidate is written as a recipe (and, with ``out``,
run by the recipe runner, so ``compactor run DIR/recipe.yaml`` reproduces it). Every
candidate is applied by the recipe runner's own step dispatch
(:func:`compactor.recipe.runner.apply_step`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from compactor.errors import CompactorError
from compactor.search_output import front_table, pareto, to_json
from compactor.search_space import (EMBED_TYPES, GRIDS, METHODS, Candidate, Pruning, Target, cut_to_fit,
                                    grid_bytes, layer_bytes, mixed as mixed_candidate, uniform)

__all__ = ["EMBED_TYPES", "GRIDS", "METHODS", "RANK_MARGIN", "Candidate", "Pruning", "Target", "grid_bytes",
           "layer_bytes", "pareto", "rank_subset", "search", "front_table", "to_json"]

#: A ranking measurement this close to the floor (relative) is re-measured on the whole
#: evaluation before it rules a grid out: the subset's KLD differs from the whole's by a few
#: per cent on SmolLM2 (and never decides a choice, which is always measured in full).
RANK_MARGIN = 0.25


def rank_subset(eval_windows, tokens: int):
    """The first windows of each domain scoring at least ``tokens`` tokens (all of a domain's
    windows if it has fewer): the ranking windows, whose reference logits the evaluation's
    cache already holds. ``eval_windows``: TokenWindows or a dict of them by domain."""
    def first(w):
        scored = w.score_mask.sum(1).cumsum(0)
        n = int((scored < tokens).sum()) + 1
        return w.select(list(range(min(n, len(w)))))

    return {d: first(w) for d, w in eval_windows.items()} if isinstance(eval_windows, dict) else first(eval_windows)


def _key(c: Candidate) -> str:
    return json.dumps(c.steps, sort_keys=True)


def search(loaded, target: Target, calib, eval_windows, reference, grids=GRIDS, embeds=EMBED_TYPES,
           methods=METHODS, mixed: bool = True, top: int = 1, progress: bool = True,
           pruning: Pruning | None = None, model_spec: str | None = None, calib_spec: str | None = None,
           eval_spec: str = "domains", work_dir=None, header: int = 0, cache_file=None,
           settings: dict | None = None, speed=None, rank_windows=None) -> dict:
    """Run the search (see the module docstring) on ``loaded`` (a LoadedModel in memory).
    ``reference``: a cached backend of the original. ``header``: the GGUF header's bytes,
    added to every size. ``top``: configurations the calibrated methods are built on.
    ``pruning``: also try depth cuts (``model_spec`` names the original in their recipe;
    they heal on ``pruning.heal_data``, else ``calib_spec``). ``cache_file``: measurements
    kept as they finish and reused (resume) when they were made with the same ``settings``
    (what else decides a measurement: the model, calibration and evaluation text).
    ``rank_windows``: where the first method ranks (:func:`rank_subset`; None: the whole
    evaluation). Returns {"candidates", "front", "chosen", "params",
    "context"}: ``context``, the recipe-runner context holding the chosen candidate's model
    when this process built it (None when it was measured before a resume)."""
    import dataclasses
    import itertools
    import tempfile
    import time

    from compactor.evaluate import evaluate
    from compactor.io import atomic_file
    from compactor.models.adapters import decoder_layers
    from compactor.primitives.ggml import GGML_TYPES
    from compactor.quant.mixed import MixedPrecisionConfig

    if not methods or top < 1:
        raise CompactorError("search: give at least one method and top >= 1")
    if target.min_decode_speedup is not None and speed is None:
        raise CompactorError("search: a decode speed-up limit needs the llama.cpp speed probe")
    model = loaded.model
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    n_layers = len(decoder_layers(model, loaded.adapter))
    if pruning is not None:
        if (pruning.heal_data or calib_spec) is None:
            raise CompactorError("search: depth cuts are healed on text: give the calibration spec or heal_data")
        pruning = dataclasses.replace(pruning, heal_data=pruning.heal_data or calib_spec, eval_data=eval_spec)
    pool = [uniform(model, g, e, m, header) for g in grids for e in embeds for m in methods]
    if mixed and target.is_budget:
        floor = min(GGML_TYPES[g].bpw for g in MixedPrecisionConfig().candidates)
        pool += [c for c in [mixed_candidate(model, target.budget_bytes(params), header, floor)] if c]
    if pruning is not None and target.is_budget:
        limit = target.budget_bytes(params)
        pool += [c for g in grids if (c := cut_to_fit(model, g, limit, pruning, n_layers, header))]
    fitting = [c for c in pool if not target.is_budget or target.fits(c.size_bytes, params)]
    if not fitting:
        small = min(pool, key=lambda c: c.size_bytes)
        raise CompactorError(f"search: no candidate fits the budget (the smallest, {small.label}, "
                             f"is {small.size_bytes / 1e6:.2f} MB, {small.size_bytes * 8 / params:.2f} bpw)")
    for c in pool:
        if c not in fitting:
            c.why_not = "over the budget"

    scratch = tempfile.TemporaryDirectory(prefix="compactor-search-") if work_dir is None else None
    work = Path(work_dir) if work_dir is not None else Path(scratch.name)
    stored = json.loads(Path(cache_file).read_text()) if cache_file and Path(cache_file).exists() else {}
    if stored and stored.get("settings") != settings:
        raise CompactorError(f"search: {cache_file} holds measurements made with other settings "
                             f"({stored.get('settings')}); run again without --resume")
    cache = stored.get("measured", {})
    built = itertools.count()  # one work directory per candidate built
    kept: list = [None, None]  # (candidate, its RunContext) of the best measured in this process

    def measure(c: Candidate, rank: bool = False) -> None:
        """Build ``c`` and score it: on the ranking windows with ``rank`` (when there are
        any), else on the evaluation windows."""
        rank = rank and rank_windows is not None
        if c.kld is not None or (rank and c.rank_kld is not None):
            return
        c.why_not = None
        key = _key(c) + (" on the ranking windows" if rank else "")
        resumed = key in cache
        if resumed:  # measured before this run was interrupted
            got = cache[key]
            kld, ppl_ratio, seconds, fields = got["kld"], got["ppl_ratio"], got["seconds"], got["fields"]
        else:
            if progress:
                where = "ranking windows" if rank else "evaluation"
                print(f"  building {c.label} ({c.size_bytes / 1e6:.2f} MB; scored on the {where}) ...", flush=True)
            t0 = time.perf_counter()
            cand = copy.copy(loaded)
            cand.model = copy.deepcopy(model)
            ctx = _apply(cand, c.steps, loaded, calib, eval_windows, model_spec, work / f"c{next(built)}",
                         progress)
            r = evaluate(cand.model, rank_windows if rank else eval_windows, reference=reference, speed=False,
                         name=c.label, progress=False)
            kld, ppl_ratio = r.kld_mean, r.ppl / r.ref_ppl
            fields = {"ppl": r.ppl, "top1": r.top1, "kld_p99": r.kld_p99, "torch_size_bytes": r.size_bytes}
            if speed is not None:  # the types decide the speed: timed once per candidate
                fields.update({k: v for k, v in c.fields.items() if k.startswith("decode_")} or speed.measure(cand))
            seconds = time.perf_counter() - t0
            if not rank:
                c.kld, c.ppl_ratio = kld, ppl_ratio
                if _better(target, params, c, kept[0]):
                    ctx._reference_backend = reference
                    kept[:] = [c, ctx]  # the best so far stays in memory: the answer needs no rebuild
            del cand, ctx
            if cache_file:
                cache[key] = {"label": c.label, "kld": kld, "ppl_ratio": ppl_ratio, "seconds": seconds,
                              "fields": fields}
                with atomic_file(cache_file) as tmp:
                    Path(tmp).write_text(json.dumps({"settings": settings, "measured": cache}, indent=1))
        c.seconds += seconds
        if rank:
            c.rank_kld, c.rank_ppl_ratio = kld, ppl_ratio
            c.fields.update({k: v for k, v in fields.items() if k.startswith("decode_")},
                            **{f"rank_{k}": v for k, v in fields.items() if not k.startswith("decode_")})
        else:
            c.kld, c.ppl_ratio = kld, ppl_ratio
            c.fields.update(fields)
        if progress:
            fast = (f", decode {c.fields['decode_tok_s']:.0f} tok/s ({c.fields['decode_speedup']:.2f}x)"
                    if "decode_speedup" in c.fields else "")
            on = " on the ranking windows" if rank else ""
            print(f"  {c.label}: {c.size_bytes / 1e6:.2f} MB, KLD {kld:.4f}, PPL ratio {ppl_ratio:.3f}{on}{fast} "
                  f"({'measured before, resumed' if resumed else f'{seconds:.0f} s'})", flush=True)

    try:
        if target.is_budget:
            chosen = _choose_budget(target, fitting, methods, top, measure)
        else:
            chosen = _choose_floor(target, pool, methods, top, measure, grids)
            if pruning is not None:
                chosen = _cut_floor(target, pool, chosen, model, grids, pruning, n_layers, header, measure)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return {"candidates": pool, "front": pareto(pool), "chosen": chosen, "params": params,
            "context": kept[1] if kept[0] is chosen else None,
            "tokens": {"evaluation": _scored(eval_windows),
                       "ranking": _scored(rank_windows) if rank_windows is not None else None}}


def _scored(windows) -> int:
    return sum(w.n_scored for w in windows.values()) if isinstance(windows, dict) else windows.n_scored


def _better(target: Target, params: int, c: Candidate, best: Candidate | None) -> bool:
    """Whether ``c`` beats ``best`` as the answer: under a budget a lower KLD (among those
    that fit), under a floor a smaller file that meets it (a lower KLD at equal size)."""
    if target.is_budget:
        return target.fits(c.size_bytes, params) and target.fast(c) and (best is None or c.kld < best.kld)
    return target.passes(c) and (
        best is None or (c.size_bytes, c.kld) < (best.size_bytes, best.kld))


def _choose_budget(target: Target, fitting: list[Candidate], methods, top: int, measure) -> Candidate:
    """Under a budget: the lowest KLD among the candidates worth building (module docstring)
    that meet the speed limit (a configuration too slow under RTN is as slow calibrated: the
    types decide the speed)."""
    proxy = methods[0]
    best_embed = _largest_embedding(fitting, proxy)  # per grid, the largest embedding type that fits
    for c in fitting:
        if c.method is not None and c.embed != best_embed.get(c.grid, c).embed:
            c.why_not = f"a larger embedding fits with {c.grid}"
    ranked = []
    for c in sorted(best_embed.values(), key=lambda c: c.size_bytes):
        measure(c, rank=True)
        ranked.append(c)
    ranked = sorted((c for c in ranked if target.fast(c)), key=lambda c: c.score()[0])[:top]
    for r in ranked:  # the best ranked compete in the choice: measured on the whole evaluation
        measure(r)
    for m in methods[1:]:
        for r in ranked:
            measure(next(c for c in fitting if (c.grid, c.embed, c.method) == (r.grid, r.embed, m)))
    for c in fitting:
        if c.method is None:  # the mixed plan and the cuts
            measure(c)
        elif not c.measured and c.why_not is None:
            slow = next((r for r in fitting if r.method == proxy and (r.grid, r.embed) == (c.grid, c.embed)
                         and r.measured and not target.fast(r)), None)
            c.why_not = ("its configuration is too slow" if slow else
                         f"{proxy} ranked its configuration below the best {top}")
    ok = [c for c in fitting if c.kld is not None and target.fast(c)]
    if not ok:
        raise CompactorError(_too_slow(target, fitting))
    return min(ok, key=lambda c: c.kld)


def _largest_embedding(cands: list[Candidate], method: str) -> dict[str, Candidate]:
    """Per grid, the ``method`` candidate with the largest embedding type among ``cands``."""
    best: dict[str, Candidate] = {}
    for c in cands:
        if c.method == method and (c.grid not in best or c.size_bytes > best[c.grid].size_bytes):
            best[c.grid] = c
    return best


def _too_slow(target: Target, cands: list[Candidate]) -> str:
    fastest = max((c for c in cands if "decode_speedup" in c.fields), key=lambda c: c.fields["decode_speedup"])
    return (f"search: no candidate reaches a decode speed-up of {target.min_decode_speedup} (the fastest, "
            f"{fastest.label}, measured {fastest.fields['decode_speedup']:.2f}x the original's F16 decode)")


def _choose_floor(target: Target, pool: list[Candidate], methods, top: int, measure, grids) -> Candidate:
    """Under a floor: the smallest file measured to meet it (module docstring).

    The first method walks the grids smallest first, each with its largest embedding type
    (its best file), up to the first grid that meets the floor. A grid whose best file misses
    the floor's quality is not tried with a smaller embedding (it would only lose more — the
    budget search's assumption too). Then the configurations smaller than that answer, of the
    grids not ruled out, smallest first, up to the first that meets it."""
    proxy = methods[0]
    configs = [c for c in pool if c.method == proxy]
    best_of = _largest_embedding(configs, proxy)
    chosen, tried, ruled_out = None, [], set()

    def verdict(c: Candidate) -> bool:
        """Ranked, then measured in full when the ranking says it meets the floor or nearly."""
        measure(c, rank=True)
        tried.append(c)
        if c.kld is None and target.near(*c.score(), RANK_MARGIN):
            measure(c)
        return c.kld is not None and target.passes(c)

    for c in sorted(best_of.values(), key=lambda c: (c.size_bytes, c.grid)):
        if verdict(c):
            chosen = c
            break
        if not target.meets(*c.score()):
            ruled_out.add(c.grid)
    if chosen is not None:
        for c in sorted((c for c in configs if not c.measured and c.grid not in ruled_out
                         and c.size_bytes < chosen.size_bytes), key=lambda c: (c.size_bytes, c.grid)):
            if verdict(c):
                chosen = c
                break
    for c in pool:
        if not c.measured and c.grid in ruled_out and c.method == proxy:
            c.why_not = f"{c.grid} with its largest embedding misses the floor already"
    for m in methods[1:]:
        limit = chosen.size_bytes if chosen is not None else float("inf")
        closest = sorted((c for c in tried if c.size_bytes < limit and target.fast(c)),
                         key=lambda c: c.score()[0])[:top]
        for r in closest:
            c = next(c for c in pool if (c.grid, c.embed, c.method) == (r.grid, r.embed, m))
            measure(c)
            if target.passes(c) and (chosen is None or c.size_bytes < chosen.size_bytes):
                chosen = c
    for c in pool:
        if not c.measured and c.why_not is None:
            c.why_not = "not needed to prove the answer"
    if chosen is None and any(target.meets(c.kld, c.ppl_ratio) for c in pool if c.kld is not None):
        raise CompactorError(_too_slow(target, pool))
    if chosen is None:
        last = max((c for c in pool if c.measured), key=lambda c: c.size_bytes)
        kld, ppl = last.score()
        raise CompactorError("search: no candidate meets the quality floor (the largest tried, "
                             f"{last.label}, measured KLD {kld:.4f}, PPL ratio {ppl:.3f}; "
                             f"grids {', '.join(grids)})")
    return chosen


def _cut_floor(target, pool, chosen, model, grids, pruning, n_layers, header, measure) -> Candidate:
    """A larger grid cut below the chosen file's size may meet the floor too: smaller wins."""
    larger = [g for g in grids if grid_bytes(model, g, header=header) > chosen.size_bytes]
    cuts = [c for g in larger if (c := cut_to_fit(model, g, chosen.size_bytes - 1, pruning, n_layers, header))]
    pool += cuts
    for c in sorted(cuts, key=lambda c: c.size_bytes):
        measure(c)
        if target.passes(c) and c.size_bytes < chosen.size_bytes:
            chosen = c
    return chosen


def _apply(cand, steps: list[dict], original, calib, eval_windows, model_spec, work_dir: Path,
           progress: bool):
    """Apply recipe ``steps`` to ``cand`` (a LoadedModel holding a copy) in place, by the
    recipe runner's step dispatch; the original is the reference and the teacher of a
    healing distillation, the search's windows its calibration and evaluation text."""
    import time

    from compactor.recipe.runner import RunContext, apply_step
    from compactor.recipe.schema import Recipe

    recipe = Recipe.from_dict({"model": model_spec or "search-candidate", "reference": "original",
                               "stages": [{"name": "candidate", "steps": steps}]}, where="compactor search")
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(recipe=recipe, loaded=cand, work_dir=work_dir, _reference=original,
                     _calib_windows=calib, _eval_windows=eval_windows)
    ctx.stage = "candidate"
    for step in recipe.stages[0].steps:
        t0 = time.perf_counter()
        apply_step(ctx, step.config, progress=progress and step.name == "distill")  # training shows progress
        ctx.log.append({"stage": "candidate", "step": step.name, "seconds": round(time.perf_counter() - t0, 3)})
    return ctx
