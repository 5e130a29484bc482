"""Search: the best file under a size budget, or the smallest file that meets a quality floor.

The space is what compactor already builds — uniform GGUF grids by RTN and GPTQ, and the
measured-KL mixed-precision planner at the budget — each candidate made from a copy of the
original and scored against the reference's logits, computed once and cached on disk.
Cheapest first: every grid's size is known before any work (its bits per weight), so
candidates that cannot fit are never built; with a quality floor the grids are tried from
the smallest up and the search stops at the first that meets it with the best method
(every smaller grid already failed with that method: the answer is proven within the space).
The chosen candidate is written as a recipe (and, with ``out``, run by the recipe runner,
so ``compactor run DIR/recipe.yaml`` reproduces it).

With ``allow_pruning`` the space also holds depth cuts: the layers of least block influence
dropped, the cut model healed by a short distillation from the original (KL + CE on the
calibration text, never the evaluation text), then GPTQ on a grid. Only cuts that can
matter are built: under a budget, a grid that does not fit whole with the fewest layers
dropped that make it fit (up to ``max_drop`` of them); under a floor, once the smallest
passing grid is known, each larger grid cut to below that grid's size. Every candidate is
applied by the recipe runner's own step dispatch (:func:`compactor.recipe.runner.apply_step`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from compactor.errors import CompactorError

#: uniform grids searched by default (GGUF types compactor writes), smallest first
GRIDS = ("q2_k", "q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")


@dataclass(frozen=True)
class Target:
    """What the search must meet: a budget (``max_size_mb`` / ``max_bpw``, minimise KLD) or
    a floor (``max_kld`` / ``max_ppl_ratio``, minimise size)."""

    max_size_mb: float | None = None
    max_bpw: float | None = None
    max_kld: float | None = None
    max_ppl_ratio: float | None = None

    def __post_init__(self):
        budget = self.max_size_mb is not None or self.max_bpw is not None
        floor = self.max_kld is not None or self.max_ppl_ratio is not None
        if budget == floor:
            raise CompactorError("search: give a size budget (--max-size / --max-bpw) or a quality floor "
                                 "(--max-kld / --max-ppl-ratio), one of the two kinds")

    @property
    def is_budget(self) -> bool:
        return self.max_size_mb is not None or self.max_bpw is not None

    def budget_bytes(self, params: int) -> float:
        """The size budget in bytes (the tighter of ``max_size_mb`` and ``max_bpw``)."""
        return min(x for x in (self.max_size_mb and self.max_size_mb * 1e6,
                               self.max_bpw and self.max_bpw * params / 8) if x)

    def fits(self, size_bytes: float, params: int) -> bool:
        return ((self.max_size_mb is None or size_bytes / 1e6 <= self.max_size_mb)
                and (self.max_bpw is None or size_bytes * 8 / params <= self.max_bpw))

    def meets(self, kld: float, ppl_ratio: float) -> bool:
        return ((self.max_kld is None or kld <= self.max_kld)
                and (self.max_ppl_ratio is None or ppl_ratio <= self.max_ppl_ratio))


@dataclass
class Candidate:
    """One point of the space: a step (as recipe data) and what it measured."""

    label: str
    steps: list[dict]  # recipe steps, applied in order
    size_bytes: float
    kld: float | None = None
    ppl_ratio: float | None = None
    seconds: float = 0.0
    fields: dict = field(default_factory=dict)


def grid_bytes(model, grid: str, embed_type: str = "q8_0") -> float:
    """Deployed size of ``model`` with every decoder linear on ``grid`` and the embedding (a
    tied head once) on ``embed_type``: parameters x the types' bits per weight, norms and
    biases in float32 — known before any quantization."""
    import torch

    from compactor.models.adapters import adapter_for, decoder_layers
    from compactor.primitives.ggml import GGML_TYPES

    a = adapter_for(model)
    lin = {id(m.weight) for layer in decoder_layers(model, a) for n, m in layer.named_modules()
           if isinstance(m, torch.nn.Linear)}
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = 0.0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in lin:
            total += p.numel() * GGML_TYPES[grid].bpw / 8
        elif p is emb or p is head:
            total += p.numel() * GGML_TYPES[embed_type].bpw / 8
        else:
            total += p.numel() * 4
    return total


def layer_bytes(model, grid: str) -> float:
    """Deployed bytes of one decoder layer on ``grid`` (its linears; norms in float32)."""
    import torch

    from compactor.models.adapters import adapter_for, decoder_layers
    from compactor.primitives.ggml import GGML_TYPES

    layer = decoder_layers(model, adapter_for(model))[0]
    lin = {id(m.weight) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() * (GGML_TYPES[grid].bpw / 8 if id(p) in lin else 4) for p in layer.parameters())


def _uses(c: Candidate, name: str) -> bool:
    return any(name in st for st in c.steps)


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """The measured candidates no other beats on both size and KLD, smallest first."""
    done = sorted((c for c in cands if c.kld is not None), key=lambda c: (c.size_bytes, c.kld))
    front, best = [], float("inf")
    for c in done:
        if c.kld < best:
            front.append(c)
            best = c.kld
    return front


@dataclass(frozen=True)
class Pruning:
    """Depth cuts in the search: at most ``max_drop`` of the layers, each cut healed by
    ``heal_tokens`` of distillation on ``heal_data`` (the search fills in its calibration
    text when None); ``eval_data``, the distillation's own before/after scoring, is set by
    the search to its evaluation spec."""

    max_drop: float = 0.25
    heal_tokens: int = 65536
    heal_data: str | None = None
    heal_window: int = 256
    eval_data: str = "domains"


def _cut_to_fit(model, grid: str, limit: float, pruning: Pruning, n_layers: int) -> Candidate | None:
    """The cut with the fewest layers dropped that brings ``grid`` to ``limit`` bytes or less
    (None if ``grid`` fits whole or would need more than ``max_drop`` of the layers)."""
    over = grid_bytes(model, grid) - limit
    n = int(-(-over // layer_bytes(model, grid)))
    if over <= 0 or n > int(pruning.max_drop * n_layers):
        return None
    steps = [{"drop_layers": {"count": n, "metric": "block_influence"}},
             {"distill": {"teacher": "original", "student": "current", "ce": 0.5, "kl": 0.5,
                          "data": pruning.heal_data, "tokens": pruning.heal_tokens, "window": pruning.heal_window,
                          "batch": 8, "micro_batch": 4, "lr": 3.0e-4, "eval_data": pruning.eval_data,
                          "eval_tokens": pruning.heal_window}},
             {"gptq": {"grid": grid}}]
    return Candidate(f"drop {n} + heal + gptq {grid}", steps, grid_bytes(model, grid) - n * layer_bytes(model, grid))


def search(loaded, target: Target, calib, eval_windows, reference, grids=GRIDS,
           methods=("rtn", "gptq"), mixed: bool = True, progress: bool = True,
           pruning: Pruning | None = None, model_spec: str | None = None,
           calib_spec: str | None = None, eval_spec: str = "domains", work_dir=None) -> dict:
    """Run the search (see the module docstring) on ``loaded`` (a LoadedModel in memory).
    ``reference``: a cached backend of the original. ``pruning``: also try depth cuts
    (``model_spec`` names the original in their recipe; they heal on ``pruning.heal_data``,
    else ``calib_spec``). Returns {"candidates", "front", "chosen"}."""
    import dataclasses
    import itertools
    import tempfile
    import time

    from compactor.evaluate import evaluate
    from compactor.models.adapters import decoder_layers

    model = loaded.model
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    n_layers = len(decoder_layers(model, loaded.adapter))
    if pruning is not None:
        if (pruning.heal_data or calib_spec) is None:
            raise CompactorError("search: depth cuts are healed on text: give the calibration spec or heal_data")
        pruning = dataclasses.replace(pruning, heal_data=pruning.heal_data or calib_spec, eval_data=eval_spec)
    pool = [Candidate(f"{m} {g}", [{m: {"grid": g}}], grid_bytes(model, g)) for g in grids for m in methods]
    if mixed and target.is_budget:
        top = target.budget_bytes(params) * 8 / params  # bits per weight
        from compactor.primitives.ggml import GGML_TYPES
        from compactor.quant.mixed import MixedPrecisionConfig

        # The planner cannot go below its cheapest candidate grid.
        floor = min(GGML_TYPES[g].bpw for g in MixedPrecisionConfig().candidates)
        for bpw in (round(top - 0.05, 2), round(top - 0.3, 2)):  # the budget, and a margin under it
            if bpw <= floor:
                continue
            pool.append(Candidate(f"mixed {bpw} bpw + gptq",
                                  [{"mixed_precision": {"target_bpw": bpw, "then": "gptq"}}], bpw * params / 8))
    if pruning is not None and target.is_budget:
        limit = target.budget_bytes(params)
        pool += [c for g in grids if (c := _cut_to_fit(model, g, limit, pruning, n_layers))]
    fitting = [c for c in pool if not target.is_budget or target.fits(c.size_bytes, params)]
    if not fitting:
        small = min(pool, key=lambda c: c.size_bytes)
        raise CompactorError(f"search: no candidate fits the budget (the smallest, {small.label}, "
                             f"is {small.size_bytes / 1e6:.2f} MB, {small.size_bytes * 8 / params:.2f} bpw)")

    scratch = tempfile.TemporaryDirectory(prefix="compactor-search-") if work_dir is None else None
    work = Path(work_dir) if work_dir is not None else Path(scratch.name)

    built = itertools.count()  # one work directory per candidate built

    def measure(c: Candidate) -> None:
        t0 = time.perf_counter()
        cand = copy.copy(loaded)
        cand.model = copy.deepcopy(model)
        _apply(cand, c.steps, loaded, calib, eval_windows, model_spec, work / f"c{next(built)}", progress)
        r = evaluate(cand.model, eval_windows, reference=reference, speed=False, name=c.label, progress=progress)
        c.kld, c.ppl_ratio = r.kld_mean, r.ppl / r.ref_ppl
        c.fields = {"ppl": r.ppl, "top1": r.top1, "kld_p99": r.kld_p99, "torch_size_bytes": r.size_bytes}
        c.seconds = time.perf_counter() - t0
        del cand

    try:
        chosen = _choose(target, pool, fitting, methods, grids, measure, model, pruning, n_layers)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return {"candidates": pool, "front": pareto(pool), "chosen": chosen, "params": params}


def _choose(target, pool, fitting, methods, grids, measure, model, pruning, n_layers) -> Candidate:
    """Measure candidates cheapest first and return the choice (see the module docstring);
    a floor search with ``pruning`` adds its cuts to ``pool``."""
    chosen = None
    if target.is_budget:
        # Every fitting candidate, cheap methods first (RTN, then single-pass methods, then
        # depth cuts, which train); the lowest KLD wins.
        for c in sorted(fitting, key=lambda c: (_uses(c, "distill"), not _uses(c, "rtn"), -c.size_bytes)):
            measure(c)
        return min((c for c in fitting if c.kld is not None), key=lambda c: c.kld)
    best = methods[-1]  # the strongest method of the list decides whether a grid passes
    for c in sorted((c for c in fitting if _uses(c, best)), key=lambda c: c.size_bytes):
        measure(c)
        if target.meets(c.kld, c.ppl_ratio):
            chosen = c
            break
    if chosen is None:
        raise CompactorError("search: no candidate meets the quality floor (the largest grid, "
                             f"{grids[-1]}, measured KLD {c.kld:.4f}, PPL ratio {c.ppl_ratio:.3f})")
    if pruning is not None:
        # A larger grid cut below the chosen file's size may meet the floor too: smaller wins.
        larger = [g for g in grids if grid_bytes(model, g) > chosen.size_bytes]
        cuts = [c for g in larger if (c := _cut_to_fit(model, g, chosen.size_bytes - 1, pruning, n_layers))]
        pool += cuts
        for c in sorted(cuts, key=lambda c: c.size_bytes):
            measure(c)
            if target.meets(c.kld, c.ppl_ratio) and c.size_bytes < chosen.size_bytes:
                chosen = c
    return chosen


def _apply(cand, steps: list[dict], original, calib, eval_windows, model_spec, work_dir: Path,
           progress: bool) -> None:
    """Apply recipe ``steps`` to ``cand`` (a LoadedModel holding a copy) in place, by the
    recipe runner's step dispatch; the original is the reference and the teacher of a
    healing distillation, the search's windows its calibration and evaluation text."""
    from compactor.recipe.runner import RunContext, apply_step
    from compactor.recipe.schema import Recipe

    recipe = Recipe.from_dict({"model": model_spec or "search-candidate", "reference": "original",
                               "stages": [{"name": "candidate", "steps": steps}]}, where="compactor search")
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(recipe=recipe, loaded=cand, work_dir=work_dir, _reference=original,
                     _calib_windows=calib, _eval_windows=eval_windows)
    ctx.stage = "candidate"
    for step in recipe.stages[0].steps:
        apply_step(ctx, step.config, progress=progress and step.name == "distill")  # training shows progress


