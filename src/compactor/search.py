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
    step: dict
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


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """The measured candidates no other beats on both size and KLD, smallest first."""
    done = sorted((c for c in cands if c.kld is not None), key=lambda c: (c.size_bytes, c.kld))
    front, best = [], float("inf")
    for c in done:
        if c.kld < best:
            front.append(c)
            best = c.kld
    return front


def search(loaded, target: Target, calib, eval_windows, reference, grids=GRIDS,
           methods=("rtn", "gptq"), mixed: bool = True, progress: bool = True) -> dict:
    """Run the search (see the module docstring) on ``loaded`` (a LoadedModel in memory).
    ``reference``: a cached backend of the original. Returns {"candidates", "front", "chosen"}."""
    import time

    from compactor.evaluate import evaluate

    model = loaded.model
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    pool = [Candidate(f"{m} {g}", {m: {"grid": g}}, grid_bytes(model, g)) for g in grids for m in methods]
    if mixed and target.is_budget:
        top = min(x for x in (target.max_bpw, target.max_size_mb and target.max_size_mb * 8e6 / params) if x)
        from compactor.primitives.ggml import GGML_TYPES
        from compactor.quant.mixed import MixedPrecisionConfig

        # The planner cannot go below its cheapest candidate grid.
        floor = min(GGML_TYPES[g].bpw for g in MixedPrecisionConfig().candidates)
        for bpw in (round(top - 0.05, 2), round(top - 0.3, 2)):  # the budget, and a margin under it
            if bpw <= floor:
                continue
            pool.append(Candidate(f"mixed {bpw} bpw + gptq", {"mixed_precision": {"target_bpw": bpw, "then": "gptq"}},
                                  bpw * params / 8))
    fitting = [c for c in pool if not target.is_budget or target.fits(c.size_bytes, params)]
    if not fitting:
        small = min(pool, key=lambda c: c.size_bytes)
        raise CompactorError(f"search: no candidate fits the budget (the smallest, {small.label}, "
                             f"is {small.size_bytes / 1e6:.2f} MB, {small.size_bytes * 8 / params:.2f} bpw)")

    def measure(c: Candidate) -> None:
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        _apply(m, c.step, calib, loaded.adapter)
        r = evaluate(m, eval_windows, reference=reference, speed=False, name=c.label, progress=progress)
        c.kld, c.ppl_ratio = r.kld_mean, r.ppl / r.ref_ppl
        c.fields = {"ppl": r.ppl, "top1": r.top1, "kld_p99": r.kld_p99, "torch_size_bytes": r.size_bytes}
        c.seconds = time.perf_counter() - t0
        del m

    chosen = None
    if target.is_budget:
        # Every fitting candidate, cheap methods first; the lowest KLD wins.
        for c in sorted(fitting, key=lambda c: (c.step.get("rtn") is None, -c.size_bytes)):
            measure(c)
        chosen = min((c for c in fitting if c.kld is not None), key=lambda c: c.kld)
    else:
        best = methods[-1]  # the strongest method of the list decides whether a grid passes
        for c in sorted((c for c in fitting if best in c.step), key=lambda c: c.size_bytes):
            measure(c)
            if target.meets(c.kld, c.ppl_ratio):
                chosen = c
                break
        if chosen is None:
            raise CompactorError("search: no candidate meets the quality floor (the largest grid, "
                                 f"{grids[-1]}, measured KLD {c.kld:.4f}, PPL ratio {c.ppl_ratio:.3f})")
    return {"candidates": pool, "front": pareto(pool), "chosen": chosen, "params": params}


def _apply(model, step: dict, calib, adapter) -> None:
    """Apply one step given as recipe data to ``model`` in place (the recipe's configs)."""
    from compactor.api import quantize_
    from compactor.calibration.sequential import run_sequential
    from compactor.quant.mixed import plan_mixed_precision
    from compactor.quant.plan import apply_planned
    from compactor.registry import lookup

    (name, kw), = step.items()
    entry = lookup(name)
    cfg = entry.config_cls.from_dict(kw)
    if name == "mixed_precision":
        apply_planned(model, calib, cfg, plan_mixed_precision, adapter=adapter, progress=False)
    elif getattr(cfg, "needs_calibration", False):
        run_sequential(model, calib, entry.handler, cfg, adapter=adapter, progress=False)
    else:
        quantize_(model, cfg)


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
        return {"label": c.label, "step": c.step, "size_bytes": c.size_bytes, "kld": c.kld,
                "ppl_ratio": c.ppl_ratio, "seconds": round(c.seconds, 1), **c.fields}

    return json.dumps({"params": result["params"], "chosen": one(result["chosen"]),
                       "front": [one(c) for c in result["front"]],
                       "candidates": [one(c) for c in result["candidates"]]}, indent=1)
