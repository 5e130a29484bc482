"""The search's space: candidates as recipe data, with the deployed size each will have —
known before any work from the GGUF types' bits per weight (K-quants on rows they cannot
block take llama.cpp's fallback, as the exporter does) and the file's header.

Axes: the decoder linears' grid, the embedding's type (a tied head shares it), the method
(RTN, GPTQ, AWQ+GPTQ: :mod:`compactor.recipe.presets`), the measured-KL mixed-precision
plan at the budget, and depth cuts healed by distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compactor.errors import CompactorError

#: uniform grids searched by default (GGUF types compactor writes), smallest first
GRIDS = ("q2_k", "q3_k", "q4_0", "iq4_nl", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")
#: embedding (tied head) types searched by default
EMBED_TYPES = ("q4_0", "q5_0", "q8_0")
#: methods per grid, cheapest first: the first ranks configurations for the others.
#: AWQ+GPTQ is in the space on request (``methods=``, ``--methods rtn,gptq,awq+gptq``): on
#: SmolLM2 at 80 MB it took 953 s to GPTQ's 232 s for 0.8 % less KLD (``search.md``).
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Target:
    """What the search must meet: a budget (``max_size_mb`` / ``max_bpw``, minimise KLD) or
    a floor (``max_kld`` / ``max_ppl_ratio``, minimise size); with either, optionally
    ``min_decode_speedup``: llama.cpp decode tok/s over the original's at F16
    (:mod:`compactor.search_speed`)."""

    max_size_mb: float | None = None
    max_bpw: float | None = None
    max_kld: float | None = None
    max_ppl_ratio: float | None = None
    min_decode_speedup: float | None = None

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

    def near(self, kld: float, ppl_ratio: float, margin: float) -> bool:
        """Whether a measurement meets the floor loosened by ``margin`` (0.25: 25 % more KLD,
        25 % more PPL excess): one close enough that a noisier measurement must not decide it."""
        return ((self.max_kld is None or kld <= self.max_kld * (1 + margin))
                and (self.max_ppl_ratio is None or ppl_ratio - 1 <= (self.max_ppl_ratio - 1) * (1 + margin)))

    def fast(self, c: Candidate) -> bool:
        """Whether a measured candidate meets the speed limit (always, when there is none)."""
        return self.min_decode_speedup is None or c.fields.get("decode_speedup", 0.0) >= self.min_decode_speedup

    def passes(self, c: Candidate) -> bool:
        """A measured candidate meets the floor and the speed limit."""
        return self.meets(c.kld, c.ppl_ratio) and self.fast(c)


@dataclass
class Candidate:
    """One point of the space: steps (as recipe data), its predicted size, what it measured.
    ``grid`` / ``embed`` / ``method``: the uniform configuration (None for plans and cuts)."""

    label: str
    steps: list[dict]  # recipe steps, applied in order
    size_bytes: float
    kld: float | None = None  # on the evaluation windows (None: not measured there)
    ppl_ratio: float | None = None
    seconds: float = 0.0  # every build and measurement of it, ranking included
    rank_kld: float | None = None  # on the ranking windows, a subset (ordering only)
    rank_ppl_ratio: float | None = None
    fields: dict = field(default_factory=dict)
    grid: str | None = None
    embed: str | None = None
    method: str | None = None
    why_not: str | None = None  # why it was not built, when it was not

    def score(self) -> tuple[float, float]:
        """(KLD, PPL ratio): on the evaluation windows when measured there, else the ranking's."""
        return (self.kld, self.ppl_ratio) if self.kld is not None else (self.rank_kld, self.rank_ppl_ratio)

    @property
    def measured(self) -> bool:
        """Measured at all (on the evaluation windows or only on the ranking windows)."""
        return self.kld is not None or self.rank_kld is not None


def _bpw(name: str, in_features: int) -> float:
    from compactor.primitives.ggml import resolve_type

    return resolve_type(name, in_features)[0].bpw


def _linear_ids(model) -> set[int]:
    import torch

    from compactor.models.adapters import adapter_for, decoder_layers

    return {id(m.weight) for layer in decoder_layers(model, adapter_for(model)) for m in layer.modules()
            if isinstance(m, torch.nn.Linear)}