def front_table(result: dict) -> str:
    """The candidates as a Markdown table: size, bpw, KLD, PPL ratio, front and choice marked."""
    front = {id(c) for c in result["front"]}
    rows = ["| candidate | predicted MB | bpw | KLD | PPL ratio | s | |", "|---|---|---|---|---|---|---|"]
    for c in sorted(result["candidates"], key=lambda c: c.size_bytes):
        mark = "**chosen**" if c is result["chosen"] else ("front" if id(c) in front else "")
        rows.append(f"| {c.label} | {c.size_bytes / 1e6:.2f} | {c.size_bytes * 8 / result['params']:.2f} | "
                    + ("not built | | |" if c.kld is None else f"{c.kld:.4f} | {c.ppl_ratio:.3f} | {c.seconds:.0f} |")
                    + f" {mark} |")
    return "\n".join(rows)


def to_json(result: dict) -> str:
    def one(c):
        return {"label": c.label, "steps": c.steps, "size_bytes": c.size_bytes, "kld": c.kld,
                "ppl_ratio": c.ppl_ratio, "seconds": round(c.seconds, 1), **c.fields}

    return json.dumps({"params": result["params"], "chosen": one(result["chosen"]),
                       "front": [one(c) for c in result["front"]],
                       "candidates": [one(c) for c in result["candidates"]]}, indent=1)
