"""The memory plan of a run, printed before any work and enforced against a cap.

Estimated from the model's config (a meta-device skeleton, no weights loaded), the steps'
statistics and the calibration and evaluation windows:

* the model: every weight in float32 when held in memory, or — streamed — the largest
  decoder layer (with its calibration shadow and codes) plus the embedding / head while
  they are materialized;
* the reference of an in-memory run (a second model; a streamed run streams it too);
* statistics: the largest Hessian group of a layer with the solver's copies (GPTQ,
  SparseGPT), or per-column moments and row samples (Wanda, AWQ, SmoothQuant);
* calibration activations: one copy of every window's hidden states in the forward
  dtype, plus the replayed consumer inputs; with spilling, one batch;
* evaluation: one window's logits for both models (the reference's are cached on disk),
  and for a streamed model the final hidden states of every evaluation window;
* the process as it stands (interpreter, torch, transformers, tokenizer): measured.

A plan over its cap stops the run before anything is written (exit 2), saying what would
fit. Estimates are upper-bound-leaning; ``bench/results/scale.md`` compares them with the
measured peak RSS (the first version, without the loading and writer items, planned 1.39 GB
for a SmolLM2 GPTQ run that peaked at 2.00 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compactor.errors import CompactorError
from compactor.memory import available_bytes, fmt_bytes, parse_bytes
from compactor.models.adapters import Adapter, decoder_layers

_BATCH = 8  # the sequential runner's windows per forward pass


@dataclass
class MemoryPlan:
    """Named estimates in bytes, their total, and the cap they must fit."""

    items: list[tuple[str, int]]
    cap: int
    cap_source: str
    suggestions: list[str] = field(default_factory=list)
    #: item name -> phase: items of different phases are never in memory together (a
    #: streamed run materializes the embedding / head, or one decoder layer, not both)
    phases: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        common = sum(b for k, b in self.items if k not in self.phases)
        by_phase: dict[str, int] = {}
        for k, b in self.items:
            if k in self.phases:
                by_phase[self.phases[k]] = by_phase.get(self.phases[k], 0) + b
        return common + max(by_phase.values(), default=0)

    @property
    def fits(self) -> bool:
        return self.total <= self.cap

    def describe(self) -> str:
        w = max(len(k) for k, _ in self.items)
        lines = ["memory plan:"] + [f"  {k.ljust(w)}  {fmt_bytes(b):>10}"
                                    + (f"  [{self.phases[k]} phase]" if k in self.phases else "")
                                    for k, b in self.items]
        lines.append(f"  {'estimated peak RSS'.ljust(w)}  {fmt_bytes(self.total):>10}  "
                     f"(cap {fmt_bytes(self.cap)}, {self.cap_source}"
                     + ("; of each phase only the larger counts" if self.phases else "") + ")")
        return "\n".join(lines)

    def refusal(self) -> str:
        what = "; ".join(self.suggestions) or "a machine with more memory"
        return (f"the memory plan needs an estimated {fmt_bytes(self.total)}, over the cap of "
                f"{fmt_bytes(self.cap)} ({self.cap_source}); nothing was written. What would fit: {what}")

    def to_dict(self) -> dict:
        return {"items": dict(self.items), "phases": dict(self.phases), "total": self.total, "cap": self.cap,
                "cap_source": self.cap_source, "fits": self.fits}


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model, adapter: Adapter) -> tuple[int, int, int]:
    """(largest decoder layer, whole model, outside the layers) in parameters; a tied head
    counted once — by name, since a meta skeleton is not tied yet."""
    layers = decoder_layers(model, adapter)
    tied = f"{adapter.lm_head}.weight" if getattr(model.config, "tie_word_embeddings", False) else None
    total = sum({id(p): p.numel() for n, p in model.named_parameters() if n != tied}.values())
    return max(_numel(layer) for layer in layers), total, total - sum(_numel(layer) for layer in layers)


def plan_memory(model, adapter: Adapter, *, streamed: bool, statistics: set[str],
                calib: tuple[int, int] | None, eval_windows: tuple[int, int] | None,
                reference: bool, spill: bool = False, forward_bytes: int = 2,
                max_memory: str | int | None = None, base_rss: int | None = None) -> MemoryPlan:
    """The plan for ``model`` (a skeleton is enough). ``statistics``: what the calibrated
    steps observe ({"hessian", "inputs"}); ``calib`` / ``eval_windows``: (windows, tokens per
    window) or None; ``forward_bytes``: 2 for bf16 calibration forwards, 4 for float32."""
    import psutil

    cfg = model.config
    layers = decoder_layers(model, adapter)
    layer_params, total_params, outer = param_counts(model, adapter)
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    vocab = cfg.vocab_size
    heads = getattr(cfg, adapter.heads_key)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attn_width = heads * head_dim
    items: list[tuple[str, int]] = [("this process now (torch, transformers, tokenizer)",
                                     base_rss if base_rss is not None else psutil.Process().memory_info().rss)]
    # A streamed run holds one decoder layer with its statistics ("layer"), or the embedding /
    # head (capture, writing the outer parts, the evaluation's head: "outer"), never both.
    phases: dict[str, str] = {}

    def add(name: str, nbytes: int, phase: str | None = None) -> None:
        items.append((name, nbytes))
        if streamed and phase:
            phases[name] = phase

    if streamed:
        # float32 layer + its reduced-precision shadow + codes and dequantized copies
        add("largest decoder layer (streamed; float32, shadow, codes)", layer_params * 4 * 2, "layer")
        add("embedding / head while materialized (float32)", outer * 4, "outer")
    else:
        add("model weights in memory (float32)", total_params * 4)
        # transformers maps the checkpoint while the weights are copied out of it: both count
        add("loading: the mapped checkpoint beside the copies", total_params * 4)
        if reference:
            add("reference model in memory (float32)", total_params * 4)
    if "hessian" not in statistics:
        # Rounding a whole weight at once (RTN, and AWQ's and the pruners' final pass) takes
        # about four float32 copies of it (blocks, scales, rounded codes, dequantized): on the
        # 2-layer 8B-width cut, RSS swung ~1 GB per 4096 x 14,336 linear above a plan
        # without this item (2.78 GB measured against 2.12 planned). GPTQ and SparseGPT
        # round block by block; their solver copies are counted below.
        largest = max(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
        add("rounding the largest linear (float32 temporaries)", largest * 4 * 4, "layer")
    # The output writer spools tensors to disk as they are added; assembling a shard copies
    # through a 16 MiB buffer (models.checkpoint.ShardWriter).
    add("output writer: copy buffer", 16 << 20)
    if calib is not None and statistics:
        n, length = calib
        tokens = n * length
        if "hessian" in statistics:
            # float64 accumulator + its float32 Hessian while it is formed (the sum is then
            # freed); in the solve the shared Hessian, one owned copy and the factor/inverse
            # pair: about four float32 n x n at once (primitives.hessian, quant.gptq)
            add("largest Hessian with the solver's copies", max(hidden, inter, attn_width) ** 2 * 4 * 4, "layer")
            # While the inverse is formed the solver also holds the weight in float32 and its
            # column-permuted copy (quant.gptq): at 8B width the down projection's 4096 x
            # 14,336 is 0.47 GB for the two — the 2-layer 8B run's peak exceeded a plan
            # without this item by that much (bench/results/scale.md).
            add("the solved weight's float32 copies", 2 * hidden * inter * 4, "layer")
        else:
            add("per-column statistics and row samples", (hidden + inter) * 4 * 1024 * 2, "layer")
        per_token = (hidden + attn_width + inter) * forward_bytes
        act = tokens * per_token if not spill else _BATCH * length * per_token
        add("calibration activations" + (" (spilled: one batch)" if spill else ""), act)
        add("one forward batch's intermediates", _BATCH * length * (inter * 3 + hidden * 4) * 4, "layer")
    if eval_windows is not None:
        n, length = eval_windows
        from compactor.evaluate.backends import TorchBackend, chunk_rows

        # Small vocabularies take whole windows through the model's forward; larger ones are
        # scored chunk by chunk (evaluate.backends): the metrics take about 6 float32
        # temporaries of a chunk per model (log-softmax, exp, products).
        whole = length * vocab * 4
        rows = length if whole <= TorchBackend.MAX_WINDOW_BYTES else chunk_rows(vocab)
        add("evaluation: logits of one chunk of positions, both models",
            min(whole, rows * vocab * 4) * 2 + min(rows, chunk_rows(vocab)) * vocab * 4 * 6 * 2, "outer")
        if streamed:
            add("evaluation: final hidden states of every window", n * length * hidden * 4 * 2, "outer")
    cap, source = memory_cap(max_memory, items[0][1])
    plan = MemoryPlan(items, cap, source, phases=phases)
    if not plan.fits:
        plan.suggestions = _suggest(plan, streamed, spill, calib, eval_windows)
    return plan


def memory_cap(max_memory: str | int | None, process_bytes: int) -> tuple[int, str]:
    """(cap in bytes, where it came from): ``--max-memory``, or what is available now plus
    what this process already holds (``process_bytes``, the plan's first item)."""
    if max_memory is not None:
        return parse_bytes(max_memory), "--max-memory"
    return available_bytes() + process_bytes, "memory available now"


def _suggest(plan: MemoryPlan, streamed: bool, spill: bool, calib, eval_windows) -> list[str]:
    out = []
    by = dict(plan.items)
    over = plan.total - plan.cap
    if not streamed:
        out.append("--stream (weights read layer by layer from disk)")
    act = next((b for k, b in plan.items if k.startswith("calibration activations")), 0)
    if calib is not None and act and not spill:
        per_window = act / calib[0]
        keep = int((act - over) // per_window) if act > over else 0
        if keep >= 1:
            out.append(f"--samples {keep} (calibration windows; {calib[0]} asked)")
        out.append("--spill-activations (calibration activations on disk)")
    ev = by.get("evaluation: final hidden states of every window", 0)
    if eval_windows is not None and ev:
        out.append("a smaller evaluation set (--tokens) or --no-eval")
    return out


def plan_for_recipe(recipe, skeleton, adapter: Adapter) -> MemoryPlan:
    """The plan of a recipe run on ``skeleton`` (its model built on the meta device)."""
    from compactor.calibration.sequential import bf16_is_fast
    from compactor.data.windows import split_specs
    from compactor.registry import lookup_config

    stats: set[str] = set()
    calibrated = False
    for stage in recipe.stages:
        for step in stage.steps:
            cfg = step.config
            entry = lookup_config(cfg)
            if getattr(cfg, "needs_calibration", False) or entry.kind == "plan":
                calibrated = True
                stats.add(getattr(cfg, "statistic", "hessian"))
    c, e = recipe.calibration, recipe.eval
    n_eval = len(split_specs(e.data)) * max(1, e.tokens // e.window)
    evaluates = e.after_each_stage or any(s.name in ("evaluate", "export", "llamacpp_quantize")
                                          for st in recipe.stages for s in st.steps)
    return plan_memory(skeleton, adapter, streamed=recipe.stream, statistics=stats,
                       calib=(c.samples, c.window) if calibrated else None,
                       eval_windows=(n_eval, e.window) if evaluates else None,
                       reference=recipe.reference is not None and evaluates,
                       spill=recipe.spill_activations, forward_bytes=2 if bf16_is_fast() else 4,
                       max_memory=recipe.max_memory)


def check_plan(plan: MemoryPlan) -> None:
    """Raise (exit 2, nothing written) when ``plan`` is over its cap."""
    if not plan.fits:
        raise CompactorError(plan.refusal())