def grid_bytes(model, grid: str, embed_type: str = "q8_0", header: int = 0) -> float:
    """Deployed size of ``model`` with every decoder linear on ``grid`` and the embedding (a
    tied head once) on ``embed_type``: parameters x the types' bits per weight, norms and
    biases in float32, plus ``header`` bytes (:func:`compactor.export.gguf.header_bytes`)."""
    lin = _linear_ids(model)
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    total = float(header)
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in lin:
            total += p.numel() * _bpw(grid, p.shape[1]) / 8
        elif id(p) in tables:
            total += p.numel() * _bpw(embed_type, p.shape[1]) / 8
        else:
            total += p.numel() * 4
    return total


def planned_weights(model) -> tuple[int, float]:
    """(weights the mixed-precision budget covers — decoder linears, embedding, an untied
    head — and the bytes of everything else, in float32)."""
    lin = _linear_ids(model)
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    planned = other = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) in lin or id(p) in tables:
            planned += p.numel()
        else:
            other += p.numel() * 4
    return planned, float(other)


def layer_bytes(model, grid: str) -> float:
    """Deployed bytes of one decoder layer on ``grid`` (its linears; norms in float32)."""
    import torch

    from compactor.models.adapters import adapter_for, decoder_layers

    layer = decoder_layers(model, adapter_for(model))[0]
    lin = {id(m.weight) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    return sum(p.numel() * (_bpw(grid, p.shape[1]) / 8 if id(p) in lin else 4) for p in layer.parameters())


def uniform(model, grid: str, embed: str, method: str, header: int) -> Candidate:
    """``method`` on ``grid`` for every decoder linear, the embedding rounded to ``embed``
    first (so the calibrated methods see the embedding the file will hold)."""
    from compactor.recipe.presets import weight_steps

    steps = [{"embedding": {"grid": embed}}, *weight_steps(method, {"grid": grid})]
    return Candidate(f"{method} {grid}, embed {embed}", steps, grid_bytes(model, grid, embed, header),
                     grid=grid, embed=embed, method=method)


def mixed(model, budget: float, header: int, floor_bpw: float) -> Candidate | None:
    """The mixed-precision plan that fills ``budget`` bytes (the planner's bits per weight
    cover linears and the embedding; norms and the header come off first), then GPTQ."""
    planned, other = planned_weights(model)
    bpw = round((budget - header - other) * 8 / planned - 0.01, 2)  # the planner never exceeds it
    if bpw <= floor_bpw:
        return None
    return Candidate(f"mixed {bpw} bpw + gptq", [{"mixed_precision": {"target_bpw": bpw, "then": "gptq"}}],
                     bpw * planned / 8 + other + header)


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


def cut_to_fit(model, grid: str, limit: float, pruning: Pruning, n_layers: int, header: int = 0,
               embed: str = "q8_0") -> Candidate | None:
    """The cut with the fewest layers dropped that brings ``grid`` to ``limit`` bytes or less
    (None if ``grid`` fits whole or would need more than ``max_drop`` of the layers)."""
    whole = grid_bytes(model, grid, embed, header)
    over = whole - limit
    n = int(-(-over // layer_bytes(model, grid)))
    if over <= 0 or n > int(pruning.max_drop * n_layers):
        return None
    steps = [{"drop_layers": {"count": n, "metric": "block_influence"}},
             {"distill": {"teacher": "original", "student": "current", "ce": 0.5, "kl": 0.5,
                          "data": pruning.heal_data, "tokens": pruning.heal_tokens, "window": pruning.heal_window,
                          "batch": 8, "micro_batch": 4, "lr": 3.0e-4, "eval_data": pruning.eval_data,
                          "eval_tokens": pruning.heal_window}},
             {"embedding": {"grid": embed}},
             {"gptq": {"grid": grid}}]
    return Candidate(f"drop {n} + heal + gptq {grid}, embed {embed}", steps,
                     whole - n * layer_bytes(model, grid))
