"""The weight-quantization settings every method shares, and the grid they describe.

``grid``: ``int`` (``bits``, ``symmetric``, ``group_size``: -1 per channel, 0 per tensor,
g > 0 groups of g input columns), ``nf4`` (``group_size`` = block), or a GGUF block type
(``q4_0``, ``iq4_nl``, ``q4_k`` ...), whose block geometry is fixed by the format; K-quants on
rows that are not a multiple of 256 fall back as llama.cpp does, and every fallback is
reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from compactor.config import StepConfig, check
from compactor.errors import CompactorError
from compactor.primitives.ggml import GGML_TYPES, ggml_qparams, resolve_type
from compactor.primitives.grids import choose_qparams, nf4_qparams, resolve_block
from compactor.primitives.qparams import QParams

GRIDS = ("int", "nf4") + tuple(GGML_TYPES)


@dataclass(frozen=True)
class WeightQuantConfig(StepConfig):
    """Shared fields of weight-quantization steps."""

    grid: str = "int"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    search: bool | None = None  # ggml grids: importance-weighted scale search

    def validate(self) -> None:
        check(self.grid in GRIDS, f"{self.name}.grid: got {self.grid!r}, expected one of {', '.join(GRIDS)}")
        check(2 <= self.bits <= 8, f"{self.name}.bits: must be in 2..8, got {self.bits}")
        check(self.group_size >= -1, f"{self.name}.group_size: -1 (channel), 0 (tensor) or > 0, got {self.group_size}")


@dataclass(frozen=True)
class Grid:
    """A grid resolved for one weight shape: a fitter, a label and its fitting unit."""

    label: str  # e.g. "int4_sym_g128", "q4_k", "q5_0"
    fit: Callable[[torch.Tensor, torch.Tensor | None], QParams]
    unit: int  # columns fitted together (group, ggml block); whole width for per-tensor/channel
    bits_per_weight: float
    note: str | None = None  # a fallback, reported to the user


def resolve_grid(cfg: WeightQuantConfig, in_features: int, where: str = "") -> Grid:
    """The concrete grid ``cfg`` means for a weight with ``in_features`` columns."""
    if cfg.grid == "int":
        block = resolve_block(in_features, cfg.group_size, where)
        g = {-1: "ch", 0: "t"}.get(cfg.group_size, f"g{cfg.group_size}")
        label = f"int{cfg.bits}_{'sym' if cfg.symmetric else 'asym'}_{g}"
        # fp16 scale (+ zero point of `bits`) per group
        bpw = cfg.bits + (16 + (0 if cfg.symmetric else cfg.bits)) / block
        fit = lambda w, imp=None: choose_qparams(w, cfg.bits, cfg.symmetric, cfg.group_size)
        unit = in_features if cfg.group_size in (0, -1) else block
        return Grid(label, fit, unit, bpw)
    if cfg.grid == "nf4":
        block = resolve_block(in_features, cfg.group_size, where)
        fit = lambda w, imp=None: nf4_qparams(w, block)
        return Grid(f"nf4_g{block}", fit, block, 4 + 16 / block)
    t, note = resolve_type(cfg.grid, in_features)  # note is shared by all such modules
    fit = lambda w, imp=None: ggml_qparams(w, t.name, importance=imp, search=cfg.search)
    return Grid(t.name, fit, t.block_weights, t.bpw, note)


def check_weight(w: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf weights by name: quantizing them would silently corrupt the model."""
    bad = ~torch.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise CompactorError(f"{where or 'weight'}: {int(bad.sum())} non-finite value(s) "
                             f"(first at row {r}, column {c}); fix the checkpoint before quantizing")
