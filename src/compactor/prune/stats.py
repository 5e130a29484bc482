"""Sparsity statistics per layer and overall, and the check run after every pruning step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactor.errors import CompactorError
from compactor.primitives.masks import parse_pattern


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, int]
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def _weight(module) -> torch.Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def sparsity_report(model, names: list[str] | None = None) -> list[LayerSparsity]:
    """Zero counts of every 2-D weight (or of the named modules), tied weights once."""
    rows, seen = [], set()
    items = ((n, model.get_submodule(n)) for n in names) if names is not None else model.named_modules()
    for name, mod in items:
        w = _weight(mod)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        rows.append(LayerSparsity(name, tuple(w.shape), int((w == 0).sum()), w.numel()))
    return rows


def overall(rows: list[LayerSparsity]) -> float:
    total = sum(r.numel for r in rows)
    return sum(r.zeros for r in rows) / total if total else 0.0


def check_pruned(model, names: list[str], cfg) -> dict:
    """Verify a pruning step did what it claims: every layer at its sparsity (layer/row
    scopes), the overall share (global scope), or N zeros in every group of M (N:M)."""
    rows = sparsity_report(model, names)
    nm = parse_pattern(cfg.pattern)
    for r in rows:
        w = _weight(model.get_submodule(r.name))
        if nm is not None:
            n, m = nm
            per_group = (w.detach().reshape(w.shape[0], -1, m) == 0).sum(-1)
            if bool((per_group < n).any()):
                raise CompactorError(f"{r.name}: {int((per_group < n).sum())} groups of {m} have fewer than {n} zeros")
        elif getattr(cfg, "scope", "layer") != "global" and r.zeros < cfg.min_zeros(tuple(w.shape)):
            raise CompactorError(f"{r.name}: sparsity {r.sparsity:.4f} is below the target {cfg.sparsity}")
    return summarize_pruned(rows, cfg)


def summarize_pruned(rows: list[LayerSparsity], cfg) -> dict:
    """Overall and per-matrix range of the sparsity rows of a pruning step (checked rows,
    possibly gathered layer by layer)."""
    nm = parse_pattern(cfg.pattern)
    got = overall(rows)
    if nm is None and getattr(cfg, "scope", "layer") == "global" and got + 1e-6 < cfg.sparsity:
        raise CompactorError(f"global sparsity {got:.4f} is below the target {cfg.sparsity}")
    return {"target_sparsity": round(cfg.target_sparsity, 6), "measured_sparsity": round(got, 6),
            "layers": len(rows), "min_layer": round(min(r.sparsity for r in rows), 6),
            "max_layer": round(max(r.sparsity for r in rows), 6)}


def format_report(rows: list[LayerSparsity]) -> str:
    """A plain table for ``compactor stats``."""
    lines = [f"{'module':<48} {'shape':>14} {'sparsity':>9}"]
    for r in rows:
        lines.append(f"{r.name:<48} {str(list(r.shape)):>14} {r.sparsity:>9.2%}")
    lines.append(f"{'overall (' + str(len(rows)) + ' matrices)':<48} {sum(r.numel for r in rows):>14,} "
                 f"{overall(rows):>9.2%}")
    return "\n".join(lines)
